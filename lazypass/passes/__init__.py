"""The lazy passes, in the order they run. Each is ``pass_(gm, cfg) -> gm``.

``ANALYSIS`` finds the sites and attaches a :class:`GraphInfo`; ``INFERENCE`` (gated
conditionals with cache state) or ``TRAINING`` (the soft blend of fitting) rewrites them.
``eager_twin`` makes the copy that eager calls run, ``compiled_writes`` the one dynamo traces.
"""

from __future__ import annotations

import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.passes.compiled_writes import compiled_writes
from lazypass.passes.eager_twin import eager_twin
from lazypass.passes.functionalize import functionalize
from lazypass.passes.info import GraphInfo, Match, Site, StateSpec, graph_info
from lazypass.passes.insert_gates import insert_gates
from lazypass.passes.match_sites import NoSitesError, match_sites
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
           "insert_gates", "soft_blend", "eager_twin", "compiled_writes", "graph_info",
           "GraphInfo", "Site", "StateSpec", "Match", "NoSitesError"]
