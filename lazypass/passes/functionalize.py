"""Turn in-place writes into tensors made in the graph into ``slice_scatter``.

Some models fill a new tensor piece by piece (Wan's rotary embedding:
``out = torch.empty_like(x); out[..., 0::2] = a; out[..., 1::2] = b``).  ``torch.export``
records that as ``copy_`` nodes on views of ``out``, nodes without users: the data a
later reader of ``out`` sees flows through no edge of the graph.  The matcher works on
edges, so it would see ``a`` and ``b`` as values nobody uses and could not cut the
branch out.  Rewriting ``copy_(slice(base), src)`` into ``base' = slice_scatter(base,
src)`` (and reads of ``base`` after it into reads of ``base'``) makes the dataflow
explicit and computes the same values.

CogView4 writes rotary embeddings into a slice of the query in place the same way.
Only safe cases are rewritten: the destination is one ``slice``/``select`` of a tensor
made in the graph (never an input or parameter), and no alias of that tensor is read
after the write.  Anything else is left as it is (and its branch stays unmatched).
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import is_view

aten = torch.ops.aten
log = logging.getLogger(__name__)

_SCATTER = {aten.slice.Tensor: aten.slice_scatter.default, aten.select.int: aten.select_scatter.default}
def functionalize(gm: fx.GraphModule, cfg: LazyConfig) -> fx.GraphModule:
    graph = gm.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.target is not aten.copy_.default or node.users or len(node.args) < 2:
            continue
        view, src = node.args[0], node.args[1]
        if not isinstance(view, fx.Node) or view.target not in _SCATTER or len(view.users) != 1:
            continue
        base = view.args[0]
        order = {n: i for i, n in enumerate(graph.nodes)}
        if not isinstance(base, fx.Node) or not _safe(base, view, order, order[node]):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(_SCATTER[view.target], (base, src, *view.args[1:]), dict(view.kwargs))
        new.meta = {k: v for k, v in base.meta.items() if k in ("val", "nn_module_stack", "stack_trace")}
        base.replace_all_uses_with(new, delete_user_cb=lambda u: order.get(u, -1) > order[node])
        graph.erase_node(node)
        graph.erase_node(view)
        rewritten += 1
    if rewritten:
        graph.lint()
        log.info("functionalize: %d in-place writes into graph-made tensors", rewritten)
    return gm


def _safe(base: fx.Node, view: fx.Node, order, pos: int) -> bool:
    """The write into ``base`` can become a new tensor without anyone noticing the difference.

    ``base`` must be made in the graph (not an input or parameter, whose mutation the caller
    would see), and no alias of it may be read after the write: views of ``base`` taken
    before the write must be consumed before it, and if ``base`` is itself a view, its
    sources must not be read after the write either.
    """
    chain = [base]
    while is_view(chain[-1]) and chain[-1].args and isinstance(chain[-1].args[0], fx.Node):
        chain.append(chain[-1].args[0])
    if any(n.op != "call_function" for n in chain):
        return False
    for up in chain[1:]:  # sources of base: only the chain itself may use them after the write
        if any(order[u] > pos and u not in chain for u in up.users):
            return False
    for u in base.users:
        if u is view or order[u] > pos:
            continue
        if is_view(u) and not _consumed_before(u, order, pos):
            return False
    return True


def _consumed_before(node: fx.Node, order, pos: int) -> bool:
    for u in node.users:
        if order[u] > pos:
            return False
        if u.target is aten.copy_.default:
            return False  # another write through an alias: leave it
        if is_view(u) and not _consumed_before(u, order, pos):
            return False
    return True
