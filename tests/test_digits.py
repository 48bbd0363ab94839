"""The digits demo: checkpoints reproduce a recorded sample, measures, a smoke run of the main job.

Record the fixture again after retraining with ``PYTHONPATH=$PWD python tests/test_digits.py``.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import digits  # noqa: E402
from digits_eval import (  # noqa: E402
    CLASSIFIER_PATH, DIT_PATH, frechet_distance, gaussian_stats, load_classifier, load_digit_images,
    load_dit, psnr,
)  # fmt: skip
from lazypass.sampling import ddim_sample  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "digits_sample.json"


def _recorded_sample() -> dict:
    torch.manual_seed(0)  # nothing random should depend on it; the noise has its own generator
    model, classifier = load_dit(), load_classifier()
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    labels = torch.tensor([0, 3, 7, 9])
    x = ddim_sample(model, noise, 10, cond=labels, learned_sigma=False)
    real, _ = load_digit_images()
    with torch.no_grad():
        logits = classifier(real[:4])
    return {
        "sample_mean": x.mean().item(),
        "sample_std": x.std().item(),
        "sample_values": x.flatten()[::16].tolist(),
        "classifier_logits": logits.flatten()[:12].tolist(),
        "predicted": classifier(x.clamp(-1, 1)).argmax(1).tolist(),
    }


def test_checkpoints_reproduce_recorded_sample():
    assert DIT_PATH.stat().st_size < 5 * 2**20 and CLASSIFIER_PATH.stat().st_size < 5 * 2**20
    want = json.loads(FIXTURE.read_text())
    with torch.no_grad():
        got = _recorded_sample()
    for key in ("sample_mean", "sample_std"):
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    np.testing.assert_allclose(got["sample_values"], want["sample_values"], atol=1e-4)
    np.testing.assert_allclose(got["classifier_logits"], want["classifier_logits"], atol=1e-4)
    assert got["predicted"] == want["predicted"] == [0, 3, 7, 9]  # the DiT draws the digits asked for


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = (np.array([0.0, 1.0]), np.diag([1.0, 4.0]))
    b = (np.array([1.0, 1.0]), np.diag([4.0, 9.0]))
    # diagonal covariances: |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2 = 1 + 1 + 1
    assert frechet_distance(a, b) == pytest.approx(3.0, abs=1e-9)
    x = rng.normal(size=(4000, 3))
    assert frechet_distance(gaussian_stats(x), gaussian_stats(x)) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(gaussian_stats(x), gaussian_stats(x + 1.0)) == pytest.approx(3.0, abs=1e-6)


def test_psnr():
    ref = torch.zeros(2, 1, 8, 8)
    assert psnr(ref + 0.2, ref) == pytest.approx(10 * math.log10(4 / 0.04), rel=1e-6)


def test_static_schedule():
    assert [i for i, s in enumerate(digits.static_skips(20, 0.5)) if s] == list(range(1, 20, 2))
    assert [i for i, s in enumerate(digits.static_skips(10, 0.3)) if s] == [3, 6, 9]


def test_main_job_smoke(tmp_path):
    results = digits.main(["--samples", "10", "--guidance", "1", "--latency-images", "1",
                           "--latency-repeats", "1", "--threads", "1", "--out", str(tmp_path)])  # fmt: skip
    r = results[1.0]
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {m.name} " in table for m in digits.METHODS)
    for name in ("grid.png", "heatmap.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the static baseline skips exactly its schedule; the fitted gates land near their target
    # ratio on samples their calibration never saw
    assert r["static-50%-20"]["lazy"] == 0.5 and r["static-30%-10"]["lazy"] == pytest.approx(0.3)
    assert abs(r["lazy-50%-20"]["lazy"] - 0.5) <= 0.08 and abs(r["lazy-30%-10"]["lazy"] - 0.3) <= 0.08
    # equal compute, the premise of the comparison: a 50% lazy 20-step run costs about DDIM-10,
    # a 30% lazy 10-step run about DDIM-7 (branches hold ~99% of the MACs)
    for lazy, ddim in (("lazy-50%-20", "DDIM-10"), ("static-50%-20", "DDIM-10"), ("lazy-30%-10", "DDIM-7"),
                       ("static-30%-10", "DDIM-7"), ("lazy-50%-20 over UniPC", "UniPC-10"),
                       ("lazy-30%-10 over UniPC", "UniPC-7")):
        assert abs(r[lazy]["macs"] / r[ddim]["macs"] - 1) < 0.05, (lazy, r[lazy]["macs"], r[ddim]["macs"])
    # reusing one-step-old branch outputs stays closer to full compute than halving the steps
    # (the static rows of the study, here on 10 samples)
    assert r["static-50%-20"]["psnr"] > r["DDIM-10"]["psnr"] > 20
    assert r["static-30%-10"]["psnr"] > r["DDIM-7"]["psnr"] > 20
    # "gap closed" is the evaluation rule (FD_DDIM - FD_method) / (FD_DDIM - FD_full)
    fd = {name: v["fd"] for name, v in r.items()}
    assert r["lazy-50%-20"]["gap"] == pytest.approx((fd["DDIM-10"] - fd["lazy-50%-20"]) / (fd["DDIM-10"] - fd["full-20"]))


if __name__ == "__main__":
    FIXTURE.parent.mkdir(exist_ok=True)
    with torch.no_grad():
        FIXTURE.write_text(json.dumps(_recorded_sample(), indent=1) + "\n")
    print(f"wrote {FIXTURE}")
