"""Issue 13: the DiT digits model converted to diffusers (output parity), and ``benchmarks/peers.py
--quick`` on a subset (every method gives finite images; the tables are complete)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tests.test_flow_digits import one_thread  # noqa: E402, F401 (autouse: tests run on one thread)
from digits_eval import DIT_CONFIG, diffusers_ddim, load_dit, to_diffusers_dit  # noqa: E402
from lazypass.models import DiT  # noqa: E402
from lazypass.sampling import ddim_sample  # noqa: E402


def _inputs(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 11, (n,), generator=g)  # includes the null class
    return x, t, y


@pytest.mark.parametrize("which", ["trained", "random"])
def test_diffusers_dit_matches_the_reference_dit(which):
    """Same outputs for the trained digits DiT and a random one (non-zero adaLN everywhere):
    measured max abs difference 0 (the same float32 ops in the same order)."""
    model = load_dit() if which == "trained" else DiT(**DIT_CONFIG, init="random").eval()
    converted = to_diffusers_dit(model)
    assert type(converted).__name__ == "DiTTransformer2DModel"
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        out = converted(x, timestep=t, class_labels=y, return_dict=False)[0]
    assert (out - ref).abs().max() <= 1e-5, float((out - ref).abs().max())
    # diffusers' own timestep frequencies would not match: the conversion has to set them
    for block in converted.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 1
    with torch.no_grad():
        other = converted(x, timestep=t, class_labels=y, return_dict=False)[0]
    assert (other - ref).abs().max() > 1e-3


def test_diffusers_ddim_is_lazypass_ddim():
    """The converted model under diffusers' DDIMScheduler samples what lazypass's DDIM samples
    from the reference model (float32 steps against float64: <= 1e-4)."""
    model = load_dit()
    converted = to_diffusers_dit(model)
    x, _, _ = _inputs(8)
    labels = torch.arange(8)
    sched = diffusers_ddim()
    sched.set_timesteps(10)
    out = x
    with torch.no_grad():
        for t in sched.timesteps:
            eps = converted(out, timestep=t.expand(8), class_labels=labels, return_dict=False)[0]
            out = sched.step(eps, t, out).prev_sample
        ref = ddim_sample(model, x, 10, cond=labels, learned_sigma=False)
    assert (out - ref).abs().max() <= 1e-4


def test_quick_benchmark_runs_every_method(tmp_path):
    """The quick mode on the flow model (both models with ``-m slow``): every method and setting
    gives finite images, every row has its numbers, the tables and plots are written."""
    _quick(tmp_path, ["flow"])


@pytest.mark.slow
def test_quick_benchmark_both_models(tmp_path):
    _quick(tmp_path, ["dit", "flow"])


@pytest.mark.slow
def test_default_run_measures_latency_after_the_parallel_quality_parts(tmp_path):
    """``--jobs 2`` (the default of a full run): one process per model for the quality part, then
    latency and batch vs one here, from their merged results; one command in the page."""
    import peers

    out = peers.main(["--quick", "--jobs", "2", "--samples", "16", "--threads", "1", "--latency-repeats", "1",
                      "--latency-images", "1", "--scratch", str(tmp_path / "scratch"), "--out", str(tmp_path)])
    assert set(out["results"]) == {"dit", "flow"}
    assert peers.specs()["dit"].tail  # DiT's tail methods ran in a third process and were merged back
    for res in out["results"].values():
        assert res["samples"] == 16
        methods = [r["method"] for r in res["rows"]]
        assert set(methods) == set(peers.METHODS) and methods == sorted(methods, key=peers.METHODS.index)
        assert [c["method"] for c in res["correctness"]] == list(peers.METHODS)
        assert res["full"]["method"] == "fewer steps" and res["full"]["fraction"] == 1.0
        assert all(r["latency_b1"] is not None and r["fd"] is not None for r in res["rows"])
        assert all(math.isfinite(c["batch_vs_one"]) for c in res["correctness"])
    meta = json.loads((tmp_path / "peers" / "results.json").read_text())["meta"]
    assert meta["command"].count("benchmarks/peers.py") == 1
    assert "3 processes" in meta["conditions"] and "2 at once" in meta["conditions"]
    assert meta["headline"] == out["meta"]["headline"]


def _quick(tmp_path, models):
    """The quality part on its own (no latency), then ``--quality-from`` on its results: latency and
    the correctness checks, FD / PSNR / MACs read back unchanged; and a mismatch refused."""
    import peers

    common = ["--quick", "--models", *models, "--threads", "1", "--scratch", str(tmp_path / "scratch")]
    first = peers.main([*common, "--samples", "32", "--out", str(tmp_path / "quality"), "--latency-repeats", "0"])
    saved_path = tmp_path / "quality" / "peers" / "results.json"
    out = peers.main([*common, "--out", str(tmp_path), "--quality-from", str(saved_path),
                      "--latency-repeats", "1", "--latency-images", "1"])  # fmt: skip
    expected = {"fewer steps", "lazypass", "fixed copy", "fixed forecast", "FirstBlockCache", "TaylorSeer",
                "MagCache", "PAB", "FasterCache", "SeaCache"}  # fmt: skip
    for name in models:
        res = out["results"][name]
        rows = res["rows"]
        assert res["samples"] == 32
        assert {r["method"] for r in rows} == expected
        before = first["results"][name]["rows"]
        assert [(r["method"], r["knob"], r["fd"], r["psnr"], r["macs"]) for r in rows] == [
            (r["method"], r["knob"], r["fd"], r["psnr"], r["macs"]) for r in before]  # fmt: skip
        assert all(r["latency_b1"] is None for r in before)
        for r in rows:
            assert r["finite"], r
            for key in ("fd", "fd_full", "macs", "batch_macs", "fraction", "latency_b1", "latency_b8"):
                assert r[key] is not None and math.isfinite(r[key]), (r["method"], key, r[key])
            assert 0.0 < r["fraction"] <= 1.0 + 1e-6, r
        assert {c["method"] for c in res["correctness"]} == expected
        assert all(math.isfinite(c["batch_vs_one"]) for c in res["correctness"])
        lazy = next(c for c in res["correctness"] if c["method"] == "lazypass")
        assert lazy["batch_vs_one"] <= 1e-4  # lazypass: a sample's result never depends on its batch
        for budget, table in res["tables"].items():
            assert set(table["values"]) == expected  # every method is in every table (value or None)
    text = (tmp_path / "peers.md").read_text()
    for name in models:
        assert out["results"][name]["title"] in text
    for method in expected:
        assert method in text
    assert "About 50% of full compute" in text and "About 70% of full compute" in text
    assert (tmp_path / "peers" / "fd_vs_macs.png").stat().st_size > 0
    assert (tmp_path / "peers" / "fd_vs_latency.png").stat().st_size > 0
    saved = json.loads((tmp_path / "peers" / "results.json").read_text())
    assert saved["meta"]["headline"].startswith("headline: lazypass FD rank")
    assert saved["meta"]["command"].count("benchmarks/peers.py") == 2  # the quality run's command, then this one
    # the page is written again from the saved results, nothing run, word for word
    again = peers.main(["--from-json", str(tmp_path / "peers" / "results.json"), "--out", str(tmp_path / "again")])
    assert again["meta"]["headline"] == saved["meta"]["headline"]
    assert (tmp_path / "again" / "peers.md").read_text() == text
    # an earlier run of other settings is refused, saying what differs
    other = json.loads(saved_path.read_text())
    other["results"][models[0]]["spec"]["sweeps"]["PAB"] = [9]
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other settings.*sweeps"):
        peers.main([*common, "--out", str(tmp_path / "bad"), "--quality-from", str(bad)])
    with pytest.raises(SystemExit, match="other settings.*samples"):
        peers.main([*common, "--samples", "16", "--out", str(tmp_path / "bad"), "--quality-from", str(saved_path)])
