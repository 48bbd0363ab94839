"""Transfer: gates fitted at 20 steps (50% lazy) used at 10, 20 and 50 steps, against DDIM at equal MACs.

    PYTHONPATH=$PWD python benchmarks/transfer.py                 # 3 noise seeds x 500 samples, CFG 1
    PYTHONPATH=$PWD python benchmarks/transfer.py --samples 64 --seeds 0   # smoke run

The digits DiT of the main job (``examples/digits.py``) with the committed gates
``examples/assets/digits_gates_50pct_20steps.safetensors``, under the options saved with them.
At every step count only the threshold is calibrated again, to the same 50% lazy ratio (in
MACs) on held-out noise (seeds 20,000 and up); the gates themselves are the 20-step ones.
Each evaluation seed draws its own noise (labels 0-9 in turn). "DDIM@eq" is DDIM at the same
MACs per image as the lazy run: FD and PSNR interpolated linearly between the two DDIM step
counts around the lazy run's equivalent steps (MACs per image / MACs of one full call).
PSNR is against full compute at the lazy run's step count, from the same noise. "gap closed"
is ``(FD_DDIM@eq - FD_lazy) / (FD_DDIM@eq - FD_full)``. Mean and spread (half the range) over
the seeds; the last line is the headline.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import lazypass  # noqa: E402
from digits_eval import (  # noqa: E402
    NULL_CLASS, classifier_outputs, frechet_distance, gates_path, gaussian_stats, load_classifier,
    load_digit_images, load_dit, psnr,
)  # fmt: skip
from lazypass.checkpoint import read_gates  # noqa: E402
from lazypass.config import GATE_OPTIONS  # noqa: E402
from lazypass.fitting.calibrate import calibrate_threshold, lazy_sampling  # noqa: E402
from lazypass.fitting.sampler import Schedule  # noqa: E402
from lazypass.fitting.soft import default_call  # noqa: E402
from lazypass.runtime import runtime  # noqa: E402
from lazypass.sampling import ddim_sample  # noqa: E402

KW = dict(learned_sigma=False)


def calibration_batches(n: int, batch: int = 64, seed: int = 20_000) -> list[dict]:
    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(seed + k)
        out.append({"noise": torch.randn(batch, 1, 8, 8, generator=g), "cond": torch.randint(0, 10, (batch,), generator=g)})
    return out


def lazy_run(model, noise, labels, steps):
    with lazypass.trajectory(model):
        images = ddim_sample(model, noise, steps, cond=labels, **KW)
        skipped = lazypass.stats(model).skipped  # (calls, sites, rows)
    prog = runtime(model).program
    site = np.array([s.macs for s in prog.sites], dtype=float)
    ratio = float((skipped * site[None, :, None]).sum() / (site.sum() * skipped.shape[0] * skipped.shape[2]))
    equivalent = steps * (1 - ratio * site.sum() / prog.model_macs)  # full calls of the same MACs
    return images, ratio, equivalent


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--gates", type=Path, default=gates_path(0.5, 20), help="gate file fitted at 20 steps")
    p.add_argument("--calibration-batches", type=int, default=4, help="held-out batches of 64 for the threshold")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    plain, classifier = load_dit(), load_classifier()
    real = gaussian_stats(classifier_outputs(classifier, load_digit_images()[0])[0])
    saved = read_gates(args.gates).config
    lazy = lazypass.apply(load_dit(), **{k: saved[k] for k in GATE_OPTIONS})
    calib = calibration_batches(args.calibration_batches)
    fd = lambda images: frechet_distance(gaussian_stats(classifier_outputs(classifier, images)[0]), real)  # noqa: E731

    rows = []
    for steps in args.steps:
        lazy(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        lazypass.load_gates(lazy, args.gates)
        schedule = Schedule(None, steps)
        ratio0, scores = lazy_sampling(lazy, calib, default_call, schedule, 1.0)
        calibrated = calibrate_threshold(lazy, calib, default_call, schedule, 1.0, args.ratio, ratio0, scores)
        per_seed = []
        for seed in args.seeds:
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(args.samples, 1, 8, 8, generator=g)
            labels = torch.arange(args.samples) % 10
            with torch.no_grad():
                full = ddim_sample(plain, noise, steps, cond=labels, **KW)
                images, ratio, eq = lazy_run(lazy, noise, labels, steps)
                lo = max(int(math.floor(eq)), 1)
                ddim = {k: ddim_sample(plain, noise, k, cond=labels, **KW) for k in (lo, lo + 1)}
            w = eq - lo
            fd_d = (1 - w) * fd(ddim[lo]) + w * fd(ddim[lo + 1])
            ps_d = (1 - w) * psnr(ddim[lo], full) + w * psnr(ddim[lo + 1], full)
            f_full, f_lazy = fd(full), fd(images)
            per_seed.append(dict(ratio=ratio, eq=eq, fd=f_lazy, fd_ddim=fd_d, fd_full=f_full, psnr=psnr(images, full),
                                 psnr_ddim=ps_d, gap=(fd_d - f_lazy) / (fd_d - f_full)))  # fmt: skip
        agg = {k: (float(np.mean([r[k] for r in per_seed])), float(np.ptp([r[k] for r in per_seed]) / 2))
               for k in per_seed[0]}  # fmt: skip
        agg.update(steps=steps, calibrated=calibrated, threshold=runtime(lazy).threshold)
        rows.append(agg)
        print(f"  {steps} steps done [{time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)

    ms = lambda v, d=2: f"{v[0]:.{d}f} ± {v[1]:.{d}f}"  # noqa: E731
    table = [[r["steps"], f"{r['ratio'][0]:.3f}", f"{r['eq'][0]:.2f}", ms(r["fd"]), ms(r["fd_ddim"]), ms(r["fd_full"]),
              ms(r["psnr"]), ms(r["psnr_ddim"]), ms(r["gap"])] for r in rows]  # fmt: skip
    print(f"gates {args.gates.name} (fitted at 20 steps), threshold recalibrated to {args.ratio:.0%} per step count; "
          f"{len(args.seeds)} seeds x {args.samples} samples, CFG 1")  # fmt: skip
    print(tabulate(table, headers=["steps", "lazy ratio (MACs)", "DDIM steps @eq", "FD lazy", "FD DDIM@eq", "FD full",
                                   "PSNR lazy", "PSNR DDIM@eq", "gap closed"], tablefmt="github"))  # fmt: skip
    wins = [r["steps"] for r in rows if r["fd"][0] < r["fd_ddim"][0] and r["psnr"][0] > r["psnr_ddim"][0]]
    print(f"headline: 20-step gates beat DDIM at equal MACs on FD and PSNR at {wins} of {args.steps} steps; gap closed "
          + ", ".join(f"{r['steps']}: {r['gap'][0]:.2f}" for r in rows)
          + f" [{time.perf_counter() - start:.0f} s]")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
