"""A copy of a rewritten graph for eager calls: each ``cond`` calls its branch directly.

``torch.ops.higher_order.cond`` run eagerly does the same thing (evaluates the predicate
and calls one branch), but its dispatch costs ~0.1 ms per call, and a lazy graph holds two
per site. The twin replaces the HOP by a plain Python function, which reads the 0-d
predicate on the host: once or twice per site per call (more under ``batch_compute=
"compact"``, one per bucket tried). It also reads the call's cache slot on the host once
per call, so that a state row is a view (``state[slot]``) instead of an ``index_select``
copy and a write is ``state[slot].copy_(new)`` instead of ``index_copy_``: a branch that
reuses its cache returns the cached row itself, and writing that row back is left out, so
a skipped branch moves no data (compiled and exported graphs keep the HOPs and the
functional reads).

Decisions are read on the host once per decision group and call: one 0-d count packs how
many rows skip and how many rows' caches are valid, which gives both predicates of the
group's conditionals (every row skips; some row skips) and lets the state writes after
them leave out their row selections (``where(rows, a, b)`` marked ``ROWS`` by
``insert_gates``) when the rows all agree: ``a`` when every row is set, ``b`` when none
is, which are the values ``where`` would give. So a call where no row skips writes each
computed output into its cache with one copy and no mask. The results are those of the
``cond`` graph, bit for bit. Parameters and branch modules are shared with the original
graph, not copied.

What only a computing branch reads is computed only when the branch computes: the nodes that
feed nothing but a conditional's operands that its reusing branch ignores (a follower site's
norm and modulation under ``granularity="step"``) move into a prelude that runs just before the
computing branch, so a call where every row skips leaves them out. The same ops in the same
order, so the values do not change; compiled and exported graphs keep them outside the ``cond``
(moving them in there made Inductor assert on the strides of a transposed residual stream).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.passes.insert_gates import FLAGS, ROWS, SLOT

aten = torch.ops.aten


def _direct_cond(pred, true_fn, false_fn, operands):
    return true_fn(*operands) if pred else false_fn(*operands)


def _prelude_cond(pred, true_fn, false_fn, prelude, outer, operands, positions):
    """``_direct_cond`` whose operands at ``positions`` (None here; ``true_fn`` never reads them) are
    computed by ``prelude(*outer)`` only when ``false_fn`` runs."""
    if pred:
        return true_fn(*operands)
    filled = list(operands)
    for k, v in zip(positions, prelude(*outer)):
        filled[k] = v
    return false_fn(*filled)


def _host_index(slot: torch.Tensor) -> int:
    return int(slot.reshape(()))


def _host_rows(skip: torch.Tensor, valid: torch.Tensor) -> dict:
    """One host read per group: ``(every, some)`` row is set, for the skip and the valid flags."""
    n = skip.numel()
    code = int(skip.sum() + valid.sum() * (n + 1))
    skipping, valid_rows = code % (n + 1), code // (n + 1)
    return {"skip": (skipping == n, skipping > 0), "valid": (valid_rows == n, valid_rows > 0)}


def _where_rows(flags: tuple[bool, bool], mask, a, b):
    """``where(mask, a, b)`` with ``mask`` made of per-row ``flags`` (every, some): ``a`` or ``b``
    itself where every row agrees (no copy; a write of ``a`` into its own state is then left out)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and a.device == b.device:
        every, some = flags
        if every:
            return a
        if not some:
            return b
    return torch.where(mask, a, b)


def _put(state: torch.Tensor, index: int, new: torch.Tensor) -> torch.Tensor:
    """``state[index] = new``, left out where ``new`` is a view of ``state``: every read of a call
    takes the same slot, so that view is ``state[index]`` itself (a reused cache)."""
    if new._base is not state:
        state[index].copy_(new)
    return state


