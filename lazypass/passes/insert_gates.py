"""Rewrite every matched site into a gated conditional over explicit cache state.

After this pass the graph takes, besides the user's inputs (K = ``calls_per_step``,
B = samples per call, all listed with their initial values in ``graph_info(gm).state_specs``),

    threshold (0-d f32), last_t (B,) f32, call_index (0-d i64);
    per decision group, named after its deciding site l (``LazyConfig.group_of``; every site is
    its own group with ``granularity="site"``):
    valid_l (K, B) bool       the rows' caches at this slot may be used (every site of the group)
    age_l (K, B) f32          calls at this slot since the row last computed (max_age, "age" input)
    t_fill_l, t_prev_l, has_prev_l    timesteps of the last two computed outputs (forecast)
    pool_l_j (K, B, D) f32    token mean of Z when the caches were filled ("drift" input)
    and per site i:
    cache_i_j (K, rows, ...)  the last computed output of stream j
    prev_i_j (K, rows, ...)   the output before it (forecast)

and updates the state tensors *in place* (``copy_`` / ``index_copy_``, one cache slot per
call, like gpt-fast's KV cache): eager mode writes one slot and nothing more, compiled
graphs keep static buffers (CUDA graphs), and ``torch.export`` functionalises the writes
into explicit inputs/outputs.  Each site's cache writes carry a ``Write`` (``WRITE`` meta),
from which ``compiled_writes`` makes the graph dynamo traces write only computed rows.
After the user's outputs the graph returns ``skipped`` (sites, B) bool, ``saved`` (sites,) bool (the whole batch skipped, so the branch was not
computed), ``scores`` (sites, B) f32 and ``computed`` (sites,) f32 (the share of rows
computed).  The k-th call at the same timestep uses cache slot k; a call past K computes
in full and leaves its slot invalid.

Per decision group, per sample ``b``, once: the deciding site scores the sample
(``passes/gating.py``) and ``skip_b = score_b > threshold and valid_b`` (and ``age_b <
max_age``); ``all(skip)``, ``any(skip)`` and the forecast factor are computed there too, for
every site of the group.  Each site's branch becomes ``cond(all(skip), reuse, cond(any(skip),
mixed, compute))``; ``mixed`` computes the branch and gives the samples that skip their
reused rows (``where``), so a sample's result never depends on its batch, while the common
all/none cases pay for no extra copy.  ``reuse`` returns the cache (``reuse="copy"``) or
``cache + (cache - prev) * (t - t_fill) / (t_fill - t_prev)`` per row (``"forecast"``, a
copy where the row has no previous output yet).  Rows that computed refill their caches;
rows that skipped keep them.  The group's row state is written once, after its last site: a
row that skipped stays valid and ages by one; a row that computed is valid where the values
computed for it at *every* site of the group are finite (one fp32 sum per row and site, one
finiteness check on their total), so a row that is non-finite at any site of its group
recomputes the whole group at its next call (a site of its own with ``granularity="site"``).
Every site of a group takes the same decision, so sharing valid, age and timesteps changes
nothing else: it keeps one copy of what would be equal per site.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import is_view, shape, value
from lazypass.passes.build import caller, graph_inputs, inserting_after, user_outputs
from lazypass.passes.gating import drift_of, forecast_factor, gate_logit, means, token_sums
from lazypass.passes.info import graph_info

aten = torch.ops.aten
log = logging.getLogger(__name__)
SLOT = "lazy_slot"  # node.meta key of the node that holds this call's cache slot (the eager twin reads it)
FLAGS = "lazy_flags"  # on a group's (B,) skip: its (all, any) and the rows' valid flags (read on the host by the eager twin)
ROWS = "lazy_rows"  # on where(mask of flags, a, b): the (B,) flags; a if all are set, b if none is
RECORD = "lazy_record"  # on the per-call records (skipped, saved, scores, computed) the graph returns last
WRITE = "lazy_write"  # on a site's cache write: a ``Write`` (``passes/compiled_writes.py`` reads it)


@dataclass
class Write:
    """What a site's cache write does: rows that computed (``skip`` unset) store ``new``; with
    ``prev`` (forecast), their old cache row first moves to ``prev`` where ``valid`` (else ``new``
    goes there too). ``nodes`` are the graph's writes that carry it out."""

    cache: fx.Node
    prev: fx.Node | None
    slot: fx.Node
    skip: fx.Node
    valid: fx.Node | None
    new: fx.Node
    nodes: list[fx.Node]


