"""Gates fitted at one step count, used at others: lazy ratio and fidelity at 10, 20 and 50 steps.

Fits the gates of a small DiT (the DiT-S/2 architecture at half depth and width, 16x16 latents,
random weights; see --help) at 20 DDIM steps with a
target lazy ratio, then samples the same noise and labels at several step counts three ways:
full compute, lazy (the fitted gates and calibrated threshold), and plain DDIM with fewer steps
at the same compute as the lazy run (the paper's comparison). Fidelity is PSNR against the
full-compute sample at that step count (higher is better).

    PYTHONPATH=$PWD python benchmarks/fit_steps.py
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from tabulate import tabulate

import lazypass
from lazypass.models import build_dit
from lazypass.sampling import ddim_sample


def make_model(args) -> torch.nn.Module:
    model = build_dit("DiT-S/2", input_size=args.input_size, num_classes=10, init="random",
                      depth=args.depth, hidden_size=args.hidden, num_heads=args.heads)
    # random adaLN weights leave every adaLN gate near zero, so no branch would matter;
    # scaled up, skipping a branch has a visible cost and the gates a trade-off to learn
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name:
                p.mul_(args.adaln_scale)
    return model.eval()


def batches(args, offset: int):
    def sample(i: int) -> dict:
        g = torch.Generator().manual_seed(offset + i)
        return {
            "noise": torch.randn(args.batch, 4, args.input_size, args.input_size, generator=g),
            "cond": torch.randint(0, 10, (args.batch,), generator=g),
        }

    return sample


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((x - ref) ** 2).mean())
    span = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(span**2 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-size", type=int, default=16, help="latent size (16: 8x8 patches = 64 tokens)")
    p.add_argument("--depth", type=int, default=6, help="DiT-S/2 has 12")
    p.add_argument("--hidden", type=int, default=192, help="DiT-S/2 has 384")
    p.add_argument("--heads", type=int, default=3, help="DiT-S/2 has 6")
    p.add_argument("--adaln-scale", type=float, default=25.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--fit-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--fit-at", type=int, default=20, help="DDIM steps the gates are fitted at")
    p.add_argument("--target", type=float, default=0.5, help="target lazy ratio at --fit-at steps")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = lazypass.apply(make_model(args))
    t0 = time.perf_counter()
    fit = lazypass.fit(model, batches(args, 0), steps=args.fit_steps, lr=args.lr, target_ratio=args.target,
                       num_inference_steps=args.fit_at, progress=False)
    fit_s = time.perf_counter() - t0
    threshold = fit.threshold
    print(f"fitted in {fit_s:.0f} s: rho {fit.rho_attn:.3g}, threshold {threshold:.4f}, lazy ratio at {args.fit_at} "
          f"steps {fit.lazy_ratio_before_calibration:.3f} before calibration, {fit.lazy_ratio:.3f} after")

    rows, headline = [], []
    for steps in args.eval_steps:
        ratios, saved, p_lazy, p_ddim, eq_steps = [], [], [], [], []
        for j in range(args.eval_batches):
            b = batches(args, 10_000)(j)  # never used for fitting or calibration
            lazypass.set_threshold(model, 1.5)  # never skip: the full-compute reference
            with lazypass.trajectory(model):
                full = ddim_sample(model, b["noise"], steps, cond=b["cond"])
            lazypass.set_threshold(model, threshold)
            with lazypass.trajectory(model):
                lazy = ddim_sample(model, b["noise"], steps, cond=b["cond"])
                st = lazypass.stats(model)
            ratios.append(st.lazy_ratio)
            saved.append(st.saved_ratio)
            # plain DDIM with the compute the lazy run spent (branches are ~all of the MACs)
            n = max(1, round(steps * (1 - st.saved_ratio)))
            eq_steps.append(n)
            lazypass.set_threshold(model, 1.5)
            with lazypass.trajectory(model):
                ddim = ddim_sample(model, b["noise"], n, cond=b["cond"])
            p_lazy.append(psnr(lazy, full))
            p_ddim.append(psnr(ddim, full))
        lazypass.set_threshold(model, threshold)
        rows.append([steps, f"{np.mean(ratios):.3f}", f"{np.mean(saved):.3f}", f"{np.mean(p_lazy):.2f}",
                     f"{np.mean(eq_steps):.1f}", f"{np.mean(p_ddim):.2f}"])
        headline.append(f"lazy@{steps}={np.mean(ratios):.2f} psnr@{steps}={np.mean(p_lazy):.1f}dB")
    print(tabulate(rows, headers=["DDIM steps", "lazy ratio", "compute-saved ratio", "PSNR lazy vs full (dB)",
                                  "DDIM steps at equal compute", "PSNR DDIM-equal vs full (dB)"]))
    print(f"fit@{args.fit_at} target {args.target}: " + " ".join(headline))


if __name__ == "__main__":
    main()
