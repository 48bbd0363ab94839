"""Flow-matching section of the main job: lazy sampling against fewer Euler steps at equal MACs.

    PYTHONPATH=$PWD python examples/digits_flow_job.py          # this section alone: docs/digits/flow_table.md
    PYTHONPATH=$PWD python examples/digits_flow_job.py --fit    # refit the two gate files, then run it
    PYTHONPATH=$PWD python examples/digits_flow_job.py --calibrate  # only reset their thresholds to the MACs
    PYTHONPATH=$PWD python examples/digits.py                   # runs it as its last section (--no-flow: not)

The model is the flow-matching ``SD3Transformer2DModel`` of ``examples/assets/digits_flow``
(``docs/digits/flow_steps.md``), sampled with diffusers' ``FlowMatchEulerDiscreteScheduler`` at
CFG 1. The step counts are where a step matters on this model (FD 5.55 at 8 Euler steps, 14.97
at 4; 6.33 at 7, 9.83 at 5), not the DiT job's 20 and 10, where halving costs the flow model
almost nothing:

- ``lazy-50%-8``: gates fitted by ``lazypass.fit(..., scheduler=FlowMatchEulerDiscreteScheduler,
  target_ratio=0.5, num_inference_steps=8)``, against ``Euler-4``;
- ``lazy-30%-7``: ``target_ratio=0.3`` at 7 steps, against ``Euler-5``;
- the thresholds saved with the gates are then set, on calibration noise, to the Euler run's
  MACs (50% and 5/7 of full compute): ``target_ratio`` counts decisions, and this model's sites
  differ in cost (a context MLP on 4 label tokens costs 1/16 of an image MLP), so 50% of the
  decisions is not 50% of the MACs;
- ``static``: the untrained baseline of the DiT job, every branch reused on evenly spread steps;
- ``full-8`` / ``full-7``: every branch computed, the references for PSNR and gap closed.

Columns as in the DiT job (``examples/digits.py``): lazy ratio, MACs per image (decisions
counted per sample), latency per image at batch 1, PSNR against the full run with the same
steps, FD to the 1,797 real digits, gap closed ``(FD_Euler - FD_method) / (FD_Euler - FD_full)``
and the classifier's accuracy.

``--fit`` runs ``lazypass.fit`` with the library's defaults for everything but the target, the
step count and the scheduler (data-free self-distillation on the model's own Euler
trajectories, noise and random labels from seeds 10,000 and up, never the evaluation noise) and
writes ``examples/assets/digits_flow_gates_{50pct_8steps,30pct_7steps}.safetensors``: gates,
threshold and the pass options they were fitted under (``reuse``, ``max_age``, ...), which the
section applies when it loads them.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

import lazypass
from digits import static_skips
from digits_eval import (
    ASSETS, accuracy, classifier_outputs, flow_cond, flow_sample, flow_scheduler, frechet_distance,
    gaussian_stats, load_classifier, load_digit_images, load_flow_dit, psnr,
)  # fmt: skip
from lazypass.checkpoint import read_gates
from lazypass.config import GATE_OPTIONS
from lazypass.runtime import runtime

FIT_SEED = 10_000  # fitting noise: seeds 10,000+, the evaluation noise is seed 0
FIT_BATCH = 32
CAL_SEED, CAL_SAMPLES = 20_000, 64  # noise that sets the threshold to the Euler run's MACs


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "full" | "lazy" | "static"
    steps: int
    ratio: float = 0.0
    reference: str = ""  # full run with the same steps, for PSNR and gap closed
    euler: str = ""  # the fewer-step Euler run at the same MACs, for gap closed


METHODS = [
    Method("full-8", "full", 8, reference="full-8"),
    Method("lazy-50%-8", "lazy", 8, 0.5, "full-8", "Euler-4"),
    Method("static-50%-8", "static", 8, 0.5, "full-8", "Euler-4"),
    Method("Euler-4", "full", 4, reference="full-8"),
    Method("full-7", "full", 7, reference="full-7"),
    Method("lazy-30%-7", "lazy", 7, 0.3, "full-7", "Euler-5"),
    Method("static-30%-7", "static", 7, 0.3, "full-7", "Euler-5"),
    Method("Euler-5", "full", 5, reference="full-7"),
]


def gates_path(ratio: float, steps: int) -> Path:
    """The committed gate file of a target, e.g. ``digits_flow_gates_50pct_8steps.safetensors``."""
    return ASSETS / f"digits_flow_gates_{round(ratio * 100)}pct_{steps}steps.safetensors"


def budget(method: Method) -> float:
    """Share of full compute of the Euler run a lazy method is compared with (4/8, 5/7)."""
    return next(m.steps for m in METHODS if m.name == method.euler) / method.steps


def fit_gates(transformer, label_embedding, ratio: float, inference_steps: int, path: Path,
              fraction: float | None = None, **options) -> dict:  # fmt: skip
    """Fit a lazy copy's gates through the flow-matching scheduler, set the threshold to
    ``fraction`` of full compute (:func:`calibrate_to_macs`; None keeps ``fit``'s, calibrated to
    ``ratio`` of the decisions) and save them to ``path``. ``options`` go to ``lazypass.fit``.

    Example (a few optimiser steps, into a scratch file):
        >>> t, e = load_flow_dit()
        >>> info = fit_gates(t, e, 0.5, 8, Path("/tmp/flow_gates.safetensors"), 0.5, steps=2)  # doctest: +SKIP
    """
    lazy = lazypass.apply(copy.deepcopy(transformer))

    def sample_fn(i: int) -> dict:
        g = torch.Generator().manual_seed(FIT_SEED + i)
        noise = torch.randn(FIT_BATCH, 1, 8, 8, generator=g)
        labels = torch.randint(0, 10, (FIT_BATCH,), generator=g)
        return {"noise": noise, "cond": {k: v.detach() for k, v in flow_cond(label_embedding, labels).items()}}

    start, cpu = time.perf_counter(), time.process_time()
    result = lazypass.fit(lazy, sample_fn, scheduler=flow_scheduler(), target_ratio=ratio,
                          num_inference_steps=inference_steps, progress=False, **options)  # fmt: skip
    info = dict(path=str(path), lazy_ratio=result.lazy_ratio, fit_threshold=result.threshold, threshold=result.threshold)
    if fraction is not None:
        info["threshold"], info["macs_fraction"] = calibrate_to_macs(lazy, label_embedding, inference_steps, fraction)
    lazypass.save_gates(lazy, path)
    info.update(seconds=round(time.perf_counter() - start, 1), cpu_seconds=round(time.process_time() - cpu, 1))
    print(f"fitted {path.name}: {info}")
    return info


def recalibrate(transformer, label_embedding, path: Path, steps: int, fraction: float) -> dict:
    """:func:`calibrate_to_macs` for a gate file fitted before (rewritten in place)."""
    saved = read_gates(path).config
    lazy = lazypass.apply(copy.deepcopy(transformer), **{k: saved[k] for k in GATE_OPTIONS})
    lazypass.load_gates(lazy, path)
    th, got = calibrate_to_macs(lazy, label_embedding, steps, fraction)
    lazypass.save_gates(lazy, path)
    print(f"calibrated {path.name}: threshold {th:.4g}, {got:.1%} of full compute on the calibration noise")
    return dict(threshold=th, macs_fraction=got)


def macs_per_image(lazy, label_embedding, steps: int, skipped: np.ndarray | None, rows: int) -> float:
    """MACs per image of a sampling run: the whole model per call, minus the branches each sample
    skipped (``skipped``: ``lazypass.stats(lazy).skipped``, (calls, sites, rows); None: full compute)."""
    x = torch.zeros(rows, 1, 8, 8)
    cond = flow_cond(label_embedding, torch.zeros(rows, dtype=torch.long))
    kwargs = {k: v.detach() for k, v in dict(timestep=torch.full((rows,), 1000.0), **cond).items()}
    prog = runtime(lazy).program_for((x,), kwargs)[0]
    total = steps * prog.model_macs / rows
    if skipped is not None:
        site = np.array([s.macs / rows for s in prog.sites])
        total -= float((skipped.mean(2) * site).sum())  # mean over rows, summed over calls
    return total


def calibrate_to_macs(lazy, label_embedding, steps: int, fraction: float, iters: int = 8) -> tuple[float, float]:
    """Set the threshold at which lazy sampling costs ``fraction`` of full compute per image, measured
    on calibration noise (seeds 20,000+; never the evaluation noise). Returns (threshold, fraction).

    ``fit``'s ``target_ratio`` counts decisions, and this model's sites differ in cost (a context MLP
    on 4 label tokens costs 1/16 of an image MLP), so 50% of decisions is not 50% of the MACs.
    """
    g = torch.Generator().manual_seed(CAL_SEED)
    noise = torch.randn(CAL_SAMPLES, 1, 8, 8, generator=g)
    labels = torch.randint(0, 10, (CAL_SAMPLES,), generator=g)
    flow_sample(lazy, label_embedding, noise, labels, 1)  # trace first: a pending gate file sets its threshold there
    full = macs_per_image(lazy, label_embedding, steps, None, CAL_SAMPLES)

    def cost(th: float) -> float:
        lazypass.set_threshold(lazy, th)
        with lazypass.trajectory(lazy):
            flow_sample(lazy, label_embedding, noise, labels, steps)
            skipped = lazypass.stats(lazy).skipped
        return macs_per_image(lazy, label_embedding, steps, skipped, CAL_SAMPLES) / full

    lo, hi, tried = 0.0, 1.0, []  # gate scores are in (0, 1); the cost rises with the threshold
    for _ in range(iters):
        mid = (lo + hi) / 2
        tried.append((mid, cost(mid)))
        lo, hi = (mid, hi) if tried[-1][1] < fraction else (lo, mid)
    th, got = min(tried, key=lambda p: abs(p[1] - fraction))
    lazypass.set_threshold(lazy, th)
    return th, got


class FlowSampler:
    """The plain flow model and one lazy copy (gates swapped per method)."""

    def __init__(self, transformer, label_embedding, gates_dir: Path | None = None):
        self.plain, self.labels = transformer, label_embedding
        self.gates_dir = gates_dir
        first = self.gate_file(next(m for m in METHODS if m.kind == "lazy"))
        if not first.exists():
            raise FileNotFoundError(f"{first} not found; fit it with `python examples/digits_flow_job.py --fit`")
        saved = read_gates(first).config  # the pass options the gates were fitted under
        self.lazy = lazypass.apply(copy.deepcopy(transformer), **{k: saved[k] for k in GATE_OPTIONS})

    def gate_file(self, method: Method) -> Path:
        path = gates_path(method.ratio, method.steps)
        return self.gates_dir / path.name if self.gates_dir else path

    def run(self, method: Method, noise, labels, record: bool = True) -> tuple[torch.Tensor, np.ndarray | None]:
        if method.kind == "full":
            return flow_sample(self.plain, self.labels, noise, labels, method.steps), None
        model = self.lazy
        if method.kind == "lazy":
            lazypass.load_gates(model, self.gate_file(method))
        schedule = static_skips(method.steps, method.ratio) if method.kind == "static" else None

        def set_step(i: int) -> None:
            if schedule is not None and i < len(schedule):
                lazypass.set_threshold(model, -0.5 if schedule[i] else 1.5)

        with lazypass.trajectory(model):
            set_step(0)
            images = flow_sample(model, self.labels, noise, labels, method.steps,
                                 callback=lambda i, t, x: set_step(i + 1))  # fmt: skip
            skipped = lazypass.stats(model).skipped if record else None
        return images, skipped

    def macs(self, method: Method, skipped: np.ndarray | None, rows: int) -> float:
        return macs_per_image(self.lazy, self.labels, method.steps, skipped, rows)


def evaluate(sampler: FlowSampler, classifier, real_stats, noise, labels, latency_images: int = 0,
             latency_repeats: int = 1) -> dict:  # fmt: skip
    """Every method of ``METHODS`` from the same noise: a dict of name -> measures."""
    images, results = {}, {}
    for m in METHODS:
        images[m.name], skipped = sampler.run(m, noise, labels)
        feats, preds = classifier_outputs(classifier, images[m.name])
        r = results[m.name] = dict(macs=sampler.macs(m, skipped, len(noise)),
                                   fd=frechet_distance(gaussian_stats(feats), real_stats), acc=accuracy(preds, labels))  # fmt: skip
        if skipped is not None:
            r["lazy"] = float(skipped.mean())
    for m in METHODS:
        r = results[m.name]
        r["psnr"] = math.inf if m.reference == m.name else psnr(images[m.name], images[m.reference])
        r["psnr_ref"] = m.reference
        if m.euler:
            f_t, f_e = results[m.reference]["fd"], results[m.euler]["fd"]
            r["gap"] = (f_e - r["fd"]) / (f_e - f_t) if f_e != f_t else float("nan")
    if latency_images:  # warm-up: the lazy copy traces batch 1 once
        for m in METHODS:
            sampler.run(m, noise[:1], labels[:1], record=False)
    for _ in range(latency_repeats if latency_images else 0):  # interleaved, median per method
        for k in range(latency_images):
            for m in METHODS:
                start = time.perf_counter()
                sampler.run(m, noise[k : k + 1], labels[k : k + 1], record=False)
                results[m.name].setdefault("times", []).append(1000 * (time.perf_counter() - start))
    for r in results.values():
        if "times" in r:
            r["latency"] = float(np.median(r.pop("times")))
    return results


def table(results: dict, fmt: str = "simple") -> str:
    rows = []
    for m in METHODS:
        r = results[m.name]
        rows.append([
            m.name, m.steps, f"{r['lazy']:.0%}" if "lazy" in r else "-", f"{r['macs'] / 1e6:.1f}M",
            f"{r['latency']:.1f}" if "latency" in r else "-",
            "ref" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f} vs {r['psnr_ref']}", f"{r['fd']:.2f}",
            f"{r['gap']:.0%}" if "gap" in r else "-", f"{r['acc']:.1%}",
        ])  # fmt: skip
    headers = ["method", "Euler steps", "lazy", "MACs/image", "ms/image (b=1)", "PSNR dB", "FD (cfg 1)",
               "gap closed", "accuracy"]  # fmt: skip
    return tabulate(rows, headers=headers, tablefmt=fmt)


def headline(results: dict) -> str:
    r = results
    return (f"headline flow (cfg 1): gap closed lazy-50%-8={r['lazy-50%-8']['gap']:.0%} "
            f"(static {r['static-50%-8']['gap']:.0%}), lazy-30%-7={r['lazy-30%-7']['gap']:.0%} "
            f"(static {r['static-30%-7']['gap']:.0%}); FD full-8={r['full-8']['fd']:.2f} "
            f"lazy-50%-8={r['lazy-50%-8']['fd']:.2f} Euler-4={r['Euler-4']['fd']:.2f}")  # fmt: skip


def run(noise, labels, classifier, real_stats, out: Path | None, latency_images: int = 0, latency_repeats: int = 1,
        gates_dir: Path | None = None) -> dict:  # fmt: skip
    """The section: sample, measure, print the table, write ``flow_table.md`` under ``out``."""
    start = time.perf_counter()
    sampler = FlowSampler(*load_flow_dit(), gates_dir)
    results = evaluate(sampler, classifier, real_stats, noise, labels, latency_images, latency_repeats)
    print("\nFlow-matching model (SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler), CFG 1")
    print(table(results))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        text = (f"{len(noise)} samples, labels 0-9 in turn, the main job's noise; flow-matching digits model, "
                f"Euler (FlowMatchEulerDiscreteScheduler), CFG 1; FD against the 1,797 real digits\n\n")  # fmt: skip
        (out / "flow_table.md").write_text(text + table(results, "github") + "\n")
    print(headline(results) + f" ({time.perf_counter() - start:.0f} s)")
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-images", type=int, default=4, help="batch-1 images timed per method (0: skip)")
    p.add_argument("--latency-repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fit", action="store_true", help="fit the gates first (lazypass.fit's defaults)")
    p.add_argument("--calibrate", action="store_true", help="only set the gate files' thresholds to the MACs")
    p.add_argument("--fit-steps", type=int, default=None, help="optimiser steps (default: lazypass.fit's)")
    p.add_argument("--gates-dir", type=Path, default=None, help="folder of the gate files (default examples/assets)")
    p.add_argument("--out", type=Path, default=Path("docs/digits"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fit or args.calibrate:
        transformer, label_embedding = load_flow_dit()
        options = {} if args.fit_steps is None else dict(steps=args.fit_steps)
        for m in (m for m in METHODS if m.kind == "lazy"):
            path = gates_path(m.ratio, m.steps)
            path = args.gates_dir / path.name if args.gates_dir else path
            path.parent.mkdir(parents=True, exist_ok=True)
            if args.fit:
                fit_gates(transformer, label_embedding, m.ratio, m.steps, path, budget(m), **options)
            else:
                recalibrate(transformer, label_embedding, path, m.steps, budget(m))
    classifier = load_classifier()
    real_stats = gaussian_stats(classifier_outputs(classifier, load_digit_images()[0])[0])
    noise = torch.randn(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    labels = torch.arange(args.samples) % 10
    return run(noise, labels, classifier, real_stats, args.out, args.latency_images, args.latency_repeats, args.gates_dir)


if __name__ == "__main__":
    main()
