"""Training-mode rewrite: blend each branch with what reusing it would give (LazyDiT eq. 4).

The same sites ``insert_gates`` turns into conditionals become, per sample ``b``,

    Y_b = (1 - m * w_b) * F(Z)_b + m * w_b * R_b

with ``R`` the value a skip would return (the caller passes it: the previous step's output
for the paper's one-step objective, the lazy run's own stale cache or forecast for the
on-policy one), ``m`` a 0-d *mix* input and ``w`` the gate's weight: the score ``s`` itself
(``hard = 0``, the paper's soft blend), or the hard decision ``s > threshold`` (where the row
may skip) with the gradient of ``s`` passed straight through (``hard = 1``).  ``m = 0`` gives
the full model exactly (``1 * F + 0 * R``) from the same graph, which is how fitting gets the
teacher's prediction and branch outputs without a second trace.  The score is the one
``insert_gates`` thresholds (``passes/gating.py``), including the cache age and input drift
and the group decisions of ``LazyConfig.granularity``.  The graph has no control flow and
no state: the caller keeps whatever state it needs.

Inputs after the user's (``graph_info(gm).state_specs``): ``lazy_mix``, ``lazy_threshold``,
``lazy_hard`` (0-d f32), then per site ``i``: ``lazy_may_{i}`` (B,) bool (the row may skip),
``lazy_age_{i}`` (B,) f32 and ``lazy_pool_{i}_{j}`` (B, D) f32 where the site decides and
reads those inputs, and ``lazy_reuse_{i}_{j}`` per stream (shape and dtype of that output).
Outputs: the user's, the raw ``F(Z)`` of every site stream, ``scores`` (sites, B) f32, and
the token means of ``Z`` of every ``lazy_pool`` input, in the same order.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import shape, value
from lazypass.passes.build import caller, graph_inputs, inserting_after, user_outputs
from lazypass.passes.gating import drift_of, gate_logit, means, token_sums
from lazypass.passes.info import graph_info

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
    leaders = cfg.group_of(len(matches))
    use_age, use_drift = "age" in cfg.gate_inputs, "drift" in cfg.gate_inputs

    mix = extra_input("lazy_mix", (), torch.float32)
    threshold = extra_input("lazy_threshold", (), torch.float32)
    hard = extra_input("lazy_hard", (), torch.float32)
    inputs = []
    for i, m in enumerate(matches):
        may = extra_input(f"lazy_may_{i}", (batch,), torch.bool)
        age = extra_input(f"lazy_age_{i}", (batch,), torch.float32) if use_age and leaders[i] == i else None
        pools = [extra_input(f"lazy_pool_{i}_{j}", (batch, shape(s.z)[-1]), torch.float32)
                 for j, s in enumerate(m.streams)] if use_drift and leaders[i] == i else []
        reuse = [extra_input(f"lazy_reuse_{i}_{j}", tuple(value(s.y).shape), value(s.y).dtype)
                 for j, s in enumerate(m.streams)]
        inputs.append((may, age, pools, reuse))

    raw, scores, pooled, decided = [], [], [], {}
    for i, (m, (may, age, pools, reuse)) in enumerate(zip(matches, inputs)):
        leader = leaders[i]
        # every Z comes before every Y (Z dominates the heavy ops, Y post-dominates them)
        after = [s.z for s in m.streams] + ([decided[leader]] if leader != i else [])
        with inserting_after(graph, max(after, key=order.__getitem__)):
            if leader == i:
                sums = token_sums(call, m, batch)
                drift = None
                if pools:
                    current = means(call, sums)
                    pooled += current
                    drift = drift_of(call, current, pools, may)
                decided[i] = call(aten.sigmoid.default, gate_logit(call, gm, gates, i, sums, age, drift))
            score = decided[leader]
            may_f = call(aten._to_copy.default, may, dtype=torch.float32)
            wanted = call(aten._to_copy.default, call(aten.gt.Tensor, score, threshold), dtype=torch.float32)
            straight = call(aten.sub.Tensor, score, call(aten.detach.default, score))  # 0, gradient of s
            w_hard = call(aten.mul.Tensor, call(aten.add.Tensor, wanted, straight), may_f)
            w = call(aten.add.Tensor, call(aten.mul.Tensor, w_hard, hard),
                     call(aten.mul.Tensor, score, call(aten.rsub.Scalar, hard, 1)))
            weight = call(aten.mul.Tensor, w, mix)
        order = {n: k for k, n in enumerate(graph.nodes)}
        scores.append(score)
        for s, r in zip(m.streams, reuse):
            y = value(s.y)
            with inserting_after(graph, s.y):
                w = call(aten._to_copy.default, weight, dtype=y.dtype)
                if y.shape[0] != batch:  # frames folded into the batch dim: a sample's rows share its weight
                    w = call(aten.expand.default, call(aten.reshape.default, w, [batch, 1]), [batch, y.shape[0] // batch])
                w = call(aten.reshape.default, w, [-1] + [1] * (y.dim() - 1))
                keep = call(aten.rsub.Scalar, w, 1)
                fresh = call(aten.mul.Tensor, keep, s.y)
                blended = call(aten.add.Tensor, fresh, call(aten.mul.Tensor, w, r))
            blended.meta["val"] = y
            s.y.replace_all_uses_with(blended, delete_user_cb=lambda u, fresh=fresh: u is not fresh)
            raw.append(s.y)
        order = {n: k for k, n in enumerate(graph.nodes)}

    with graph.inserting_before(output):
        stacked = call(aten.stack.default, scores)
    output.args = (tuple(outputs) + tuple(raw) + (stacked,) + tuple(pooled),)
    info.state_specs = specs
    info.n_user_outputs = len(outputs)
    graph.lint()
    log.info("soft_blend: %d sites", len(matches))
    return gm
