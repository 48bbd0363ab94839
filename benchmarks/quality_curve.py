"""Quality against compute on the digits DiT: every way to spend fewer MACs per image.

    PYTHONPATH=$PWD python benchmarks/quality_curve.py --out docs/curve          # the whole curve
    PYTHONPATH=$PWD python benchmarks/quality_curve.py --only learned --out docs/curve   # learned gates again
    PYTHONPATH=$PWD python benchmarks/quality_curve.py --samples 16 --seeds 0 --quick --out /tmp/qc  # smoke

CFG 1, the project's digits DiT (``examples/digits_eval.py``), DDIM (eta 0), ``--samples`` images
per noise seed (labels 0-9 in turn, noise ``torch.randn`` from ``Generator().manual_seed(seed)``,
as the main job draws seed 0), FD against the 1,797 real digits; mean and sample standard
deviation over the seeds. Methods:

- ``baselines``: DDIM at every step count from 5 to 20, and DPM-Solver++(2M) and UniPC
  (diffusers schedulers, order 2, on the same model and noise) at the same counts; the solvers'
  timestep spacing is chosen among leading / linspace / trailing on separate noise (seed 700,
  FD at 7 and 10 steps), so each solver runs at its best;
- ``fixed``: untrained fixed schedules: every branch reused on evenly spread steps ("spread"), and
  blocks alternating (even blocks reuse on those steps, odd blocks one step earlier), each with
  copy and forecast reuse, at 50% of 20 steps and 30% of 10; spread-forecast also at every
  learned ratio of 20 steps;
- ``best_fixed``: the best fixed (site, step) schedules found by ``examples/digits_fixed.py`` on
  separate search noise (assets ``examples/assets/digits_best_fixed_*.json``);
- ``learned``: ``lazypass.fit`` gates at 30, 40, 50, 60, 67 and 75% of 20 steps and 30% of 10:
  the main job's gate files (``examples/assets/digits_gates_*``, 50%/20 and 30%/10), the others
  from ``--gates-dir`` (default ``examples/assets/curve/``, committed), each fitted there with
  the library defaults and ``target_ratio`` (noise seeds 10,000 and up) by the first run that
  finds it missing, with a JSON of how (``--refit``: fit every point afresh under ``--out/gates``);
- lazy over UniPC (``learned ... over UniPC``, ``spread-forecast ... over UniPC``, parts ``learned`` and
  ``fixed``): the same lazy points at 50%/20 and 30%/10 with UniPC as the sampler instead of DDIM
  (gates fitted with ``scheduler=`` that UniPC, main-job assets ``digits_gates_unipc_*``), for a user
  who already samples with UniPC: compared with UniPC at fewer steps, their "same sampler @eq" and
  gap closed are on the UniPC curve and their PSNR against full-compute UniPC;
- ``oracle``: per sample and step, it runs both the full model and the all-reuse (forecast)
  model from the row's own state and reuses where the weighted eps error
  ``c_i^2 * mean((eps_reuse - eps_full)^2)`` is below ``tau`` (``c_i``: the DDIM coefficient of
  eps at step i); ``tau`` is bisected on separate noise (seed 901) to the budget. A one-step
  greedy oracle: it shows how much per-sample gating could gain, it is not an upper bound.

MACs per image are counted from what ran: the model's MACs per call times calls, minus the
branches each sample skipped (``lazypass.stats``; the oracle's own decisions). "DDIM @eq" is the
DDIM curve's FD linearly interpolated at the method's MACs (same seed), "best solver @eq" the
best of DDIM, DPM-Solver++ and UniPC there, and "gap closed" ``(FD_DDIM@eq - FD) / (FD_DDIM@eq -
FD_full)`` with ``FD_full`` the full-compute run at the method's step count. PSNR is against
that full-compute run (same noise). Each (method, seed) result is cached under ``--out/results``
(learned and best-fixed ones keyed by their gate / schedule file's hash), so parts can run
separately (``--only``), new points are added to an existing results folder without running
anything else again (``--only learned --ratios 0.75``), and a later run assembles the table
(``table.md``) and the plot (``curve.png``, FD against MACs per image) from all of them. The
table ends with the lazy points side by side, learned against the fixed forecast schedule at the
same ratio (their FD difference paired by noise seed) and against full compute.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import lazypass  # noqa: E402
from digits_eval import (  # noqa: E402
    NULL_CLASS, SOLVERS, classifier_outputs, frechet_distance, gates_path, gaussian_stats, load_classifier,
    load_digit_images, load_dit, make_solver, psnr, solver_sample, solver_tag,
)  # fmt: skip
from digits_fixed import (  # noqa: E402
    FixedRunner, alternating_table, load_schedule, schedule_path, spread_table, table_ratio,
)  # fmt: skip
from lazypass.checkpoint import read_gates  # noqa: E402
from lazypass.config import GATE_OPTIONS  # noqa: E402
from lazypass.runtime import runtime  # noqa: E402
from lazypass.sampling import ALPHAS_CUMPROD, ddim_sample, ddim_timesteps  # noqa: E402

PARTS = ("baselines", "fixed", "best_fixed", "learned", "oracle")
RATIOS_20 = (0.3, 0.4, 0.5, 0.6, 2 / 3, 0.75)
HEADLINE = ((0.5, 20), (0.3, 10))
SPACING_SEED, ORACLE_SEED, FIT_SEED = 700, 901, 10_000
OVER_BASE = "UniPC"  # the best solver at 7 and 10 steps on this model (the table below)
OVER = f"over {OVER_BASE}"


@dataclass(frozen=True)
class Entry:
    """One point of the curve: ``family`` groups points into a plotted line."""

    name: str
    family: str
    steps: int
    ratio: float = 0.0
    part: str = "baselines"
    base: str = "DDIM"  # the sampler a lazy point runs over (DDIM, or a solver of SOLVERS)

    @property
    def full(self) -> str:
        """The full-compute run of the same sampler and steps (PSNR reference, FD_full of the gap)."""
        return f"{self.base}-{self.steps}"


def pct(r: float) -> str:
    return f"{round(r * 100)}%"


def entries(args) -> list[Entry]:
    out = []
    counts = args.baseline_steps or range(args.min_steps, 21)
    for n in counts:
        out.append(Entry(f"DDIM-{n}", "DDIM", n))
    for solver in args.solvers:
        for n in counts:
            out.append(Entry(f"{solver}-{n}", solver, n))
    for ratio, steps in HEADLINE:
        for pattern in ("spread", "alternating"):
            for reuse in ("copy", "forecast"):
                out.append(Entry(f"{pattern}-{reuse} {pct(ratio)}/{steps}", f"{pattern}-{reuse}", steps, ratio, "fixed"))
    for ratio in args.ratios:
        if (ratio, 20) not in HEADLINE:
            out.append(Entry(f"spread-forecast {pct(ratio)}/20", "spread-forecast", 20, ratio, "fixed"))
    for ratio, steps in HEADLINE:
        if schedule_path(ratio, steps).exists():
            out.append(Entry(f"best-fixed {pct(ratio)}/{steps}", "best-fixed", steps, ratio, "best_fixed"))
    for ratio in args.ratios:
        out.append(Entry(f"learned {pct(ratio)}/20", "learned", 20, ratio, "learned"))
    out.append(Entry("learned 30%/10", "learned", 10, 0.3, "learned"))
    for ratio, steps in HEADLINE:  # lazy over the strongest solver, against that solver with fewer steps
        tag = f"{pct(ratio)}/{steps} {OVER}"
        out.append(Entry(f"spread-forecast {tag}", f"spread-forecast {OVER}", steps, ratio, "fixed", OVER_BASE))
        out.append(Entry(f"learned {tag}", f"learned {OVER}", steps, ratio, "learned", OVER_BASE))
    for ratio, steps in [(r, 20) for r in args.oracle_ratios] + [(0.3, 10)]:
        out.append(Entry(f"oracle {pct(ratio)}/{steps}", "oracle", steps, ratio, "oracle"))
    return out


# -- sampling ----------------------------------------------------------------------------


def eval_noise(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def ddim_coefficients(steps: int) -> np.ndarray:
    """|d x_prev / d eps| of each DDIM step (the last step gives the x0 estimate)."""
    ts = ddim_timesteps(steps)
    a = ALPHAS_CUMPROD.numpy()
    out = []
    for i, t in enumerate(ts):
        ap = a[ts[i + 1]] if i + 1 < len(ts) else 1.0
        out.append(abs(math.sqrt(ap) * math.sqrt(1 - a[t]) / math.sqrt(a[t]) - math.sqrt(1 - ap)))
    return np.array(out)


class Oracle:
    """Per-sample, per-step oracle over a lazy forecast model (see the module docstring).

    It reads and writes the lazy model's cache state between its two calls per step
    (``runtime(model).state.as_tensors()``: batch on dim 1 of the per-site state, dim 0 of
    ``lazy_last_t``), which no user code should do; it is a measuring device only.
    """

    def __init__(self, model):
        self.lazy = lazypass.apply(copy.deepcopy(model), reuse="forecast", gate_inputs=())

    def sample(self, noise, labels, steps: int, tau: float) -> tuple[torch.Tensor, np.ndarray]:
        w2 = ddim_coefficients(steps) ** 2
        rt = runtime(self.lazy)
        decisions = []

        def fn(x, t, y):
            i = len(decisions)
            if i == 0:
                lazypass.set_threshold(self.lazy, 1.5)
                decisions.append(torch.zeros(x.shape[0], dtype=torch.bool))
                return self.lazy(x, t, y)
            state = rt.state
            before = [s.clone() for s in state.as_tensors()]
            lazypass.set_threshold(self.lazy, -0.5)  # every branch reuses (forecast)
            e_reuse = self.lazy(x, t, y)
            reused = [s.clone() for s in state.as_tensors()]
            state.load(before)
            lazypass.set_threshold(self.lazy, 1.5)  # every branch computes
            e_full = self.lazy(x, t, y)
            skip = w2[i] * (e_reuse - e_full).pow(2).flatten(1).mean(1) < tau
            merged = []
            for s, r in zip(state.as_tensors(), reused):
                if s.dim() >= 1 and s.shape[min(1, s.dim() - 1)] == x.shape[0]:
                    axis = 1 if s.dim() >= 2 else 0
                    mask = skip.view([1] * axis + [-1] + [1] * (s.dim() - axis - 1))
                    s = torch.where(mask, r, s)
                merged.append(s)
            state.load(merged)
            decisions.append(skip)
            return torch.where(skip.view(-1, 1, 1, 1), e_reuse, e_full)

        with lazypass.trajectory(self.lazy):
            images = ddim_sample(fn, noise, steps, cond=labels, learned_sigma=False)
        return images, torch.stack(decisions).numpy()  # (steps, rows)

    def calibrate(self, steps: int, target: float, samples: int, iters: int = 12) -> tuple[float, float]:
        g = torch.Generator().manual_seed(ORACLE_SEED)
        noise, labels = torch.randn(samples, 1, 8, 8, generator=g), torch.randint(0, 10, (samples,), generator=g)
        lo, hi, best = -12.0, 2.0, None
        for _ in range(iters):
            mid = (lo + hi) / 2
            _, dec = self.sample(noise, labels, steps, 10.0**mid)
            r = float(dec.mean())
            if best is None or abs(r - target) < abs(best[1] - target):
                best = (10.0**mid, r)
            if abs(r - target) < 0.004:
                break
            lo, hi = (mid, hi) if r < target else (lo, mid)
        return best


# -- the benchmark -----------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.model = load_dit()
        self.classifier = load_classifier()
        real, _ = load_digit_images()
        self.real_stats = gaussian_stats(classifier_outputs(self.classifier, real)[0])
        self.runners: dict[str, FixedRunner] = {}
        r = self.runner("copy")
        self.site_macs = r.site_macs  # per call, per image
        x, t, y = torch.zeros(1, 1, 8, 8), torch.full((1,), 999), torch.zeros(1, dtype=torch.long)
        self.call_macs = float(runtime(r.lazy).program_for((x, t, y), {})[0].model_macs)
        self.results_dir = args.out / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self._oracle = None
        self._spacing = None

    def runner(self, reuse: str) -> FixedRunner:
        if reuse not in self.runners:
            self.runners[reuse] = FixedRunner(self.model, reuse)
        return self.runners[reuse]

    def fd(self, images) -> float:
        return frechet_distance(gaussian_stats(classifier_outputs(self.classifier, images)[0]), self.real_stats)

    def macs(self, steps: int, skipped: np.ndarray | None) -> float:
        """Per image: calls x model MACs, minus the skipped branches (skipped: calls, sites, rows)."""
        total = steps * self.call_macs
        if skipped is not None:
            total -= float((skipped.mean(2) * self.site_macs).sum())
        return total

    # cached per (method, seed)
    def _path(self, e: Entry, seed: int) -> Path:
        """Result file; learned and best-fixed results name the gate / schedule file's content
        hash, so refitted gates or a new search are measured again, never read from the cache."""
        safe = e.name.replace(" ", "_").replace("/", "-").replace("%", "pct").replace("(", "").replace(")", "")
        source = self.gate_path(e) if e.part == "learned" else schedule_path(e.ratio, e.steps) if (
            e.part == "best_fixed") else None  # fmt: skip
        tag = ""
        if source is not None:
            tag = "_" + (hashlib.sha256(source.read_bytes()).hexdigest()[:10] if source.exists() else "missing")
        return self.results_dir / f"{safe}{tag}_s{seed}_n{self.args.samples}.json"

    def cached(self, e: Entry, seed: int) -> dict | None:
        p = self._path(e, seed)
        return json.loads(p.read_text()) if p.exists() else None

    def reference(self, steps: int, seed: int, base: str = "DDIM") -> torch.Tensor:
        """Full-compute images of ``base`` (DDIM or a solver) at ``steps`` (saved: PSNR references)."""
        tag = "" if base == "DDIM" else solver_tag(base) + "_"
        p = self.args.out / "images" / f"full{tag}{steps}_s{seed}_n{self.args.samples}.safetensors"
        if p.exists():
            return load_file(str(p))["images"]
        noise, labels = eval_noise(seed, self.args.samples)
        if base == "DDIM":
            x = ddim_sample(self.model, noise, steps, cond=labels, learned_sigma=False)
        else:
            x = solver_sample(self.model, noise, steps, labels, base, self.spacing()[base])
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": x.contiguous()}, str(p))
        return x

    def spacing(self) -> dict:
        if self._spacing is None:
            p = self.args.out / "results" / f"solver_spacing_n{self.args.spacing_samples}.json"
            lock = p.with_suffix(".lock")
            while not p.exists() and lock.exists():  # another run of this script is choosing it
                time.sleep(5)
            if p.exists():
                self._spacing = json.loads(p.read_text())
            else:
                lock.touch()
                noise, labels = eval_noise(SPACING_SEED, self.args.spacing_samples)
                choice, scores = {}, {}
                for solver in SOLVERS:
                    for sp in ("leading", "linspace", "trailing"):
                        scores[f"{solver} {sp}"] = sum(
                            self.fd(solver_sample(self.model, noise, n, labels, solver, sp)) for n in (7, 10))
                    choice[solver] = min(("leading", "linspace", "trailing"), key=lambda s: scores[f"{solver} {s}"])
                self._spacing = dict(choice=choice, fd_sum_7_10=scores)
                p.write_text(json.dumps(self._spacing, indent=1))
                lock.unlink()
        return self._spacing["choice"]

    def run(self, e: Entry, seed: int) -> dict:
        hit = self.cached(e, seed)
        if hit is not None:
            return hit
        if e.part == "learned":
            self.gate_file(e)  # fitted first, so the result is saved under its gates' hash
        noise, labels = eval_noise(seed, self.args.samples)
        start = time.perf_counter()
        skipped, extra = None, {}
        if e.family == "DDIM":
            images = self.reference(e.steps, seed) if e.steps in (10, 20) else ddim_sample(
                self.model, noise, e.steps, cond=labels, learned_sigma=False)
        elif e.family in SOLVERS:
            sp = self.spacing()[e.family]
            images = self.reference(e.steps, seed, e.family) if e.steps in (10, 20) else solver_sample(
                self.model, noise, e.steps, labels, e.family, sp)
            extra["spacing"] = sp
        elif e.part in ("fixed", "best_fixed"):
            if e.part == "best_fixed":
                sched = load_schedule(schedule_path(e.ratio, e.steps))
                table, reuse = sched.table, sched.reuse
            else:
                pattern, reuse = e.family.split(" ")[0].split("-")
                n = len(self.site_macs)
                table = spread_table(e.steps, e.ratio, n) if pattern == "spread" else alternating_table(e.steps, e.ratio, 2, n)
            images, skipped = self.runner(reuse).sample(table, noise, labels, sampler=self.sampler(e.base))
            extra["table_ratio"] = table_ratio(table, self.site_macs)
        elif e.part == "learned":
            images, skipped, extra = self.learned(e, noise, labels)
        elif e.part == "oracle":
            images, skipped, extra = self.oracle(e, noise, labels)
        else:
            raise ValueError(e)
        seconds = time.perf_counter() - start
        macs = self.macs(e.steps, skipped)
        lazy = 0.0 if skipped is None else float((skipped.mean(2) * self.site_macs).sum() / (e.steps * self.site_macs.sum()))
        res = dict(name=e.name, seed=seed, samples=self.args.samples, fd=self.fd(images), macs=macs, lazy=lazy,
                   seconds=round(seconds, 1), **extra)  # fmt: skip
        if e.part != "baselines" or e.steps != 20:
            ref_steps, ref_base = (e.steps, e.base) if e.part != "baselines" else (20, e.family)
            res["psnr"] = psnr(images, self.reference(ref_steps, seed, ref_base))
            res["psnr_ref"] = f"{ref_base}-{ref_steps}"
        self._path(e, seed).write_text(json.dumps(res, indent=1))
        return res

    def sampler(self, base: str):
        """``sample(model, noise, steps, cond=, callback=)`` over ``base``; None for DDIM (the default)."""
        if base == "DDIM":
            return None
        return functools.partial(solver_sample, solver=base, spacing=self.spacing()[base])

    # -- learned gates
    def gate_path(self, e: Entry) -> Path:
        """The main job's gate file where it exists, else the curve's own under ``--gates-dir``
        (fitted there by the first run that needs it); ``--refit``: fitted afresh under --out/gates."""
        main_job = gates_path(e.ratio, e.steps, e.base)
        if self.args.refit:
            return self.args.out / "gates" / main_job.name
        return main_job if main_job.exists() else self.args.gates_dir / main_job.name

    def gate_file(self, e: Entry) -> Path:
        path = self.gate_path(e)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            model = lazypass.apply(load_dit())

            def sample_fn(i: int) -> dict:
                g = torch.Generator().manual_seed(FIT_SEED + 1000 * round(e.ratio * 100) + i)
                return {"noise": torch.randn(64, 1, 8, 8, generator=g),
                        "cond": torch.randint(0, 10, (64,), generator=g), "null_cond": torch.full((64,), NULL_CLASS)}

            start = time.perf_counter()
            over = {} if e.base == "DDIM" else {"scheduler": make_solver(e.base, self.spacing()[e.base])}
            result = lazypass.fit(model, sample_fn, target_ratio=e.ratio, num_inference_steps=e.steps, progress=False,
                                  **over)  # fmt: skip
            lazypass.save_gates(model, path)
            (path.with_suffix(".json")).write_text(json.dumps(dict(
                fit_seconds=round(time.perf_counter() - start, 1), load_average=round(os.getloadavg()[0], 1),
                threads=torch.get_num_threads(), lazy_ratio=result.lazy_ratio, threshold=result.threshold,
                fit="lazypass.fit defaults, target_ratio and num_inference_steps" + (
                    "" if e.base == "DDIM" else f", scheduler {e.base} ({self.spacing()[e.base]} spacing)") +
                    "; batches of 64, noise and labels "
                    f"from Generator().manual_seed({FIT_SEED} + 1000 * {round(e.ratio * 100)} + i)"), indent=1))  # fmt: skip
        return path

    def learned(self, e: Entry, noise, labels):
        path = self.gate_file(e)
        saved = read_gates(path).config
        model = lazypass.apply(copy.deepcopy(self.model), **{k: saved[k] for k in GATE_OPTIONS})
        lazypass.load_gates(model, path)
        with lazypass.trajectory(model):
            if e.base == "DDIM":
                images = ddim_sample(model, noise, e.steps, cond=labels, learned_sigma=False)
            else:
                images = self.sampler(e.base)(model, noise, e.steps, labels)
            skipped = lazypass.stats(model).skipped
        info = dict(gates=str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path))
        meta = path.with_suffix(".json")
        if meta.exists():
            info["fit_seconds"] = json.loads(meta.read_text())["fit_seconds"]
        return images, skipped, info

    # -- oracle
    def oracle(self, e: Entry, noise, labels):
        if self._oracle is None:
            self._oracle = Oracle(self.model)
        p = self.results_dir / f"oracle_tau_{e.steps}_{round(e.ratio * 100)}_n{self.args.oracle_samples}.json"
        if p.exists():
            tau, r = json.loads(p.read_text())
        else:
            tau, r = self._oracle.calibrate(e.steps, e.ratio, self.args.oracle_samples, self.args.oracle_iters)
            p.write_text(json.dumps([tau, r]))
        images, dec = self._oracle.sample(noise, labels, e.steps, tau)
        n = len(self.site_macs)
        skipped = np.repeat(dec[:, None, :], n, axis=1)
        return images, skipped, dict(tau=tau, calibration_ratio=r)


def mean_sd(v) -> tuple[float, float]:
    v = np.asarray(v, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def interp(points: dict[float, float], x: float) -> float:
    """Linear interpolation of {MACs: FD}; NaN outside the measured range."""
    xs = sorted(points)
    if not xs or x < xs[0] - 1e-6 * xs[0] or x > xs[-1] * (1 + 1e-6):
        return float("nan")
    return float(np.interp(x, xs, [points[k] for k in xs]))


def summarize(es: list[Entry], results: dict, seeds: list[int]) -> list[dict]:
    """Per method: mean and spread over the seeds of FD, PSNR, MACs, and the equal-MAC comparisons."""
    by_seed = {s: {e.name: results.get((e.name, s)) for e in es} for s in seeds}
    rows = []
    for e in es:
        per = [by_seed[s][e.name] for s in seeds if by_seed[s][e.name] is not None]
        if not per:
            continue
        row = dict(entry=e, n=len(per), fd=mean_sd([r["fd"] for r in per]), macs=float(np.mean([r["macs"] for r in per])),
                   lazy=float(np.mean([r["lazy"] for r in per])))  # fmt: skip
        if all("psnr" in r for r in per):
            row["psnr"] = mean_sd([r["psnr"] for r in per])
            row["psnr_ref"] = per[0]["psnr_ref"]
        ddim_eq, best_eq, gap = [], [], []
        for r in per:
            s = r["seed"]
            curves = {f: {} for f in ("DDIM", *SOLVERS)}
            for other in es:
                o = by_seed[s].get(other.name)
                if o is not None and other.family in curves:
                    curves[other.family][o["macs"]] = o["fd"]
            d = interp(curves[e.base], r["macs"])  # the same sampler with fewer steps
            full = by_seed[s].get(e.full)
            ddim_eq.append(d)
            best_eq.append(min((interp(c, r["macs"]) for c in curves.values()), key=lambda v: (math.isnan(v), v)))
            if e.part != "baselines" and full is not None and not math.isnan(d) and d != full["fd"]:
                gap.append((d - r["fd"]) / (d - full["fd"]))
        if e.part != "baselines":
            row["ddim_eq"] = mean_sd(ddim_eq)
            row["best_eq"] = mean_sd(best_eq)
            if len(gap) == len(per):
                row["gap"] = mean_sd(gap)
        rows.append(row)
    return rows


def fmt(ms, d=2) -> str:
    m, s = ms
    return "nan" if math.isnan(m) else f"{m:.{d}f} ± {s:.{d}f}"


def table(rows: list[dict], tablefmt="simple") -> str:
    out = []
    for r in rows:
        e = r["entry"]
        out.append([
            e.name, e.steps, r["n"], f"{r['lazy']:.1%}" if e.part != "baselines" else "-", f"{r['macs'] / 1e6:.1f}",
            fmt(r["fd"]), f"{fmt(r['psnr'])} vs {r['psnr_ref']}" if "psnr" in r else "-",
            fmt(r["ddim_eq"]) if "ddim_eq" in r else "-", fmt(r["best_eq"]) if "best_eq" in r else "-",
            fmt(r["gap"]) if "gap" in r else "-",
        ])  # fmt: skip
    headers = ["method", "steps", "seeds", "lazy (MACs)", "MMACs/image", "FD", "PSNR dB", "same sampler FD @eq MACs",
               "best solver FD @eq", "gap closed"]  # fmt: skip
    return tabulate(out, headers=headers, tablefmt=tablefmt)


def compare(rows: list[dict], results: dict, seeds: list[int], points: list[tuple]) -> list[list[str]]:
    """Per lazy point (ratio, steps[, base sampler]): learned against the fixed forecast schedule (spread steps),
    their FD difference paired by noise seed (mean ± sd over seeds) at the same nominal ratio and
    at the learned gates' own MACs (the fixed forecast curve at those steps, full compute as its 0%
    point, interpolated), the best fixed schedule and the oracle where measured, and the FD above
    full compute."""
    by = {r["entry"].name: r for r in rows}

    def per_seed(name: str, ref: str, f) -> tuple[float, float] | None:
        v = [f(results[(name, s)]["fd"], results[(ref, s)]["fd"]) for s in seeds
             if (name, s) in results and (ref, s) in results]  # fmt: skip
        return mean_sd(v) if v else None

    def fixed_at(name: str, steps: int, base: str, seed: int) -> float:
        end = f"/{steps}" + ("" if base == "DDIM" else f" over {base}")
        curve = {r["macs"]: r["fd"] for (n, s), r in results.items() if s == seed and (
            n == f"{base}-{steps}" or n.startswith("spread-forecast ") and n.endswith(end))}  # fmt: skip
        return interp(curve, results[(name, seed)]["macs"]) if (name, seed) in results else math.nan

    def signed(v) -> str:
        return "-" if v is None or math.isnan(v[0]) else f"{v[0]:+.2f} ± {v[1]:.2f}"

    out = []
    for ratio, steps, *over in points:
        base = over[0] if over else "DDIM"
        tag = f"{pct(ratio)}/{steps}" + ("" if base == "DDIM" else f" over {base}")
        learned, fixed, full = f"learned {tag}", f"spread-forecast {tag}", f"{base}-{steps}"
        if learned not in by and fixed not in by:
            continue
        fd = {k: fmt(by[n]["fd"]) if n in by else "-" for k, n in
              (("l", learned), ("f", fixed), ("b", f"best-fixed {tag}"), ("o", f"oracle {tag}"))}  # fmt: skip
        lazy = " / ".join(f"{by[n]['lazy']:.1%}" if n in by else "-" for n in (learned, fixed))
        gaps = " / ".join(f"{by[n]['gap'][0]:.2f}" if n in by and "gap" in by[n] else "-" for n in (learned, fixed))
        solver = by.get(learned) or by.get(fixed)
        diff = per_seed(learned, fixed, lambda a, b: a - b)
        eq = [results[(learned, s)]["fd"] - fixed_at(learned, steps, base, s) for s in seeds if (learned, s) in results]
        above = [per_seed(n, full, lambda a, b: 100 * (a / b - 1)) for n in (learned, fixed)]
        out.append([
            tag, lazy, fd["l"], fd["f"], signed(diff), signed(mean_sd(eq) if eq else None), fd["b"], fd["o"],
            fmt(solver["best_eq"]) if "best_eq" in solver else "-", gaps,
            " / ".join("-" if a is None else f"{a[0]:+.1f}% ± {a[1]:.1f}" for a in above),
        ])  # fmt: skip
    return out


COMPARE_HEADERS = ["lazy point", "lazy: learned / fixed", "learned FD", "fixed forecast FD",
                   "learned - fixed (paired)", "learned - fixed @eq MACs", "best fixed FD", "oracle FD", "best solver FD @eq",
                   "gap closed: learned / fixed", "FD above full: learned / fixed"]  # fmt: skip


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    families: dict[str, list[dict]] = {}
    for r in rows:
        key = r["entry"].family + (f" ({r['entry'].steps} steps)" if r["entry"].part not in ("baselines",) else "")
        families.setdefault(key, []).append(r)
    styles = {"DDIM": ("k", "-", "o"), "DPM++(2M)": ("tab:blue", "--", "s"), "UniPC": ("tab:cyan", "--", "^")}
    colors = {"spread-copy": "tab:olive", "spread-forecast": "tab:green", "alternating-copy": "tab:brown",
              "alternating-forecast": "tab:purple", "best-fixed": "tab:orange", "learned": "tab:red",
              "oracle": "tab:pink"}  # fmt: skip
    for k, (key, rs) in enumerate(sorted(families.items())):
        rs = sorted(rs, key=lambda r: r["macs"])
        fam, steps = rs[0]["entry"].family, rs[0]["entry"].steps
        color, ls, marker = styles.get(fam, (colors.get(fam, f"C{k % 10}"), "-" if len(rs) > 1 else "none",
                                             "D" if steps == 20 else "v"))  # fmt: skip
        ax.errorbar([r["macs"] / 1e9 for r in rs], [r["fd"][0] for r in rs], yerr=[r["fd"][1] for r in rs],
                    color=color, linestyle=ls, marker=marker, markersize=4, capsize=2, label=key)  # fmt: skip
    ax.set_xlabel("GMACs per image (executed); lazy methods: diamonds at 20 steps, triangles at 10")
    ax.set_ylabel("FD to the real digits (lower is better)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(rows: list[dict]) -> str:
    by = {r["entry"].name: r for r in rows}

    def gap(name):
        r = by.get(name)
        return f"{r['gap'][0]:.2f}" if r and "gap" in r else "n/a"

    parts = []
    for ratio, steps in HEADLINE:
        tag = f"{pct(ratio)}/{steps}"
        eq = by.get(f"learned {tag}") or by.get(f"best-fixed {tag}") or by.get(f"spread-forecast {tag}")
        ddim = f"{eq['ddim_eq'][0]:.2f}" if eq and "ddim_eq" in eq else "n/a"
        parts.append(f"learned{tag.replace('%', '')} gap={gap(f'learned {tag}')} best_fixed gap={gap(f'best-fixed {tag}')} "
                     f"spread_forecast gap={gap(f'spread-forecast {tag}')} oracle gap={gap(f'oracle {tag}')} ddim_eq FD={ddim}")  # fmt: skip
        over = by.get(f"learned {tag} {OVER}")
        if over is not None:
            parts.append(f"learned{tag.replace('%', '')} {OVER} FD={over['fd'][0]:.2f} "
                         f"best_solver_eq FD={over['best_eq'][0]:.2f}")  # fmt: skip
    return "quality_curve: " + "; ".join(parts)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000, help="images per noise seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", choices=PARTS + ("none",), default=list(PARTS),
                   help="parts to run; every cached result is tabulated ('none': only the table and plot)")
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS_20), help="lazy ratios at 20 steps")
    p.add_argument("--oracle-ratios", type=float, nargs="+", default=[0.5], help="oracle ratios at 20 steps (plus 30%%/10)")
    p.add_argument("--min-steps", type=int, default=5, help="shortest DDIM / solver run")
    p.add_argument("--baseline-steps", type=int, nargs="+", default=None,
                   help="run the baselines at these step counts only (default min-steps..20)")
    p.add_argument("--quick", action="store_true", help="smoke mode: 20 steps 50%% and 10 steps 30%% only, "
                   "no fitting (committed gates), baselines at 5, 7, 10, 20 steps")  # fmt: skip
    p.add_argument("--refit", action="store_true", help="fit every learned point afresh under --out/gates "
                   "(ignore the committed gate files)")  # fmt: skip
    p.add_argument("--gates-dir", type=Path, default=ROOT / "examples" / "assets" / "curve",
                   help="gates of the learned points the main job has none for: loaded from here, or fitted "
                   "and saved here when missing")  # fmt: skip
    p.add_argument("--spacing-samples", type=int, default=100, help="samples of the solvers' spacing choice")
    p.add_argument("--solvers", nargs="*", choices=SOLVERS, default=list(SOLVERS), help="diffusers solver curves")
    p.add_argument("--oracle-samples", type=int, default=64, help="calibration samples of the oracle's tau")
    p.add_argument("--oracle-iters", type=int, default=12, help="bisection steps of the oracle's tau")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("docs/curve"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.quick:
        args.ratios, args.oracle_ratios = [0.5], [0.5]
    args.ratios = [2 / 3 if abs(r - 2 / 3) < 0.01 else r for r in args.ratios]
    es = entries(args)
    if args.quick:
        es = [e for e in es if e.part != "baselines" or e.steps in (5, 7, 10, 20)]  # fmt: skip
        es = [e for e in es if e.part != "learned" or gates_path(e.ratio, e.steps, e.base).exists()]
    bench = Bench(args)
    results = {}
    for seed in args.seeds:
        for e in es:
            if e.part in args.only:
                r = bench.run(e, seed)
                print(f"  seed {seed} {e.name}: FD {r['fd']:.2f} MMACs {r['macs'] / 1e6:.1f} "
                      f"({r['seconds']:.0f} s) [{time.perf_counter() - start:.0f} s]", flush=True)  # fmt: skip
            hit = bench.cached(e, seed)
            if hit is not None:
                results[(e.name, seed)] = hit
    rows = summarize(es, results, args.seeds)
    title = (f"digits DiT, CFG 1, {args.samples} samples x seeds {args.seeds}: FD against executed MACs "
             f"(mean and sd over seeds)")  # fmt: skip
    text = table(rows)
    side = compare(rows, results, args.seeds, [(r, 20) for r in args.ratios] + [(0.3, 10)] +
                   [(r, n, OVER_BASE) for r, n in HEADLINE])  # fmt: skip
    print(text)
    print(tabulate(side, headers=COMPARE_HEADERS))
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "PYTHONPATH=$PWD python benchmarks/quality_curve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    side_text = ("Lazy points side by side (fixed: the forecast schedule on evenly spread steps; "
                 "'learned - fixed': FD difference paired by noise seed, at the same nominal ratio and at the learned "
                 "gates' MACs along the fixed forecast curve; 'FD above full': against full compute at the same "
                 "steps and noise):")  # fmt: skip
    (args.out / "table.md").write_text(
        f"`{cmd}` (assembles the cached per-seed results under `{args.out}/results`)\n\n{title}\n\n"
        f"{table(rows, 'github')}\n\n{side_text}\n\n{tabulate(side, headers=COMPARE_HEADERS, tablefmt='github')}\n\n"
        f"{headline(rows)}\n")  # fmt: skip
    plot(rows, args.out / "curve.png", title)
    print(f"wrote {args.out}/table.md, {args.out}/curve.png; wall time {time.perf_counter() - start:.0f} s")
    print(headline(rows))
    return rows


if __name__ == "__main__":
    main()
