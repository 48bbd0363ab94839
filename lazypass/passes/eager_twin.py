"""A copy of a rewritten graph for eager calls: each ``cond`` calls its branch directly.

``torch.ops.higher_order.cond`` run eagerly does the same thing (evaluates the predicate
and calls one branch), but its dispatch costs ~0.1 ms per call, and a lazy graph holds two
per site. The twin replaces the HOP by a plain Python function, which reads the 0-d
predicate on the host: once or twice per site per call (more under ``batch_compute=
"compact"``, one per bucket tried). It also reads the call's cache slot on the host once
per call, so that a state row is ``state[slot]`` instead of an ``index_select`` copy and a
write is an assignment to it instead of ``index_copy_``. An eager run holds the states that
are only read and written by row as Python lists of rows (``row_states``,
``Runtime.fresh_state``): a read is a list lookup and a write rebinds the row to the new
tensor, with no op at all; a branch that reuses its cache returns the cached row itself, and
writing that row back is left out (compiled and exported graphs keep the HOPs and the
functional reads and writes).

What an eager call pays per op matters on small models, so the twin also calls branches
through their ``forward`` (no ``nn.Module.__call__``), turns a branch that is only a
conditional on its own operand into a direct choice (``_Choose``), holds parameters as plain
attributes, computes the threshold's logit once per threshold (``_memo``), and returns the
call's records as one :class:`Records` that stacks them when read (``lazypass.stats``).

Decisions are read on the host once per decision group and call: one 0-d count packs how
many rows skip and how many rows' caches are valid, which gives both predicates of the
group's conditionals (every row skips; some row skips) and lets the state writes after
them leave out their row selections (``where(rows, a, b)`` marked ``ROWS`` by
``insert_gates``) when the rows all agree: ``a`` when every row is set, ``b`` when none
is, which are the values ``where`` would give. So a call where no row skips puts each
computed output into its cache with no mask (and, held as a list, no copy). The results are those of the
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
from lazypass.ops import is_view
from lazypass.passes.insert_gates import FLAGS, RECORD, ROWS, SLOT

aten = torch.ops.aten


# Branches are called through ``forward``: ``nn.Module.__call__`` and GraphModule's wrapper cost
# more per call than a small branch's ops, and the twin's modules have no hooks of their own.
def _direct_cond(pred, true_fn, false_fn, operands):
    return true_fn.forward(*operands) if pred else false_fn.forward(*operands)


class _Choose(torch.nn.Module):
    """A branch that is nothing but a conditional on one of its own operands (a site's "decide"
    branch: mixed rows or all computing): calls the chosen branch itself, one call level less."""

    def __init__(self, index: int, true_fn: torch.nn.Module, false_fn: torch.nn.Module):
        super().__init__()
        self.index, self.true_fn, self.false_fn = index, true_fn, false_fn

    def forward(self, *operands):
        return (self.true_fn if operands[self.index] else self.false_fn).forward(*operands)


def _as_choice(gm: fx.GraphModule) -> _Choose | None:
    """``gm`` as a :class:`_Choose` if its graph is one conditional on its own operands, in order,
    whose outputs it returns, all of them, in order."""
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    conds = [n for n in nodes if n.target is _direct_cond]
    if len(conds) != 1 or any(n.op == "call_module" for n in nodes):
        return None
    cond = conds[0]
    pred, true_fn, false_fn, operands = cond.args
    out = nodes[-1].args[0]
    calls = [n for n in nodes if n.op == "call_function" and n is not cond]
    if (tuple(operands) != tuple(inputs) or pred not in inputs or not isinstance(out, (tuple, list))
            or list(out) != calls
            or any(n.target is not operator.getitem or n.args != (cond, k) for k, n in enumerate(out))):
        return None
    branches = [operator.attrgetter(f.target)(gm) for f in (true_fn, false_fn)]
    if any(not isinstance(b, fx.GraphModule) or len(list(b.graph.nodes)[-1].args[0]) != len(out) for b in branches):
        return None
    return _Choose(inputs.index(pred), *branches)


def _prelude_cond(pred, true_fn, false_fn, prelude, outer, operands, positions):
    """``_direct_cond`` whose operands at ``positions`` (None here; ``true_fn`` never reads them) are
    computed by ``prelude(*outer)`` only when ``false_fn`` runs."""
    if pred:
        return true_fn.forward(*operands)
    filled = list(operands)
    for k, v in zip(positions, prelude.forward(*outer)):
        filled[k] = v
    return false_fn.forward(*filled)


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


def _row(state, index: int):
    """This call's row of a state: a view of a ``(K, ...)`` tensor, or the tensor a list of rows
    holds (eager runs keep the states that are only read and written by row as lists, see
    ``row_states``)."""
    return state[index]


def _put_row(state, index: int, row: torch.Tensor, new: torch.Tensor):
    """``state[index] = new`` where ``row`` is the call's read of ``state[index]``; left out where
    ``new`` is that row itself (a reused cache). A list takes ``new`` itself where it is a fresh
    contiguous tensor of the row's dtype and shape (no copy: nothing writes into it later, and it
    is laid out as a copy would be, so what reads it computes the same), else a copy."""
    if new is row or new._base is state:
        return state
    if type(state) is list:
        if new.dtype == row.dtype and new.shape == row.shape and new.device == row.device and new.is_contiguous():
            state[index] = new
        else:
            state[index] = torch.empty_like(row, memory_format=torch.contiguous_format).copy_(new)
    else:
        row.copy_(new)
    return state


def _put(state, index: int, new: torch.Tensor):
    """``_put_row`` without an earlier read of the row."""
    return _put_row(state, index, state[index], new)


def _views(graph: fx.Graph, slot: fx.Node, index: fx.Node) -> None:
    """Reads and writes of ``state[slot]`` in ``graph`` as rows (``_row``) with the host ``index``; a
    write goes through the call's earlier read of the same state where there is one."""
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
                squeeze.target, squeeze.args = _row, (state, index)
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
            user.target, user.args = _put_row, (state, index, read, new.args[0])
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