@dataclass
class _SiteState:
    """The cache inputs of one site (``prevs`` only when forecasting)."""

    caches: list[fx.Node]
    prevs: list[fx.Node] = field(default_factory=list)


@dataclass
class _GroupState:
    """The row state of one decision group, kept by its deciding site (None where the options need none)."""

    valid: fx.Node
    age: fx.Node | None = None
    t_fill: fx.Node | None = None
    t_prev: fx.Node | None = None
    has_prev: fx.Node | None = None
    pools: list[fx.Node] = field(default_factory=list)


@dataclass
class _Decision:
    """What the deciding site of a group computed for every site of the group (this call's rows)."""

    valid: fx.Node  # (B,) the rows' caches may be used
    skip: fx.Node  # (B,) the rows skip every site of the group
    everyone: fx.Node  # 0-d
    anyone: fx.Node  # 0-d
    logit: fx.Node
    age: fx.Node | None = None
    factor: fx.Node | None = None  # forecast factor (B,)
    rows_t: tuple = ()  # (t_fill, t_prev, has_prev) rows
    current: list[fx.Node] | None = None  # token means of Z (drift)
    totals: list[fx.Node] = field(default_factory=list)  # per site: (B,) fp32 sum of its computed values
    masks: dict = field(default_factory=dict)  # (flags, row shape) -> mask, shared by the group's sites
    nodes: list[fx.Node] = field(default_factory=list)  # what later sites of the group must follow


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
    last_site = {lead: i for i, lead in enumerate(leaders)}  # the last site of each group

    output, outputs = user_outputs(graph)
    state_input, specs = graph_inputs(graph)
    threshold = state_input("lazy_threshold", (), torch.float32)
    last_t = state_input("lazy_last_t", (batch,), torch.float32, math.inf)
    call_index = state_input("lazy_call_index", (), torch.int64)
    states, groups = [], {}

    def site_input(i, name, shape, dtype, fill=0.0):
        return state_input(name, shape, dtype, fill, site=i)

    for i, m in enumerate(matches):
        ys = [value(s.y) for s in m.streams]
        dtypes = [cfg.cache_torch_dtype or y.dtype for y in ys]
        if leaders[i] == i:
            gs = _GroupState(site_input(i, f"lazy_valid_{i}", (K, batch), torch.bool))
            if cfg.max_age is not None or use_age:
                gs.age = site_input(i, f"lazy_age_{i}", (K, batch), torch.float32)
            if forecast:
                gs.t_fill = site_input(i, f"lazy_t_fill_{i}", (K, batch), torch.float32)
                gs.t_prev = site_input(i, f"lazy_t_prev_{i}", (K, batch), torch.float32)
                gs.has_prev = site_input(i, f"lazy_has_prev_{i}", (K, batch), torch.bool)
            if use_drift:
                gs.pools = [site_input(i, f"lazy_pool_{i}_{j}", (K, batch, shape(s.z)[-1]), torch.float32)
                            for j, s in enumerate(m.streams)]
            groups[i] = gs
        st = _SiteState([site_input(i, f"lazy_cache_{i}_{j}", (K, *y.shape), d)
                         for j, (y, d) in enumerate(zip(ys, dtypes))])
        if forecast:
            st.prevs = [site_input(i, f"lazy_prev_{i}_{j}", (K, *y.shape), d) for j, (y, d) in enumerate(zip(ys, dtypes))]
        states.append(st)

    # Step bookkeeping, right after the inputs: which cache slot this call uses, and
    # which samples start a new run (their timestep went up).
    first_use = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    with graph.inserting_before(first_use):
        # score > threshold  <=>  logit > logit(threshold): one log per call instead of a sigmoid
        # per site; thresholds outside (0, 1) clamp to logit -inf (always) / +inf (never)
        clamped = call(aten.clamp.default, threshold, 0.0, 1.0)
        bar = call(aten.sub.Tensor, call(aten.log.default, clamped),
                   call(aten.log1p.default, call(aten.neg.default, clamped)))
        if timestep is not None:
            t = call(aten.reshape.default, call(aten._to_copy.default, timestep, dtype=torch.float32), [-1])
            t = call(aten.expand.default, t, [batch])
            not_new = call(aten.le.Tensor, t, last_t)
            same_step = call(aten.all.default, call(aten.eq.Tensor, t, last_t))
            index = call(aten.where.ScalarOther, same_step, call(aten.add.Tensor, call_index, 1), 0)
            in_range = call(aten.lt.Scalar, index, K)
            slot = call(aten.reshape.default, call(aten.clamp.default, index, None, K - 1), [1])
            slot.meta[SLOT] = True
            call(aten.copy_.default, last_t, t)
            call(aten.copy_.default, call_index, index)
        else:  # every call is a step of its own: one slot
            t = not_new = in_range = None
            slot = call(aten.zeros.default, [1], dtype=torch.int64, device=value(matches[0].streams[0].x).device)
            slot.meta[SLOT] = True

    def row(state):  # this call's slot of a (K, B, ...) state tensor
        return call(aten.squeeze.dim, call(aten.index_select.default, state, 0, slot), 0)

    def put(state, new):
        return call(aten.index_copy_.default, state, 0, slot, call(aten.unsqueeze.default, new, 0))

    def rows_where(d, flags, row_shape, a, b):
        """``where(flags per row, a, b)`` over a site's rows; the eager twin skips it when the flags
        are all equal (``ROWS``), which the common calls are (no row or every row skips)."""
        key = (flags, tuple(row_shape))
        if key not in d.masks:
            d.masks[key] = _row_mask(call, flags, row_shape, batch)
        out = call(aten.where.self, d.masks[key], a, b)
        out.meta[ROWS] = flags
        return out

    def decide(i, m, gs):
        """The group's decision and row state, once, at its deciding site."""
        if not_new is not None:
            call(aten.logical_and_.default, gs.valid, not_new)
        valid = row(gs.valid)
        may = valid if in_range is None else call(aten.logical_and.default, valid, in_range)
        age = row(gs.age) if gs.age is not None else None
        if cfg.max_age is not None:
            may = call(aten.logical_and.default, may, call(aten.lt.Scalar, age, cfg.max_age))
        sums = token_sums(call, m, batch, sync)
        drift = current = None
        if gs.pools:
            current = means(call, sums)
            drift = drift_of(call, current, [row(p) for p in gs.pools], valid)
        logit = gate_logit(call, gm, gates, i, sums, age if use_age else None, drift)
        skip = call(aten.logical_and.default, call(aten.gt.Tensor, logit, bar), may)
        if sync is not None:  # a sample skips only where every rank may skip it
            flags = call(aten._to_copy.default, skip, dtype=torch.int32)
            skip = call(aten._to_copy.default, all_reduce(call, flags, "min", sync[1]), dtype=torch.bool)
        everyone = call(aten.all.default, skip)
        anyone = call(aten.any.default, skip)
        skip.meta[FLAGS] = (everyone, anyone, valid)  # the eager twin reads these on the host, once per group
        d = _Decision(valid, skip, everyone, anyone, logit, age=age, current=current)
        if forecast:
            d.rows_t = (row(gs.t_fill), row(gs.t_prev), row(gs.has_prev))
            d.factor = forecast_factor(call, t, *d.rows_t)
        d.nodes = [skip, everyone, anyone] + ([d.factor] if d.factor is not None else [])
        return d

    def write_group(gs, d):
        """The group's row state, once, after its last site: a row that skipped keeps its caches
        (valid, one call older); a row that computed is valid where every value the group's
        sites computed for it is finite."""
        skip = d.skip
        total = d.totals[0] if len(d.totals) == 1 else call(aten.sum.dim_IntList, call(aten.stack.default, d.totals),
                                                               [0])
        finite = call(aten.eq.Scalar, call(aten.sub.Tensor, total, total), 0)  # NaN/Inf survive a sum
        written = call(aten.logical_or.default, skip, finite)
        if in_range is not None:
            written = call(aten.logical_and.default, written, in_range)
        if forecast:
            t_fill, t_prev, has_prev = d.rows_t
            put(gs.t_prev, rows_where(d, skip, (batch,), t_prev, t_fill))
            put(gs.t_fill, rows_where(d, skip, (batch,), t_fill, t))
            put(gs.has_prev, _choose(call, skip, has_prev, d.valid))
        put(gs.valid, written)
        if gs.age is not None:
            put(gs.age, call(aten.where.ScalarOther, skip, call(aten.add.Tensor, d.age, 1), 0.0))
        for pool, mean in zip(gs.pools, d.current or []):
            put(pool, rows_where(d, skip, (batch, 1), row(pool), mean))

    skipped, saved, scores, computed, decided = [], [], [], [], {}
    for i, (m, st) in enumerate(zip(matches, states)):
        leader = leaders[i]
        # after the step bookkeeping too: a site may read only graph inputs (StableAudio);
        # a site that follows its group's decision comes after that decision
        after = [s.z for s in m.streams] + m.operands + [slot] + (decided[leader].nodes if leader != i else [])
        with inserting_after(graph, max(after, key=_position(graph))):
            if leader == i:
                decided[i] = decide(i, m, groups[i])
            d = decided[leader]
            skip, valid = d.skip, d.valid
            compacts = cfg.compacts(batch)
            reuse, decide_, counted = _branches(gm, m, i, [value(c).dtype for c in st.caches], batch, forecast,
                                                "compact" if compacts else "full")
            # whole caches go in and the branch that reuses them reads this call's rows itself: a
            # row read outside would be a cond operand, which a compiler must materialize (a copy
            # per cache and call), while a read inside fuses into the forecast
            operands = tuple(m.operands + st.caches + st.prevs + [slot, skip, d.anyone]
                             + ([d.factor] if forecast else []))
            if forecast:  # this call's rows, for the writes below
                olds, prev_rows = [row(c) for c in st.caches], [row(p) for p in st.prevs]
            cond = call(torch.ops.higher_order.cond, d.everyone, reuse, decide_, operands)
            n_out = len(m.streams)
            outs = [call(operator.getitem, cond, j) for j in range(n_out)]
            d.totals.append(call(operator.getitem, cond, n_out))  # (B,) fp32: sum of the row's computed values
            computed.append(call(operator.getitem, cond, n_out + 1) if counted else None)

            # rows that computed refill the cache; rows that skipped keep it (with copies the
            # output of a skipped row is its cache, so the plain write leaves it unchanged, and the
            # eager twin leaves out the write when the branch returned the cache itself)
            for j, (cache, out, stream) in enumerate(zip(st.caches, outs, m.streams)):
                same = value(stream.y).dtype == value(cache).dtype
                src = new = out if same else _cast(call, out, value(cache).dtype)
                writes = []
                if forecast:
                    rows = value(cache).shape[1:]
                    old = olds[j]
                    # a row whose old cache is not valid (never filled, or non-finite) keeps its
                    # new output as ``prev`` too: the forecast factor is 0 then, and 0 * (c - NaN)
                    # would still be NaN
                    before = rows_where(d, valid, rows, old, src)
                    writes.append(put(st.prevs[j], rows_where(d, skip, rows, prev_rows[j], before)))
                    src = rows_where(d, skip, rows, old, src)
                writes.append(put(cache, src))
                writes[-1].meta[WRITE] = Write(cache, st.prevs[j] if forecast else None, slot, skip,
                                               valid if forecast else None, new, writes)
            if last_site[leader] == i:
                write_group(groups[leader], d)
        for out, s in zip(outs, m.streams):
            out.meta["val"] = _dense_value(value(s.y))
            s.y.replace_all_uses_with(out, delete_user_cb=lambda u: u not in m.nodes)
        for n in reversed(m.nodes):
            graph.erase_node(n)
        skipped.append(skip)
        saved.append(d.everyone)
        scores.append(d.logit)

    with graph.inserting_before(output):
        records = [call(aten.stack.default, r) for r in (skipped, saved, scores)]
        records[2] = call(aten.sigmoid.default, records[2])  # logits -> scores, once per call
        # a branch that does not compact computes every row or none
        whole = call(aten.rsub.Scalar, call(aten._to_copy.default, records[1], dtype=torch.float32), 1)
        if all(c is None for c in computed):
            records.append(whole)
        else:
            records.append(call(aten.stack.default, [call(aten.select.int, whole, 0, k) if c is None else c
                                                     for k, c in enumerate(computed)]))
    for r in records:
        r.meta[RECORD] = True
    output.args = (tuple(outputs) + tuple(records),)
    info.state_specs = specs
    info.n_user_outputs = len(outputs)
    graph.lint()
    log.info("insert_gates: %d conditionals in %d decision groups", len(matches), len(groups))
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


