"""The gate of a site as graph nodes, shared by the hard (``insert_gates``) and soft
(``soft_blend``) rewrites, so fitting trains exactly the score inference thresholds.

Per sample ``b`` of site ``i`` (all in fp32)::

    sums_j  = sum over tokens of Z_j                       (B, D_j), one per stream
    logit   = sum_j sums_j . w_ij + bias_i  [+ age_i * age_b]  [+ drift_i * drift_b]
    drift_b = min(mean_j |sums_j / T_j - pool_j| / (|pool_j| + eps), DRIFT_CAP)   (0 where the cache is not valid)
    score   = sigmoid(logit)

``pool_j`` is the token mean of ``Z_j`` when the row's cache was filled. Rows of a site are
sample-major, so ``(rows, ..., D) -> (B, -1, D)`` gathers each sample's tokens, also where
frames are folded into the leading dim (Latte). The drift is capped at ``DRIFT_CAP`` so one
far-off input cannot swamp the linear gate (a drift of 4 already means "recompute"). With tokens sharded over ranks the partial
token sums are added up across them before anything else, which gives every rank the score
of the unsharded model. The drift is a ratio, so the local token count scales out of it.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from lazypass.ops import shape, value

aten = torch.ops.aten
EPS = 1e-6
DRIFT_CAP = 4.0


def token_sums(call, m, batch: int, sync=None) -> list[tuple[fx.Node, int]]:
    """Per stream: the fp32 sum of ``Z`` over tokens, (B, D), and the number of tokens summed
    (on this rank; with ``sync=("sharded", group)`` the sums are over all ranks' tokens)."""
    out = []
    for s in m.streams:
        z, zs = s.z, shape(s.z)
        tokens = math.prod(zs[:-1]) // batch
        if len(zs) != 3 or zs[0] != batch:
            z = call(aten.reshape.default, z, [batch, -1, zs[-1]])
        # a dtype= argument makes sum copy its input first, even to the same dtype
        fp32 = getattr(value(s.z), "dtype", None) == torch.float32
        wide = {} if fp32 else {"dtype": torch.float32}
        summed = call(aten.sum.dim_IntList, z, [1], False, **wide)
        if sync is not None and sync[0] == "sharded":
            from lazypass.distributed import all_reduce

            summed = all_reduce(call, summed, "sum", sync[1])
        out.append((summed, tokens))
    return out


def means(call, sums: list[tuple[fx.Node, int]]) -> list[fx.Node]:
    """Token means of ``Z`` per stream (what the drift compares)."""
    return [call(aten.div.Scalar, s, tokens) for s, tokens in sums]


def gate_logit(call, gm, gates, i: int, sums, age=None, drift=None) -> fx.Node:
    """The logit of site ``i``'s gate, (B,) fp32; ``age``/``drift`` are (B,) fp32 nodes or None."""
    logit = None
    for j, (summed, _) in enumerate(sums):
        term = call(aten.mv.default, summed, _param(call, gm, gates.weight_name(i, j), gates.weight(i, j)))
        logit = term if logit is None else call(aten.add.Tensor, logit, term)
    logit = call(aten.add.Tensor, logit, _site(call, gm, gates, "bias", i))
    for name, feature in (("age", age), ("drift", drift)):
        if feature is not None:
            logit = call(aten.add.Tensor, logit, call(aten.mul.Tensor, feature, _site(call, gm, gates, name, i)))
    return logit


def drift_of(call, current: list[fx.Node], pools: list[fx.Node], valid: fx.Node) -> fx.Node:
    """Relative change of the token means since the cache was filled, (B,) fp32."""
    total = None
    for mean, pool in zip(current, pools):
        change = call(aten.linalg_vector_norm.default, call(aten.sub.Tensor, mean, pool), 2, [1])
        size = call(aten.add.Scalar, call(aten.linalg_vector_norm.default, pool, 2, [1]), EPS)
        term = call(aten.div.Tensor, change, size)
        total = term if total is None else call(aten.add.Tensor, total, term)
    if len(current) > 1:
        total = call(aten.div.Scalar, total, len(current))
    total = call(aten.clamp.default, total, None, DRIFT_CAP)
    return call(aten.where.ScalarOther, valid, total, 0.0)


def forecast_factor(call, t, t_fill, t_prev, has_prev) -> fx.Node:
    """``(t - t_fill) / (t_fill - t_prev)`` per row, 0 where the row has no previous output:
    a forecast reuse returns ``cache + (cache - prev) * factor``."""
    span = call(aten.sub.Tensor, t_fill, t_prev)
    ok = call(aten.logical_and.default, has_prev, call(aten.ne.Scalar, span, 0))
    safe = call(aten.where.ScalarOther, ok, span, 1.0)
    return call(aten.where.ScalarOther, ok, call(aten.div.Tensor, call(aten.sub.Tensor, t, t_fill), safe), 0.0)


def _site(call, gm, gates, name: str, i: int) -> fx.Node:
    # site_index: a program with fewer sites than the gates reads its own (lazypass/sitemap.py)
    return call(aten.select.int, _param(call, gm, f"lazy_gate_{name}", getattr(gates, name)), 0, gates.site_index(i))


def _param(call, gm, name, param):
    if not hasattr(gm, name):
        setattr(gm, name, param)
    node = gm.graph.get_attr(name)
    node.meta["val"] = torch.empty(param.shape, dtype=param.dtype, device="meta")
    return node if param.dtype == torch.float32 else call(aten._to_copy.default, node, dtype=torch.float32)
