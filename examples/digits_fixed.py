"""Fixed skip schedules of the digits DiT: patterns, the best-schedule search and its assets.

A fixed schedule is a (steps, sites) bool table: ``table[i, s]`` means that every sample reuses
site ``s`` at sampling step ``i`` (never at step 0, when no cache holds anything). It runs
through the public API: a lazy copy of the model with zero gate weights, whose per-site gate
bias is set before every step to +20 (score ~1, skip) or -20 (score ~0, compute), as
``benchmarks/speed.py`` forces its ratios. The lazy ratio of a table is the share of branch
MACs it skips (attention and MLP branches differ in MACs), which is what "equal MACs" compares.

The best fixed schedule at a budget is found on final-sample error, on search noise (seed 800,
random labels) that neither the evaluation noise (seeds 0, 1, 2) nor the gate fitting (seeds
10,000 and up) uses: a greedy search from the empty table adds the (step, site) skips with the
least error per MAC saved, a few per round (a lazy-greedy shortlist between full rounds), up to
the budget; a hill climb with MAC-preserving moves (swap one skipped site for another of the
same kind, or swap the rows of two steps) then starts from the better of that and the evenly
spread schedule. Regenerate the committed assets with

    PYTHONPATH=$PWD python examples/digits_fixed.py            # 20 steps 50%, 10 steps 30%

Example:
    >>> from digits_fixed import spread_table
    >>> [i for i, row in enumerate(spread_table(10, 0.3, 8)) if row.all()]
    [3, 6, 9]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import lazypass
from digits_eval import ASSETS, DIT_PATH, load_dit
from lazypass.runtime import runtime
from lazypass.sampling import ddim_sample

SEARCH_SEED = 800
TOLERANCE = 0.005  # the search keeps the ratio within half a point of its budget
SKIP, COMPUTE = 20.0, -20.0  # gate biases: sigmoid(+-20) is 1 or 0 to float precision


def schedule_path(ratio: float, steps: int) -> Path:
    """The committed best fixed schedule, e.g. ``digits_best_fixed_20steps_50pct.json``."""
    return ASSETS / f"digits_best_fixed_{steps}steps_{round(ratio * 100)}pct.json"


def spread_table(steps: int, ratio: float, n_sites: int) -> np.ndarray:
    """Every site reuses on evenly spread steps, never step 0 (the main job's ``static``)."""
    rows = [math.floor((i + 1) * ratio + 1e-9) > math.floor(i * ratio + 1e-9) for i in range(steps)]
    return np.repeat(np.array(rows, dtype=bool)[:, None], n_sites, axis=1)


def alternating_table(steps: int, ratio: float, sites_per_block: int, n_sites: int) -> np.ndarray:
    """Blocks alternate: even blocks reuse on the spread steps, odd blocks one step earlier
    (fixed parity, as the official LazyDiT and Learning-to-Cache code reuse)."""
    spread = spread_table(steps, ratio, 1)[:, 0]
    table = np.zeros((steps, n_sites), dtype=bool)
    even = np.array([(s // sites_per_block) % 2 == 0 for s in range(n_sites)])
    for i in np.flatnonzero(spread):
        table[i, even] = True
        if i >= 2:
            table[i - 1, ~even] = True
    return table


def table_ratio(table: np.ndarray, site_macs: np.ndarray) -> float:
    """Share of branch MACs a fixed table skips."""
    return float((table * site_macs).sum() / (table.shape[0] * site_macs.sum()))


@dataclass(frozen=True)
class Schedule:
    """A fixed schedule as saved: the table, the reuse mode it was found for, and its ratio."""

    table: np.ndarray
    reuse: str
    steps: int
    target: float
    lazy_ratio: float
    sites: list[str]
    meta: dict


def save_schedule(path: Path, table: np.ndarray, reuse: str, target: float, sites: list[str],
                  site_macs: np.ndarray, meta: dict) -> None:  # fmt: skip
    d = dict(steps=int(table.shape[0]), target_ratio=target, lazy_ratio=round(table_ratio(table, site_macs), 6),
             reuse=reuse, sites=sites, table=["".join("x" if v else "." for v in row) for row in table],
             **meta)  # fmt: skip
    path.write_text(json.dumps(d, indent=1) + "\n")


def load_schedule(path: Path) -> Schedule:
    """Read a schedule asset; rows are strings, ``x`` = reuse, ``.`` = compute.

    Example:
        >>> s = load_schedule(schedule_path(0.5, 20))
        >>> s.table.shape, s.reuse
        ((20, 8), 'forecast')
    """
    d = json.loads(Path(path).read_text())
    rows = d["table"]
    if len(rows) != d["steps"] or any(set(r) - {"x", "."} or len(r) != len(d["sites"]) for r in rows):
        raise ValueError(f"{path}: table must be {d['steps']} rows of {len(d['sites'])} characters 'x' or '.'")
    table = np.array([[c == "x" for c in r] for r in rows], dtype=bool)
    if table[0].any():
        raise ValueError(f"{path}: step 0 cannot reuse (no cache holds anything yet)")
    meta = {k: v for k, v in d.items() if k not in ("table", "reuse", "steps", "target_ratio", "lazy_ratio", "sites")}
    return Schedule(table, d["reuse"], d["steps"], d["target_ratio"], d["lazy_ratio"], d["sites"], meta)


class FixedRunner:
    """A lazy copy of ``model`` that follows fixed tables (``reuse`` = "copy" or "forecast")."""

    def __init__(self, model: torch.nn.Module, reuse: str):
        self.lazy = lazypass.apply(copy.deepcopy(model), reuse=reuse, gate_inputs=(), granularity="site")
        x, t, y = torch.zeros(1, 1, 8, 8), torch.full((1,), 999), torch.zeros(1, dtype=torch.long)
        prog = runtime(self.lazy).program_for((x, t, y), {})[0]  # trace: the gates exist from here on
        self.sites = [f"{s.path}:{s.kind}" for s in prog.sites]
        self.kinds = [s.kind for s in prog.sites]
        self.site_macs = np.array([s.macs for s in prog.sites], dtype=np.float64)  # per call at batch 1
        lazypass.set_threshold(self.lazy, 0.5)

    def _row(self, row) -> None:
        with torch.no_grad():
            self.lazy.lazy_gates.bias.copy_(torch.tensor([SKIP if v else COMPUTE for v in row]))

    def sample(self, table: np.ndarray, noise: torch.Tensor, labels: torch.Tensor, callback=None, sampler=None,
               **kwargs) -> tuple[torch.Tensor, np.ndarray]:  # fmt: skip
        """Images and the skip record (calls, sites, rows) of ``lazypass.stats``; ``kwargs`` go to
        ``ddim_sample`` (``guidance_scale``, ``null_cond``: every row follows the table), or to
        ``sampler(model, noise, steps, cond=, callback=, **kwargs)`` where one is given (another solver)."""
        steps = table.shape[0]
        if table.shape[1] != len(self.sites):
            raise ValueError(f"the table has {table.shape[1]} sites, the model {len(self.sites)}")

        def cb(i, t, x):
            if i + 1 < steps:
                self._row(table[i + 1])
            if callback is not None:
                callback(i, t, x)

        with lazypass.trajectory(self.lazy):
            self._row(table[0])
            if sampler is None:
                kwargs.setdefault("learned_sigma", False)
            images = (sampler or ddim_sample)(self.lazy, noise, steps, cond=labels, callback=cb, **kwargs)
            skipped = lazypass.stats(self.lazy).skipped
        return images, skipped


# -- search ------------------------------------------------------------------------------


def search_noise(n: int, seed: int = SEARCH_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


class Objective:
    """Final-sample error of a table: mean squared difference to full compute, same noise."""

    def __init__(self, runner: FixedRunner, plain: torch.nn.Module, steps: int, samples: int, seed: int):
        self.runner, self.steps = runner, steps
        self.noise, self.labels = search_noise(samples, seed)
        self.ref = ddim_sample(plain, self.noise, steps, cond=self.labels, learned_sigma=False).clamp(-1, 1)
        self.calls = 0

    def __call__(self, table: np.ndarray) -> float:
        self.calls += 1
        x, _ = self.runner.sample(table, self.noise, self.labels)
        return float((x.clamp(-1, 1) - self.ref).pow(2).mean())


def greedy(obj: Objective, target: float, per_round: int, full_every: int, shortlist: int, log=print) -> np.ndarray:
    """Add the skips with the least error increase per MAC saved until the budget is reached.

    Every ``full_every``-th round scores every free (step, site); the rounds between re-score
    only the ``shortlist`` best-ranked of the last full round. A skip that would overshoot the
    budget by more than ``TOLERANCE`` is passed over.
    """
    steps, n = obj.steps, len(obj.runner.sites)
    macs = obj.runner.site_macs
    cur = np.zeros((steps, n), dtype=bool)
    err = obj(cur)
    rank: dict = {}
    rnd = 0
    while table_ratio(cur, macs) < target - TOLERANCE:
        free = [(k, s) for k in range(1, steps) for s in range(n) if not cur[k, s]]
        if rnd % full_every and rank:
            free = sorted((c for c in free if c in rank), key=rank.get)[:shortlist] or free
        scored = []
        for k, s in free:
            cand = cur.copy()
            cand[k, s] = True
            scored.append(((obj(cand) - err) / macs[s], k, s))
        scored.sort()
        if rnd % full_every == 0:
            rank = {(k, s): j for j, (_, k, s) in enumerate(scored)}
        added = 0
        for _, k, s in scored:
            if added == per_round or table_ratio(cur, macs) >= target - TOLERANCE:
                break
            nxt = cur.copy()
            nxt[k, s] = True
            if table_ratio(nxt, macs) <= target + TOLERANCE:
                cur, added = nxt, added + 1
        if not added:
            break
        err = obj(cur)
        rnd += 1
        log(f"  greedy {steps} steps: ratio {table_ratio(cur, macs):.3f} err {err:.3e} ({obj.calls} rollouts)")
    return cur


def hill_climb(obj: Objective, start: np.ndarray, iters: int, proposals: int, seed: int = 0, log=print) -> np.ndarray:
    """Local search with MAC-preserving moves; keeps the best proposal of each round if it helps."""
    rng = np.random.default_rng(seed)
    kinds = np.array(obj.runner.kinds)
    steps = start.shape[0]
    cur, err = start.copy(), obj(start)
    for it in range(iters):
        best = (err, None)
        for _ in range(proposals):
            new = cur.copy()
            if rng.random() < 0.5:  # swap a skipped (step, site) for an unskipped one of the same kind
                kind = kinds[rng.integers(len(kinds))]
                on = [tuple(p) for p in np.argwhere(cur) if kinds[p[1]] == kind]
                off = [(k, s) for k in range(1, steps) for s in range(len(kinds)) if kinds[s] == kind and not cur[k, s]]
                if not on or not off:
                    continue
                (k1, s1), (k2, s2) = on[rng.integers(len(on))], off[rng.integers(len(off))]
                new[k1, s1], new[k2, s2] = False, True
            else:  # swap the rows of two steps
                k1, k2 = rng.choice(np.arange(1, steps), 2, replace=False)
                new[[k1, k2]] = new[[k2, k1]]
            e = obj(new)
            if e < best[0]:
                best = (e, new)
        if best[1] is not None:
            err, cur = best
        log(f"  hill {steps} steps it {it}: err {err:.3e} ({obj.calls} rollouts)")
    return cur


def find_best_fixed(model, runner: FixedRunner, steps: int, target: float, args, log=print) -> tuple[np.ndarray, dict]:
    obj = Objective(runner, model, steps, args.search_samples, args.search_seed)
    start = time.perf_counter()
    g = greedy(obj, target, args.per_round or max(1, steps // 4 + 1), args.full_every, args.shortlist, log)
    spread = spread_table(steps, target, len(runner.sites))
    e_g, e_s = obj(g), obj(spread)
    origin, table = ("greedy", g) if e_g <= e_s else ("spread", spread)
    log(f"  {steps} steps: greedy err {e_g:.3e} (ratio {table_ratio(g, runner.site_macs):.3f}), "
        f"spread err {e_s:.3e}; hill climb from {origin}")  # fmt: skip
    table = hill_climb(obj, table, args.hill_iters, args.hill_proposals, log=log)
    info = dict(search=dict(
        objective="mean squared error of the final sample vs full compute, same noise",
        noise_seed=args.search_seed, samples=args.search_samples, greedy_error=e_g, spread_error=e_s,
        hill_start=origin, final_error=obj(table), rollouts=obj.calls,
        seconds=round(time.perf_counter() - start, 1)),
        command="PYTHONPATH=$PWD python examples/digits_fixed.py " + " ".join(args.argv))  # fmt: skip
    return table, info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", default=["20:0.5", "10:0.3"], help="steps:ratio pairs")
    p.add_argument("--reuse", default="forecast", choices=["copy", "forecast"])
    p.add_argument("--search-samples", type=int, default=16)
    p.add_argument("--search-seed", type=int, default=SEARCH_SEED)
    p.add_argument("--per-round", type=int, default=0, help="skips added per greedy round (0: steps // 4 + 1)")
    p.add_argument("--full-every", type=int, default=4, help="greedy rounds between full candidate scans")
    p.add_argument("--shortlist", type=int, default=30, help="candidates re-scored in the other rounds")
    p.add_argument("--hill-iters", type=int, default=10)
    p.add_argument("--hill-proposals", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=ASSETS)
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    model = load_dit(DIT_PATH)
    runner = FixedRunner(model, args.reuse)
    out = {}
    for spec in args.targets:
        steps, target = int(spec.split(":")[0]), float(spec.split(":")[1])
        table, info = find_best_fixed(model, runner, steps, target, args, log=lambda s: print(s, flush=True))
        path = args.out_dir / schedule_path(target, steps).name
        save_schedule(path, table, args.reuse, target, runner.sites, runner.site_macs, info)
        print(f"wrote {path}: ratio {table_ratio(table, runner.site_macs):.3f}, "
              f"{info['search']['seconds']} s", flush=True)  # fmt: skip
        out[spec] = (table, info)
    return out


if __name__ == "__main__":
    main()