def _put_row(state: torch.Tensor, row: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``_put`` through ``row``, the call's earlier read of ``state[index]`` (no second view)."""
    if new._base is not state:
        row.copy_(new)
    return state


def _views(graph: fx.Graph, slot: fx.Node, index: fx.Node) -> None:
    """Reads and writes of ``state[slot]`` in ``graph`` as views with the host ``index``; a write
    goes through the call's earlier read of the same state where there is one."""
    order = {n: k for k, n in enumerate(graph.nodes)}
    reads: dict[fx.Node, fx.Node] = {}
    writes = []
    for user in list(slot.users):
        if user is index:
            continue
        if user.target is aten.index_select.default and user.args[1:] == (0, slot):
            (squeeze,) = user.users if len(user.users) == 1 else (None,)
            if squeeze is not None and squeeze.target is aten.squeeze.dim and squeeze.args[1:] == (0,):
                state = user.args[0]
                squeeze.target, squeeze.args = aten.select.int, (state, 0, index)
                graph.erase_node(user)
                if state not in reads or order[squeeze] < order[reads[state]]:
                    reads[state] = squeeze
                continue
        elif user.target is aten.index_copy_.default and user.args[1:3] == (0, slot):
            new = user.args[3]
            if new.target is aten.unsqueeze.default and new.args[1:] == (0,):
                writes.append((user, new))
                continue
        user.replace_input_with(slot, index)  # cond operands: the branches get the host index too
    for user, new in writes:
        state = user.args[0]
        read = reads.get(state)
        if read is not None and order[read] < order[user]:
            user.target, user.args = _put_row, (state, read, new.args[0])
        else:
            user.target, user.args = _put, (state, index, new.args[0])
        if not new.users:
            graph.erase_node(new)


def _host_decisions(graph: fx.Graph, copied: dict) -> None:
    """Each group's predicates and row selections from one host read (``_host_rows``)."""
    flags: dict[fx.Node, fx.Node] = {}  # (B,) flags -> node of their (every, some)
    host: dict[fx.Node, fx.Node] = {}  # the graph's all/any of a skip -> host bool
    for old, new in copied.items():
        if FLAGS not in old.meta or new.graph is not graph:
            continue
        everyone, anyone, valid = (copied.get(n) for n in old.meta[FLAGS])
        if None in (everyone, anyone, valid):
            continue
        order = {n: k for k, n in enumerate(graph.nodes)}
        with graph.inserting_after(max(everyone, anyone, key=order.__getitem__)):
            rows = graph.call_function(_host_rows, (new, valid))
        with graph.inserting_after(rows):
            flags[new] = graph.call_function(operator.getitem, (rows, "skip"))
        with graph.inserting_after(flags[new]):
            flags[valid] = graph.call_function(operator.getitem, (rows, "valid"))
        with graph.inserting_after(flags[valid]):
            host[everyone] = graph.call_function(operator.getitem, (flags[new], 0))
        with graph.inserting_after(host[everyone]):
            host[anyone] = graph.call_function(operator.getitem, (flags[new], 1))
    for old, new in copied.items():
        of = old.meta.get(ROWS)
        if of is None or new.graph is not graph or copied.get(of) not in flags:
            continue
        new.target, new.args = _where_rows, (flags[copied[of]],) + tuple(new.args)
    for node in graph.nodes:
        if node.target is _direct_cond:  # the predicate and the operands that are predicates inside
            pred, true_fn, false_fn, operands = node.args
            node.args = (host.get(pred, pred), true_fn, false_fn, tuple(host.get(o, o) for o in operands))


def eager_twin(gm: fx.GraphModule, cfg: LazyConfig | None = None, *, branch: bool = False) -> fx.GraphModule:
    """A new graph module whose cond nodes (also inside branches) call the chosen branch."""
    graph = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copied))
    attrs, names = {}, {}
    for node in list(graph.nodes):
        if node.op == "get_attr":
            obj = operator.attrgetter(node.target)(gm)
            # one flat attribute per parameter: ``self.model.blocks.0.attn.qkv.weight`` is five
            # ``nn.Module.__getattr__`` calls per parameter and call
            flat = names.setdefault(node.target, f"lazy_twin_{len(names)}" if "." in node.target else node.target)
            attrs[flat] = eager_twin(obj, branch=True) if isinstance(obj, fx.GraphModule) else obj
            node.target = flat
        elif node.target is torch.ops.higher_order.cond:
            node.target = _direct_cond
    if not branch:
        _host_decisions(graph, copied)
        _preludes(graph, attrs)
    is_slot = (lambda n: n.op == "placeholder" and n.target == "slot") if branch else (lambda n: n.meta.get(SLOT))
    slot = next((n for n in graph.nodes if is_slot(n)), None)
    if slot is not None:
        if branch:
            _views(graph, slot, slot)  # the caller passes the host index
        else:
            with graph.inserting_after(slot):
                index = graph.call_function(_host_index, (slot,))
            _views(graph, slot, index)
    return fx.GraphModule(attrs, graph)


def _pure(node: fx.Node) -> bool:
    """A node that may run later than where it stands: no side effect, and no read of lazy state
    (which the state writes before the conditional may change)."""
    if node.op != "call_function" or not node.users:
        return False
    if node.target is not operator.getitem and not (isinstance(node.target, torch._ops.OpOverload)
                                                    and not node.target._schema.is_mutable):
        return False
    return not any(a.op == "placeholder" and a.name.startswith("lazy_") or a.target is aten.select.int
                   for a in node.all_input_nodes)  # ``_views``' state rows are ``select``s


def _preludes(graph: fx.Graph, attrs: dict) -> None:
    """Move what only a conditional's computing branch reads into a prelude of that branch."""
    order = {n: k for k, n in enumerate(graph.nodes)}
    nodes = list(graph.nodes)
    for cond in [n for n in nodes if n.target is _direct_cond]:
        pred, true_fn, false_fn, operands = cond.args
        if true_fn.op != "get_attr":
            continue
        ignored = {p.name for p in attrs[true_fn.target].graph.nodes if p.op == "placeholder" and not p.users}
        names = [p.name for p in attrs[true_fn.target].graph.nodes if p.op == "placeholder"]
        free = {k for k, name in enumerate(names) if name in ignored}
        used_elsewhere = {o for k, o in enumerate(operands) if k not in free} | {pred}
        moved: set[fx.Node] = set()
        for node in reversed(nodes[: order[cond]]):
            if not _pure(node) or node in used_elsewhere:
                continue
            if all(u is cond or u in moved for u in node.users):
                moved.add(node)
        positions = tuple(k for k, o in enumerate(operands) if k in free and o in moved)
        if not positions:
            continue
        body = sorted(moved, key=order.__getitem__)
        outer = sorted({a for n in body for a in n.all_input_nodes if a not in moved}, key=order.__getitem__)
        g = fx.Graph()
        env = {a: g.placeholder(f"outer_{k}") for k, a in enumerate(outer)}
        for n in body:
            env[n] = g.node_copy(n, env.__getitem__)
        g.output(tuple(env[operands[k]] for k in positions))
        name = f"lazy_twin_prelude_{len([a for a in attrs if a.startswith('lazy_twin_prelude_')])}"
        attrs[name] = fx.GraphModule(attrs, g)
        with graph.inserting_before(cond):
            prelude = graph.get_attr(name)
        kept = tuple(None if k in positions else o for k, o in enumerate(operands))
        cond.target, cond.args = _prelude_cond, (pred, true_fn, false_fn, prelude, tuple(outer), kept, positions)
        for n in reversed(body):
            graph.erase_node(n)
