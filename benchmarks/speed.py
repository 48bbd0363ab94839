"""Speed of ``torch.compile(model, backend="lazydit")`` against eager and plain Inductor.

Reference DiT (random init), 32x32x4 latents, batch 2, class labels, no guidance, no grad.

Per step (one model call at a new, lower timestep; caches valid):
  eager            the original model, eager
  inductor         torch.compile(original) (default backend)
  outside sites    torch.compile of the original with every attention and MLP branch replaced
                   by a pointwise op on its input (x * 0.5): what a call costs when only the
                   parts outside the sites run (embeddings, norms, modulation, final layer, residuals)
  lazydit 0%       torch.compile(lazypass.apply(copy), backend="lazydit"), default options, no
                   site skipping (threshold 1.5)
  lazydit all skip the same compiled model, every site skipping (threshold -0.5)
  lazydit r%       a second lazy model with granularity="site" (one gate per site): a fixed,
                   seeded subset of round(r * sites) sites always skips (gate bias +20, score ~1),
                   the others never do (bias -20); one compile serves every ratio (the gates are
                   graph inputs). With the default granularity="step" only the first site's gate
                   decides, so these rows need per-site gates.
End to end (DDIM steps from lazypass.sampling, the two trajectories advanced side by side):
  inductor DDIM-10   10 steps, no laziness
  lazydit DDIM-20    20 steps at 50% lazy: every site skips on every other step (threshold
                     -0.5 on odd steps, 1.5 on even ones, set in place between calls), so the
                     branch MACs equal DDIM-10's; what is left is the cost of the part of
                     the model outside the sites, the gates and the cache traffic.
Figures: e2e = lazydit DDIM-20 / inductor DDIM-10 (goal <= 1.03); zero = lazydit 0% /
inductor (goal <= 1.02); residue = lazydit all skip / outside sites (goal <= 1.03); skip
efficiency = measured speedup (site-gated lazydit 0% / r%) over the ideal speedup from MACs
(model MACs / MACs left), goal >= 0.95. All variants take turns within every repeat
(interleaved); medians.

``--tune-allocator`` calls lazypass.tune_cpu_allocator() first (glibc keeps freed memory: the
buffers each ``cond`` branch allocates then reuse pages instead of faulting fresh ones). It
changes the whole process, so compare it with a second run without the flag.

    PYTHONPATH=$PWD python benchmarks/speed.py [--models DiT-S/2 DiT-B/2] [--repeats 9] [--e2e-repeats 3]
                                               [--tune-allocator]
"""

import argparse
import copy
import os
import platform
import random
import statistics
import time

import torch
from tabulate import tabulate

import lazypass
from lazypass.models import build_dit
from lazypass.sampling import ddim_step, ddim_timesteps

RATIOS = (0.0, 0.3, 0.5)


def _skip_subset(gates, ratio, seed=0):
    """Sites that skip at this ratio: a seeded random subset (mixes attention and MLP sites)."""
    n = len(gates.layout)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    chosen = set(order[: round(ratio * n)])
    with torch.no_grad():
        for p in gates.weights:
            p.zero_()
        gates.bias.copy_(torch.tensor([20.0 if i in chosen else -20.0 for i in range(n)]))
    return chosen


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Pointwise(torch.nn.Module):
    """Stands in for a branch: reads its input once and writes one output, as a reuse does."""

    def forward(self, x):
        return x * 0.5


def outside_sites(model):
    """The model with every attention and MLP branch replaced by a pointwise op."""
    out = copy.deepcopy(model)
    for block in out.blocks:
        block.attn, block.mlp = _Pointwise(), _Pointwise()
    return out


