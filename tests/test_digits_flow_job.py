"""The flow-matching section of the main job (examples/digits_flow_job.py): committed gates fitted
through FlowMatchEulerDiscreteScheduler, equal-MACs pairs, a smoke run on a few samples."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import digits_flow_job as job  # noqa: E402
import lazypass  # noqa: E402
from tests.test_flow_digits import one_thread  # noqa: E402, F401 (autouse: tests run on one thread)
from digits_eval import load_flow_dit  # noqa: E402
from lazypass.checkpoint import read_gates  # noqa: E402


def test_committed_gates_exist_for_every_lazy_method():
    for m in job.METHODS:
        if m.kind == "lazy":
            saved = read_gates(job.gates_path(m.ratio, m.steps))
            assert 0.0 < saved.threshold < 1.5, saved.threshold  # calibrated by fit


def test_section_smoke(tmp_path):
    r = job.main(["--samples", "20", "--latency-images", "1", "--latency-repeats", "1", "--threads", "1",
                  "--out", str(tmp_path)])  # fmt: skip
    table = (tmp_path / "flow_table.md").read_text()
    assert all(f"| {m.name} " in table for m in job.METHODS)
    for m in job.METHODS:
        assert r[m.name]["latency"] > 0 and 0 <= r[m.name]["fd"] < 1e4
    # the static baseline skips exactly its schedule: 4 of 8 steps, 2 of 7 (steps 3 and 6)
    assert r["static-50%-8"]["lazy"] == 0.5 and r["static-30%-7"]["lazy"] == pytest.approx(2 / 7)
    # equal compute, the premise of the pairs: Euler-4 is half of full-8 and the static run at
    # 50% costs about as much; Euler-5 is 5/7 of full-7 and static 30% about as much
    assert r["Euler-4"]["macs"] == pytest.approx(r["full-8"]["macs"] / 2)
    assert r["Euler-5"]["macs"] == pytest.approx(r["full-7"]["macs"] * 5 / 7)
    for lazy, euler in (("static-50%-8", "Euler-4"), ("static-30%-7", "Euler-5")):
        assert abs(r[lazy]["macs"] / r[euler]["macs"] - 1) < 0.05, (lazy, r[lazy]["macs"], r[euler]["macs"])
    # the fitted gates' thresholds were set to the Euler run's MACs on calibration noise: on
    # samples that noise never saw they cost about as much
    for lazy, euler in (("lazy-50%-8", "Euler-4"), ("lazy-30%-7", "Euler-5")):
        assert abs(r[lazy]["macs"] / r[euler]["macs"] - 1) < 0.1, (lazy, r[lazy]["macs"], r[euler]["macs"])
    # gap closed is the rule (FD_Euler - FD_method) / (FD_Euler - FD_full)
    g = (r["Euler-4"]["fd"] - r["static-50%-8"]["fd"]) / (r["Euler-4"]["fd"] - r["full-8"]["fd"])
    assert r["static-50%-8"]["gap"] == pytest.approx(g)


def test_fit_gates_goes_through_the_flow_scheduler(tmp_path):
    """Two optimiser steps: the file loads into a fresh lazy copy and records the calibrated threshold."""
    transformer, labels = load_flow_dit()
    path = tmp_path / "g.safetensors"
    info = job.fit_gates(transformer, labels, 0.5, 4, path, 0.5, steps=2, calibration_batches=1)
    assert path.exists() and info["lazy_ratio"] is not None
    assert abs(info["macs_fraction"] - 0.5) < 0.1, info  # the threshold was moved to half the MACs
    lazy = lazypass.apply(transformer)
    lazypass.load_gates(lazy, path)
    assert read_gates(path).threshold == pytest.approx(info["threshold"])
