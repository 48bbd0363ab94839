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

With ``reuse="forecast"`` (and a timestep input) ``R`` is the forecast the inference graph
returns, ``R + (R - P) * factor`` (``gating.forecast_factor``) from the inputs below, so the
on-policy fit reuses exactly what inference would.

Inputs after the user's (``graph_info(gm).state_specs``): ``lazy_mix``, ``lazy_hard`` (0-d
f32), ``lazy_threshold`` (sites,) f32 (one per site, so a fit can force one group of sites to
skip), then per site ``i``: ``lazy_may_{i}`` (B,) bool (the row may skip),
``lazy_age_{i}`` (B,) f32 and ``lazy_pool_{i}_{j}`` (B, D) f32 where the site decides and
reads those inputs, ``lazy_reuse_{i}_{j}`` per stream (shape and dtype of that output) and,
when forecasting, ``lazy_prev_{i}_{j}`` (same), ``lazy_tfill_{i}``, ``lazy_tprev_{i}`` (B,)
f32 and ``lazy_hasprev_{i}`` (B,) bool.
Outputs: the user's, the raw ``F(Z)`` of every site stream, ``scores`` (sites, B) f32, the
token means of ``Z`` and then the token sums of ``Z`` (fp32, what the gate weights multiply)
of every stream of every deciding site, and, when forecasting, the timestep the graph reads
(B,) f32.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import shape, value
from lazypass.passes.build import caller, graph_inputs, inserting_after, user_outputs
from lazypass.passes.gating import drift_of, forecast_factor, gate_logit, means, token_sums
from lazypass.passes.info import graph_info

aten = torch.ops.aten
log = logging.getLogger(__name__)


def soft_blend(gm: fx.GraphModule, cfg: LazyConfig) -> fx.GraphModule:
    info = graph_info(gm)
    matches, gates, batch, timestep = info.matches, info.gates, info.batch, info.timestep
    forecast = cfg.reuse == "forecast" and timestep is not None
    graph = gm.graph
    order = {n: k for k, n in enumerate(graph.nodes)}
    call = caller(graph)
    output, outputs = user_outputs(graph)
    extra_input, specs = graph_inputs(graph)
    leaders = cfg.group_of(len(matches))
    use_age, use_drift = "age" in cfg.gate_inputs, "drift" in cfg.gate_inputs

    mix = extra_input("lazy_mix", (), torch.float32)
    hard = extra_input("lazy_hard", (), torch.float32)
    thresholds = extra_input("lazy_threshold", (len(matches),), torch.float32)
    inputs = []
    for i, m in enumerate(matches):
        may = extra_input(f"lazy_may_{i}", (batch,), torch.bool)
        age = extra_input(f"lazy_age_{i}", (batch,), torch.float32) if use_age and leaders[i] == i else None
        pools = [extra_input(f"lazy_pool_{i}_{j}", (batch, shape(s.z)[-1]), torch.float32)
                 for j, s in enumerate(m.streams)] if use_drift and leaders[i] == i else []
        reuse = [extra_input(f"lazy_reuse_{i}_{j}", tuple(value(s.y).shape), value(s.y).dtype)
                 for j, s in enumerate(m.streams)]
        fc = None
        if forecast:
            prevs = [extra_input(f"lazy_prev_{i}_{j}", tuple(value(s.y).shape), value(s.y).dtype)
                     for j, s in enumerate(m.streams)]
            fc = (prevs, extra_input(f"lazy_tfill_{i}", (batch,), torch.float32),
                  extra_input(f"lazy_tprev_{i}", (batch,), torch.float32),
                  extra_input(f"lazy_hasprev_{i}", (batch,), torch.bool))
        inputs.append((may, age, pools, reuse, fc))

    t = None
    if forecast:  # the timestep as the inference graph reads it, (B,) f32
        first_use = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
        with graph.inserting_before(first_use):
            t = call(aten.reshape.default, call(aten._to_copy.default, timestep, dtype=torch.float32), [-1])
            t = call(aten.expand.default, t, [batch])

    raw, scores, pooled, summed, decided = [], [], [], [], {}
    for i, (m, (may, age, pools, reuse, fc)) in enumerate(zip(matches, inputs)):
        leader = leaders[i]
        # every Z comes before every Y (Z dominates the heavy ops, Y post-dominates them)
        after = [s.z for s in m.streams] + ([decided[leader]] if leader != i else [])
        with inserting_after(graph, max(after, key=order.__getitem__)):
            if leader == i:
                sums = token_sums(call, m, batch)
                current = means(call, sums)
                pooled += current
                summed += [s for s, _ in sums]
                drift = drift_of(call, current, pools, may) if pools else None
                decided[i] = call(aten.sigmoid.default, gate_logit(call, gm, gates, i, sums, age, drift))
            score = decided[leader]
            may_f = call(aten._to_copy.default, may, dtype=torch.float32)
            threshold = call(aten.select.int, thresholds, 0, i)
            wanted = call(aten._to_copy.default, call(aten.gt.Tensor, score, threshold), dtype=torch.float32)
            straight = call(aten.sub.Tensor, score, call(aten.detach.default, score))  # 0, gradient of s
            w_hard = call(aten.mul.Tensor, call(aten.add.Tensor, wanted, straight), may_f)
            w = call(aten.add.Tensor, call(aten.mul.Tensor, w_hard, hard),
                     call(aten.mul.Tensor, score, call(aten.rsub.Scalar, hard, 1)))
            weight = call(aten.mul.Tensor, w, mix)
        order = {n: k for k, n in enumerate(graph.nodes)}
        scores.append(score)
        for j, (s, r) in enumerate(zip(m.streams, reuse)):
            y = value(s.y)
            with inserting_after(graph, s.y):
                if fc is not None:  # the forecast the inference graph would return
                    prevs, t_fill, t_prev, has_prev = fc
                    f = forecast_factor(call, t, t_fill, t_prev, has_prev)
                    f = call(aten._to_copy.default, f, dtype=y.dtype)
                    if y.shape[0] != batch:
                        f = call(aten.expand.default, call(aten.reshape.default, f, [batch, 1]), [batch, y.shape[0] // batch])
                    f = call(aten.reshape.default, f, [-1] + [1] * (y.dim() - 1))
                    r = call(aten.add.Tensor, r, call(aten.mul.Tensor, call(aten.sub.Tensor, r, prevs[j]), f))
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
    output.args = (tuple(outputs) + tuple(raw) + (stacked,) + tuple(pooled) + tuple(summed) + ((t,) if t is not None else ()),)
    info.state_specs = specs
    info.n_user_outputs = len(outputs)
    graph.lint()
    log.info("soft_blend: %d sites", len(matches))
    return gm
