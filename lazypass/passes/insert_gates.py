"""Rewrite every matched site into a gated conditional, with the cache state as graph I/O.

After this pass the graph is *functional*: besides the user's inputs it takes

    threshold (0-d f32), last_t (B,) f32, call_index (0-d i64),
    per site: valid (K, B) bool, one cache (K, B, ...) per branch output

and returns, after the user's outputs, the new ``last_t``, ``call_index``, valid flags
and caches, then ``skipped`` (sites, B) bool, ``executed`` (sites,) bool and
``scores`` (sites, B) f32.  K is ``calls_per_step``: the k-th call at the same timestep
uses cache slot k.  Keeping the state explicit is what lets one graph run eagerly
(the runtime just keeps the returned tensors), under Inductor, and in ONNX/TensorRT
where mutated buffers would otherwise be frozen into constants.

Per site, per sample ``b``:  ``s_b = sigmoid(sum_streams sum_tokens(Z) . w + bias)``
(fp32), ``skip_b = s_b > threshold and valid_b``.  The branch becomes
``cond(all(skip), reuse, compute)``; ``compute`` still takes the cached rows of the
samples that skip (``where``), so a sample's result never depends on its batch.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import shape, value

aten = torch.ops.aten
log = logging.getLogger(__name__)


def insert_gates(gm: fx.GraphModule, cfg: LazyConfig) -> fx.GraphModule:
    matches = gm.meta["lazypass.matches"]
    gates = gm.meta["lazypass.gates"]
    graph = gm.graph
    K = cfg.calls_per_step
    batch = shape(matches[0].streams[0].x)[0]
    timestep = gm.meta["lazypass.timestep"]

    output = next(n for n in graph.nodes if n.op == "output")
    user_outputs = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]

    specs = []  # (name, shape, dtype) of each state input, in order

    def state_input(name, shp, dtype):
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(name)
        anchor.meta["val"] = torch.empty(shp, dtype=dtype, device="meta")
        specs.append((name, tuple(shp), dtype))
        return anchor

    anchor = placeholders[-1]
    threshold = state_input("lazy_threshold", (), torch.float32)
    last_t = state_input("lazy_last_t", (batch,), torch.float32)
    call_index = state_input("lazy_call_index", (), torch.int64)
    site_state = []
    for i, m in enumerate(matches):
        valid = state_input(f"lazy_valid_{i}", (K, batch), torch.bool)
        caches = []
        for j, s in enumerate(m.streams):
            v = value(s.y)
            caches.append(state_input(f"lazy_cache_{i}_{j}", (K, *v.shape), cfg.cache_torch_dtype or v.dtype))
        site_state.append((valid, caches))

    def call(target, *args, **kwargs):
        return graph.call_function(target, args, kwargs)

    # Step bookkeeping, right after the inputs.
    first_use = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    with graph.inserting_before(first_use):
        if timestep is not None:
            t = call(aten.reshape.default, call(aten._to_copy.default, timestep, dtype=torch.float32), [-1])
            t = call(aten.expand.default, t, [batch])
            new_run = call(aten.gt.Tensor, t, last_t)
            same_step = call(aten.all.default, call(aten.eq.Tensor, t, last_t))
            next_index = call(aten.where.ScalarOther, same_step, call(aten.add.Tensor, call_index, 1), 0)
            in_range = call(aten.lt.Scalar, next_index, K)
            slot = call(aten.reshape.default, call(aten.clamp.default, next_index, None, K - 1), [1])
            not_new = call(aten.logical_not.default, new_run)
        else:
            t, next_index, in_range, not_new = last_t, call_index, None, None
            slot = None

    skipped, executed, scores, new_state = [], [], [], []
    for i, (m, (valid, caches)) in enumerate(zip(matches, site_state)):
        anchor_node = max((s.z for s in m.streams), key=lambda n: _index(graph, n))
        last_operand = max(m.operands, key=lambda n: _index(graph, n))
        if _index(graph, last_operand) > _index(graph, anchor_node):
            anchor_node = last_operand
        with graph.inserting_after(anchor_node):
            marker = call(operator.add, 0, 0)  # placeholder position; replaced below
        with graph.inserting_before(marker):
            keep = valid if not_new is None else call(aten.logical_and.default, valid, not_new)
            valid_row, reads = _read_slot(call, keep, caches, slot)
            valid_now = valid_row if in_range is None else call(aten.logical_and.default, valid_row, in_range)
            reads = [_cast(call, r, value(s.y).dtype) for r, s in zip(reads, m.streams)]
            score = gate_score(call, gm, gates, i, m)
            want = call(aten.gt.Tensor, score, threshold)
            skip = call(aten.logical_and.default, want, valid_now)
            everyone = call(aten.all.default, skip)
            reuse, compute = _branches(gm, m, i)
            cond = call(
                torch.ops.higher_order.cond, everyone, reuse, compute, tuple(m.operands + reads + [skip])
            )
            outs = [call(operator.getitem, cond, j) for j in range(len(m.streams))]
        graph.erase_node(marker)
        for out, s in zip(outs, m.streams):
            out.meta["val"] = value(s.y)
            s.y.replace_all_uses_with(out, delete_user_cb=lambda u: u is not cond and u not in m.nodes)
        for n in reversed(m.nodes):
            graph.erase_node(n)

        with graph.inserting_before(output):
            new_valid, new_caches = _write_slot(call, keep, caches, slot, in_range, outs, reads, cfg)
        new_state.append(new_valid)
        new_state.extend(new_caches)
        skipped.append(skip)
        executed.append(everyone)
        scores.append(score)

    with graph.inserting_before(output):
        records = [
            call(aten.stack.default, skipped),
            call(aten.stack.default, executed),
            call(aten.stack.default, scores),
        ]
    output.args = (tuple(user_outputs) + (t, next_index, *new_state, *records),)
    gm.meta["lazypass.state_specs"] = specs
    gm.meta["lazypass.n_user_outputs"] = len(user_outputs)
    graph.lint()
    log.info("insert_gates: %d conditionals", len(matches))
    return gm


def _index(graph: fx.Graph, node: fx.Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    raise KeyError(node)


def _cast(call, node, dtype):
    v = value(node)
    if v is not None and v.dtype == dtype:
        return node
    return call(aten._to_copy.default, node, dtype=dtype)


def _read_slot(call, valid, caches, slot):
    if slot is None:  # no timestep: one slot
        return call(aten.select.int, valid, 0, 0), [call(aten.select.int, c, 0, 0) for c in caches]
    row = call(aten.squeeze.dim, call(aten.index_select.default, valid, 0, slot), 0)
    reads = [call(aten.squeeze.dim, call(aten.index_select.default, c, 0, slot), 0) for c in caches]
    return row, reads


def _write_slot(call, valid, caches, slot, in_range, outs, reads, cfg):
    new_caches = []
    for cache, out, read in zip(caches, outs, reads):
        src = out if in_range is None else call(aten.where.self, in_range, out, read)
        dtype = cfg.cache_torch_dtype
        if dtype is not None:
            src = call(aten._to_copy.default, src, dtype=dtype)
        if slot is None:
            new_caches.append(call(aten.unsqueeze.default, src, 0))
        else:
            new_caches.append(call(aten.index_copy.default, cache, 0, slot, call(aten.unsqueeze.default, src, 0)))
    if slot is None:
        return call(aten.ones_like.default, valid), new_caches
    row = call(aten.squeeze.dim, call(aten.index_select.default, valid, 0, slot), 0)
    row = call(aten.logical_or.default, row, in_range)
    return call(aten.index_copy.default, valid, 0, slot, call(aten.unsqueeze.default, row, 0)), new_caches


def gate_score(call, gm, gates, i, m):
    """Gate score of site ``i`` per sample, in fp32: sigmoid(sum over streams of sum_tokens(Z) . w + b).

    Shared by the hard (``insert_gates``) and soft (``soft_blend``) rewrites.
    """
    logit = None
    for j, s in enumerate(m.streams):
        zs = shape(s.z)
        summed = call(aten.sum.dim_IntList, s.z, list(range(1, len(zs) - 1)), False, dtype=torch.float32)
        w = _gate_param(call, gm, gates.weight_name(i, j), gates.weight(i, j))
        term = call(aten.mv.default, summed, w)
        logit = term if logit is None else call(aten.add.Tensor, logit, term)
    b = call(aten.select.int, _gate_param(call, gm, "lazy_gate_bias", gates.bias), 0, i)
    return call(aten.sigmoid.default, call(aten.add.Tensor, logit, b))


def _gate_param(call, gm, name, param):
    if not hasattr(gm, name):
        setattr(gm, name, param)
    node = gm.graph.get_attr(name)
    node.meta["val"] = torch.empty(param.shape, dtype=param.dtype, device="meta")
    return call(aten._to_copy.default, node, dtype=torch.float32)


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


def _branches(gm, m, i):
    names = tuple(f"cache_{j}" for j in range(len(m.streams))) + ("skip",)

    # reuse: the cached rows, copied (a cond branch may not return its inputs)
    reuse = fx.Graph()
    for k in range(len(m.operands)):
        reuse.placeholder(f"operand_{k}")
    *reads, _ = [reuse.placeholder(name) for name in names]
    reuse.output(tuple(reuse.call_function(aten.clone.default, (r,)) for r in reads))

    # compute: F, then the cached rows of the samples that skip
    compute, (*reads, skip), outs = branch_graph(m, names)
    mixed = []
    for out, read, s in zip(outs, reads, m.streams):
        rows = compute.call_function(aten.reshape.default, (skip, [-1] + [1] * (len(shape(s.y)) - 1)))
        mixed.append(compute.call_function(aten.where.self, (rows, read, out)))
    compute.output(tuple(mixed))

    nodes = []
    for tag, g in (("reuse", reuse), ("compute", compute)):
        name = f"lazy_site_{i}_{tag}"
        setattr(gm, name, fx.GraphModule(torch.nn.Module(), g))
        nodes.append(gm.graph.get_attr(name))
    return nodes