def _row_sums(call, node, dims, batch, dtype):
    """(B,) fp32: the sum of every value of the sample (``node`` has shape ``dims``). NaN and Inf
    survive a sum (and sums of sums), so the group checks finiteness once, on the total over its
    sites; a sum that overflows only makes a cache row invalid, which is safe. Rows are
    sample-major, so ``(B, -1)`` also gathers the rows of a sample whose frames are folded into
    the leading dim."""
    wide = {} if dtype == torch.float32 else {"dtype": torch.float32}  # a dtype= argument copies first
    if dims and len(dims) > 1 and dims[0] == batch:  # no reshape needed
        return call(aten.sum.dim_IntList, node, list(range(1, len(dims))), False, **wide)
    rows = call(aten.reshape.default, node, [batch, -1])
    return call(aten.sum.dim_IntList, rows, [1], False, **wide)


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


def _unaliased(g: fx.Graph, outs: list[fx.Node]) -> list[fx.Node]:
    """The branch outputs, copied where one is a branch input, a view of one, or shares memory
    with another output (CogVideoX's two streams end at one node): ``cond`` branches may not
    return aliases, and torch.export refuses them."""
    def root(node):
        while is_view(node) and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node

    roots = [root(o) for o in outs]
    shared = {r for r in roots if roots.count(r) > 1}
    kept = []
    for o, r in zip(outs, roots):
        if o in kept or r.op == "placeholder" or (o is not r and r in shared):
            o = g.call_function(aten.clone.default, (o,))
        kept.append(o)
    return kept


