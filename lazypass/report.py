"""Tables: what the pass found (``report``) and what happened while sampling (``stats``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tabulate import tabulate
from torch import nn

from lazypass.passes import Site
from lazypass.runtime import compiled_records, runtime


def _macs(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def site_table(sites: list[Site], model_macs: int) -> str:
    rows = [
        [
            s.index,
            s.kind,
            s.path,
            " + ".join(f"{t}x{d}" for t, d in zip(s.tokens, s.dims)),
            _macs(s.macs),
            _bytes(s.cache_bytes),
        ]
        for s in sites
    ]
    covered = sum(s.macs for s in sites)
    table = tabulate(rows, headers=["site", "kind", "block path", "tokens x dim", "MACs/call", "cache"])
    share = covered / model_macs if model_macs else 0.0
    kinds = {k: sum(s.kind == k for s in sites) for k in ("attn", "ffn")}
    return (
        f"{table}\n{len(sites)} sites ({kinds['attn']} attn, {kinds['ffn']} ffn) cover {share:.1%} of the "
        f"model's {_macs(model_macs)} MACs per call; caches {_bytes(sum(s.cache_bytes for s in sites))}"
    )


def report(model: nn.Module, *args, print_table: bool = True, **kwargs) -> list[Site]:
    """Dry run: trace ``model`` on these inputs, print the site table, return the sites.

    Example:
        >>> import torch, lazypass
        >>> from lazypass.models import tiny_dit
        >>> model = lazypass.apply(tiny_dit())
        >>> sites = lazypass.report(model, torch.randn(2, 4, 8, 8), torch.tensor([9, 9]),
        ...                         torch.tensor([1, 2]), print_table=False)
        >>> [s.kind for s in sites]
        ['attn', 'ffn', 'attn', 'ffn']
    """
    prog, _ = runtime(model).program_for(args, kwargs)
    if print_table:
        print(site_table(prog.sites, prog.model_macs))
    return prog.sites


@dataclass
class Stats:
    """What the gates did over the calls since the last reset.

    ``skipped[c, i, b]``: sample ``b`` took the cache of site ``i`` at call ``c``;
    ``executed[c, i]``: the branch was really not computed (the whole batch skipped);
    ``scores[c, i, b]``: gate scores. ``lazy_ratio`` counts decisions (what the paper
    reports), ``executed_ratio`` counts compute that was saved.
    """

    sites: list[Site]
    skipped: np.ndarray
    executed: np.ndarray
    scores: np.ndarray

    def _ratio(self, a: np.ndarray, kind: str | None) -> float:
        cols = [i for i, s in enumerate(self.sites) if kind is None or s.kind == kind]
        if a.size == 0 or not cols:
            return 0.0
        return float(a[:, cols].mean())

    @property
    def lazy_ratio(self) -> float:
        return self._ratio(self.skipped, None)

    def lazy_ratio_of(self, kind: str) -> float:
        return self._ratio(self.skipped, kind)

    @property
    def executed_ratio(self) -> float:
        return self._ratio(self.executed, None)

    @property
    def macs_full(self) -> int:
        return int(sum(s.macs for s in self.sites) * self.executed.shape[0])

    @property
    def macs_saved(self) -> int:
        per_site = np.array([s.macs for s in self.sites], dtype=np.float64)
        return int((self.executed * per_site).sum()) if self.executed.size else 0

    def table(self) -> str:
        rows = []
        for i, s in enumerate(self.sites):
            pattern = "".join("X" if e else ("x" if d.any() else ".") for e, d in
                              zip(self.executed[:, i], self.skipped[:, i]))
            rows.append([i, s.kind, s.path, pattern, f"{self.skipped[:, i].mean():.0%}",
                         f"{self.executed[:, i].mean():.0%}"])
        table = tabulate(rows, headers=["site", "kind", "block path", "calls (X skipped, x some rows)",
                                        "lazy", "executed"])
        return (
            f"{table}\nlazy ratio {self.lazy_ratio:.1%} (attn {self.lazy_ratio_of('attn'):.1%}, "
            f"ffn {self.lazy_ratio_of('ffn'):.1%}); executed {self.executed_ratio:.1%}; "
            f"saved {_macs(self.macs_saved)} of {_macs(self.macs_full)} branch MACs"
        )

    def __str__(self) -> str:
        return self.table()


def stats(model: nn.Module) -> Stats:
    """Per site x call: skipped or not, lazy ratio by kind, MACs saved, since the last reset.

    Example:
        >>> print(lazypass.stats(model))  # doctest: +SKIP
    """
    rt = runtime(model)
    prog, state = rt.program, rt.state
    records = compiled_records(rt) if rt.compiled_last else (state.records if state is not None else [])
    if prog is None or not records:
        sites = prog.sites if prog is not None else []
        n = len(sites)
        return Stats(sites, np.zeros((0, n, 0), bool), np.zeros((0, n), bool), np.zeros((0, n, 0)))
    skipped = np.stack([r[0].detach().cpu().numpy() for r in records])
    executed = np.stack([r[1].detach().cpu().numpy() for r in records])
    scores = np.stack([r[2].detach().float().cpu().numpy() for r in records])
    return Stats(prog.sites, skipped, executed, scores)
