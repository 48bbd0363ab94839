"""Rank-consistent skip decisions under ``torch.distributed``.

When ranks hold different token shards of the same samples (sequence parallel, as xDiT
does), each rank's gate sees only its own tokens, so local decisions can disagree.  If a
branch holds a collective (the all-to-all or all-gather of sequence-parallel attention),
a rank that skips it leaves the others waiting in that collective forever.  The gates
therefore reduce across ranks *inside the graph*, with the traceable functional
collectives (``_c10d_functional.all_reduce`` + ``wait_tensor``): no host sync, and the
graph still compiles and exports.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lazypass.config import LazyConfig

_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d", "_c10d_functional_autograd", "_dtensor")


def has_collectives(gm: fx.GraphModule) -> bool:
    """Whether the traced model communicates across ranks itself."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "namespace", None) in _COLLECTIVE_NAMESPACES:
            return True
    return False


def sync_mode(gm: fx.GraphModule, cfg: LazyConfig) -> tuple[str, str] | None:
    """``(mode, group_name)`` to synchronise decisions with, or None. Resolved at trace time."""
    mode = cfg.sync_decisions
    if mode is False:
        return None
    ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    if mode is None:
        if not ready or torch.distributed.get_world_size() < 2 or not has_collectives(gm):
            return None
        mode = "sharded"
    elif not ready:
        raise RuntimeError(
            f"sync_decisions={mode!r} needs torch.distributed to be initialised before the model is "
            "traced (call torch.distributed.init_process_group first), or leave sync_decisions=None"
        )
    if mode is True:
        mode = "sharded"
    group = cfg.sync_group or torch.distributed.group.WORLD.group_name
    return mode, group


def all_reduce(call, node: fx.Node, op: str, group: str) -> fx.Node:
    """Insert ``wait(all_reduce(node, op))``; bool flags travel as int32 (MIN = all agree)."""
    c10d = torch.ops._c10d_functional
    return call(c10d.wait_tensor.default, call(c10d.all_reduce.default, node, op, group))
