"""Compiled 0%-lazy cost against plain Inductor, with glibc's default allocator and with
``lazypass.tune_cpu_allocator()``.

The allocator setting is process-wide, so each variant runs in its own child process: DiT-S/2
(random init), batch 2, 32x32x4 latents; ``torch.compile`` of the original (Inductor) and of a
lazy copy (``lazydit``, threshold 1.5: nothing skips); then ``--pairs`` pairs of calls, Inductor
then lazy, each at a new timestep; the ratio of each pair; median and quartiles. Pairs keep load
changes on a shared machine out of the ratio.

    PYTHONPATH=$PWD python benchmarks/allocator.py [--pairs 30]
"""

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time

import torch

import lazypass
from lazypass.models import build_dit


def child(tuned: bool, pairs: int) -> dict:
    applied = lazypass.tune_cpu_allocator() if tuned else False
    torch.set_num_threads(1)
    torch.manual_seed(0)
    b = 2
    original = build_dit("DiT-S/2", input_size=32, init="random").eval()
    lazy = lazypass.apply(copy.deepcopy(original))
    x, y = torch.randn(b, 4, 32, 32), torch.randint(0, 1000, (b,))
    lazypass.trace(lazy, x, torch.full((b,), 999), y)
    lazypass.set_threshold(lazy, 1.5)
    with torch.no_grad():
        inductor = torch.compile(original, fullgraph=True, dynamic=False)
        lazydit = torch.compile(lazy, backend="lazydit", fullgraph=True, dynamic=False)
        step = {"n": 0}

        def call(fn) -> float:
            step["n"] += 1
            t = torch.full((b,), 999 - step["n"] % 999)
            start = time.perf_counter()
            fn(x, t, y)
            return time.perf_counter() - start

        for _ in range(3):
            call(inductor), call(lazydit)
        ratios = sorted(call(lazydit) / call(inductor) for _ in range(pairs))
    q = len(ratios) // 4
    return {"applied": applied, "median": statistics.median(ratios), "q1": ratios[q], "q3": ratios[-q - 1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "tuned", args.pairs)))
        return
    rows = {}
    for variant in ("default", "tuned"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--pairs", str(args.pairs)],
                             check=True, capture_output=True, text=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    print(f"DiT-S/2, batch 2, 1 thread, torch {torch.__version__}; lazydit 0% / inductor over {args.pairs} "
          "paired calls (each variant in its own process)")
    print(f"{'allocator':<10} {'median':>7} {'quartiles':>13}")
    for variant, r in rows.items():
        note = "" if variant == "default" or r["applied"] else "  (not applied: not glibc)"
        print(f"{variant:<10} {r['median']:7.3f} {r['q1']:6.3f}-{r['q3']:.3f}{note}")
    print(f"allocator: default={rows['default']['median']:.3f} tuned={rows['tuned']['median']:.3f}")


if __name__ == "__main__":
    main()