def bench(name, args):
    torch.manual_seed(0)
    b = args.batch
    original = build_dit(name, input_size=32, init="random").eval()
    lazy = lazypass.apply(copy.deepcopy(original))
    sited = lazypass.apply(copy.deepcopy(original), granularity="site")
    x = torch.randn(b, 4, 32, 32)
    y = torch.randint(0, 1000, (b,))
    t0 = torch.full((b,), 999)
    sites = lazypass.report(lazy, x, t0, y, print_table=False)
    lazypass.trace(sited, x, t0, y)
    prog = lazypass.runtime.runtime(lazy).program_for((x, t0, y), {})[0]
    model_macs = prog.model_macs

    compiled, seconds = {}, {}
    with torch.no_grad():
        for key, model, backend in [("inductor", original, "inductor"), ("outside", outside_sites(original), "inductor"),
                                    ("lazydit", lazy, "lazydit"), ("sited", sited, "lazydit")]:
            start = time.perf_counter()
            compiled[key] = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
            compiled[key](x, t0, y)
            seconds[key] = time.perf_counter() - start

    step = {"n": 1}

    def call(fn, threshold=None, ratio=None):
        # a descending timestep per call, as in sampling: caches stay valid
        t = torch.full((b,), 999 - step["n"] % 999)
        step["n"] += 1
        if threshold is not None:
            lazypass.set_threshold(lazy, threshold)
        if ratio is not None:
            _skip_subset(sited.lazy_gates, ratio)
        start = time.perf_counter()
        with torch.no_grad():
            fn(x, t, y)
        return time.perf_counter() - start

    variants = {"eager": lambda: call(original), "inductor": lambda: call(compiled["inductor"]),
                "outside sites": lambda: call(compiled["outside"]),
                "lazydit 0%": lambda: call(compiled["lazydit"], threshold=1.5),
                "lazydit all skip": lambda: call(compiled["lazydit"], threshold=-0.5)}
    for r in RATIOS:
        variants[f"lazydit {r:.0%} (site gates)"] = lambda r=r: call(compiled["sited"], ratio=r)
    for fn in variants.values():
        fn(), fn()
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k, fn in variants.items():
            times[k].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}

    skipped_macs = {}
    for r in RATIOS:
        chosen = _skip_subset(sited.lazy_gates, r)
        skipped_macs[r] = sum(sites[i].macs for i in chosen)

    # End to end: DDIM-20 at 50% lazy (all sites skip every other step) vs DDIM-10 in full.
    # The two trajectories advance side by side (a DDIM-10 step after every second DDIM-20
    # step), so load changes on a shared machine hit both alike; sums of call+update times.
    def e2e():
        noise = torch.randn(b, 4, 32, 32, generator=torch.Generator().manual_seed(1))
        xl, xf, tl, tf = noise, noise, 0.0, 0.0
        ts20, ts10 = ddim_timesteps(20), ddim_timesteps(10)
        with torch.no_grad(), lazypass.trajectory(lazy):
            for i, t in enumerate(ts20):
                lazypass.set_threshold(lazy, -0.5 if i % 2 else 1.5)
                start = time.perf_counter()
                out = compiled["lazydit"](xl, torch.full((b,), t), y)
                xl = ddim_step(xl, out[:, :4], t, t - 50)
                tl += time.perf_counter() - start
                if i % 2 == 0:
                    t10 = ts10[i // 2]
                    start = time.perf_counter()
                    out = compiled["inductor"](xf, torch.full((b,), t10), y)
                    xf = ddim_step(xf, out[:, :4], t10, t10 - 100)
                    tf += time.perf_counter() - start
            st = lazypass.stats(lazy)
        return tl, tf, st

    runs = [e2e() for _ in range(args.e2e_repeats)]
    e2e_med = {"lazy": statistics.median(r[0] for r in runs), "full": statistics.median(r[1] for r in runs)}
    e2e_ratio = statistics.median(r[0] / r[1] for r in runs)
    e2e_stats = runs[-1][2]
    lazypass.set_threshold(lazy, 0.5)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    rows = [[name, k, "", f"{med[k] * 1e3:.1f}", "", ""]
            for k in ("eager", "inductor", "outside sites", "lazydit 0%", "lazydit all skip")]
    base = med["lazydit 0% (site gates)"]
    eff = {}
    for r in RATIOS:
        m = med[f"lazydit {r:.0%} (site gates)"]
        ideal = model_macs / (model_macs - skipped_macs[r])
        measured = base / m
        eff[r] = measured / ideal
        rows.append([name, f"lazydit {r:.0%} (site gates)", f"{skipped_macs[r] / model_macs:.1%}", f"{m * 1e3:.1f}",
                     f"{measured:.3f} / {ideal:.3f}", f"{eff[r]:.3f}" if r else ""])
    rows.append([name, "inductor DDIM-10 (full)", "", f"{e2e_med['full'] * 1e3:.0f}", "", ""])
    rows.append([name, f"lazydit DDIM-20 ({e2e_stats.lazy_ratio:.0%} lazy, {e2e_stats.saved_ratio:.0%} "
                       "saved)", "", f"{e2e_med['lazy'] * 1e3:.0f}", "", ""])
    return {
        "rows": rows,
        "zero": med["lazydit 0%"] / med["inductor"],
        "residue": med["lazydit all skip"] / med["outside sites"],
        "e2e": e2e_ratio,
        "graphs": graphs,
        "eff": eff,
        "sites": len(sites),
        "covered": sum(s.macs for s in sites) / model_macs,
        "compile": seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--e2e-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, 0: leave as is. 1 by default: on a shared, oversubscribed CPU, "
                             "OpenMP barriers between small kernels stall on descheduled threads and swamp the timings")
    parser.add_argument("--tune-allocator", action="store_true",
                        help="call lazypass.tune_cpu_allocator() first (process-wide; compare two runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "default allocator"
    if args.tune_allocator:
        allocator = "allocator tuned" if lazypass.tune_cpu_allocator() else "allocator not tunable here (not glibc)"

    print(f"{_cpu()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"batch {args.batch}, 32x32x4 latents; medians of {args.repeats} interleaved repeats per step, "
          f"{args.e2e_repeats} end to end; {allocator}", flush=True)
    headers = ["model", "variant", "MACs skipped", "ms", "speedup measured / ideal", "skip efficiency"]
    results = {}
    for name in args.models:  # each model's table as soon as it is measured
        r = results[name] = bench(name, args)
        print(f"{name}: {r['sites']} sites cover {r['covered']:.1%} of MACs; compile s: inductor "
              f"{r['compile']['inductor']:.0f}, lazydit {r['compile']['lazydit']:.0f} (site gates "
              f"{r['compile']['sited']:.0f}); dynamo graphs compiled so far: {r['graphs']} "
              "(4 per model: inductor, outside sites, lazydit, lazydit site gates; more would be recompiles)")
        print(tabulate(r["rows"], headers=headers), flush=True)
    if len(results) > 1:
        print(tabulate([row for r in results.values() for row in r["rows"]], headers=headers))
    print("speed: " + " ".join(
        f"{name}: e2e_ratio={r['e2e']:.3f} zero_vs_inductor={r['zero']:.3f} residue_vs_outside={r['residue']:.3f} "
        f"skip_eff30={r['eff'][0.3]:.3f} skip_eff50={r['eff'][0.5]:.3f};"
        for name, r in results.items()))


if __name__ == "__main__":
    main()
