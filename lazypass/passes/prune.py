"""Drop what export leaves behind that would keep a skipped branch alive.

Runtime assertions (``_assert_tensor_metadata``) and dead values (the unused context
output of a last joint-attention block) are users of branch nodes; with them in place a
branch could never be cut out of the graph.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import op_kind

log = logging.getLogger(__name__)


def prune(gm: fx.GraphModule, cfg: LazyConfig) -> fx.GraphModule:
    asserts = 0
    for node in list(gm.graph.nodes):
        if op_kind(node) == "assert" and not node.users:
            gm.graph.erase_node(node)
            asserts += 1
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    log.info("prune: dropped %d assertions and %d dead nodes", asserts, before - len(gm.graph.nodes))
    return gm
