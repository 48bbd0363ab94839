"""Gate overhead and skip efficiency of the lazy model in eager mode.

DiT-S/2 (random weights), 32x32x4 latents, batch 2. Per-step latency, measured side by side
(the three variants take turns in every repeat; medians):
  original            the model before lazypass.apply
  lazy, never skip    threshold 1.5: gates, conditionals and cache bookkeeping run, nothing skips
  lazy, all skip      threshold -0.5 with valid caches: every site reuses its cache
The never-skip ratio is the gate overhead (goal <= 1.01). For the all-skip variant the ideal is
the original latency scaled by the MACs left outside the sites.

    python benchmarks/overhead.py [--model DiT-S/2] [--repeats 15]
"""

import argparse
import copy
import platform
import statistics
import time

import torch
from tabulate import tabulate

import lazypass
from lazypass.models import build_dit


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    original = build_dit(args.model, input_size=32, init="random").eval()
    lazy = lazypass.apply(copy.deepcopy(original))
    x = torch.randn(args.batch, 4, 32, 32)
    y = torch.randint(0, 1000, (args.batch,))
    sites = lazypass.report(lazy, x, torch.full((args.batch,), 999), y, print_table=False)
    prog = lazypass.runtime.runtime(lazy).program_for((x, torch.full((args.batch,), 999), y), {})[0]
    covered = sum(s.macs for s in sites) / prog.model_macs

    step = {"n": 0}

    def call(model, threshold=None):
        # a descending timestep per call, as in sampling: caches stay valid, runs never restart
        t = torch.full((args.batch,), 999 - step["n"] % 999)
        step["n"] += 1
        if threshold is not None:
            lazypass.set_threshold(model, threshold)
        start = time.perf_counter()
        with torch.no_grad():
            model(x, t, y)
        return time.perf_counter() - start

    variants = {
        "original": lambda: call(original),
        "lazy, never skip": lambda: call(lazy, 1.5),
        "lazy, all skip": lambda: call(lazy, -0.5),
    }
    for fn in variants.values():  # warm up; also fills the caches
        fn(), fn()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["original"]
    ideal_skip = base * (1 - covered)
    rows = [
        ["original", f"{base * 1e3:.1f}", "1.000", "", ""],
        ["lazy, never skip", f"{med['lazy, never skip'] * 1e3:.1f}", f"{med['lazy, never skip'] / base:.3f}",
         "", ""],
        ["lazy, all skip", f"{med['lazy, all skip'] * 1e3:.1f}", f"{med['lazy, all skip'] / base:.3f}",
         f"{ideal_skip * 1e3:.2f}", f"{med['lazy, all skip'] / ideal_skip:.1f}x"],
    ]
    print(f"{args.model}, batch {args.batch}, 32x32x4 latents, eager, {len(sites)} sites covering "
          f"{covered:.1%} of MACs; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.repeats} repeats (medians)")
    print(tabulate(rows, headers=["variant", "ms/step", "vs original", "ideal ms (MACs)", "vs ideal"]))
    print(f"overhead: ratio={med['lazy, never skip'] / base:.3f} all_skip_ratio={med['lazy, all skip'] / base:.3f} "
          f"all_skip_vs_ideal={med['lazy, all skip'] / ideal_skip:.1f}")


if __name__ == "__main__":
    main()