def eager_twin(gm: fx.GraphModule, cfg: LazyConfig | None = None, *, branch: bool = False) -> torch.nn.Module:
    """A new graph module whose cond nodes (also inside branches) call the chosen branch.

    The top-level twin returns the user's outputs followed by one :class:`Records` (the call's
    records, computed when read) where the graph returns the four record tensors."""
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
    _drop_unused(graph)
    if not branch:
        _memo_threshold(graph, attrs)
        _defer_records(graph, attrs, copied)
    twin = fx.GraphModule(attrs, graph)
    twin.lazy_twin = True  # a graph of the twin's own (``_bind_ops`` rewrites only those)
    _plain_tensors(twin)
    if branch:
        return _as_choice(twin) or twin
    twin.row_states = frozenset(_row_states(graph, attrs))
    _bind_ops(twin)  # last: the analyses above read the ops' schemas
    return twin


# Where an aten op is called from Python matters as much as what it computes on a small model:
# ``torch.ops.aten.linear.default(...)`` goes through ``OpOverload.__call__`` and a boxed call
# (its arguments packed onto an IValue stack by schema), which costs several times what
# ``torch._C._nn.linear(...)`` does, and a small DiT call runs hundreds of ops. The Python
# bindings dispatch to the same ATen operators (the overload is picked from the arguments, as the
# graph's was), so the values are the same, bit for bit (the twin-agreement tests check it).
_BINDINGS = (torch._C._VariableFunctions, torch._C._nn, torch._C._linalg, torch._C._special, torch._C._fft)
_UNBOUND = {"to.dtype_layout"}  # Tensor.to takes no layout or pin_memory


def _binding(op):
    """The Python binding of aten ``op``, or None (then the OpOverload itself is called)."""
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten":
        return None
    name, overload = op._schema.name.split("::")[1], op._overloadname
    if f"{name}.{overload}" in _UNBOUND:
        return None
    for module in _BINDINGS:
        fn = getattr(module, name, None)
        if fn is not None:
            return fn
    return getattr(torch._C.TensorBase, name, None)  # a method only (``new_zeros``, ``copy_``): self first


def _bind_ops(twin: torch.nn.Module) -> None:
    """Call the aten ops of every graph of the twin through their Python bindings."""
    for module in twin.modules():
        if isinstance(module, fx.GraphModule) and getattr(module, "lazy_twin", False):
            bound = False
            for node in module.graph.nodes:
                fn = _binding(node.target) if node.op == "call_function" else None
                if fn is not None:
                    node.target, bound = fn, True
            if bound:
                module.recompile()


def _row_states(graph: fx.Graph, attrs: dict) -> list[str]:
    """The states that the twin only reads and writes by row, and whose rows are only given values
    that share no memory with a state written in place or a parameter: an eager run holds them as
    lists of rows, which a write rebinds instead of copying into."""
    rows = {p for p in graph.nodes if p.op == "placeholder" and p.target.startswith("lazy_") and p.users
            and _by_row(p, attrs.__getitem__)}
    memo: dict[fx.Node, set] = {}
    changed = True
    while changed:
        changed = False
        for p in list(rows):
            if any(not _bases(u.args[-1], memo, attrs.__getitem__) <= rows for u in p.users if u.target in (_put, _put_row)):
                rows.discard(p)
                changed = True
    return sorted(p.target for p in rows)


