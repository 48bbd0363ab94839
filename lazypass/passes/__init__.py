"""The lazy passes, in the order they run. Each is ``pass_(gm, cfg) -> gm``."""

from __future__ import annotations

import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.passes.functionalize import functionalize
from lazypass.passes.insert_gates import insert_gates
from lazypass.passes.match_sites import Match, NoSitesError, Site, match_sites
from lazypass.passes.prune import prune
from lazypass.passes.soft_blend import soft_blend

ANALYSIS = [functionalize, prune, match_sites]
INFERENCE = [insert_gates]
TRAINING = [soft_blend]


def run_passes(gm: fx.GraphModule, cfg: LazyConfig, passes) -> fx.GraphModule:
    """Run ``passes`` in order, then clean up (lint, recompile) once."""
    for pass_ in passes:
        gm = pass_(gm, cfg)
    gm.graph.lint()
    gm.recompile()
    return gm


__all__ = ["ANALYSIS", "INFERENCE", "TRAINING", "run_passes", "functionalize", "prune", "match_sites",
           "insert_gates", "soft_blend",
           "Site", "Match", "NoSitesError"]
