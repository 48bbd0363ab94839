"""Rewrite every matched site into a gated conditional over explicit cache state.

After this pass the graph takes, besides the user's inputs,

    threshold (0-d f32), last_t (B,) f32, call_index (0-d i64),
    per site: valid (K, B) bool, one cache (K, B, ...) per branch output

and updates the state tensors *in place* (``copy_`` / ``index_copy_``, one cache slot per
call, like gpt-fast's KV cache): eager mode writes one slot and nothing more, compiled
graphs keep static buffers (CUDA graphs), and ``torch.export`` functionalises the writes
into explicit inputs/outputs for ONNX.  After the user's outputs the graph returns
``skipped`` (sites, B) bool, ``saved`` (sites,) bool (the whole batch skipped, so the
branch was not computed) and ``scores`` (sites, B) f32.
K is ``calls_per_step``: the k-th call at the same timestep uses cache slot k; a call past
K computes in full and leaves its slot invalid.

Per site, per sample ``b``:  ``s_b = sigmoid(sum_streams sum_tokens(Z) . w + bias)``
(fp32), ``skip_b = s_b > threshold and valid_b``.  The branch becomes
``cond(all(skip), reuse, cond(any(skip), mixed, compute))``; ``mixed`` computes the branch
and gives the samples that skip their cached rows (``where``), so a sample's result never
depends on its batch, while the common all/none cases pay for no extra copy.
"""

from __future__ import annotations

import logging
import math
import operator

import torch
import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import shape, value
from lazypass.passes.build import caller, graph_inputs, inserting_after, user_outputs
from lazypass.passes.info import graph_info

aten = torch.ops.aten
log = logging.getLogger(__name__)


def insert_gates(gm: fx.GraphModule, cfg: LazyConfig) -> fx.GraphModule:
    from lazypass.distributed import all_reduce, sync_mode  # torch.distributed only when used

    info = graph_info(gm)
    matches, gates, batch, timestep = info.matches, info.gates, info.batch, info.timestep
    graph = gm.graph
    K = cfg.calls_per_step
    sync = sync_mode(gm, cfg)
    call = caller(graph)

    output, outputs = user_outputs(graph)
    state_input, specs = graph_inputs(graph)

    threshold = state_input("lazy_threshold", (), torch.float32)
    last_t = state_input("lazy_last_t", (batch,), torch.float32, math.inf)
    call_index = state_input("lazy_call_index", (), torch.int64)
    site_state = []
    for i, m in enumerate(matches):
        valid = state_input(f"lazy_valid_{i}", (K, batch), torch.bool)
        caches = [
            state_input(f"lazy_cache_{i}_{j}", (K, *value(s.y).shape), cfg.cache_torch_dtype or value(s.y).dtype)
            for j, s in enumerate(m.streams)
        ]
        site_state.append((valid, caches))

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
            not_new = in_range = None
            slot = call(aten.zeros.default, [1], dtype=torch.int64, device=value(matches[0].streams[0].x).device)

    skipped, saved, scores = [], [], []
    for i, (m, (valid, caches)) in enumerate(zip(matches, site_state)):
        # after the step bookkeeping too: a site may read only graph inputs (StableAudio)
        last_input = max([s.z for s in m.streams] + m.operands + [slot], key=_position(graph))
        with inserting_after(graph, last_input):
            if not_new is not None:
                call(aten.logical_and_.default, valid, not_new)
            row = call(aten.squeeze.dim, call(aten.index_select.default, valid, 0, slot), 0)
            if in_range is not None:
                row = call(aten.logical_and.default, row, in_range)
            score = gate_score(call, gm, gates, i, m, batch, sync)
            skip = call(aten.logical_and.default, call(aten.gt.Tensor, score, threshold), row)
            if sync is not None:  # a sample skips only where every rank may skip it
                flags = call(aten._to_copy.default, skip, dtype=torch.int32)
                skip = call(aten._to_copy.default, all_reduce(call, flags, "min", sync[1]), dtype=torch.bool)
            everyone = call(aten.all.default, skip)
            anyone = call(aten.any.default, skip)
            reuse, decide = _branches(gm, m, i, [value(c).dtype for c in caches], batch)
            operands = tuple(m.operands + caches + [slot, skip, anyone])
            cond = call(torch.ops.higher_order.cond, everyone, reuse, decide, operands)
            outs = [call(operator.getitem, cond, j) for j in range(len(m.streams))]
            written = None if in_range is None else call(
                aten.expand.default, call(aten.reshape.default, in_range, [1]), [batch])
            for cache, out in zip(caches, outs):
                src = _cast(call, out, value(cache).dtype)
                call(aten.index_copy_.default, cache, 0, slot, call(aten.unsqueeze.default, src, 0))
                # a row written from a NaN/Inf output (or one that overflows cache_dtype) is never reused
                ok = _finite_rows(call, src, batch)
                written = ok if written is None else call(aten.logical_and.default, written, ok)
            if cfg.max_reuse == 1:  # a row just reused may not be reused again next step
                written = call(aten.logical_and.default, written, call(aten.logical_not.default, skip))
            call(aten.index_copy_.default, valid, 0, slot, call(aten.unsqueeze.default, written, 0))
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