def _by_row(p: fx.Node, attr) -> bool:
    """Whether state ``p`` is only read by row (``_row``), written by row (``_put``), and passed to
    conditionals whose branches only read it by row."""
    for u in p.users:
        if u.target in (_row, _put, _put_row) and u.args[0] is p and p not in u.args[1:]:
            continue
        if u.target is _direct_cond and p not in u.args[:1]:
            _, true_fn, false_fn, operands = u.args
        elif u.target is _prelude_cond and p not in u.args[:1] and p not in u.args[4]:
            _, true_fn, false_fn, _, _, operands, _ = u.args
        else:
            return False
        for fn in (attr(true_fn.target), attr(false_fn.target)):
            for j, o in enumerate(operands):
                if o is p and not _branch_by_row(fn, j):
                    return False
    return True


def _branch_by_row(fn, j: int) -> bool:
    """``_by_row`` for operand ``j`` of branch ``fn``, which may only read it."""
    if isinstance(fn, _Choose):
        return _branch_by_row(fn.true_fn, j) and _branch_by_row(fn.false_fn, j)
    p = [n for n in fn.graph.nodes if n.op == "placeholder"][j]
    return all(u.target is not _put and u.target is not _put_row for u in p.users) and _by_row(
        p, lambda target: operator.attrgetter(target)(fn))


def _bases(node, memo: dict, attr) -> set:
    """The inputs (placeholders, attributes) whose memory ``node``'s value may share: through views,
    rows, row selections, a conditional's branches, and whatever a host function was given.
    ``attr(target)``: the module a ``get_attr`` node reads."""
    if not isinstance(node, fx.Node):
        return set()
    if node not in memo:
        memo[node] = {node}  # while it is being looked at (a cycle cannot occur in a graph)
        if node.op in ("placeholder", "get_attr"):
            found = {node}
        elif node.target is _row:
            found = {node.args[0]}
        elif node.target is _where_rows:
            found = _bases(node.args[2], memo, attr) | _bases(node.args[3], memo, attr)
        elif node.target is operator.getitem and getattr(node.args[0], "target", None) in (_direct_cond, _prelude_cond):
            found = _cond_bases(node.args[0], node.args[1], memo, attr)
        elif is_view(node) or not _op(node):
            found = set().union(*(_bases(a, memo, attr) for a in node.all_input_nodes))
        else:
            found = set()  # a new tensor
        memo[node] = found
    return memo[node]


def _cond_bases(cond: fx.Node, k: int, memo: dict, attr) -> set:
    """``_bases`` of output ``k`` of a conditional: of the operands its branches may return."""
    if cond.target is _direct_cond:
        _, true_fn, false_fn, operands = cond.args
        found = set()
    else:  # a prelude computes some operands of the computing branch from ``outer``
        _, true_fn, false_fn, _, outer, operands, _ = cond.args
        found = set().union(*(_bases(o, memo, attr) for o in outer))
    for fn in (true_fn, false_fn):
        positions = _output_aliases(attr(fn.target), k)
        if positions is None:
            return {fn}
        found |= set().union(*(_bases(operands[j], memo, attr) for j in positions))
    return found


def _output_aliases(fn, k: int) -> set[int] | None:
    """The operand positions whose memory output ``k`` of branch ``fn`` may share (None: it may share
    a parameter's)."""
    if isinstance(fn, _Choose):
        a, b = _output_aliases(fn.true_fn, k), _output_aliases(fn.false_fn, k)
        return None if a is None or b is None else a | b
    nodes = list(fn.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    bases = _bases(nodes[-1].args[0][k], {}, lambda target: operator.attrgetter(target)(fn))
    if any(b.op != "placeholder" for b in bases):
        return None
    return {inputs.index(b) for b in bases}


def _op(node: fx.Node) -> bool:
    """An aten op that writes nothing."""
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and not node.target._schema.is_mutable)


def _drop_unused(graph: fx.Graph) -> None:
    """Ops whose value nothing reads (the graph's all/any of a group, whose predicates the host
    read gives here)."""
    for node in reversed(list(graph.nodes)):
        if _op(node) and not node.users:
            graph.erase_node(node)


def _plain_tensors(gm: fx.GraphModule) -> None:
    """The twin's parameters and buffers as plain attributes: a parameter read is then a
    dictionary lookup instead of ``nn.Module.__getattr__``; they stay the model's tensors."""
    for table in (gm._parameters, gm._buffers):
        for name in list(table):
            tensor = table.pop(name)
            object.__setattr__(gm, name, tensor)


def _subgraph(attrs: dict, prefix: str, body: list, outer: list, outputs) -> str:
    """``body`` (nodes in graph order) as a new graph module in ``attrs``, taking ``outer`` and
    returning ``outputs``; its attribute name."""
    g = fx.Graph()
    env = {a: g.placeholder(f"outer_{k}") for k, a in enumerate(outer)}
    for n in body:
        env[n] = g.node_copy(n, env.__getitem__)
    g.output(tuple(env[o] for o in outputs))
    name = f"{prefix}{len([a for a in attrs if a.startswith(prefix)])}"
    attrs[name] = fx.GraphModule(attrs, g)
    attrs[name].lazy_twin = True
    return name


