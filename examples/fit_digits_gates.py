"""Fit the digits DiT's gates, data-free, for the main job (``examples/digits.py``).

    PYTHONPATH=$PWD python examples/fit_digits_gates.py

Two gate sets, as in LazyDiT's table 1: 50% lazy for 20 DDIM steps and 30% lazy for 10 steps.
``lazypass.fit`` trains only the gates with its default on-policy objective, data-free (noise
and random labels): it unrolls the lazy model itself (lazypass's defaults: one decision per
step, forecast reuse, gates reading the cache age and input drift), prices every decision by
its effect on the final sample against the full model from the same noise, fits the gates to
the target lazy ratio and calibrates the threshold on held-out noise (counted in MACs); the
gates, that threshold and the options they were fitted under are saved with
``lazypass.save_gates``. The noise here is drawn from seeds 10,000 and up, so it never
overlaps the evaluation noise of the main job (seed 0). ``--objective one_step`` (with
``--reuse copy --granularity site``) fits the paper's way, for comparison. ``--solver UniPC`` fits
the same two gate sets over diffusers' UniPC (``scheduler=``; the main job's "over UniPC" rows).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lazypass
from digits_eval import DIT_PATH, NULL_CLASS, SOLVERS, gates_path, load_dit, make_solver

TARGETS = [(0.5, 20), (0.3, 10)]


def batches(batch: int, seed: int):
    def sample_fn(i: int) -> dict:
        g = torch.Generator().manual_seed(seed + i)
        return {
            "noise": torch.randn(batch, 1, 8, 8, generator=g),
            "cond": torch.randint(0, 10, (batch,), generator=g),
            "null_cond": torch.full((batch,), NULL_CLASS),  # fit (issue4 0785a60) fails on a 0-d null id
        }

    return sample_fn


def fit_one(ratio: float, steps: int, args) -> dict:
    granularity = int(args.granularity) if args.granularity.isdigit() else args.granularity
    model = lazypass.apply(load_dit(args.dit), rho=args.rho, max_age=args.max_age, reuse=args.reuse,
                           granularity=granularity)  # fmt: skip
    start = time.perf_counter()
    result = lazypass.fit(
        model, batches(args.batch, args.seed), objective=args.objective, steps=args.fit_steps, lr=args.lr,
        rounds=args.rounds, target_ratio=ratio, num_inference_steps=steps, guidance_scale=args.guidance,
        calibration_batches=args.calibration_batches,
        **({} if args.solver == "DDIM" else {"scheduler": make_solver(args.solver)}),
    )  # fmt: skip
    target = gates_path(ratio, steps, args.solver)
    path = args.out_dir / target.name if args.out_dir else target
    lazypass.save_gates(model, path)
    info = dict(
        target=ratio, steps=steps, lazy_ratio=result.lazy_ratio,
        before_calibration=result.lazy_ratio_before_calibration, threshold=result.threshold,
        objective=args.objective, solver=args.solver, final_fidelity=result.fidelity[-1],
        seconds=round(time.perf_counter() - start, 1), path=str(path),
    )  # fmt: skip
    print(info)
    return info


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", default="on_policy", choices=["on_policy", "one_step"])
    p.add_argument("--fit-steps", type=int, default=400, help="optimiser steps (per round with on_policy)")
    p.add_argument("--lr", type=float, default=None, help="default: the objective's (0.05 on_policy, 1e-4 one_step)")
    p.add_argument("--rounds", type=int, default=3, help="on_policy rounds of rollouts (one batch each)")
    p.add_argument("--rho", type=float, default=1e-2, help="initial rho of one_step (adapted toward the target)")
    p.add_argument("--reuse", default="forecast", choices=["forecast", "copy"])
    p.add_argument("--granularity", default="step", help='"step", "site" or sites per group')
    p.add_argument("--calibration-batches", type=int, default=4, help="held-out batches the threshold is set on")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", type=float, default=None, help="fit only this target ratio")
    p.add_argument("--out-dir", type=Path, default=None, help="default examples/assets")
    p.add_argument("--dit", type=Path, default=DIT_PATH, help="DiT checkpoint")
    p.add_argument("--solver", default="DDIM", choices=("DDIM",) + SOLVERS, help="the sampler the gates are fitted over")
    p.add_argument("--max-age", type=int, default=None, help="1: never reuse a cache twice in a row")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return [fit_one(r, s, args) for r, s in TARGETS if args.only is None or r == args.only]


if __name__ == "__main__":
    main()
