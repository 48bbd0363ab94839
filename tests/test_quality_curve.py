"""``benchmarks/quality_curve.py``: the equal-MAC arithmetic, and a smoke run of its quick mode."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality_curve as qc  # noqa: E402


def test_interpolation_inside_the_measured_range_only():
    pts = {1.0: 10.0, 3.0: 4.0}
    assert qc.interp(pts, 2.0) == pytest.approx(7.0)
    assert qc.interp(pts, 3.0) == pytest.approx(4.0)
    assert math.isnan(qc.interp(pts, 0.5)) and math.isnan(qc.interp(pts, 3.5))


def test_ddim_coefficients():
    c = qc.ddim_coefficients(10)
    assert c.shape == (10,) and (c > 0).all()
    assert c[0] > c[-2]  # early (noisy) steps move x more per unit of eps error


def test_summary_gap_closed():
    es = [qc.Entry("DDIM-5", "DDIM", 5), qc.Entry("DDIM-10", "DDIM", 10), qc.Entry("lazy", "x", 10, 0.5, "fixed")]
    results = {}
    for seed, (f5, f10, f) in enumerate([(30.0, 10.0, 15.0), (32.0, 12.0, 17.0)]):
        results[("DDIM-5", seed)] = dict(seed=seed, fd=f5, macs=5.0, lazy=0.0)
        results[("DDIM-10", seed)] = dict(seed=seed, fd=f10, macs=10.0, lazy=0.0)
        results[("lazy", seed)] = dict(seed=seed, fd=f, macs=5.0, lazy=0.5, psnr=30.0, psnr_ref="DDIM-10")
    rows = {r["entry"].name: r for r in qc.summarize(es, results, [0, 1])}
    lazy = rows["lazy"]
    assert lazy["ddim_eq"][0] == pytest.approx(31.0)  # DDIM at the same MACs: 5 steps
    assert lazy["gap"][0] == pytest.approx(0.75) and lazy["gap"][1] == pytest.approx(0.0)  # (30-15)/(30-10)
    assert "0.75 ± 0.00" in qc.table(list(rows.values()))


def test_side_by_side_pairs_learned_and_fixed_by_seed():
    es = [qc.Entry("DDIM-10", "DDIM", 10), qc.Entry("DDIM-20", "DDIM", 20),
          qc.Entry("spread-forecast 75%/20", "spread-forecast", 20, 0.75, "fixed"),
          qc.Entry("learned 75%/20", "learned", 20, 0.75, "learned")]  # fmt: skip
    results = {}
    for seed, (full, fixed, learned) in enumerate([(20.0, 26.0, 24.0), (22.0, 30.0, 27.0)]):
        for name, fd, macs in (("DDIM-10", 40.0, 10.0), ("DDIM-20", full, 20.0), ("spread-forecast 75%/20", fixed, 10.0),
                               ("learned 75%/20", learned, 10.0)):  # fmt: skip
            results[(name, seed)] = dict(seed=seed, fd=fd, macs=macs, lazy=0.0 if macs == 20.0 else 0.75)
        results[("learned 75%/20", seed)]["macs"] = 12.0  # a little less lazy than the fixed schedule
    rows = qc.summarize(es, results, [0, 1])
    (line,) = qc.compare(rows, results, [0, 1], [(0.75, 20), (0.4, 20)])  # 40%: nothing measured, no line
    cells = dict(zip(qc.COMPARE_HEADERS, line))
    assert cells["lazy point"] == "75%/20" and cells["learned FD"] == "25.50 ± 2.12"
    assert cells["learned - fixed (paired)"] == "-2.50 ± 0.71"  # -2 and -3, not the difference of the means' spreads
    # the fixed forecast curve (full compute at 20 MACs, 75% at 10) at the learned MACs, 12: 24.8 and 28.4
    assert cells["learned - fixed @eq MACs"] == "-1.10 ± 0.42"  # -0.8 and -1.4
    # DDIM at 12 MACs: 36, 36.4; (36 - 24) / (36 - 20) = 0.75, (36.4 - 27) / (36.4 - 22) = 0.65; fixed 0.7, 0.56
    assert cells["gap closed: learned / fixed"] == "0.70 / 0.63"
    assert cells["FD above full: learned / fixed"] == "+21.4% ± 1.9 / +33.2% ± 4.5"  # 20% and 22.7%; 30% and 36.4%
    assert cells["best fixed FD"] == "-" and cells["oracle FD"] == "-"


def test_lazy_over_a_solver_is_measured_against_that_solver_with_fewer_steps():
    over = qc.Entry("learned 30%/10 over UniPC", "learned over UniPC", 10, 0.3, "learned", "UniPC")
    es = [qc.Entry("DDIM-7", "DDIM", 7), qc.Entry("UniPC-7", "UniPC", 7), qc.Entry("UniPC-10", "UniPC", 10), over]
    results = {}
    for seed, learned in enumerate((26.0, 28.0)):
        for name, fd, macs in (("DDIM-7", 40.0, 7.0), ("UniPC-7", 32.0, 7.0), ("UniPC-10", 24.0, 10.0),
                               (over.name, learned, 7.0)):  # fmt: skip
            results[(name, seed)] = dict(seed=seed, fd=fd, macs=macs, lazy=0.3 if name == over.name else 0.0)
    rows = {r["entry"].name: r for r in qc.summarize(es, results, [0, 1])}
    r = rows[over.name]
    assert over.full == "UniPC-10"
    assert r["ddim_eq"][0] == pytest.approx(32.0) and r["best_eq"][0] == pytest.approx(32.0)  # UniPC-7, not DDIM-7
    assert r["gap"][0] == pytest.approx((0.75 + 0.5) / 2)  # (32 - 26) / (32 - 24), (32 - 28) / (32 - 24)


def test_learned_gates_are_looked_up_in_the_main_assets_then_the_curve_folder(tmp_path):
    from types import SimpleNamespace

    from digits_eval import gates_path

    bench = SimpleNamespace(args=SimpleNamespace(refit=False, gates_dir=tmp_path / "curve", out=tmp_path / "out"))
    main_job, other = qc.Entry("learned 50%/20", "learned", 20, 0.5, "learned"), qc.Entry("l", "learned", 20, 0.75, "learned")
    assert gates_path(0.5, 20).exists()
    assert qc.Bench.gate_path(bench, main_job) == gates_path(0.5, 20)
    assert qc.Bench.gate_path(bench, other) == tmp_path / "curve" / "digits_gates_75pct_20steps.safetensors"
    unipc = qc.Entry("learned 30%/10 over UniPC", "learned over UniPC", 10, 0.3, "learned", "UniPC")
    assert qc.Bench.gate_path(bench, unipc) == gates_path(0.3, 10, "UniPC")
    assert gates_path(0.3, 10, "UniPC").name == "digits_gates_unipc_30pct_10steps.safetensors"
    bench.args.refit = True
    assert qc.Bench.gate_path(bench, main_job) == tmp_path / "out" / "gates" / "digits_gates_50pct_20steps.safetensors"


@pytest.mark.slow
def test_quick_mode_smoke(tmp_path):
    rows = qc.main(["--samples", "8", "--seeds", "0", "1", "--quick", "--spacing-samples", "8",
                    "--oracle-samples", "8", "--oracle-iters", "3", "--out", str(tmp_path)])
    names = {r["entry"].name for r in rows}
    want = {"DDIM-5", "DDIM-7", "DDIM-10", "DDIM-20", "DPM++(2M)-7", "UniPC-10", "spread-copy 50%/20",
            "alternating-forecast 30%/10", "best-fixed 50%/20", "best-fixed 30%/10", "learned 50%/20",
            "learned 30%/10", "oracle 50%/20", "oracle 30%/10", "learned 30%/10 over UniPC",
            "spread-forecast 50%/20 over UniPC"}
    assert want <= names, want - names
    for r in rows:
        assert r["n"] == 2 and np.isfinite(r["fd"][0]) and r["macs"] > 0, r["entry"]
        if r["entry"].part != "baselines":
            assert 0 < r["lazy"] < 1 and np.isfinite(r["psnr"][0]) and "gap" in r and np.isfinite(r["gap"][0])
    assert (tmp_path / "curve.png").stat().st_size > 10_000 and (tmp_path / "table.md").exists()


def test_oracle_extremes_match_the_fixed_runs():
    """tau = inf reuses every step after the first, tau = 0 never: both equal the fixed tables."""
    import torch

    from digits_eval import load_dit
    from digits_fixed import FixedRunner

    torch.set_num_threads(1)
    model = load_dit()
    oracle, runner = qc.Oracle(model), FixedRunner(model, "forecast")
    noise, labels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([4, 5, 6])
    every = np.ones((5, len(runner.sites)), dtype=bool)
    every[0] = False
    for tau, table in ((math.inf, every), (0.0, np.zeros_like(every))):
        images, decisions = oracle.sample(noise, labels, 5, tau)
        want, _ = runner.sample(table, noise, labels)
        assert decisions.shape == (5, 3) and (decisions == table[:, :1]).all()
        torch.testing.assert_close(images, want, atol=1e-5, rtol=1e-5)
