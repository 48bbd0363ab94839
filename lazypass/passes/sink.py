"""Move what only a follower's branch reads into that branch.

With ``granularity="step"`` (or groups of blocks) one site of each group reads its ``Z`` for
the gate; the other sites of the group (followers) read ``Z`` only inside their branch. Their
norm and modulation would still run on every call, also when the branch is skipped. This pass
pulls into a follower's ``F`` every node that only ``F`` uses, walking back from ``F``'s
operands (the norm, the modulation, the shift and scale chunks it reads), so a skipped
follower costs little more than its conditional. A leader keeps ``Z`` outside: its gate reads
it. Heavy ops (linear, matmul, ...) and collectives stay outside, so a site's MACs and its
place in a sharded run do not change. The values are the same: the same nodes run, inside the
branch. Runs before ``insert_gates``, on the inference program only.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import is_heavy, value
from lazypass.passes.info import graph_info

log = logging.getLogger(__name__)


def _movable(node: fx.Node, nodes: set[fx.Node], others: set[fx.Node]) -> bool:
    return (
        node.op == "call_function"
        and node not in others
        and not is_heavy(node)
        and "c10d" not in str(getattr(node.target, "namespace", ""))
        and bool(node.users)
        and all(u in nodes for u in node.users)
        # a conditional's operands are tensors: a chunk of a split stays outside, the split too
        and all(value(p) is not None for p in node.all_input_nodes)
    )


def sink(gm: fx.GraphModule, cfg: LazyConfig) -> fx.GraphModule:
    info = graph_info(gm)
    leaders = cfg.group_of(len(info.matches))
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    claimed = {n for m in info.matches for n in m.nodes}
    keep = {n for m in info.matches for s in m.streams for n in (s.x, s.y, s.add)}
    moved = 0
    for i, m in enumerate(info.matches):
        if leaders[i] == i:
            continue
        nodes = set(m.nodes)
        others = (claimed - nodes) | keep
        frontier = list(m.operands)
        while frontier:
            node = frontier.pop()
            if node not in nodes and _movable(node, nodes, others):
                nodes.add(node)
                frontier.extend(node.all_input_nodes)
        if len(nodes) == len(m.nodes):
            continue
        moved += len(nodes) - len(m.nodes)
        m.nodes = sorted(nodes, key=order.__getitem__)
        m.operands = list(dict.fromkeys(p for n in m.nodes for p in n.all_input_nodes if p not in nodes))
    log.info("sink: moved %d nodes into follower branches", moved)
    return gm
