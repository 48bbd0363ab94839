"""Training-mode rewrite: blend each branch with its previous output (LazyDiT eq. 4).

The same sites ``insert_gates`` turns into conditionals become, per sample ``b``,

    Y_b = (1 - m * s_b) * F(Z)_b + m * s_b * Y_prev_b

with ``s`` the gate score (the same ``gate_score`` the hard rewrite uses) and ``m`` a 0-d
*mix* input: ``m = 1`` is the paper's soft blend; ``m = 0`` gives the full model exactly
(``1 * F + 0 * Y_prev``) from the same graph, which is how fitting computes the full-compute
trajectory and its branch outputs without a second trace.  The graph stays differentiable
and has no control flow and no state: the caller passes ``Y_prev`` (detached branch
outputs of the previous step) and receives this step's raw ``F(Z)`` to pass next time.

Inputs:  the user's flat inputs, ``lazy_mix`` (0-d f32), then one ``lazy_prev_{i}_{j}``
per site ``i`` and stream ``j`` (shape and dtype of that branch output).
Outputs: the user's flat outputs, the raw ``F(Z)`` of every site stream (same order as
the ``lazy_prev`` inputs), then ``scores`` (sites, B) f32.
``graph_info(gm).state_specs`` lists the extra inputs.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import value
from lazypass.passes.build import caller, graph_inputs, inserting_after, user_outputs
from lazypass.passes.info import graph_info
from lazypass.passes.insert_gates import gate_score

aten = torch.ops.aten
log = logging.getLogger(__name__)


def soft_blend(gm: fx.GraphModule, cfg: LazyConfig) -> fx.GraphModule:
    info = graph_info(gm)
    matches, gates, batch = info.matches, info.gates, info.batch
    graph = gm.graph
    order = {n: k for k, n in enumerate(graph.nodes)}
    call = caller(graph)
    output, outputs = user_outputs(graph)
    extra_input, specs = graph_inputs(graph)

    mix = extra_input("lazy_mix", (), torch.float32)
    prevs = [
        [extra_input(f"lazy_prev_{i}_{j}", tuple(value(s.y).shape), value(s.y).dtype) for j, s in enumerate(m.streams)]
        for i, m in enumerate(matches)
    ]

    raw, scores = [], []
    for i, m in enumerate(matches):
        # every Z comes before every Y (Z dominates the heavy ops, Y post-dominates them)
        last_z = max((s.z for s in m.streams), key=order.__getitem__)
        with inserting_after(graph, last_z):
            score = gate_score(call, gm, gates, i, m, batch)
            weight = call(aten.mul.Tensor, score, mix)
        scores.append(score)
        for s, prev in zip(m.streams, prevs[i]):
            y = value(s.y)
            with inserting_after(graph, s.y):
                w = call(aten._to_copy.default, weight, dtype=y.dtype)
                if y.shape[0] != batch:  # frames folded into the batch dim: a sample's rows share its weight
                    w = call(aten.expand.default, call(aten.reshape.default, w, [batch, 1]), [batch, y.shape[0] // batch])
                w = call(aten.reshape.default, w, [-1] + [1] * (y.dim() - 1))
                keep = call(aten.rsub.Scalar, w, 1)
                fresh = call(aten.mul.Tensor, keep, s.y)
                blended = call(aten.add.Tensor, fresh, call(aten.mul.Tensor, w, prev))
            blended.meta["val"] = y
            s.y.replace_all_uses_with(blended, delete_user_cb=lambda u, fresh=fresh: u is not fresh)
            raw.append(s.y)

    with graph.inserting_before(output):
        stacked = call(aten.stack.default, scores)
    output.args = (tuple(outputs) + tuple(raw) + (stacked,),)
    info.state_specs = specs
    info.n_user_outputs = len(outputs)
    graph.lint()
    log.info("soft_blend: %d sites", len(matches))
    return gm
