"""What the passes learn about a graph and hand to each other, typed.

``match_sites`` attaches a :class:`GraphInfo` to the graph module (``graph_info(gm)``);
the rewrites read the matches from it and add what they define: the extra inputs of the
rewritten graph (:class:`StateSpec`, each with its initial value) and how many of the
outputs are the user's. Nothing else travels in ``gm.meta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx as fx

from lazypass.ops import value

_KEY = "lazypass"


@dataclass(frozen=True)
class Site:
    """A lazy site as ``report`` shows it.

    ``tokens``/``dims`` give the gate input ``Z`` of each stream (tokens x hidden dim);
    ``macs`` are multiply-accumulates of the skippable branch per call (whole batch);
    ``cache_bytes`` is the memory of its state: caches and whatever else the options keep
    per row (all call slots).
    """

    index: int
    kind: str
    path: str
    tokens: tuple[int, ...]
    dims: tuple[int, ...]
    out_shapes: tuple[tuple[int, ...], ...]
    macs: int
    cache_bytes: int


@dataclass
class Stream:
    """One residual stream of a site: ``add = x + g * F(..., z, ...)``, ``y`` the cached output."""

    x: fx.Node
    z: fx.Node
    y: fx.Node
    add: fx.Node


@dataclass
class Match:
    """A site while the passes work on it: its nodes in the graph being rewritten."""

    kind: str
    path: str
    streams: list[Stream]
    nodes: list[fx.Node]  # F, in graph order
    macs: int
    operands: list[fx.Node] = field(default_factory=list)  # what F reads from outside


class StateSpec(NamedTuple):
    """An extra input a rewrite adds to the graph, the value a new run starts from, and the
    site it belongs to (None for the model-wide ones)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float = 0.0
    site: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def initial(self, device: torch.device | str) -> torch.Tensor:
        return torch.full(self.shape, self.fill, dtype=self.dtype, device=device)


@dataclass
class GraphInfo:
    """The analysis of one captured graph (``match_sites``) and what the rewrite added.

    ``batch`` is the number of samples per call (the timestep's length, else the leading
    dim of the first output); sites may hold a multiple of it as rows (frames folded into
    the batch dim). ``timestep`` is the input feeding the timestep embedding, if found.
    ``gates`` is set by whoever runs the rewrite; ``state_specs`` and ``n_user_outputs``
    by the rewrite itself.
    """

    matches: list[Match]
    model_macs: int
    timestep: fx.Node | None
    batch: int
    gates: object | None = None
    state_specs: list[StateSpec] = field(default_factory=list)
    n_user_outputs: int = 0

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Kind and gate-input dims of every site, in order: what gates are made for."""
        return [(m.kind, tuple(int(value(s.z).shape[-1]) for s in m.streams)) for m in self.matches]


def graph_info(gm: fx.GraphModule) -> GraphInfo:
    info = gm.meta.get(_KEY)
    if info is None:
        raise RuntimeError("internal: this graph was not analysed by match_sites (run the ANALYSIS passes first)")
    return info


def set_graph_info(gm: fx.GraphModule, info: GraphInfo) -> None:
    gm.meta[_KEY] = info


__all__ = ["GraphInfo", "Match", "Site", "StateSpec", "Stream", "graph_info", "set_graph_info"]
