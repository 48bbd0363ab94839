"""``lazypass.export_onnx``: a lazy model as an ONNX file for phones.

The exported graph is the inference program (``Program.core``) behind a functional
wrapper: it takes the user's tensor inputs, then every extra input the rewrite declared
(``Program.state_specs``: threshold, last timestep, call index, valid flags, caches, and
whatever later rewrites add), clones the state, runs the program (which updates the
clones in place) and returns

    the user's outputs, the next value of every state input the program updates
    (``<name>_next``), then the program's per-call records (skipped, saved, scores).

The stock exporter drops buffer mutations and freezes buffers as constants; here the
state is ordinary inputs and outputs, so nothing is lost. ``torch.cond`` becomes ``If``
(two per site: all rows skip / some rows skip), each branch inlined by the optimiser.
Nothing here knows the state's names: it all comes from the specs, and the file's
metadata (key ``lazypass``, JSON) lists the inputs, state (with shapes, dtypes and the
value a run starts from), outputs, records, sites and options, so that a runner
(``lazypass.onnx.load``) can thread the state without torch.

Flavours:

- ``"dynamic"``: one graph, the decision inside (``If``). onnxruntime runs it on its CPU
  provider, MNN's Module API runs only the taken branch.
- ``"static"``: for runtimes without control flow (NNAPI, QNN, GPU delegates). A skip
  schedule (per call and site, from the gates' decisions on recorded runs) is baked in:
  one graph per distinct decision pattern, each ``If`` replaced by the branch it takes,
  state the patterns do not need (flags, threshold) removed, the weights stored once in a
  shared external-data file (``<path>.data``) that every pattern graph points into.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import io as _io
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import asdict

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

FORMAT = "lazypass-onnx"
VERSION = 1
FLAVOURS = ("dynamic", "static")
MIN_OPSET = 18  # what the exporter's op library is written for
RECORD_NAMES = ("lazy_skipped", "lazy_saved", "lazy_scores", "lazy_computed")  # insert_gates' records, in order
NEXT = "_next"  # state output name = state input name + NEXT

_DTYPES = {None: None, torch.float32: torch.float32, torch.float16: torch.float16,
           "float32": torch.float32, "float16": torch.float16}


class ExportError(ValueError):
    """A bad argument to :func:`export_onnx`; nothing was written."""


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: tuple | None = None,
    flavour: str = "dynamic",
    dtype: torch.dtype | None = None,
    opset: int | None = None,
    *,
    example_kwargs: dict | None = None,
    schedule=None,
) -> list[str]:
    """Export a lazy model (after ``lazypass.apply``) to ONNX; returns the files written.

    Args:
        model: a lazy model. It is exported for the inputs of its last call (or its only
            traced signature), or for ``example_inputs`` / ``example_kwargs``, traced now
            if needed. The file is specialised to those shapes, as the torch program is.
        path: the ``.onnx`` file to write (its directory must exist). ``"static"`` also
            writes ``<stem>.p<k>.onnx`` per further decision pattern and ``<path>.data``.
        flavour: ``"dynamic"`` (decisions as ``If``) or ``"static"`` (a baked schedule).
        dtype: ``None`` (the model's own), ``torch.float32`` or ``torch.float16``:
            weights, activations and caches in that dtype; gate scores stay fp32. The
            model itself is not changed (a copy is converted).
        opset: ONNX opset (default: the exporter's, 20); at least 18.
        schedule: static flavour only: which sites skip at each call of a run. A
            ``lazypass.Stats`` (from ``lazypass.stats(model)`` after a sampling run), a
            list of them (one per calibration run; a site skips at a call where most runs
            skipped it for the whole batch), or a (calls, sites) bool array. Default: the
            stats of the model's last run. Calls past the schedule compute everything.

    Example:
        >>> lazypass.export_onnx(model, "dit.onnx", example_inputs=(x, t, y))  # doctest: +SKIP
        >>> runner = lazypass.onnx.load("dit.onnx")                               # doctest: +SKIP
    """
    path = os.fspath(path)
    target = _check_arguments(path, flavour, dtype, opset, schedule)
    from lazypass.runtime import runtime, traced_program

    rt = runtime(model)  # ValueError on a model that was never applied
    args = tuple(example_inputs) if example_inputs is not None else ()
    kwargs = dict(example_kwargs or {})
    if example_inputs is not None or example_kwargs is not None:
        prog, _ = rt.program_for(args, kwargs)
        leaves = _leaves_of(args, kwargs)
    else:
        prog = traced_program(model)  # NotTracedError when nothing was traced
        leaves = _example_leaves(prog)
    sched = _schedule(model, prog, schedule) if flavour == "static" else None

    timestep = _timestep_leaf(prog)
    param = next(model.parameters())
    if target is not None and target != param.dtype:
        model, leaves = _converted(model, leaves, target, timestep)
        prog, _ = runtime(model).program_for(*_unflatten(leaves, prog))
    threshold = runtime(model).threshold

    wrapper, io, trace = _functional(rt.forward, prog, leaves, threshold, timestep)
    proto = _to_onnx(wrapper, io, trace, opset)
    io["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    io["config"] = runtime(model).cfg.to_dict()
    io["sites"] = [asdict(s) for s in prog.sites]
    io["batch"] = prog.batch
    if flavour == "dynamic":
        _set_meta(proto, io, "dynamic")
        return _save([(path, proto)])
    return _static(proto, io, sched, path, rt.cfg.group_of(len(prog.sites)))


# -- arguments -----------------------------------------------------------------------

def _check_arguments(path, flavour, dtype, opset, schedule):
    if flavour not in FLAVOURS:
        raise ExportError(f"flavour must be one of {list(FLAVOURS)}, got {flavour!r}")
    try:
        target = _DTYPES[dtype]
    except (KeyError, TypeError):
        raise ExportError(
            f"dtype must be None, torch.float32 or torch.float16, got {dtype!r} (phone runtimes run fp32 and "
            "fp16; bfloat16 and integer weights are not exported)"
        ) from None
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET):
        raise ExportError(f"opset must be an int >= {MIN_OPSET} (the exporter's op library), got {opset!r}")
    if schedule is not None and flavour != "static":
        raise ExportError("schedule= is for flavour='static' (the dynamic flavour decides in the graph)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write {path!r}: the directory {folder!r} does not exist")
    if os.path.isdir(path):
        raise ExportError(f"cannot write {path!r}: it is a directory; give a file name ending in .onnx")
    return target


# -- inputs --------------------------------------------------------------------------

def _leaves_of(args, kwargs):
    from lazypass.tracing import flatten_inputs

    return list(flatten_inputs(args, kwargs)[0])


def _example_leaves(prog):
    """Example values for the exporter's trace, from the signature the program is keyed by."""
    leaves = []
    for part in prog.key[1]:
        if part[0] == "T":
            _, shape, dt, device = part
            leaves.append(torch.zeros(shape, dtype=dt, device=device))
        elif isinstance(part[2], str) and part[1] != "str":  # an unhashable constant, kept as its repr
            raise ExportError(
                f"the model was traced with a {part[1]} argument that cannot be rebuilt from its signature; pass "
                "example_inputs= (and example_kwargs=) to export_onnx"
            )
        else:
            leaves.append(part[2])
    return leaves


def _unflatten(leaves, prog):
    args, kwargs = pytree.tree_unflatten(list(leaves), prog.core._in_spec)
    return tuple(args), dict(kwargs)


def _timestep_leaf(prog) -> int | None:
    """Index among the user's leaves of the input that feeds the timestep embedding."""
    info = prog.core.meta.get("lazypass")
    node = getattr(info, "timestep", None)
    if node is None:
        return None
    holders = [n for n in prog.core.graph.nodes if n.op == "placeholder"]
    return holders.index(node) if node in holders else None


def _converted(model, leaves, dtype, timestep):
    """A copy of the model in ``dtype`` (gates kept in fp32) and its inputs cast to match;
    the timestep keeps its dtype (fp16 rounds timesteps above 2048 and fractional ones)."""
    from lazypass.runtime import runtime

    clone = copy.deepcopy(model)
    clone.to(dtype)
    clone.lazy_gates.float()
    runtime(clone).set_threshold(runtime(model).threshold)
    cast = [
        x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and i != timestep else x
        for i, x in enumerate(leaves)
    ]
    return clone, cast


# -- the functional wrapper ----------------------------------------------------------

class _Functional(nn.Module):
    """State in, state out: the program on clones of its state inputs (nothing is mutated)."""

    def __init__(self, core, leaves, n_state, mutated, n_user):
        super().__init__()
        self.core = core
        self.training = False  # not .eval(): the exported core refuses train()
        self.slots = [isinstance(x, torch.Tensor) for x in leaves]
        self.constants = [None if s else x for s, x in zip(self.slots, leaves)]
        self.n_state, self.mutated, self.n_user = n_state, mutated, n_user

    def forward(self, *inputs):
        it = iter(inputs)
        leaves = [next(it) if s else c for s, c in zip(self.slots, self.constants)]
        state = [x.clone() for x in it]
        outs = self.core(*leaves, *state)
        return (*outs[: self.n_user], *[state[i] for i in self.mutated], *outs[self.n_user:])


def _writes(node: fx.Node, user: fx.Node) -> bool:
    """Whether ``user`` writes into ``node`` (directly, or through a view of it)."""
    target = user.target
    schema = getattr(target, "_schema", None)
    if user.op != "call_function" or schema is None:
        return False
    bound = list(zip(schema.arguments, user.args)) + [
        (a, user.kwargs[a.name]) for a in schema.arguments if a.name in user.kwargs
    ]
    for arg, val in bound:
        if val is node and arg.alias_info is not None:
            if arg.alias_info.is_write:
                return True
            return any(_writes(user, u) for u in user.users)  # a view: writes to it write to node
    return False


def _mutated_state(prog) -> list[int]:
    """Indices (in ``state_specs``) of the state inputs the program updates in place."""
    holders = [n for n in prog.core.graph.nodes if n.op == "placeholder"]
    state = holders[len(holders) - len(prog.state_specs):]
    return [i for i, n in enumerate(state) if any(_writes(n, u) for u in n.users)]


def _names(spec, root: str) -> tuple[list[str], dict]:
    """Leaf names and a JSON description of a pytree spec (what the runner rebuilds)."""
    names: list[str] = []

    def walk(s, name):
        if s.is_leaf():
            names.append(name)
            return {"kind": "leaf"}
        kids = s.children() if hasattr(s, "children") else s.children_specs
        t, ctx = s.type, s.context
        if t in (tuple, list):
            keys = list(range(len(kids)))
            node = {"kind": t.__name__}
        elif isinstance(ctx, (list, tuple)) and len(ctx) == len(kids) and all(isinstance(k, str) for k in ctx):
            keys = list(ctx)  # dict, OrderedDict, namedtuple fields, diffusers outputs
            node = {"kind": "dict" if issubclass(t, dict) else "object", "name": t.__name__, "keys": keys}
        else:
            keys = list(range(len(kids)))
            node = {"kind": "tuple"}
        node["items"] = [walk(k, f"{name}.{key}") for k, key in zip(kids, keys)]
        return node

    return names, walk(spec, root)


def _input_names(forward, in_spec, leaves):
    """Graph input names of the user's leaves: the forward's parameter names (``x``,
    ``hidden_states``), with ``.key`` for nested entries; and how the runner binds them."""
    try:
        params = [p for p in inspect.signature(forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        positional = [p.name for p in params]
    except (TypeError, ValueError):
        positional = []
    paths = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(len(leaves))), in_spec))[0]
    entries = []
    for (keypath, _), leaf in zip(paths, leaves):
        keys = [getattr(k, "idx", getattr(k, "key", getattr(k, "name", None))) for k in keypath]
        kind, first, rest = keys[0], keys[1], keys[2:]
        param = (positional[first] if first < len(positional) else f"arg{first}") if kind == 0 else first
        name = ".".join([str(param)] + [str(k) for k in rest])
        entry = {"name": name, "param": param, "path": rest}
        if isinstance(leaf, torch.Tensor):
            entry.update(dtype=str(leaf.dtype).replace("torch.", ""), shape=list(leaf.shape))
        else:
            entry["value"] = leaf if leaf is None or isinstance(leaf, (bool, int, float, str)) else repr(leaf)
        entries.append(entry)
    return positional, entries


def _functional(forward, prog, leaves, threshold, timestep):
    mutated = _mutated_state(prog)
    wrapper = _Functional(prog.core, leaves, len(prog.state_specs), mutated, prog.n_user_outputs)
    positional, entries = _input_names(forward, prog.core._in_spec, leaves)
    tensors = [e for e in entries if "dtype" in e]
    settings, state = [], []
    for i, spec in enumerate(prog.state_specs):
        item = {"name": spec.name, "shape": list(spec.shape), "dtype": str(spec.dtype).replace("torch.", ""),
                "fill": _json_number(spec.fill)}
        if i in mutated:
            state.append({**item, "output": spec.name + NEXT})
        else:  # read only (the threshold): the runner sets it
            item["value"] = float(threshold) if spec.name == "lazy_threshold" else item["fill"]
            settings.append(item)
    out_names, out_tree = _names(prog.out_spec, "output")
    n_records = len(prog.core.graph.output_node().args[0]) - prog.n_user_outputs
    records = [RECORD_NAMES[k] if k < len(RECORD_NAMES) else f"lazy_record_{k}" for k in range(n_records)]
    example = [x for x in leaves if isinstance(x, torch.Tensor)]
    device = example[0].device if example else torch.device("cpu")
    example += [spec.initial(device) for spec in prog.state_specs]
    io = {
        "params": positional,
        "inputs": tensors,
        "constants": [e for e in entries if "dtype" not in e],
        "timestep": entries[timestep]["name"] if timestep is not None else None,
        "settings": settings,
        "state": state,
        "outputs": [{"name": n} for n in out_names],
        "out_tree": out_tree,
        "records": [{"name": n} for n in records],
        "threshold": float(threshold),
    }
    input_names = [e["name"] for e in tensors] + [spec.name for spec in prog.state_specs]
    output_names = out_names + [s["output"] for s in state] + records
    return wrapper, io, (example, input_names, output_names)


def _json_number(v: float):
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


# -- ONNX ----------------------------------------------------------------------------

def _translations() -> dict:
    """Ops written differently from the exporter's defaults, so that every runtime takes them.

    - MNN's converter has no ``IsInf`` / ``IsNaN`` (the cache's finite-row check uses
      ``isfinite``): ``isfinite(x) = |x| < inf``, ``isnan(x) = x != x``,
      ``isinf(x) = |x| == inf``.
    - ``squeeze(x, d)`` of a dim whose size is not 1 is the identity in torch, and an error
      in ONNX's ``Squeeze`` (PixArt squeezes its output this way): emitted as ``Identity``.
    """
    from onnxscript import opset18 as op

    def inf_like(x):
        return op.CastLike(op.Constant(value_float=math.inf), x)

    def isfinite(x):
        return op.Less(op.Abs(x), inf_like(x))

    def isinf(x):
        return op.Equal(op.Abs(x), inf_like(x))

    def isnan(x):
        return op.Not(op.Equal(x, x))

    def squeezable(x, dims):
        shape = list(x.shape) if x.shape is not None else None
        if shape is None:
            return dims
        return [d for d in dims if not (isinstance(shape[d % len(shape)], int) and shape[d % len(shape)] != 1)]

    def squeeze_dims(x, dims):
        if x.shape is not None and len(x.shape) == 0:
            return op.Identity(x)
        dims = squeezable(x, list(dims))
        if not dims:
            return op.Identity(x)
        return op.Squeeze(x, op.Constant(value_ints=dims))

    def squeeze_dim(x, dim: int):
        return squeeze_dims(x, [dim])

    aten = torch.ops.aten
    return {aten.isfinite.default: isfinite, aten.isinf.default: isinf, aten.isnan.default: isnan,
            aten.squeeze.dim: squeeze_dim, aten.squeeze.dims: squeeze_dims}


def _to_onnx(wrapper, io, trace, opset):
    import onnx

    example, input_names, output_names = trace
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, tuple(example), dynamo=True, input_names=input_names, output_names=output_names,
                opset_version=opset, custom_translation_table=_translations(), optimize=True, verbose=False,
            )
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    if proto.functions:
        raise RuntimeError(f"internal: {len(proto.functions)} ONNX functions were not inlined")
    # dtypes and shapes of the outputs, as the graph declares them
    declared = {v.name: v.type.tensor_type for v in proto.graph.output}
    for item in io["outputs"] + io["records"]:
        t = declared[item["name"]]
        item["dtype"] = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        item["shape"] = [d.dim_value for d in t.shape.dim]
    return proto