def _dense_value(v):
    """The example value of a branch output after ``_dense``: same shape, contiguous strides."""
    if v is None or v.is_contiguous():
        return v
    mode = getattr(v, "fake_mode", None)
    if mode is None:
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    with mode:
        return torch.empty(v.shape, dtype=v.dtype, device=v.device)


def _branches(gm, m, i, cache_dtypes, batch, forecast: bool, batch_compute: str = "full"):
    """``reuse`` and ``decide`` graphs (``decide`` is cond(any(skip), mixed, compute)), and whether
    they also return the share of rows computed.

    Every branch returns F's outputs, then ``total`` (B,) fp32, the sum of every value the row
    computed, in the cache dtype (0 for rows that reused; only read for rows that computed), and,
    where the site compacts, ``computed`` (0-d f32, the share of rows computed; otherwise it is 1
    or 0, known from the decision). With ``batch_compute="compact"``, ``mixed`` is a chain of
    conditionals over bucket sizes (``buckets``): the smallest bucket that holds the rows that
    compute gathers those rows (padded with skipping rows), runs F on them alone and scatters
    them back.
    """
    n_out = len(m.streams)
    # the caches (K, rows, ...), forecasting the previous outputs (K, rows, ...) too, and the slot
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
            if forecast:
                f = _row_mask(_on(g), by_name["factor"], shape(s.y), batch)
                if d[0] != torch.float32:
                    f = g.call_function(aten._to_copy.default, (f,), {"dtype": d[0]})
                slope = g.call_function(aten.sub.Tensor, (c, p))
                c = g.call_function(aten.add.Tensor, (c, g.call_function(aten.mul.Tensor, (slope, f))))
            out.append(c)
        return out

    sizes = buckets(batch) if batch_compute == "compact" else []
    batched = _batched_nodes(gm.graph, batch) if sizes else set()
    pending = [(n, _compact_graph(gm, m, names, batch, n, reused, batched)) for n in sizes]
    pending = [(n, p) for n, p in pending if p is not None]
    if sizes and not pending:
        log.info("insert_gates: site %d computes whole batches (its branch does not take a subset of rows)", i)
    counted = bool(pending)

    def finish(g, outs, skip, rows: float | fx.Node):
        """Output node: F's outputs (contiguous), row sums of what the caches will hold, [share computed]."""
        outs = [_dense(g, o, s) for o, s in zip(outs, m.streams)]
        total = None
        for o, d, s in zip(outs, dtypes, m.streams):
            if d[0] != d[1]:
                o = g.call_function(aten._to_copy.default, (o,), {"dtype": d[1]})
            sums = _row_sums(_on(g), o, shape(s.y), batch, d[1])
            total = sums if total is None else g.call_function(aten.add.Tensor, (total, sums))
        if total is None:
            total = g.call_function(aten.new_zeros.default, (skip, [batch]), {"dtype": torch.float32})
        extra = (total,)
        if counted:
            if not isinstance(rows, fx.Node):
                rows = g.call_function(aten.new_full.default, (skip, [], rows), {"dtype": torch.float32})
            extra += (rows,)
        g.output(tuple(outs) + extra)

    compact = []
    for n, (g, outs, skip) in pending:  # their output nodes, now that ``finish`` knows what to return
        finish(g, outs, skip, n / batch)
        compact.append((n, g))

    reuse = fx.Graph()
    for k in range(len(m.operands)):
        reuse.placeholder(f"operand_{k}")
    inputs = [reuse.placeholder(name) for name in names]
    skip = inputs[names.index("skip")]
    extra = (reuse.call_function(aten.new_zeros.default, (skip, [batch]), {"dtype": torch.float32}),)
    if counted:
        extra += (reuse.call_function(aten.new_zeros.default, (skip, []), {"dtype": torch.float32}),)
    reuse.output(tuple(reused(reuse, inputs)) + extra)
    n_ret = n_out + len(extra)

    compute, extras, outs = branch_graph(m, names)
    finish(compute, _unaliased(compute, outs), extras[names.index("skip")], 1.0)

    def mixed_full():
        g, extras, outs = branch_graph(m, names)
        skip = extras[names.index("skip")]
        rows = []
        for out, old, s in zip(outs, reused(g, extras), m.streams):
            mask = _row_mask(_on(g), skip, shape(s.y), batch)
            rows.append(g.call_function(aten.where.self, (mask, old, out)))
        finish(g, rows, skip, 1.0)
        return g

    mixed = mixed_full()
    decide_module = torch.nn.Module()
    decide_module.compute = fx.GraphModule(torch.nn.Module(), compute)
    decide_module.mixed = _bucket_chain(compact, fx.GraphModule(torch.nn.Module(), mixed), m, names, batch, n_ret)
    decide = fx.Graph()
    inputs = [decide.placeholder(f"operand_{k}") for k in range(len(m.operands))]
    inputs += [decide.placeholder(name) for name in names]
    anyone = inputs[len(m.operands) + names.index("anyone")]
    inner = decide.call_function(torch.ops.higher_order.cond, (anyone, decide.get_attr("mixed"),
                                                                decide.get_attr("compute"), tuple(inputs)))
    decide.output(tuple(decide.call_function(operator.getitem, (inner, j)) for j in range(n_ret)))
    setattr(gm, f"lazy_site_{i}_decide", fx.GraphModule(decide_module, decide))
    return _module(gm, f"lazy_site_{i}_reuse", reuse), gm.graph.get_attr(f"lazy_site_{i}_decide"), counted


