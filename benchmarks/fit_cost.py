"""Peak memory and wall time of fitting the gates of DiT-S/2 (batch 8, 32x32 latents).

Each measurement runs in its own subprocess, which reports its own peak resident set size
(``ru_maxrss``; tracemalloc does not see torch's allocations):

* ``inference``: build DiT-S/2, apply lazypass, one lazy forward at batch 8 (the baseline
  any user of the model pays anyway);
* ``fit``: the same, then ``lazypass.fit``: by default the on-policy objective, one round of
  rollouts at 50 DDIM steps (about ``L**2`` = 2,500 model calls of the batch, no gradients) and
  50 optimiser steps of the gate fit; ``--objective one_step --num-inference-steps 20`` measures
  the paper's objective (50 optimiser steps of self-distillation).

    PYTHONPATH=$PWD python benchmarks/fit_cost.py
    PYTHONPATH=$PWD python benchmarks/fit_cost.py --objective one_step --num-inference-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from tabulate import tabulate


def child(args) -> None:
    import lazypass
    from lazypass.models import build_dit

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_dit("DiT-S/2", input_size=args.input_size, init="random").eval()
    lazypass.apply(model)
    size = args.input_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, size, size, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    with torch.no_grad():
        model(x, torch.full((args.batch,), 999), y)
    setup = time.perf_counter() - t0
    fit_s = fit_cpu = 0.0
    if args.mode == "fit":

        def sample(i):
            g = torch.Generator().manual_seed(i)
            return {"noise": torch.randn(args.batch, 4, size, size, generator=g),
                    "cond": torch.randint(0, 1000, (args.batch,), generator=g)}

        t1 = time.perf_counter()
        cpu0 = time.process_time()
        lazypass.fit(model, sample, objective=args.objective, steps=args.steps, rounds=args.rounds,
                     num_inference_steps=args.num_inference_steps, progress=False)  # fmt: skip
        fit_s = time.perf_counter() - t1
        fit_cpu = time.process_time() - cpu0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"mode": args.mode, "peak_mib": usage.ru_maxrss / 1024,  # ru_maxrss is in KiB on Linux
                      "setup_s": setup, "fit_s": fit_s, "fit_cpu_s": fit_cpu, "cpu_s": usage.ru_utime + usage.ru_stime}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="fit (optimiser) steps")
    p.add_argument("--num-inference-steps", type=int, default=50)
    p.add_argument("--objective", default="on_policy", choices=["on_policy", "one_step"])
    p.add_argument("--rounds", type=int, default=1, help="on_policy rounds of rollouts")
    p.add_argument("--input-size", type=int, default=32, help="latent size (32: ImageNet 256x256, 256 tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=["inference", "fit"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        child(args)
        return

    results = {}
    for mode in ("inference", "fit"):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "mode"
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    inf, fit = results["inference"], results["fit"]
    rows = [
        ["apply + one lazy forward (batch %d)" % args.batch, f"{inf['peak_mib']:.0f}", f"{inf['setup_s']:.1f}", "-", "-"],
        [f"+ fit ({args.objective}{f', {args.rounds} round(s)' if args.objective == 'on_policy' else ''}, "
         f"{args.steps} optimiser steps) at {args.num_inference_steps} DDIM steps", f"{fit['peak_mib']:.0f}",
         f"{fit['setup_s']:.1f}", f"{fit['fit_s']:.1f}", f"{fit['fit_cpu_s']:.1f}"],
    ]
    print(f"DiT-S/2, {args.input_size}x{args.input_size} latents, batch {args.batch}, torch threads {args.threads}")
    print(tabulate(rows, headers=["process", "peak RSS (MiB)", "setup (s)", "fit wall time (s)", "fit CPU time (s)"]))
    print(f"fit cost: peak_rss={fit['peak_mib']:.0f}MiB (+{fit['peak_mib'] - inf['peak_mib']:.0f}MiB over inference) "
          f"wall={fit['fit_s']:.0f}s ({fit['fit_s'] / args.steps:.2f}s/step) cpu={fit['fit_cpu_s']:.0f}s "
          f"load_avg={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