def _set_meta(proto, io, flavour, extra=None):
    from lazypass import __version__

    doc = {"format": FORMAT, "version": VERSION, "flavour": flavour, "lazypass": __version__,
           "torch": torch.__version__, **io, **(extra or {})}
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = "lazypass", json.dumps(doc)
    proto.producer_name = "lazypass"
    proto.doc_string = (
        f"lazypass {flavour} export ({len(io['sites'])} lazy sites); the metadata key 'lazypass' (JSON) "
        "lists the inputs, the state to thread between calls and the outputs. Run with lazypass.onnx.load."
    )


def _save(files, check: bool = True) -> list[str]:
    """Check every model, then write each through a temporary file (no partial file on failure)."""
    import onnx

    for _, proto in files:
        if check:
            onnx.checker.check_model(proto)
    written = []
    for path, proto in files:
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lazypass-", suffix=".onnx")
        os.close(fd)
        try:
            if proto.ByteSize() > _PROTO_LIMIT:  # protobuf's 2 GiB: weights go to <path>.data
                onnx.save_model(proto, tmp, save_as_external_data=True, location=os.path.basename(path) + ".data")
            else:
                onnx.save_model(proto, tmp)
            _readable(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        written.append(path)
    return written


def _readable(path):
    """Temporary files are private (0600); the file written is as any other new file (umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


# -- static flavour ------------------------------------------------------------------

def _schedule(model, prog, schedule) -> np.ndarray:
    from lazypass.report import Stats, stats
    from lazypass.runtime import runtime

    if schedule is None:
        schedule = stats(model)
        if schedule.saved.shape[0] == 0:
            raise ExportError(
                "flavour='static' needs a skip schedule: run a sampling trajectory with the lazy model first "
                "(its decisions are the schedule) or pass schedule= (Stats, a list of Stats, or a bool array)"
            )
    runs = schedule if isinstance(schedule, (list, tuple)) and schedule and isinstance(schedule[0], Stats) else [schedule]
    if all(isinstance(r, Stats) for r in runs):
        calls = max(r.saved.shape[0] for r in runs)
        votes = np.zeros((calls, len(prog.sites)))
        for r in runs:
            votes[: r.saved.shape[0]] += r.saved
        sched = votes > len(runs) / 2
    else:
        sched = np.asarray(schedule)
        if sched.dtype != bool or sched.ndim != 2:
            raise ExportError(f"schedule must be Stats, a list of Stats or a (calls, sites) bool array, got {schedule!r}")
    if sched.shape[1] != len(prog.sites):
        raise ExportError(f"the schedule has {sched.shape[1]} sites, the model {len(prog.sites)}")
    if sched.shape[0] and sched[0].any():
        raise ExportError("the schedule skips at the first call of a run, when no cache holds anything yet")
    cfg = runtime(model).cfg
    split = [k for k, row in enumerate(sched) if (row != row[cfg.group_of(len(prog.sites))]).any()]
    if split:
        raise ExportError(
            f"schedule row {split[0]} decides differently for sites of one decision group (granularity="
            f"{cfg.granularity!r}: the sites of a group share one decision); give every site of a group the "
            "same value, or apply the model with granularity='site' for per-site schedules"
        )
    return sched


def _fix_conditions(graph, value: bool, tag: str, counter: list) -> None:
    """Give every ``If`` in ``graph`` (and its subgraphs) a constant condition."""
    import onnx

    for node in list(graph.node):
        if node.op_type != "If":
            continue
        name = f"lazypass_{tag}_{counter[0]}"
        counter[0] += 1
        graph.node.insert(list(graph.node).index(node), onnx.helper.make_node(
            "Constant", [], [name], value=onnx.helper.make_tensor(name, onnx.TensorProto.BOOL, [], [value])))
        node.input[0] = name
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _fix_conditions(attr.g, value, tag, counter)


def _pattern_graph(proto, pattern, leaders) -> "onnx.ModelProto":
    """The dynamic graph with each site's decision fixed: ``True`` takes the reuse branch,
    ``False`` the compute branch (the else branch of every nested ``If``), and the rows' skip
    flags that the state writes read follow the pattern too; the optimiser inlines the branches."""
    import onnx
    import onnxscript

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    sites = [n for n in model.graph.node if n.op_type == "If"]
    if len(sites) != len(pattern):
        raise RuntimeError(f"internal: {len(sites)} top-level If nodes for {len(pattern)} sites")
    _fix_decisions(model.graph, [pattern[lead] for lead in sorted(set(leaders))])
    counter = [0]
    for node, skip in zip(sites, pattern):
        name = f"lazypass_site_{counter[0]}"
        counter[0] += 1
        model.graph.node.insert(list(model.graph.node).index(node), onnx.helper.make_node(
            "Constant", [], [name], value=onnx.helper.make_tensor(name, onnx.TensorProto.BOOL, [], [bool(skip)])))
        node.input[0] = name
        if not skip:
            for attr in node.attribute:
                if attr.name == "else_branch":
                    _fix_conditions(attr.g, False, "compute", counter)
    model = onnxscript.optimizer.optimize(model)
    if _count_if(model.graph):
        raise RuntimeError("internal: a conditional is left in a static graph")
    return model


def _fix_decisions(graph, decisions: list[bool]) -> None:
    """Each decision group's ``score > threshold`` (``Greater(logit, logit of the threshold)``, one per
    group in graph order) compares against a constant instead: -inf where the group reuses (every row
    whose cache may be used skips, as the eager model forced to the schedule does), +inf where it
    computes. The threshold is then read by nothing and leaves the graph."""
    import onnx

    consumers: dict[str, list] = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    bar, frontier = None, ["lazy_threshold"]
    for _ in range(4):  # clamp, log / log1p, sub: the logit of the threshold
        frontier = [o for v in frontier for n in consumers.get(v, []) for o in n.output]
        hits = [v for v in frontier if any(n.op_type == "Greater" for n in consumers.get(v, []))]
        if hits:
            bar = hits[0]
            break
    compares = [n for n in consumers.get(bar, []) if n.op_type == "Greater" and list(n.input)[1] == bar]
    if bar is None or len(compares) != len(decisions):
        raise RuntimeError(f"internal: {len(compares)} threshold comparisons for {len(decisions)} decision groups")
    for k, (node, reuse) in enumerate(zip(compares, decisions)):
        name = f"lazypass_bar_{k}"
        value = -math.inf if reuse else math.inf
        graph.node.insert(list(graph.node).index(node), onnx.helper.make_node(
            "Constant", [], [name], value=onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [value])))
        node.input[1] = name


def _count_if(graph) -> int:
    import onnx

    n = 0
    for node in graph.node:
        n += node.op_type == "If"
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                n += _count_if(attr.g)
    return n


def _inputs_needed(graph, outputs) -> set[str]:
    """Graph inputs that ``outputs`` depend on."""
    producer = {o: n for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}
    seen, stack, found = set(), list(outputs), set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in inputs:
            found.add(v)
        node = producer.get(v)
        if node is not None:
            stack.extend(x for x in node.input if x)
            stack.extend(_outer_reads(node))
    return found


def _outer_reads(node) -> list[str]:
    import onnx

    names = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            local = {o for n in attr.g.node for o in n.output} | {i.name for i in attr.g.input}
            local |= {t.name for t in attr.g.initializer}
            for n in attr.g.node:
                names += [x for x in n.input if x and x not in local]
                names += _outer_reads(n)
    return names


def _prune(model, keep_inputs: set[str], keep_outputs: set[str]):
    import onnx
    import onnxscript

    outs = [o for o in model.graph.output if o.name in keep_outputs]
    del model.graph.output[:]
    model.graph.output.extend(outs)
    model = onnxscript.optimizer.optimize(model)  # drops what fed only the removed outputs
    read = {x for n in model.graph.node for x in n.input} | set(_outer_reads_all(model.graph))
    stale = [i.name for i in model.graph.input if i.name not in keep_inputs and i.name in read]
    if stale:
        raise RuntimeError(f"internal: static graph still reads dropped state {stale}")
    ins = [i for i in model.graph.input if i.name in keep_inputs]
    del model.graph.input[:]
    model.graph.input.extend(ins)
    onnx.checker.check_model(model)
    return model


def _outer_reads_all(graph) -> list[str]:
    names = []
    for n in graph.node:
        names += _outer_reads(n)
    return names


def _static(proto, io, sched, path, leaders):
    """One graph per distinct row of the schedule, sharing one external weight file."""
    import onnx

    n_sites = len(io["sites"])
    patterns = [tuple([False] * n_sites)]  # calls past the schedule compute everything
    index = []
    for row in sched:
        row = tuple(bool(v) for v in row)
        if row not in patterns:
            patterns.append(row)
        index.append(patterns.index(row))
    graphs = [_pattern_graph(proto, p, leaders) for p in patterns]

    # state the patterns need: what user outputs read, closed under "next state reads state"
    state = {s["name"]: s for s in io["state"]}
    user_outs = [o["name"] for o in io["outputs"]]
    needed: set[str] = set()
    while True:
        roots = user_outs + [state[n]["output"] for n in needed]
        found = set().union(*(_inputs_needed(g.graph, roots) for g in graphs)) & set(state)
        if found <= needed:
            break
        needed |= found
    keep_in = {e["name"] for e in io["inputs"]} | needed
    keep_out = set(user_outs) | {state[n]["output"] for n in needed}
    graphs = [_prune(g, keep_in, keep_out) for g in graphs]

    dropped = [s["name"] for s in io["state"] if s["name"] not in needed]
    io = dict(io, state=[s for s in io["state"] if s["name"] in needed], settings=[], records=[])
    stem = path[:-5] if path.endswith(".onnx") else path
    files = [path] + [f"{stem}.p{k}.onnx" for k in range(1, len(graphs))]
    data = path + ".data"
    static = {
        "patterns": [list(p) for p in patterns],
        "schedule": index,
        "files": [os.path.basename(f) for f in files],
        "data": os.path.basename(data),
        "dropped_state": dropped,
    }
    for k, g in enumerate(graphs):
        _set_meta(g, io, "static", {"static": dict(static, pattern=k)})
        onnx.checker.check_model(g)
    blob = _share_weights(graphs, static["data"])
    return _save_with_data(list(zip(files, graphs)), data, blob)


_ALIGN = 64
_PROTO_LIMIT = 1_900_000_000
_SHARE_MIN = 1024  # bytes: smaller tensors stay inside each graph


def _share_weights(graphs, location) -> bytes:
    """Move every initializer of at least ``_SHARE_MIN`` bytes out of the graphs into one
    blob, each distinct tensor once; the graphs point into it (ONNX external data:
    location, offset, length). Returns the blob."""
    import onnx
    import onnx.external_data_helper as ext
    from onnx import numpy_helper

    blobs: dict[str, tuple[int, int]] = {}
    chunks, offset = [], 0
    for g in graphs:
        for t in g.graph.initializer:
            raw = t.raw_data or numpy_helper.from_array(numpy_helper.to_array(t)).raw_data
            if len(raw) < _SHARE_MIN:
                continue
            key = hashlib.sha1(raw + f"{t.data_type}{list(t.dims)}".encode()).hexdigest()
            if key not in blobs:
                pad = (-offset) % _ALIGN
                chunks.append(b"\0" * pad)
                offset += pad
                blobs[key] = (offset, len(raw))
                chunks.append(raw)
                offset += len(raw)
            start, length = blobs[key]
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(field)
            t.raw_data = raw
            ext.set_external_data(t, location=location, offset=start, length=length)
            t.data_location = onnx.TensorProto.EXTERNAL
            t.ClearField("raw_data")
    return b"".join(chunks)


def _save_with_data(files, data_path, blob) -> list[str]:
    """Write the weight blob and the graphs, each through a temporary file."""
    folder = os.path.dirname(os.path.abspath(data_path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lazypass-", suffix=".data")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        _readable(tmp)
        written = _save(files, check=False)
        os.replace(tmp, data_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return [*written, data_path]