def buckets(batch: int) -> list[int]:
    """Row counts a compacted branch runs at: quarters of the batch and the powers of two below
    the first quarter (8 -> 1, 2, 4, 6; 16 -> 1, 2, 4, 8, 12; 4 -> 1, 2, 3). More rows than the
    largest compute the whole batch. A fixed list, so compiled graphs hold a fixed number of
    variants (one per bucket) whatever the number of rows that skip."""
    step = max(1, batch // 4)
    out = {q * step for q in range(1, 4)} | {2**k for k in range(batch.bit_length()) if 2**k < step}
    return sorted(n for n in out if n < batch)


def _on(g: fx.Graph):
    return lambda target, *args, **kwargs: g.call_function(target, args, kwargs)


def _bucket_chain(compact, full: fx.GraphModule, m, names, batch: int, n_ret: int) -> fx.GraphModule:
    """``cond(n <= b1, rows_b1, cond(n <= b2, rows_b2, ... full))`` over the rows that compute."""
    if not compact:
        return full
    (size, graph), rest = compact[0], compact[1:]
    other = _bucket_chain(rest, full, m, names, batch, n_ret)
    g = fx.Graph()
    inputs = [g.placeholder(f"operand_{k}") for k in range(len(m.operands))]
    inputs += [g.placeholder(name) for name in names]
    skip = inputs[len(m.operands) + names.index("skip")]
    skipping = g.call_function(aten.sum.default, (skip,))
    n = g.call_function(aten.rsub.Scalar, (skipping, batch))
    pred = g.call_function(aten.le.Scalar, (n, size))
    holder = torch.nn.Module()
    holder.rows = fx.GraphModule(torch.nn.Module(), graph)
    holder.other = other
    inner = g.call_function(torch.ops.higher_order.cond, (pred, g.get_attr("rows"), g.get_attr("other"), tuple(inputs)))
    g.output(tuple(g.call_function(operator.getitem, (inner, j)) for j in range(n_ret)))
    return fx.GraphModule(holder, g)


def _compact_graph(gm, m, names, batch: int, size: int, reused, batched):
    """F on ``size`` rows: those that compute first, padded with rows that skip; their outputs are
    scattered over the reused rows. Returns the graph (no output node yet), its outputs and its
    ``skip`` input, or None where F's graph does not run on a subset of rows (checked on meta
    tensors)."""
    g = fx.Graph()
    ops = [g.placeholder(f"operand_{k}") for k in range(len(m.operands))]
    extras = [g.placeholder(name) for name in names]
    skip = extras[names.index("skip")]
    call = _on(g)
    # the rows that compute, then the rows that skip, each in batch order: the top ``size`` of
    # -2B * skip - row (topk, not sort: ONNX has TopK, and no sort of bool or uint8)
    flags = call(aten._to_copy.default, skip, dtype=torch.float32)
    rank = call(aten.cumsum.default, call(aten.ones_like.default, flags), 0)  # 1..B, on the rows' device
    key = call(aten.sub.Tensor, call(aten.mul.Tensor, flags, -2.0 * batch), rank)
    chosen = call(operator.getitem, call(aten.topk.default, key, size), 1)
    index: dict[int, fx.Node] = {}

    def rows_of(per_sample: int) -> fx.Node:  # row indices of the chosen samples, rows sample-major
        if per_sample not in index:
            if per_sample == 1:
                index[1] = chosen
            else:
                base = call(aten.mul.Tensor, call(aten.unsqueeze.default, chosen, 1), per_sample)
                ones = call(aten.new_ones.default, chosen, [per_sample])
                offsets = call(aten.sub.Scalar, call(aten.cumsum.default, ones, 0), 1)  # 0..per_sample-1
                index[per_sample] = call(aten.reshape.default, call(aten.add.Tensor, base, offsets), [-1])
        return index[per_sample]

    env: dict[fx.Node, fx.Node] = {}
    for p, node in zip(m.operands, ops):
        dims = shape(p)
        if dims and dims[0] % batch == 0 and dims[0] >= batch and p in batched:
            env[p] = call(aten.index_select.default, node, 0, rows_of(dims[0] // batch))
        else:
            env[p] = node
    for n in m.nodes:
        env[n] = g.node_copy(n, env.__getitem__)
        if n in batched:
            _shrink_sizes(env[n], shape(n), batch, size)
    if not _runs_on_meta(gm, g, [env[s.y] for s in m.streams], m, names, batch, size):
        return None
    outs = []
    for s, old in zip(m.streams, reused(g, extras)):
        dims = shape(s.y)
        idx = rows_of(dims[0] // batch)
        full = call(aten.index_copy.default, old, 0, idx, env[s.y])
        mask = _row_mask(call, skip, dims, batch)
        outs.append(call(aten.where.self, mask, old, full))
    return g, outs, skip


_SIZED = {aten.view.default: 1, aten.reshape.default: 1, aten._unsafe_view.default: 1, aten.expand.default: 1,
          aten.new_zeros.default: 1, aten.new_ones.default: 1, aten.new_empty.default: 1, aten.new_full.default: 1,
          aten.zeros.default: 0, aten.ones.default: 0, aten.empty.memory_format: 0, aten.full.default: 0}


def _shrink_sizes(node: fx.Node, dims, batch: int, size: int) -> None:
    """Sizes written into the graph (a traced ``view(B, T, H, D)``) for ``size`` samples instead of
    ``batch``: a size list whose first entry is the node's leading dim, a multiple of the batch."""
    k = _SIZED.get(node.target)
    if k is None or not dims or len(node.args) <= k or not isinstance(node.args[k], (list, tuple)):
        return
    sizes = list(node.args[k])
    if sizes and isinstance(sizes[0], int) and sizes[0] == dims[0] and dims[0] % batch == 0:
        sizes[0] = dims[0] // batch * size
        node.args = node.args[:k] + (sizes,) + node.args[k + 1:]


def _batched_nodes(graph: fx.Graph, batch: int) -> set[fx.Node]:
    """Nodes computed from an input whose leading dim is the batch (not from parameters or
    constants alone): what a compacted branch gathers, and where it shrinks written sizes."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            dims = shape(n)
            if dims and dims[0] == batch and not n.name.startswith("lazy_"):
                out.add(n)
        elif any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _runs_on_meta(gm, g: fx.Graph, computed, m, names, batch: int, size: int) -> bool:
    """Whether F runs on the gathered rows (a copy of ``g`` so far, whose outputs are ``computed``)
    and gives its outputs for exactly those rows, on meta tensors."""
    want = []
    for s in m.streams:
        dims = shape(s.y)
        if not dims or dims[0] % batch:
            return False
        want.append((dims[0] // batch * size, *dims[1:]))
    check = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = check.graph_copy(g, env)
    check.output(tuple(env[c] for c in computed))
    del out
    def meta(node):
        v = value(node)
        if v is None and node.op == "get_attr":
            v = operator.attrgetter(node.target)(gm)
        if not isinstance(v, torch.Tensor):
            raise ValueError("no example value")
        return torch.empty(v.shape, dtype=v.dtype, device="meta")

    try:
        inputs = [meta(p) for p in m.operands]
        by_name = {"slot": torch.zeros(1, dtype=torch.int64, device="meta"),
                   "skip": torch.zeros(batch, dtype=torch.bool, device="meta"),
                   "anyone": torch.zeros((), dtype=torch.bool, device="meta"),
                   "factor": torch.zeros(batch, dtype=torch.float32, device="meta")}
        for j, s in enumerate(m.streams):
            by_name[f"cache_{j}"] = by_name[f"prev_{j}"] = torch.empty((1, *shape(s.y)), device="meta")
        inputs += [by_name[name] for name in names]
        outs = fx.Interpreter(fx.GraphModule(torch.nn.Module(), check)).run(*inputs)
    except Exception as e:  # any op the gathered rows do not fit
        log.info("insert_gates: compaction to %d rows does not run (%s)", size, e)
        return False
    return all(tuple(o.shape) == w for o, w in zip(outs, want))
