"""FD of the flow-matching digits model at each number of Euler steps (``docs/digits/flow_steps.md``).

    PYTHONPATH=$PWD python examples/digits_flow_steps.py
    PYTHONPATH=$PWD python examples/digits_flow_steps.py --shift 1 3 --steps 50 10 4   # compare shifts

1,000 samples (labels 0-9 in turn) from the same noise (seed 0), CFG 1 by default, sampled
with ``FlowMatchEulerDiscreteScheduler`` at each step count. Columns: Frechet distance to the
1,797 real digits in the classifier's feature space, the classifier's accuracy on the requested
labels, and the PSNR against the run with the most steps (same noise). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tabulate import tabulate

from digits_eval import (
    FLOW_DIR, accuracy, classifier_outputs, flow_metadata, flow_sample, flow_scheduler, frechet_distance,
    gaussian_stats, load_classifier, load_digit_images, load_flow_dit, psnr,
)  # fmt: skip

STEPS = (50, 20, 10, 8, 7, 6, 5, 4)


def measure(transformer, label_embedding, steps=STEPS, shifts=(None,), samples=1000, seed=0, guidance=1.0,
            classifier=None, real_stats=None) -> list[dict]:  # fmt: skip
    """One row per (shift, steps): FD, accuracy, PSNR against the most-step run of that shift."""
    classifier = classifier or load_classifier()
    if real_stats is None:
        real_stats = gaussian_stats(classifier_outputs(classifier, load_digit_images()[0])[0])
    noise = torch.randn(samples, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(samples) % 10
    rows = []
    for shift in shifts:
        sched = flow_scheduler(shift)
        ref = None
        for n in sorted(steps, reverse=True):
            x = flow_sample(transformer, label_embedding, noise, labels, n, guidance, sched)
            ref = x if ref is None else ref
            feats, preds = classifier_outputs(classifier, x)
            fd = frechet_distance(gaussian_stats(feats), real_stats)
            rows.append(dict(shift=sched.config.shift, steps=n, fd=fd, acc=accuracy(preds, labels),
                             psnr=psnr(x, ref) if x is not ref else float("inf")))  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    ref = {r["shift"]: max(q["steps"] for q in rows if q["shift"] == r["shift"]) for r in rows}
    body = [
        [f"{r['shift']:g}", r["steps"], f"{r['fd']:.2f}", f"{r['acc']:.1%}",
         "ref" if r["psnr"] == float("inf") else f"{r['psnr']:.2f} vs {ref[r['shift']]}"]
        for r in rows
    ]  # fmt: skip
    return tabulate(body, headers=["shift", "Euler steps", "FD", "accuracy", "PSNR dB"], tablefmt="github")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=FLOW_DIR, help="flow model folder (diffusers layout)")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--shift", type=float, nargs="+", default=[None], help="scheduler shift (default: its config)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    transformer, label_embedding = load_flow_dit(args.model)
    rows = measure(transformer, label_embedding, args.steps, args.shift, args.samples, args.seed, args.guidance)
    meta = flow_metadata(args.model)
    print(f"{args.samples} samples, labels 0-9 in turn, seed {args.seed}, CFG {args.guidance:g}; "
          f"model {args.model} ({meta.get('steps')} steps, sigma {meta.get('sigma_sampling')}, "
          f"train shift {meta.get('train_shift')}); {time.perf_counter() - start:.0f} s\n")  # fmt: skip
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
