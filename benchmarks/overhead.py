"""Cost of the lazy model in eager mode: gate overhead, all-skip residue, lazy sampling, compaction.

Every table times its variants side by side (they take turns in every repeat; medians), so
the ratios hold on a busy machine even where the milliseconds do not.

1. DiT-S/2 (random weights), 32x32x4 latents, batch 2, per call:
     original            the model before lazypass.apply
     lazy, never skip    threshold 1.5: gates, conditionals and cache bookkeeping run, nothing skips
     lazy, all skip      threshold -0.5 with valid caches: every site reuses its cache
   The never-skip ratio is the gate overhead (goal <= 1.02). For the all-skip variant the ideal
   is the original latency scaled by the MACs left outside the sites.
2. The digits DiT of examples/digits.py (examples/assets), one image at batch 1, DDIM-20, CFG 1
   and 2 (CFG 2 runs cond and uncond rows in one batch of 2): full compute against the fitted
   50% gates (digits_gates_50pct_20steps.safetensors, with the options they were fitted under).
   Goal: lazy faster than full, by a margin close to the MACs saved. On this tiny model the parts
   outside the sites (embeddings, norms, modulation, residuals: per-op cost, few MACs) take a
   large share of the time, so the table also times the model with every branch replaced by a
   pointwise op ("no branches", speed.py's outside-sites model): the ideal lazy time is that
   floor plus the share of branch compute that ran times (full - floor).
0. (``--parts 0``, load-independent) aten ops dispatched and MB written by copies per call, for
   the variants of table 1 and for the digits DiT with its fitted gates' options.
3. DiT-S/2 at batch 8 with about half the rows skipping each site (granularity="site", so that
   every site decides for itself; seeded random gate weights, each site's bias re-centred before
   every call so that its median row sits at the threshold): batch_compute="full" against
   "compact", and the ideal from the MACs compact executed.

    PYTHONPATH=$PWD python benchmarks/overhead.py [--repeats 7] [--parts 0 1 2 3]
"""

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import lazypass
from lazypass.models import build_dit
from lazypass.runtime import runtime
from lazypass.sampling import ddim_sample

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def interleaved(variants: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per variant; the variants take turns within every repeat. A variant that
    returns a number has timed itself (to leave set-up out)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            took = fn()
            times[name].append(took if isinstance(took, float) else time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def _dit(batch: int, **options):
    torch.manual_seed(0)
    original = build_dit("DiT-S/2", input_size=32, init="random").eval()
    lazy = lazypass.apply(copy.deepcopy(original), **options)
    x = torch.randn(batch, 4, 32, 32)
    y = torch.randint(0, 1000, (batch,))
    sites = lazypass.report(lazy, x, torch.full((batch,), 999), y, print_table=False)
    prog = runtime(lazy).program_for((x, torch.full((batch,), 999), y), {})[0]
    return original, lazy, x, y, sites, prog


def _caller(batch: int, x, y):
    step = {"n": 0}

    def call(model, threshold=None):
        # a descending timestep per call, as in sampling: caches stay valid, runs never restart
        t = torch.full((batch,), 999 - step["n"] % 999)
        step["n"] += 1
        if threshold is not None:
            lazypass.set_threshold(model, threshold)
        with torch.no_grad():
            model(x, t, y)

    return call


_COPIES = ("aten.copy_.default", "aten.index_copy_.default", "aten.index_select.default",
            "aten._to_copy.default", "aten.clone.default")


def _dispatched(fn) -> tuple[int, float]:
    """(aten ops dispatched, MB written by copy-like ops) while ``fn`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.mb = 0, 0.0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops += 1
            if str(func) in _COPIES:
                written = args[1] if func is torch.ops.aten.copy_.default else out
                self.mb += written.numel() * written.element_size() / 2**20
            return out

    count = Count()
    with count, torch.no_grad():
        fn()
    return count.ops, count.mb


def part_count(args) -> dict:
    rows = []
    original, lazy, x, y, sites, prog = _dit(2)
    call = _caller(2, x, y)
    call(lazy, 1.5), call(lazy, 1.5)  # caches valid
    for name, fn in (("original", lambda: call(original)), ("lazy, never skip", lambda: call(lazy, 1.5)),
                     ("lazy, all skip", lambda: call(lazy, -0.5))):
        ops, mb = _dispatched(fn)
        rows.append(["DiT-S/2, batch 2", name, ops, f"{mb:.2f}"])
    sys.path.insert(0, str(EXAMPLES))
    from digits_eval import gates_path, load_dit

    from lazypass.checkpoint import read_gates
    from lazypass.config import GATE_OPTIONS

    plain = load_dit()
    saved = read_gates(gates_path(0.5, 20)).config
    lazy = lazypass.apply(copy.deepcopy(plain), **{k: saved[k] for k in GATE_OPTIONS})
    xd, yd = torch.randn(1, 1, 8, 8), torch.tensor([3])
    call = _caller(1, xd, yd)
    call(lazy, 1.5), call(lazy, 1.5)
    for name, fn in (("original", lambda: call(plain)), ("lazy, never skip", lambda: call(lazy, 1.5)),
                     ("lazy, all skip", lambda: call(lazy, -0.5))):
        ops, mb = _dispatched(fn)
        rows.append(["digits DiT, batch 1", name, ops, f"{mb:.2f}"])
    print("\n0. per call: aten ops dispatched and MB written by copies (load-independent)")
    print(tabulate(rows, headers=["model", "variant", "aten ops", "MB copied"]), flush=True)
    return {}


def part_overhead(args) -> dict:
    b = 2
    original, lazy, x, y, sites, prog = _dit(b)
    covered = sum(s.macs for s in sites) / prog.model_macs
    call = _caller(b, x, y)
    med = interleaved({
        "original": lambda: call(original),
        "lazy, never skip": lambda: call(lazy, 1.5),
        "lazy, all skip": lambda: call(lazy, -0.5),
    }, args.repeats, warmup=2)
    base = med["original"]
    ideal = base * (1 - covered)
    rows = [["original", f"{base * 1e3:.1f}", "1.000", "", ""],
            ["lazy, never skip", f"{med['lazy, never skip'] * 1e3:.1f}", f"{med['lazy, never skip'] / base:.3f}", "", ""],
            ["lazy, all skip", f"{med['lazy, all skip'] * 1e3:.1f}", f"{med['lazy, all skip'] / base:.3f}",
             f"{ideal * 1e3:.2f}", f"{med['lazy, all skip'] / ideal:.1f}x"]]
    print(f"\n1. DiT-S/2, batch {b}, 32x32x4 latents, eager, {len(sites)} sites covering {covered:.1%} of MACs")
    print(tabulate(rows, headers=["variant", "ms/call", "vs original", "ideal ms (MACs)", "vs ideal"]), flush=True)
    return {"zero": med["lazy, never skip"] / base, "all_skip": med["lazy, all skip"] / base,
            "all_skip_vs_ideal": med["lazy, all skip"] / ideal}


def part_digits(args) -> dict:
    sys.path.insert(0, str(EXAMPLES))
    from digits_eval import NULL_CLASS, gates_path, load_dit

    from lazypass.checkpoint import read_gates
    from lazypass.config import GATE_OPTIONS

    from speed import outside_sites

    path = gates_path(0.5, 20)
    plain = load_dit()
    floor = outside_sites(plain)
    saved = read_gates(path).config
    lazy = lazypass.apply(copy.deepcopy(plain), **{k: saved[k] for k in GATE_OPTIONS})
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    label = torch.tensor([3])
    lazypass.trace(lazy, noise, torch.full((1,), 999), label)
    lazypass.trace(lazy, noise.repeat(2, 1, 1, 1), torch.full((2,), 999), label.repeat(2))
    lazypass.load_gates(lazy, path)
    rows, out = [], {}
    for guidance in (1.0, 2.0):
        kwargs = dict(cond=label, guidance_scale=guidance, null_cond=torch.tensor(NULL_CLASS), learned_sigma=False)

        def lazy_run():
            with lazypass.trajectory(lazy):
                ddim_sample(lazy, noise, 20, **kwargs)
                lazy_run.stats = lazypass.stats(lazy)

        med = interleaved({"full": lambda: ddim_sample(plain, noise, 20, **kwargs), "lazy": lazy_run,
                           "no branches": lambda: ddim_sample(floor, noise, 20, **kwargs)},
                          args.repeats * 3, warmup=2)
        st = lazy_run.stats
        ratio = med["lazy"] / med["full"]
        ideal = med["no branches"] + (1 - st.compute_saved) * (med["full"] - med["no branches"])
        rows.append([f"CFG {guidance:g}", f"{med['full'] * 1e3:.1f}", f"{med['lazy'] * 1e3:.1f}", f"{ratio:.3f}",
                     f"{st.lazy_ratio:.0%}", f"{st.compute_saved:.0%}", f"{med['no branches'] * 1e3:.1f}",
                     f"{ideal / med['full']:.3f}", f"{med['lazy'] / ideal:.3f}"])
        out[f"cfg{guidance:g}"] = ratio
        out[f"cfg{guidance:g}_vs_ideal"] = med["lazy"] / ideal
    print("\n2. digits DiT (examples/assets), one image at batch 1, DDIM-20, fitted 50% gates, eager; ideal = "
          "no-branches time + share of branch compute run x (full - no branches)")
    print(tabulate(rows, headers=["guidance", "full-20 ms", "lazy-20 ms", "lazy / full", "lazy ratio",
                                  "branch compute saved", "no branches ms", "ideal / full", "lazy / ideal"]),
          flush=True)
    return out


def _half_skipping(lazy, x, y, batch):
    """Seeded random gate weights and a call that keeps half the rows of every site skipping: before
    each timed call, every site's bias moves its median row of the previous call just below the
    threshold (logits drift slowly from one timestep to the next)."""
    gates = lazy.lazy_gates
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gates.parameters():
            p.zero_()
        for p in gates.weights:
            p.copy_(torch.randn(p.shape, generator=g) * 1e-3)  # logits of order 1: scores not saturated
    step = {"n": 0}

    def recentre():
        st = lazypass.stats(lazy)
        if st.scores.shape[0]:
            last = torch.as_tensor(st.scores[-1]).double().clamp(1e-12, 1 - 1e-12)
            with torch.no_grad():
                gates.bias.sub_(torch.logit(last).median(dim=1).values.float() + 1e-3)

    def call():
        recentre()
        t = torch.full((batch,), 999 - step["n"] % 999)
        step["n"] += 1
        start = time.perf_counter()
        with torch.no_grad():
            lazy(x, t, y)
        return time.perf_counter() - start

    lazypass.set_threshold(lazy, 0.5)
    return call


def part_compact(args) -> dict:
    b = 8
    # per-site decisions: with one decision per step (the default) a row skips every site or none,
    # and the re-centred biases of the sites after the first would not count
    original, full, x, y, sites, prog = _dit(b, granularity="site", batch_compute="full")
    compact = lazypass.apply(copy.deepcopy(original), granularity="site", batch_compute="compact")
    lazypass.trace(compact, x, torch.full((b,), 999), y)
    run_full, run_compact = _half_skipping(full, x, y, b), _half_skipping(compact, x, y, b)
    call = _caller(b, x, y)
    med = interleaved({"original": lambda: call(original), "lazy, full rows": run_full,
                       "lazy, compact": run_compact}, args.repeats, warmup=2)
    st_full, st = lazypass.stats(full), lazypass.stats(compact)
    timed = slice(st.computed.shape[0] - args.repeats, None)  # the timed calls (after the warm-up)
    share = lambda s_: float((s_.computed[timed] * [x.macs for x in s_.sites]).sum()  # noqa: E731
                             / (prog.model_macs * args.repeats))
    ideal = med["original"] * (1 - sum(x.macs for x in sites) / prog.model_macs + share(st))
    base = med["original"]
    half = lambda s_: float(s_.skipped[timed].mean())  # noqa: E731
    rows = [["original", f"{base * 1e3:.0f}", "1.000", "", "", ""],
            ["lazy, batch_compute=full", f"{med['lazy, full rows'] * 1e3:.0f}", f"{med['lazy, full rows'] / base:.3f}",
             f"{half(st_full):.0%}", f"{1 - st_full.computed[timed].mean():.0%}", ""],
            ["lazy, batch_compute=compact", f"{med['lazy, compact'] * 1e3:.0f}", f"{med['lazy, compact'] / base:.3f}",
             f"{half(st):.0%}", f"{1 - st.computed[timed].mean():.0%}", f"{med['lazy, compact'] / ideal:.2f}"]]
    print(f"\n3. DiT-S/2, batch {b}, half the rows skipping each site, eager; ideal = original x share of MACs "
          f"compact executed = {ideal * 1e3:.0f} ms")
    print(tabulate(rows, headers=["variant", "ms/call", "vs original", "lazy ratio", "branch compute saved",
                                  "vs ideal"]), flush=True)
    return {"compact_vs_full": med["lazy, compact"] / med["lazy, full rows"],
            "compact_vs_ideal": med["lazy, compact"] / ideal}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--parts", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, load average "
          f"{load:.1f}; {args.repeats} interleaved repeats (medians)")
    parts = {0: part_count, 1: part_overhead, 2: part_digits, 3: part_compact}
    found = {}
    for k in args.parts:
        found.update(parts[k](args))
    print("overhead: " + " ".join(f"{k}={v:.3f}" for k, v in found.items()))


if __name__ == "__main__":
    main()
