"""Rewrite every matched site into a gated conditional over explicit cache state.

After this pass the graph takes, besides the user's inputs (K = ``calls_per_step``,
B = samples per call, all listed with their initial values in ``graph_info(gm).state_specs``),

    threshold (0-d f32), last_t (B,) f32, call_index (0-d i64), and per site i:
    valid_i (K, B) bool       the row's cache at this slot may be used
    age_i (K, B) f32          calls at this slot since the row last computed (max_age, "age" input)
    cache_i_j (K, rows, ...)  the last computed output of stream j
    prev_i_j, t_fill_i, t_prev_i, has_prev_i    the output before it and both timesteps (forecast)
    pool_i_j (K, B, D) f32    token mean of Z when the cache was filled (deciding sites, "drift" input)

and updates the state tensors *in place* (``copy_`` / ``index_copy_``, one cache slot per
call, like gpt-fast's KV cache): eager mode writes one slot and nothing more, compiled
graphs keep static buffers (CUDA graphs), and ``torch.export`` functionalises the writes
into explicit inputs/outputs.  After the user's outputs the graph returns ``skipped``
(sites, B) bool, ``saved`` (sites,) bool (the whole batch skipped, so the branch was not
computed) and ``scores`` (sites, B) f32.  The k-th call at the same timestep uses cache
slot k; a call past K computes in full and leaves its slot invalid.

Per site, per sample ``b``: the deciding site of its group (``LazyConfig.granularity``)
scores the sample (``passes/gating.py``) and ``skip_b = score_b > threshold and valid_b``
(and ``age_b < max_age``).  The branch becomes ``cond(all(skip), reuse, cond(any(skip),
mixed, compute))``; ``mixed`` computes the branch and gives the samples that skip their
reused rows (``where``), so a sample's result never depends on its batch, while the common
all/none cases pay for no extra copy.  ``reuse`` returns the cache (``reuse="copy"``) or
``cache + (cache - prev) * (t - t_fill) / (t_fill - t_prev)`` per row (``"forecast"``, a
copy where the row has no previous output yet).  Rows that computed refill their cache;
rows that skipped keep it and age by one.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import shape, value
from lazypass.passes.build import caller, graph_inputs, inserting_after, user_outputs
from lazypass.passes.gating import drift_of, forecast_factor, gate_logit, means, token_sums
from lazypass.passes.info import graph_info

aten = torch.ops.aten
log = logging.getLogger(__name__)


@dataclass
class _SiteState:
    """The state inputs of one site (None where the options need none)."""

    valid: fx.Node
    caches: list[fx.Node]
    age: fx.Node | None = None
    prevs: list[fx.Node] = field(default_factory=list)
    t_fill: fx.Node | None = None
    t_prev: fx.Node | None = None
    has_prev: fx.Node | None = None
    pools: list[fx.Node] = field(default_factory=list)


def insert_gates(gm: fx.GraphModule, cfg: LazyConfig) -> fx.GraphModule:
    from lazypass.distributed import all_reduce, sync_mode  # torch.distributed only when used

    info = graph_info(gm)
    matches, gates, batch, timestep = info.matches, info.gates, info.batch, info.timestep
    graph = gm.graph
    K = cfg.calls_per_step
    sync = sync_mode(gm, cfg)
    call = caller(graph)
    forecast = cfg.reuse == "forecast" and timestep is not None
    if cfg.reuse == "forecast" and timestep is None:
        log.info("insert_gates: no timestep input, so reuse='forecast' falls back to copies")
    use_age, use_drift = "age" in cfg.gate_inputs, "drift" in cfg.gate_inputs
    leaders = cfg.group_of(len(matches))

    output, outputs = user_outputs(graph)
    state_input, specs = graph_inputs(graph)
    threshold = state_input("lazy_threshold", (), torch.float32)
    last_t = state_input("lazy_last_t", (batch,), torch.float32, math.inf)
    call_index = state_input("lazy_call_index", (), torch.int64)
    states = []

    def site_input(i, name, shape, dtype, fill=0.0):
        return state_input(name, shape, dtype, fill, site=i)

    for i, m in enumerate(matches):
        ys = [value(s.y) for s in m.streams]
        dtypes = [cfg.cache_torch_dtype or y.dtype for y in ys]
        st = _SiteState(
            site_input(i, f"lazy_valid_{i}", (K, batch), torch.bool),
            [site_input(i, f"lazy_cache_{i}_{j}", (K, *y.shape), d) for j, (y, d) in enumerate(zip(ys, dtypes))],
        )
        if cfg.max_age is not None or (use_age and leaders[i] == i):
            st.age = site_input(i, f"lazy_age_{i}", (K, batch), torch.float32)
        if forecast:
            st.prevs = [site_input(i, f"lazy_prev_{i}_{j}", (K, *y.shape), d) for j, (y, d) in enumerate(zip(ys, dtypes))]
            st.t_fill = site_input(i, f"lazy_t_fill_{i}", (K, batch), torch.float32)
            st.t_prev = site_input(i, f"lazy_t_prev_{i}", (K, batch), torch.float32)
            st.has_prev = site_input(i, f"lazy_has_prev_{i}", (K, batch), torch.bool)
        if use_drift and leaders[i] == i:
            st.pools = [site_input(i, f"lazy_pool_{i}_{j}", (K, batch, shape(s.z)[-1]), torch.float32)
                        for j, s in enumerate(m.streams)]
        states.append(st)

    # Step bookkeeping, right after the inputs: which cache slot this call uses, and
    # which samples start a new run (their timestep went up).
    first_use = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    with graph.inserting_before(first_use):
        if timestep is not None:
            t = call(aten.reshape.default, call(aten._to_copy.default, timestep, dtype=torch.float32), [-1])
            t = call(aten.expand.default, t, [batch])
            not_new = call(aten.le.Tensor, t, last_t)
            same_step = call(aten.all.default, call(aten.eq.Tensor, t, last_t))
            index = call(aten.where.ScalarOther, same_step, call(aten.add.Tensor, call_index, 1), 0)
            in_range = call(aten.lt.Scalar, index, K)
            slot = call(aten.reshape.default, call(aten.clamp.default, index, None, K - 1), [1])
            call(aten.copy_.default, last_t, t)
            call(aten.copy_.default, call_index, index)
        else:  # every call is a step of its own: one slot
            t = not_new = in_range = None
            slot = call(aten.zeros.default, [1], dtype=torch.int64, device=value(matches[0].streams[0].x).device)

    def row(state):  # this call's slot of a (K, B, ...) state tensor
        return call(aten.squeeze.dim, call(aten.index_select.default, state, 0, slot), 0)

    def put(state, new):
        call(aten.index_copy_.default, state, 0, slot, call(aten.unsqueeze.default, new, 0))

    skipped, saved, scores, decided = [], [], [], {}
    for i, (m, st) in enumerate(zip(matches, states)):
        leader = leaders[i]
        # after the step bookkeeping too: a site may read only graph inputs (StableAudio);
        # a site that follows its group's decision comes after that decision
        after = [s.z for s in m.streams] + m.operands + [slot] + ([decided[leader][1]] if leader != i else [])
        with inserting_after(graph, max(after, key=_position(graph))):
            if not_new is not None:
                call(aten.logical_and_.default, st.valid, not_new)
            valid = row(st.valid)
            may = valid if in_range is None else call(aten.logical_and.default, valid, in_range)
            age = row(st.age) if st.age is not None else None
            if cfg.max_age is not None:
                may = call(aten.logical_and.default, may, call(aten.lt.Scalar, age, cfg.max_age))
            current = None
            if leader == i:
                sums = token_sums(call, m, batch, sync)
                drift = None
                if st.pools:
                    current = means(call, sums)
                    drift = drift_of(call, current, [row(p) for p in st.pools], valid)
                logit = gate_logit(call, gm, gates, i, sums, age if use_age else None, drift)
                score = call(aten.sigmoid.default, logit)
                decided[i] = (score, call(aten.gt.Tensor, score, threshold))
            score, want = decided[leader]
            skip = call(aten.logical_and.default, want, may)
            if sync is not None:  # a sample skips only where every rank may skip it
                flags = call(aten._to_copy.default, skip, dtype=torch.int32)
                skip = call(aten._to_copy.default, all_reduce(call, flags, "min", sync[1]), dtype=torch.bool)
            everyone = call(aten.all.default, skip)
            anyone = call(aten.any.default, skip)
            extra = []
            if forecast:
                t_fill, t_prev, has_prev = row(st.t_fill), row(st.t_prev), row(st.has_prev)
                extra = [forecast_factor(call, t, t_fill, t_prev, has_prev)]
            reuse, decide = _branches(gm, m, i, [value(c).dtype for c in st.caches], batch, forecast)
            operands = tuple(m.operands + st.caches + st.prevs + [slot, skip, anyone] + extra)
            cond = call(torch.ops.higher_order.cond, everyone, reuse, decide, operands)
            outs = [call(operator.getitem, cond, j) for j in range(len(m.streams))]

            # rows that computed refill the cache; rows that skipped keep it (with copies the
            # output of a skipped row is its cache, so the plain write leaves it unchanged)
            finite = None
            for j, (cache, out) in enumerate(zip(st.caches, outs)):
                src = _cast(call, out, value(cache).dtype)
                ok = _finite_rows(call, src, batch)
                finite = ok if finite is None else call(aten.logical_and.default, finite, ok)
                if forecast:
                    mask = _row_mask(call, skip, value(cache).shape[1:], batch)
                    old = row(cache)
                    put(st.prevs[j], call(aten.where.self, mask, row(st.prevs[j]), old))
                    src = call(aten.where.self, mask, old, src)
                put(cache, src)
            written = _choose(call, skip, valid, finite)
            if in_range is not None:
                written = call(aten.logical_and.default, written, in_range)
            if forecast:
                put(st.t_prev, call(aten.where.self, skip, t_prev, t_fill))
                put(st.t_fill, call(aten.where.self, skip, t_fill, t))
                put(st.has_prev, _choose(call, skip, has_prev, valid))
            put(st.valid, written)
            if st.age is not None:
                put(st.age, call(aten.where.ScalarOther, skip, call(aten.add.Tensor, age, 1), 0.0))
            for pool, mean in zip(st.pools, current or []):
                put(pool, call(aten.where.self, call(aten.unsqueeze.default, skip, 1), row(pool), mean))
        for out, s in zip(outs, m.streams):
            out.meta["val"] = _dense_value(value(s.y))
            s.y.replace_all_uses_with(out, delete_user_cb=lambda u: u not in m.nodes)
        for n in reversed(m.nodes):
            graph.erase_node(n)
        skipped.append(skip)
        saved.append(everyone)
        scores.append(score)

    with graph.inserting_before(output):
        records = [call(aten.stack.default, r) for r in (skipped, saved, scores)]
    output.args = (tuple(outputs) + tuple(records),)
    info.state_specs = specs
    info.n_user_outputs = len(outputs)
    graph.lint()
    log.info("insert_gates: %d conditionals", len(matches))
    return gm


def _choose(call, cond, a, b):
    """``where(cond, a, b)`` for bool tensors, as logic: onnxruntime has no bool ``Where``."""
    keep = call(aten.logical_and.default, cond, a)
    return call(aten.logical_or.default, keep, call(aten.logical_and.default, call(aten.logical_not.default, cond), b))


def _row_mask(call, flags, row_shape, batch):
    """(B,) flags as a mask over a site's rows (rows, ...): frames folded into the batch dim
    share their sample's flag (rows are sample-major)."""
    rows = row_shape[0]
    if rows != batch:
        flags = call(aten.expand.default, call(aten.reshape.default, flags, [-1, 1]), [batch, rows // batch])
    return call(aten.reshape.default, flags, [-1] + [1] * (len(row_shape) - 1))


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


def _cast(call, node, dtype):
    v = value(node)
    if v is not None and v.dtype == dtype:
        return node
    return call(aten._to_copy.default, node, dtype=dtype)


def _finite_rows(call, node, batch):
    """(B,) bool: every value of the sample is finite. One fp32 sum per sample: NaN and Inf survive
    a sum, and a sum that overflows only makes a cache row invalid, which is safe. Rows are
    sample-major, so ``(B, -1)`` also gathers the rows of a sample whose frames are folded into
    the leading dim."""
    rows = call(aten.reshape.default, node, [batch, -1])
    return call(aten.isfinite.default, call(aten.sum.dim_IntList, rows, [1], False, dtype=torch.float32))


def branch_graph(m, extra: tuple[str, ...] = ()) -> tuple[fx.Graph, list[fx.Node], list[fx.Node]]:
    """A new graph computing F from its operands (then ``extra`` inputs).

    Returns the graph, the placeholders of ``extra`` and F's outputs (no output node yet).
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for k, p in enumerate(m.operands):
        env[p] = g.placeholder(f"operand_{k}")
        env[p].meta = dict(p.meta)
    extras = [g.placeholder(name) for name in extra]
    for n in m.nodes:
        env[n] = g.node_copy(n, env.__getitem__)
    return g, extras, [env[s.y] for s in m.streams]


def _read(g: fx.Graph, cache: fx.Node, slot: fx.Node, dtype: torch.dtype, cache_dtype: torch.dtype) -> fx.Node:
    """One cache slot as a new tensor (index_select copies, so a branch may return it)."""
    row = g.call_function(aten.squeeze.dim, (g.call_function(aten.index_select.default, (cache, 0, slot)), 0))
    if dtype == cache_dtype:
        return row
    return g.call_function(aten._to_copy.default, (row,), {"dtype": dtype})


def _module(gm: fx.GraphModule, name: str, g: fx.Graph) -> fx.Node:
    setattr(gm, name, fx.GraphModule(torch.nn.Module(), g))
    return gm.graph.get_attr(name)


def _dense(g: fx.Graph, node: fx.Node, stream) -> fx.Node:
    """A contiguous copy where the branch output is not (Sana's conv MLP ends channels-last):
    the branches of a ``cond`` must agree on strides, and cache reads are contiguous."""
    y = value(stream.y)
    if y is None or y.is_contiguous():
        return node
    return g.call_function(aten.clone.default, (node,), {"memory_format": torch.contiguous_format})


def _dense_value(v):
    """The example value of a branch output after ``_dense``: same shape, contiguous strides."""
    if v is None or v.is_contiguous():
        return v
    mode = getattr(v, "fake_mode", None)
    if mode is None:
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    with mode:
        return torch.empty(v.shape, dtype=v.dtype, device=v.device)


def _branches(gm, m, i, cache_dtypes, batch, forecast: bool):
    """``reuse`` and ``decide`` graphs; ``decide`` is cond(any(skip), mixed, compute)."""
    n_out = len(m.streams)
    names = tuple(f"cache_{j}" for j in range(n_out))
    if forecast:
        names += tuple(f"prev_{j}" for j in range(n_out))
    names += ("slot", "skip", "anyone") + (("factor",) if forecast else ())
    dtypes = list(zip([value(s.y).dtype for s in m.streams], cache_dtypes))

    def reused(g, inputs):
        """The value a skipped row returns, per stream."""
        by_name = dict(zip(names, inputs))
        out = []
        for j, (s, d) in enumerate(zip(m.streams, dtypes)):
            c = _read(g, by_name[f"cache_{j}"], by_name["slot"], *d)
            if forecast:
                p = _read(g, by_name[f"prev_{j}"], by_name["slot"], *d)
                f = _row_mask(lambda t, *a: g.call_function(t, a), by_name["factor"], shape(s.y), batch)
                f = g.call_function(aten._to_copy.default, (f,), {"dtype": d[0]})
                slope = g.call_function(aten.sub.Tensor, (c, p))
                c = g.call_function(aten.add.Tensor, (c, g.call_function(aten.mul.Tensor, (slope, f))))
            out.append(c)
        return out

    reuse = fx.Graph()
    for k in range(len(m.operands)):
        reuse.placeholder(f"operand_{k}")
    reuse.output(tuple(reused(reuse, [reuse.placeholder(name) for name in names])))

    compute, _, outs = branch_graph(m, names)
    compute.output(tuple(_dense(compute, o, s) for o, s in zip(outs, m.streams)))

    mixed, extras, outs = branch_graph(m, names)
    skip = extras[names.index("skip")]
    rows = []
    for out, old, s in zip(outs, reused(mixed, extras), m.streams):
        mask = _row_mask(lambda t, *a: mixed.call_function(t, a), skip, shape(s.y), batch)
        rows.append(mixed.call_function(aten.where.self, (mask, old, out)))
    mixed.output(tuple(_dense(mixed, r, s) for r, s in zip(rows, m.streams)))

    decide = fx.Graph()
    inputs = [decide.placeholder(f"operand_{k}") for k in range(len(m.operands))]
    inputs += [decide.placeholder(name) for name in names]
    anyone = inputs[len(m.operands) + names.index("anyone")]
    mixed_attr = decide.get_attr("mixed")
    compute_attr = decide.get_attr("compute")
    inner = decide.call_function(torch.ops.higher_order.cond, (anyone, mixed_attr, compute_attr, tuple(inputs)))
    decide.output(tuple(decide.call_function(operator.getitem, (inner, j)) for j in range(n_out)))
    decide_module = torch.nn.Module()
    decide_module.mixed = fx.GraphModule(torch.nn.Module(), mixed)
    decide_module.compute = fx.GraphModule(torch.nn.Module(), compute)
    setattr(gm, f"lazy_site_{i}_decide", fx.GraphModule(decide_module, decide))
    return _module(gm, f"lazy_site_{i}_reuse", reuse), gm.graph.get_attr(f"lazy_site_{i}_decide")
