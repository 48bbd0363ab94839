"""Turn in-place writes into fresh tensors made in the graph into ``slice_scatter``.

Some models fill a new tensor piece by piece (Wan's rotary embedding:
``out = torch.empty_like(x); out[..., 0::2] = a; out[..., 1::2] = b``).  ``torch.export``
records that as ``copy_`` nodes on views of ``out``, nodes without users: the data a
later reader of ``out`` sees flows through no edge of the graph.  The matcher works on
edges, so it would see ``a`` and ``b`` as values nobody uses and could not cut the
branch out.  Rewriting ``copy_(slice(base), src)`` into ``base' = slice_scatter(base,
src)`` (and reads of ``base`` after it into reads of ``base'``) makes the dataflow
explicit and computes the same values.

Only the plain case is rewritten: ``base`` is made in the graph, the destination is one
``slice``/``select`` of it, and ``base`` is not read between its creation and the write
except by such views.  Anything else is left as it is.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from lazypass.config import LazyConfig

aten = torch.ops.aten
log = logging.getLogger(__name__)

_FRESH = {
    aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.empty.memory_format, aten.zeros.default, aten.ones.default, aten.full.default,
    aten.clone.default, aten.slice_scatter.default, aten.select_scatter.default,
}
_SCATTER = {aten.slice.Tensor: aten.slice_scatter.default, aten.select.int: aten.select_scatter.default}


def functionalize(gm: fx.GraphModule, cfg: LazyConfig) -> fx.GraphModule:
    graph = gm.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.target is not aten.copy_.default or node.users or len(node.args) < 2:
            continue
        view, src = node.args[0], node.args[1]
        if not isinstance(view, fx.Node) or view.target not in _SCATTER:
            continue
        base = view.args[0]
        if not isinstance(base, fx.Node) or base.target not in _FRESH:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        before = [u for u in base.users if order[u] < order[node]]
        if any(u.target not in _SCATTER or any(w.target is not aten.copy_.default for w in u.users)
               for u in before):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(_SCATTER[view.target], (base, src, *view.args[1:]), dict(view.kwargs))
        new.meta = {k: v for k, v in base.meta.items() if k in ("val", "nn_module_stack", "stack_trace")}
        base.replace_all_uses_with(new, delete_user_cb=lambda u: order.get(u, -1) > order[node])
        graph.erase_node(node)
        if not view.users:
            graph.erase_node(view)
        rewritten += 1
    if rewritten:
        graph.lint()
        log.info("functionalize: %d in-place writes into graph-made tensors", rewritten)
    return gm
