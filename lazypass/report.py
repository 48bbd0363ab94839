"""Tables: what the pass found (``report``) and what happened while sampling (``stats``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tabulate import tabulate
from torch import nn

from lazypass.compiled import compiled_records
from lazypass.config import LazyConfig
from lazypass.gates import LazyGates
from lazypass.passes import INFERENCE, Site, run_passes
from lazypass.passes.match_sites import site_records
from lazypass.runtime import runtime
from lazypass.tracing import analyse


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
    """Dry run: the sites lazypass finds in ``model`` for these inputs, as a table and records.

    On a lazy model this traces it (as :func:`lazypass.trace` does). On a model that is not
    lazy yet it captures the graph and runs the analysis only: the model is not changed.

    Example:
        >>> import torch, lazypass
        >>> from lazypass.models import tiny_dit
        >>> sites = lazypass.report(tiny_dit(), torch.randn(2, 4, 8, 8), torch.tensor([9, 9]),
        ...                         torch.tensor([1, 2]), print_table=False)
        >>> [s.kind for s in sites]
        ['attn', 'ffn', 'attn', 'ffn']
    """
    rt = model.__dict__.get("_lazypass")
    if rt is not None:
        prog, _ = rt.program_for(args, kwargs)
        sites, model_macs = (prog.sites, prog.model_macs) if prog is not None else ([], 0)
    else:
        cfg = LazyConfig()
        gm, _, info = analyse(model, model.forward, cfg, args, kwargs)
        info.gates = LazyGates(info.layout, cfg.gate_inputs)
        run_passes(gm, cfg, INFERENCE)  # on the captured copy: the state a lazy model would keep
        sites, model_macs = site_records(info), info.model_macs
    if print_table:
        print(site_table(sites, model_macs))
    return sites


@dataclass
class Stats:
    """What the gates did over the calls since the last reset.

    ``skipped[c, i, b]``: sample ``b`` took the cache of site ``i`` at call ``c``;
    ``saved[c, i]``: the whole batch skipped, so the branch was not computed and its
    compute was saved; ``scores[c, i, b]``: gate scores. ``lazy_ratio`` counts decisions
    (what the paper reports), ``saved_ratio`` counts compute that was saved.
    """

    sites: list[Site]
    skipped: np.ndarray
    saved: np.ndarray
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
    def saved_ratio(self) -> float:
        return self._ratio(self.saved, None)

    @property
    def macs_full(self) -> int:
        return int(sum(s.macs for s in self.sites) * self.saved.shape[0])

    @property
    def macs_saved(self) -> int:
        per_site = np.array([s.macs for s in self.sites], dtype=np.float64)
        return int((self.saved * per_site).sum()) if self.saved.size else 0

    def table(self) -> str:
        rows = []
        for i, s in enumerate(self.sites):
            pattern = "".join("X" if e else ("x" if d.any() else ".") for e, d in
                              zip(self.saved[:, i], self.skipped[:, i]))
            rows.append([i, s.kind, s.path, pattern, f"{self.skipped[:, i].mean():.0%}",
                         f"{self.saved[:, i].mean():.0%}"])
        table = tabulate(rows, headers=["site", "kind", "block path", "calls (X skipped, x some rows)",
                                        "lazy", "saved"])
        return (
            f"{table}\nlazy ratio {self.lazy_ratio:.1%} (attn {self.lazy_ratio_of('attn'):.1%}, "
            f"ffn {self.lazy_ratio_of('ffn'):.1%}); compute saved on {self.saved_ratio:.1%} of branch calls; "
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
    run = rt.current_run()
    prog, state = (rt.program, None) if rt.compiled_last else (run.program, run.state)
    records = compiled_records(rt) if rt.compiled_last else (list(state.records) if state is not None else [])
    if prog is None or not records:
        sites = prog.sites if prog is not None else []
        n = len(sites)
        return Stats(sites, np.zeros((0, n, 0), bool), np.zeros((0, n), bool), np.zeros((0, n, 0)))
    skipped = np.stack([r[0].detach().cpu().numpy() for r in records])
    saved = np.stack([r[1].detach().cpu().numpy() for r in records])
    scores = np.stack([r[2].detach().float().cpu().numpy() for r in records])
    return Stats(prog.sites, skipped, saved, scores)
