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


def test_main_job_smoke(tmp_path, capsys):
    results = digits.main(["--samples", "10", "--guidance", "1", "--latency-images", "1",
                           "--latency-repeats", "1", "--threads", "1", "--out", str(tmp_path)])  # fmt: skip
    r = results[1.0]
    out = capsys.readouterr().out
    assert "gap closed" in out and "headline" in out
    for name in ("grid.png", "heatmap.png", "table.md"):
        assert (tmp_path / name).stat().st_size > 1000
    # full compute at 10 steps is DDIM-10; full at T is its own PSNR reference
    assert r["full-10"]["fd"] == r["DDIM-10"]["fd"] and math.isinf(r["full-20"]["psnr"])
    assert r["static-50%-20"]["lazy"] == 0.5 and r["static-30%-10"]["lazy"] == pytest.approx(0.3)
    assert 0.1 < r["lazy-50%-20"]["lazy"] < 0.9 and 0.05 < r["lazy-30%-10"]["lazy"] < 0.6
    assert r["lazy-50%-20"]["macs"] < r["full-20"]["macs"] and r["DDIM-10"]["macs"] == r["full-20"]["macs"] / 2
    assert r["DDIM-7"]["macs"] == pytest.approx(r["full-10"]["macs"] * 0.7)
    assert all(r[m.name]["latency"] > 0 for m in digits.METHODS)
    assert 5 < r["lazy-50%-20"]["psnr"] < 80


if __name__ == "__main__":
    FIXTURE.parent.mkdir(exist_ok=True)
    with torch.no_grad():
        FIXTURE.write_text(json.dumps(_recorded_sample(), indent=1) + "\n")
    print(f"wrote {FIXTURE}")
