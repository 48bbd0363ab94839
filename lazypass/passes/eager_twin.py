"""A copy of a rewritten graph for eager calls: each ``cond`` calls its branch directly.

``torch.ops.higher_order.cond`` run eagerly does the same thing (evaluates the predicate
and calls one branch), but its dispatch costs ~0.1 ms per call, and a lazy graph holds two
per site. The twin replaces the HOP by a plain Python function, which reads the 0-d
predicate on the host: the one place eager lazy mode syncs, once or twice per site per call
(compiled and exported graphs keep the HOP). Parameters and branch modules are shared
with the original graph, not copied.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from lazypass.config import LazyConfig


def _direct_cond(pred, true_fn, false_fn, operands):
    return true_fn(*operands) if pred else false_fn(*operands)


def eager_twin(gm: fx.GraphModule, cfg: LazyConfig | None = None) -> fx.GraphModule:
    """A new graph module whose cond nodes (also inside branches) call the chosen branch."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    attrs = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            obj = operator.attrgetter(node.target)(gm)
            attrs[node.target] = eager_twin(obj) if isinstance(obj, fx.GraphModule) else obj
        elif node.target is torch.ops.higher_order.cond:
            node.target = _direct_cond
    return fx.GraphModule(attrs, graph)