def _memo(fn: fx.GraphModule, threshold: torch.Tensor) -> tuple:
    """``fn(threshold)``, computed again only when the threshold tensor changed (``set_threshold``
    fills it in place, which bumps its version; an inference tensor has no version: every call)."""
    if threshold.is_inference():
        return fn.forward(threshold)
    hit = fn.__dict__.get("_lazy_memo")
    if hit is None or hit[0] is not threshold or hit[1] != threshold._version:
        hit = (threshold, threshold._version, fn.forward(threshold))
        fn.__dict__["_lazy_memo"] = hit
    return hit[2]


def _memo_threshold(graph: fx.Graph, attrs: dict) -> None:
    """What only the threshold gives (its logit) once per threshold, not once per call."""
    threshold = next((n for n in graph.nodes if n.op == "placeholder" and n.target == "lazy_threshold"), None)
    if threshold is None:
        return
    body: list[fx.Node] = []
    for node in graph.nodes:
        if _op(node) and node.all_input_nodes and all(a is threshold or a in body for a in node.all_input_nodes):
            body.append(node)
    ends = [n for n in body if any(u not in body for u in n.users)]
    if not ends:
        return
    name = _subgraph(attrs, "lazy_twin_memo_", body, [threshold], ends)
    with graph.inserting_before(body[0]):
        terms = graph.call_function(_memo, (graph.get_attr(name), threshold))
        for k, end in enumerate(ends):
            end.replace_all_uses_with(graph.call_function(operator.getitem, (terms, k)),
                                      delete_user_cb=lambda u: u not in body)
    for n in reversed(body):
        graph.erase_node(n)


class Records:
    """One eager call's records (skipped, saved, scores, computed), computed when first read:
    stacking and scoring them costs a call more than reading them does, and most never are."""

    __slots__ = ("_fn", "_args", "_values")

    def __init__(self, fn, args: tuple):
        self._fn, self._args, self._values = fn, args, None if fn is not None else tuple(args)

    def values(self) -> tuple:
        if self._values is None:
            self._values = tuple(self._fn.forward(*self._args))
            self._fn = self._args = None
        return self._values

    def __getitem__(self, k):
        return self.values()[k]

    def __iter__(self):
        return iter(self.values())

    def __len__(self) -> int:
        return len(self.values())


def _records(fn, *args) -> Records:
    return Records(fn, args)


def _defer_records(graph: fx.Graph, attrs: dict, copied: dict) -> None:
    """Return the records of an inference graph as one :class:`Records`, computed when read where
    the values they are made of are fresh (no later write of the call changes them); else made now."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = list(out.args[0])
    marked = {copied[o] for o in copied if o.meta.get(RECORD)}
    if not marked:
        return  # a fitting (soft) graph: no records
    n = len(values) - len(marked)
    records = values[n:]
    if set(records) != marked:
        raise AssertionError("eager_twin: the graph does not end with its records")
    moved: set[fx.Node] = set()
    for node in reversed(list(graph.nodes)):
        if _op(node) and node.users and all(u in moved or (u is out and node in records) for u in node.users):
            moved.add(node)
    body = [n for n in graph.nodes if n in moved]
    outer = list(dict.fromkeys(a for b in body for a in b.all_input_nodes if a not in moved))
    if set(records) <= moved and all(_op(a) and not is_view(a) for a in outer):
        with graph.inserting_before(out):
            rec = graph.call_function(_records, (graph.get_attr(_subgraph(attrs, "lazy_twin_records_", body, outer, records)),
                                                 *outer))
        out.args = (tuple(values[:n]) + (rec,),)
        for node in reversed(body):
            graph.erase_node(node)
    else:
        with graph.inserting_before(out):
            rec = graph.call_function(_records, (None, *records))
        out.args = (tuple(values[:n]) + (rec,),)


def _pure(node: fx.Node) -> bool:
    """A node that may run later than where it stands: no side effect, and no read of lazy state
    (which the state writes before the conditional may change)."""
    if node.op != "call_function" or not node.users:
        return False
    if node.target is not operator.getitem and not _op(node):
        return False
    return not any(a.op == "placeholder" and a.name.startswith("lazy_") or a.target is _row
                   for a in node.all_input_nodes)


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
        name = _subgraph(attrs, "lazy_twin_prelude_", body, outer, [operands[k] for k in positions])
        with graph.inserting_before(cond):
            prelude = graph.get_attr(name)
        kept = tuple(None if k in positions else o for k, o in enumerate(operands))
        cond.target, cond.args = _prelude_cond, (pred, true_fn, false_fn, prelude, tuple(outer), kept, positions)
        for n in reversed(body):
            graph.erase_node(n)
