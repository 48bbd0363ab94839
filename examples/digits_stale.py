"""Why the learned 50% gates lose: chained reuse. Two untrained 50% patterns at 20 steps.

    PYTHONPATH=$PWD python examples/digits_stale.py

"steps 1-10" reuses every branch on ten steps in a row (what the fitted gates do, see the
heatmap), so step 10 still uses step 0's branch outputs; "odd steps" never reuses an output
older than one step (the regime ``lazypass.fit`` trains for). Same noise and measures as the
main job (1,000 samples, CFG 1, PSNR against full compute at 20 steps).
"""

import torch

import digits
from digits_eval import (
    classifier_outputs, frechet_distance, gaussian_stats, load_classifier, load_digit_images, load_dit, psnr,
)  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    model, classifier = load_dit(), load_classifier()
    real, _ = load_digit_images()
    real_stats = gaussian_stats(classifier_outputs(classifier, real)[0])
    noise = torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(1000) % 10
    sampler = digits.Sampler(model)
    full, static = digits.METHODS[0], digits.METHODS[2]
    ref = sampler.run(full, noise, labels, 1.0).images
    patterns = {"steps 1-10": [1 <= i <= 10 for i in range(20)], "odd steps": digits.static_skips(20, 0.5)}
    original = digits.static_skips
    for name, pattern in patterns.items():
        digits.static_skips = lambda steps, ratio, pattern=pattern: pattern
        run = sampler.run(static, noise, labels, 1.0)
        feats, _ = classifier_outputs(classifier, run.images)
        fd = frechet_distance(gaussian_stats(feats), real_stats)
        print(f"{name:>10}: lazy {run.skipped.mean():.0%}  FD {fd:.2f}  PSNR {psnr(run.images, ref):.2f} dB")
    digits.static_skips = original


if __name__ == "__main__":
    main()