def gate_score(call, gm, gates, i, m, batch, sync=None):
    """Gate score of site ``i`` per sample, in fp32: sigmoid(sum over streams of sum_tokens(Z) . w + b).

    Shared by the hard (``insert_gates``) and soft (``soft_blend``) rewrites. With tokens sharded over ranks the partial sums are added up across them, which gives
    every rank the score of the unsharded model. Rows of a site are sample-major, so
    ``(rows, ..., D) -> (B, -1, D)`` gathers each sample's tokens, also where frames are
    folded into the leading dim (Latte)."""
    logit = None
    for j, s in enumerate(m.streams):
        z = s.z
        if len(shape(z)) != 3 or shape(z)[0] != batch:
            z = call(aten.reshape.default, z, [batch, -1, shape(z)[-1]])
        summed = call(aten.sum.dim_IntList, z, [1], False, dtype=torch.float32)
        w = _gate_param(call, gm, gates.weight_name(i, j), gates.weight(i, j))
        term = call(aten.mv.default, summed, w)
        logit = term if logit is None else call(aten.add.Tensor, logit, term)
    if sync is not None and sync[0] == "sharded":
        from lazypass.distributed import all_reduce

        logit = all_reduce(call, logit, "sum", sync[1])
    b = call(aten.select.int, _gate_param(call, gm, "lazy_gate_bias", gates.bias), 0, gates.bias_index(i))
    return call(aten.sigmoid.default, call(aten.add.Tensor, logit, b))


def _gate_param(call, gm, name, param):
    if not hasattr(gm, name):
        setattr(gm, name, param)
    node = gm.graph.get_attr(name)
    node.meta["val"] = torch.empty(param.shape, dtype=param.dtype, device="meta")
    return node if param.dtype == torch.float32 else call(aten._to_copy.default, node, dtype=torch.float32)


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


def _branches(gm, m, i, cache_dtypes, batch):
    """``reuse`` and ``decide`` graphs; ``decide`` is cond(any(skip), mixed, compute)."""
    n_out = len(m.streams)
    names = tuple(f"cache_{j}" for j in range(n_out)) + ("slot", "skip", "anyone")
    dtypes = list(zip([value(s.y).dtype for s in m.streams], cache_dtypes))

    reuse = fx.Graph()
    for k in range(len(m.operands)):
        reuse.placeholder(f"operand_{k}")
    *caches, slot, _, _ = [reuse.placeholder(name) for name in names]
    reuse.output(tuple(_read(reuse, c, slot, *d) for c, d in zip(caches, dtypes)))

    compute, _, outs = branch_graph(m, names)
    compute.output(tuple(_dense(compute, o, s) for o, s in zip(outs, m.streams)))

    mixed, (*caches, slot, skip, _), outs = branch_graph(m, names)
    rows = []
    for out, cache, s, d in zip(outs, caches, m.streams, dtypes):
        rows_of, rank = shape(s.y)[0], len(shape(s.y))
        mask = skip
        if rows_of != batch:  # frames folded into the batch dim: one flag per sample's rows
            mask = mixed.call_function(aten.reshape.default, (skip, [-1, 1]))
            mask = mixed.call_function(aten.expand.default, (mask, [batch, rows_of // batch]))
        mask = mixed.call_function(aten.reshape.default, (mask, [-1] + [1] * (rank - 1)))
        rows.append(mixed.call_function(aten.where.self, (mask, _read(mixed, cache, slot, *d), out)))
    mixed.output(tuple(_dense(mixed, r, s) for r, s in zip(rows, m.streams)))

    decide = fx.Graph()
    inputs = [decide.placeholder(f"operand_{k}") for k in range(len(m.operands))]
    inputs += [decide.placeholder(name) for name in names]
    mixed_attr = decide.get_attr("mixed")
    compute_attr = decide.get_attr("compute")
    inner = decide.call_function(torch.ops.higher_order.cond, (inputs[-1], mixed_attr, compute_attr, tuple(inputs)))
    decide.output(tuple(decide.call_function(operator.getitem, (inner, j)) for j in range(n_out)))
    decide_module = torch.nn.Module()
    decide_module.mixed = fx.GraphModule(torch.nn.Module(), mixed)
    decide_module.compute = fx.GraphModule(torch.nn.Module(), compute)
    setattr(gm, f"lazy_site_{i}_decide", fx.GraphModule(decide_module, decide))
    return _module(gm, f"lazy_site_{i}_reuse", reuse), gm.graph.get_attr(f"lazy_site_{i}_decide")
