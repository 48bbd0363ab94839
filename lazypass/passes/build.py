"""Small helpers the rewrites share to add inputs and nodes to a graph."""

from __future__ import annotations

import torch
import torch.fx as fx

from lazypass.passes.info import StateSpec


def caller(graph: fx.Graph):
    """``call(target, *args, **kwargs)``: add a ``call_function`` node at the insert point."""

    def call(target, *args, **kwargs):
        return graph.call_function(target, args, kwargs)

    return call


def inserting_after(graph: fx.Graph, node: fx.Node):
    """Insert point right after ``node`` that keeps new nodes in the order they are made
    (``graph.inserting_after`` would put each one directly after ``node``, reversing them)."""
    return graph.inserting_before(node.next)


def user_outputs(graph: fx.Graph) -> tuple[fx.Node, list]:
    """The output node and the graph's outputs as a list."""
    output = next(n for n in graph.nodes if n.op == "output")
    outs = output.args[0]
    return output, list(outs) if isinstance(outs, (list, tuple)) else [outs]


def graph_inputs(graph: fx.Graph):
    """``(add, specs)``: ``add(name, shape, dtype, fill=0, site=None)`` appends a graph input
    after the last one and records its :class:`StateSpec` in ``specs``."""
    specs: list[StateSpec] = []
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def add(name: str, shape, dtype: torch.dtype, fill: float = 0.0, site: int | None = None) -> fx.Node:
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(name)
        anchor.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
        specs.append(StateSpec(name, tuple(shape), dtype, fill, site))
        return anchor

    return add, specs
