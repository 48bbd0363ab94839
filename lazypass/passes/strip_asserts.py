"""Drop runtime assertions that export leaves behind; they would keep skipped branches alive."""

from __future__ import annotations

import logging

import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import op_kind

log = logging.getLogger(__name__)


def strip_asserts(gm: fx.GraphModule, cfg: LazyConfig) -> fx.GraphModule:
    dropped = 0
    for node in list(gm.graph.nodes):
        if op_kind(node) == "assert" and not node.users:
            gm.graph.erase_node(node)
            dropped += 1
    log.info("strip_asserts: dropped %d assertion nodes", dropped)
    return gm
