"""Move what only a follower's branch reads into that branch.

With ``granularity="step"`` (or groups of blocks) one site of each group reads its ``Z`` for
the gate; the other sites of the group (followers) read ``Z`` only inside their branch. Their
norm and modulation would still run on every call, also when the branch is skipped. This pass
pulls into a follower's ``F`` every node that only ``F`` uses, walking back from ``F``'s
operands (the norm and the modulation), so a skipped follower costs little more than its
conditional. A leader keeps ``Z`` outside: its gate reads it.

Views that other sites share (the shift and scale chunks of one adaLN output) are copied, not
moved: the branch gets its own view of the chunk's base, since the operands of a conditional
may not alias each other. Heavy ops (linear, matmul, ...) and collectives stay outside, so a
site's MACs and its place in a sharded run do not change; a site whose new operands would not
be plain tensors keeps its old boundary. The values are the same: the same nodes run, inside
the branch. Runs before ``insert_gates``, on the inference program only.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import is_heavy, is_view, value
from lazypass.passes.info import graph_info

log = logging.getLogger(__name__)


def _pure(node: fx.Node, others: set[fx.Node]) -> bool:
    return (
        node.op == "call_function"
        and node not in others
        and not is_heavy(node)
        and "c10d" not in str(getattr(node.target, "namespace", ""))
    )


def _view_chain(node: fx.Node, others: set[fx.Node]) -> list[fx.Node] | None:
    """``node`` and the views under it, down to a base that is a plain tensor (not a view)."""
    chain = []
    while is_view(node) and _pure(node, others) and node.args and isinstance(node.args[0], fx.Node):
        chain.append(node)
        node = node.args[0]
    return chain if chain and value(node) is not None and not is_view(node) else None


def _own_copy(graph: fx.Graph, chain: list[fx.Node], users: list[fx.Node], order: dict, undo: list) -> fx.Node:
    """A copy of the view ``chain`` (top first) for ``users`` alone; returns the copy of the top."""
    below = chain[-1].args[0]
    for node in reversed(chain):
        with graph.inserting_after(node):
            copy = graph.node_copy(node, lambda n, old=node, new=below: new if n is old.args[0] else n)
        copy.meta = dict(node.meta)
        order[copy] = order[node] + 0.5
        undo.append(copy)
        below = copy
    for user in users:
        user.replace_input_with(chain[0], below)
        undo.append((user, below, chain[0]))
    return below


def _sink_site(graph: fx.Graph, m, others: set[fx.Node], order: dict) -> int:
    nodes = set(m.nodes)
    frontier = list(m.operands)
    undo: list = []  # copies made, and inputs redirected to them
    while frontier:
        node = frontier.pop()
        if node in nodes or not _pure(node, others) or not node.users:
            continue
        inside = [u for u in node.users if u in nodes]
        if len(inside) < len(node.users):
            chain = _view_chain(node, others) if inside else None
            if chain is None:
                continue
            node = _own_copy(graph, chain, inside, order, undo)
        nodes.add(node)
        frontier.extend(node.all_input_nodes)
    ordered = sorted(nodes, key=order.__getitem__)
    operands = list(dict.fromkeys(p for n in ordered for p in n.all_input_nodes if p not in nodes))
    if any(value(p) is None or (is_view(p) and p not in m.operands) for p in operands):
        for step in reversed(undo):  # keep the old boundary: put the graph back as it was
            if isinstance(step, tuple):
                step[0].replace_input_with(step[1], step[2])
            else:
                graph.erase_node(step)
        return 0
    added = len(nodes) - len(m.nodes)
    m.nodes, m.operands = ordered, operands
    return added


def sink(gm: fx.GraphModule, cfg: LazyConfig) -> fx.GraphModule:
    info = graph_info(gm)
    leaders = cfg.group_of(len(info.matches))
    claimed = {n for m in info.matches for n in m.nodes}
    keep = {n for m in info.matches for s in m.streams for n in (s.x, s.y, s.add)}
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    moved = 0
    for i, m in enumerate(info.matches):
        if leaders[i] != i:
            moved += _sink_site(gm.graph, m, (claimed - set(m.nodes)) | keep, order)
    log.info("sink: moved %d nodes into follower branches", moved)
    return gm
