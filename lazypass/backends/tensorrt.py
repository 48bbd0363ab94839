"""``lazypass.export_tensorrt``: a lazy model as a TensorRT engine with the skip decisions inside.

The engine is built from the dynamic ONNX flavour (``export_onnx``: one ``If`` per site,
the caches as plain inputs and outputs) by TensorRT's ONNX parser, which turns each
``If`` into an ``IIfConditional``. TensorRT puts an input layer in front of every outside
tensor a branch reads and runs the layers behind those input layers only when their
branch is taken, so a reusing site does not compute. Its conditionals are stricter
than ONNX's ``If``:

- the condition is a 0-d bool;
- both branches give the same number of outputs, pairwise of one element type (one of
  bool, int32, float16, bfloat16, float32) and one rank (older releases: one shape);
- branch outputs have distinct names, and each is made inside its branch (an outside
  tensor handed straight through would cross the boundary without an input layer);
- no edge crosses between the branches (a branch reads only its own values and those of
  the scopes around it).

``prepare_onnx`` writes the ONNX file adapted to these rules, checked by
``check_if_constraints`` (plain ``onnx``, no GPU), and onnxruntime runs it like any
other export (``lazypass.onnx.load``), which is how the adaptation is tested on CPU.
The adaptation renames values so that every name is defined once in the whole model,
routes branch outputs that are not made in their branch through an ``Identity``, makes a
one-element bool condition 0-d (``Reshape``), and carries int64
branch outputs as int32 (cast back after the ``If``). An edge crossing between branches
or branch outputs of different types or ranks cannot be adapted: export refuses them.

TensorRT 11 builds strongly typed networks only (``BuilderFlag.FP16`` is gone):
``fp16=True`` exports the fp16 ONNX flavour (weights, activations and caches in fp16,
gate scores in fp32, as ``export_onnx(dtype=torch.float16)``), and the engine keeps
exactly those types; ``fp16=False`` builds an fp32 engine (TF32 off where the release
still has the flag).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter

import torch
from torch import nn

IF_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16", "INT32", "BOOL")  # TensorRT's If: output element types
INSTALL = 'pip install "lazypass[tensorrt]"'
PREFIX = "lazypass_trt"


class TensorRTConstraintError(ValueError):
    """The ONNX graph cannot be made to meet TensorRT's ``If`` rules; nothing was built."""


def export_tensorrt(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: tuple | None = None,
    fp16: bool = True,
    workspace: int | None = None,
    *,
    example_kwargs: dict | None = None,
    onnx_path: str | os.PathLike | None = None,
) -> list[str]:
    """Build a TensorRT engine of a lazy model (after ``lazypass.apply``); returns the files written.

    Needs the ``tensorrt`` package and an NVIDIA GPU (``pip install "lazypass[tensorrt]"``).

    Args:
        model: a lazy model, exported for the inputs of its last call or ``example_inputs``
            / ``example_kwargs`` (the engine has those shapes, as the ONNX file does).
        path: the engine file to write (its directory must exist). Beside it,
            ``<path>.json`` holds the state layout the runner threads between calls.
        fp16: an fp16 engine (weights, activations, caches; gate scores stay fp32) or fp32.
        workspace: TensorRT's workspace memory pool limit in bytes (default: TensorRT's).
        onnx_path: keep the adapted ONNX file there (default: a temporary file, removed).

    Example:
        >>> lazypass.export_tensorrt(model, "dit.engine", example_inputs=(x, t, y))  # doctest: +SKIP
        >>> runner = lazypass.tensorrt.load("dit.engine")                            # doctest: +SKIP
        >>> eps = runner(x.cuda(), t.cuda(), y.cuda())                                # doctest: +SKIP
    """
    path = os.fspath(path)
    _check_arguments(path, fp16, workspace)
    trt = import_tensorrt()
    with tempfile.TemporaryDirectory(prefix="lazypass-trt-") as tmp:
        onnx_file = os.fspath(onnx_path) if onnx_path is not None else os.path.join(tmp, "model.onnx")
        written = prepare_onnx(model, onnx_file, example_inputs, fp16=fp16, example_kwargs=example_kwargs)
        meta = _onnx_meta(onnx_file)
        engine = build_engine(trt, onnx_file, workspace=workspace, fp16=fp16)
        meta["tensorrt"] = {"version": trt.__version__, "fp16": fp16, "workspace": workspace,
                            "engine": os.path.basename(path)}
        files = _write(path, engine, meta)
    return files + (written if onnx_path is not None else [])


def import_tensorrt():
    """``tensorrt``, or an ImportError that says how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(
            f"TensorRT engines need the tensorrt package and an NVIDIA GPU: {INSTALL} "
            f"(importing tensorrt failed: {e}). lazypass.backends.tensorrt.prepare_onnx writes the adapted "
            "ONNX graph without it."
        ) from None
    return trt


def _check_arguments(path, fp16, workspace):
    if not isinstance(fp16, bool):
        raise ValueError(f"fp16 must be True or False, got {fp16!r}")
    if workspace is not None and (isinstance(workspace, bool) or not isinstance(workspace, int) or workspace <= 0):
        raise ValueError(f"workspace must be None or a positive number of bytes, got {workspace!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path!r}: the directory {folder!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path!r}: it is a directory; give a file name such as model.engine")


# -- the ONNX graph TensorRT's parser gets ---------------------------------------------

def prepare_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: tuple | None = None,
    fp16: bool = False,
    *,
    example_kwargs: dict | None = None,
) -> list[str]:
    """Export the dynamic ONNX flavour adapted to TensorRT's ``If`` rules; returns the files
    written. Needs no GPU and no TensorRT: ``lazypass.onnx.load(path)`` runs the file.

    Example:
        >>> from lazypass.backends.tensorrt import prepare_onnx, check_if_constraints
        >>> prepare_onnx(model, "dit_trt.onnx", example_inputs=(x, t, y))  # doctest: +SKIP
        >>> check_if_constraints(onnx.load("dit_trt.onnx"))                 # doctest: +SKIP
        []
    """
    import onnx

    from lazypass.backends.onnx import export_onnx

    path = os.fspath(path)
    files = export_onnx(model, path, example_inputs, flavour="dynamic", dtype=torch.float16 if fp16 else None,
                        example_kwargs=example_kwargs)
    proto = onnx.load(path, load_external_data=False)  # the weights (and any external data file) stay as they are
    adapt_if(proto)
    problems = check_if_constraints(proto) + check_op_types(proto)
    if problems:
        for f in files:
            os.remove(f)
        raise TensorRTConstraintError("the exported graph cannot meet TensorRT's parser's rules: "
                                      + "; ".join(problems[:8]))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".lazypass-", suffix=".onnx")
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        onnx.checker.check_model(tmp)
        os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return files


def _sub_graphs(node):
    import onnx

    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for k, g in enumerate(attr.graphs):
                yield f"{attr.name}[{k}]", g


def _defined(graph) -> list[str]:
    """Names this graph itself defines (not its subgraphs)."""
    names = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    names += [t.values.name for t in graph.sparse_initializer]
    return names + [o for n in graph.node for o in n.output if o]


def _reads(graph) -> list[str]:
    """Names this graph's nodes read, its subgraphs' outer reads included, and its outputs."""
    names = []
    for n in graph.node:
        names += [x for x in n.input if x]
        for _, g in _sub_graphs(n):
            own = set(_defined(g))
            names += [x for x in _reads(g) if x not in own]
    return names + [o.name for o in graph.output]


def _all_names(graph, out: set) -> set:
    out.update(_defined(graph))
    out.update(o.name for o in graph.output)
    for n in graph.node:
        out.update(x for x in n.input if x)
        for _, g in _sub_graphs(n):
            _all_names(g, out)
    return out


def _types(model) -> dict:
    """Every value's type (``onnx.TypeProto``) the graph declares or shape inference finds,
    subgraphs included (names are unique once the adaptation has run)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a help here; the declared types remain
        inferred = model
    types: dict = {}

    def walk(g):
        for v in list(g.input) + list(g.value_info) + list(g.output):
            if v.type.HasField("tensor_type"):
                types.setdefault(v.name, v.type)
        for t in g.initializer:
            tp = onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
            types.setdefault(t.name, tp)
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        types.setdefault(n.output[0], onnx.helper.make_tensor_type_proto(a.t.data_type, list(a.t.dims)))
            for _, sub in _sub_graphs(n):
                walk(sub)

    walk(inferred.graph)
    return types


def _declared(value_info, types):
    """A branch output's type: as declared, else as inferred."""
    if value_info.type.HasField("tensor_type") and value_info.type.tensor_type.elem_type:
        return value_info.type
    return types.get(value_info.name)


def _elem(tp) -> int | None:
    return tp.tensor_type.elem_type if tp is not None and tp.HasField("tensor_type") else None


def _shape(tp) -> list | None:
    """Dims (int, or str for a symbolic dim, None unknown), or None when the rank is unknown."""
    if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tp.tensor_type.shape.dim]


def _type_name(elem) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem) if elem else "unknown"


def check_if_constraints(model) -> list[str]:
    """What keeps TensorRT's ONNX parser from building the model's ``If`` nodes as
    conditionals; ``[]`` when nothing does. Checks every ``If`` (nested ones too):

    - every name is defined once in the whole model (no value shadows another);
    - the condition is a 0-d bool;
    - the branches have the same number of outputs, pairwise of equal element type
      (one of bool, int32, float16, bfloat16, float32) and rank, and equal shape
      where both shapes are static;
    - branch output names are distinct (within a branch and across the two) and each is
      made by a node of its branch;
    - no edge crosses between branches: a branch reads only what it or an enclosing
      scope defines.

    Example:
        >>> check_if_constraints(onnx.load("dit_trt.onnx"))  # doctest: +SKIP
        []
    """
    import onnx

    problems: list[str] = []
    types = _types(model)
    counts: Counter = Counter()

    def count(g):
        counts.update(_defined(g))
        for n in g.node:
            for _, sub in _sub_graphs(n):
                count(sub)

    count(model.graph)
    twice = sorted(n for n, c in counts.items() if c > 1)
    if twice:
        problems.append(f"{len(twice)} value name(s) defined more than once ({twice[:4]}): names must be unique")

    def visit(g, visible: set, where: str, sibling: set):
        own = set(_defined(g))
        seen = visible | own
        for x in _reads(g):
            if x not in seen:
                kind = "crosses from the other branch" if x in sibling else "is not defined in any enclosing scope"
                problems.append(f"{where} reads {x!r}, which {kind}")
        for n in g.node:
            branches = dict(_sub_graphs(n))
            if n.op_type == "If":
                check_if(n, branches, where, own)
            for name, sub in branches.items():
                others = set()
                for other, og in branches.items():
                    if other != name:
                        others |= _defined_deep(og)
                visit(sub, seen, f"{where}/{n.name or n.op_type}.{name}", others)

    def check_if(n, branches, where, own):
        label = f"{where}/If {n.name!r}"
        cond = types.get(n.input[0])
        if _elem(cond) != onnx.TensorProto.BOOL or _shape(cond) != []:
            problems.append(f"{label}: condition {n.input[0]!r} is {_type_name(_elem(cond))}{_shape(cond)}, "
                            "not a 0-d bool")
        then, other = branches.get("then_branch"), branches.get("else_branch")
        if then is None or other is None:
            problems.append(f"{label}: a branch is missing")
            return
        if len(then.output) != len(other.output):
            problems.append(f"{label}: the branches give {len(then.output)} and {len(other.output)} outputs")
        names = [o.name for o in then.output] + [o.name for o in other.output]
        dup = sorted(k for k, c in Counter(names).items() if c > 1)
        if dup:
            problems.append(f"{label}: branch output names {dup} are not distinct")
        for tag, b in (("then", then), ("else", other)):
            made = {o for node in b.node for o in node.output if o}
            outside = [o.name for o in b.output if o.name not in made]
            if outside:
                problems.append(f"{label}: {tag} branch outputs {outside} are not made inside the branch")
        for k, (a, b) in enumerate(zip(then.output, other.output)):
            ta, tb = _declared(a, types), _declared(b, types)
            ea, eb, sa, sb = _elem(ta), _elem(tb), _shape(ta), _shape(tb)
            if ea != eb:
                problems.append(f"{label}: output {k} is {_type_name(ea)} in one branch, {_type_name(eb)} in the other")
            elif _type_name(ea) not in IF_TYPES:
                problems.append(f"{label}: output {k} is {_type_name(ea)}; TensorRT's If carries {list(IF_TYPES)}")
            if sa is None or sb is None:
                problems.append(f"{label}: output {k} has an unknown rank")
            elif len(sa) != len(sb):
                problems.append(f"{label}: output {k} has rank {len(sa)} in one branch, {len(sb)} in the other")
            elif all(isinstance(d, int) for d in sa + sb) and sa != sb:
                problems.append(f"{label}: output {k} has shape {sa} in one branch, {sb} in the other")

    visit(model.graph, set(), "graph", set())
    return problems


def _defined_deep(g) -> set:
    names = set(_defined(g))
    for n in g.node:
        for _, sub in _sub_graphs(n):
            names |= _defined_deep(sub)
    return names


# Element types TensorRT's ONNX parser takes for the data input of the ops the exporter
# emits (onnx-tensorrt, docs/operators.md, TensorRT 10.x); ops not listed are not checked.
_FP = ("FLOAT", "FLOAT16", "BFLOAT16")
_NUM = _FP + ("INT32", "INT64")
OP_TYPES = {
    **{op: _FP for op in ("Clip", "Conv", "Cos", "Einsum", "Erf", "Exp", "Gemm", "LayerNormalization", "MatMul",
                          "Pow", "Sigmoid", "Sin", "Softmax", "Sqrt", "Tanh")},
    **{op: _NUM for op in ("Abs", "Add", "Div", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Max",
                           "Min", "Mul", "Neg", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum",
                           "ScatterND", "Sub")},
    **{op: ("BOOL",) for op in ("And", "Not", "Or", "Xor")},
}


def check_op_types(model) -> list[str]:
    """Nodes whose data input has an element type TensorRT's parser does not take for that
    op (``OP_TYPES``); ``[]`` when none. ``adapt_if`` rewrites the ones the exporter emits
    (bool ``ScatterND``, int ``Clip``).

    Example:
        >>> check_op_types(onnx.load("dit_trt.onnx"))  # doctest: +SKIP
        []
    """
    types = _types(model)
    problems = []

    def walk(g, where):
        for n in g.node:
            allowed = OP_TYPES.get(n.op_type)
            if allowed and n.input and n.input[0]:
                kind = _type_name(_elem(types.get(n.input[0])))
                if kind not in allowed:
                    problems.append(f"{where}: {n.op_type} {n.name!r} on {kind}; TensorRT's parser takes {list(allowed)}")
            for name, sub in _sub_graphs(n):
                walk(sub, f"{where}/{n.name or n.op_type}.{name}")

    walk(model.graph, "graph")
    return problems


def adapt_if(model):
    """Rewrite ``model`` (in place; returned) so that its ``If`` nodes meet TensorRT's rules
    where a rewrite can (see the module docstring); what cannot be adapted stays and
    :func:`check_if_constraints` reports it. Values keep their meaning: onnxruntime gives
    the same results before and after."""
    import onnx

    taken = _all_names(model.graph, set())
    counter = [0]

    def fresh(base: str) -> str:
        while True:
            counter[0] += 1
            name = f"{PREFIX}_{base}_{counter[0]}"
            if name not in taken:
                taken.add(name)
                return name

    _unique_names(model.graph, set(_defined(model.graph)), fresh)
    types = _types(model)

    def rewrite(g):
        nodes = []
        for n in g.node:
            for _, sub in _sub_graphs(n):
                rewrite(sub)
            if n.op_type in ("ScatterND", "Clip"):
                nodes += _typed_for_tensorrt(n, types, fresh)
                continue
            if n.op_type != "If":
                nodes.append(n)
                continue
            nodes += _condition(n, types, fresh)
            branches = dict(_sub_graphs(n))
            then, other = branches.get("then_branch"), branches.get("else_branch")
            if then is None or other is None:
                nodes.append(n)
                continue
            used: set = set()
            for b in (then, other):
                _outputs_made_inside(b, used, fresh)
            nodes.append(n)
            nodes += _int64_outputs(n, then, other, types, fresh, g)
        del g.node[:]
        g.node.extend(nodes)

    rewrite(model.graph)
    return model


def _typed_for_tensorrt(n, types, fresh) -> list:
    """A bool ``ScatterND`` as an int32 one between casts; an integer ``Clip`` as
    ``Min(Max(x, lo), hi)`` (the parser's ScatterND has no bool, its Clip only floats).
    The same values either way; other nodes are returned as they are."""
    from onnx import TensorProto, helper

    kind = _elem(types.get(n.input[0]))
    if n.op_type == "ScatterND" and kind == TensorProto.BOOL and not any(a.name == "reduction" for a in n.attribute):
        data, updates, wide = fresh("scatter_data"), fresh("scatter_updates"), fresh("scatter_int32")
        return [helper.make_node("Cast", [n.input[0]], [data], to=TensorProto.INT32, name=data),
                helper.make_node("Cast", [n.input[2]], [updates], to=TensorProto.INT32, name=updates),
                helper.make_node("ScatterND", [data, n.input[1], updates], [wide], name=wide),
                helper.make_node("Cast", [wide], [n.output[0]], to=TensorProto.BOOL, name=wide + "_bool")]
    if n.op_type == "Clip" and kind in (TensorProto.INT32, TensorProto.INT64):
        nodes, x = [], n.input[0]
        bounds = list(n.input[1:3]) + [""] * (3 - len(n.input))
        for op, bound in (("Max", bounds[0]), ("Min", bounds[1])):
            if bound:
                out = fresh(f"clip_{op.lower()}")
                nodes.append(helper.make_node(op, [x, bound], [out], name=out))
                x = out
        nodes.append(helper.make_node("Identity", [x], [n.output[0]], name=fresh("clip")))
        return nodes
    return [n]


def _unique_names(g, outer_defined: set, fresh) -> None:
    """Rename every value a subgraph defines that is defined elsewhere already (ONNX lets a
    subgraph shadow a name; TensorRT's parser keeps one tensor per name)."""
    for n in g.node:
        for _, sub in _sub_graphs(n):
            renames = {}
            for name in _defined(sub):
                if name in outer_defined or name in renames:
                    renames[name] = fresh(name.split("/")[-1][:40])
            if renames:
                _rename(sub, renames)
            outer_defined |= set(_defined(sub))
            _unique_names(sub, outer_defined, fresh)


def _rename(g, renames: dict) -> None:
    """Rename values this graph defines, in its definitions, its reads, its outputs, and the
    outer reads of its subgraphs (unless a subgraph defines the name itself)."""
    for v in g.input:
        v.name = renames.get(v.name, v.name)
    for t in g.initializer:
        t.name = renames.get(t.name, t.name)
    for v in list(g.output) + list(g.value_info):
        v.name = renames.get(v.name, v.name)
    for n in g.node:
        for k, x in enumerate(n.input):
            n.input[k] = renames.get(x, x)
        for k, x in enumerate(n.output):
            n.output[k] = renames.get(x, x)
        for _, sub in _sub_graphs(n):
            inner = {k: v for k, v in renames.items() if k not in set(_defined(sub))}
            if inner:
                _rename_reads(sub, inner)


def _rename_reads(g, renames: dict) -> None:
    for n in g.node:
        for k, x in enumerate(n.input):
            n.input[k] = renames.get(x, x)
        for _, sub in _sub_graphs(n):
            inner = {k: v for k, v in renames.items() if k not in set(_defined(sub))}
            if inner:
                _rename_reads(sub, inner)
    made = set(_defined(g))
    for v in g.output:
        if v.name not in made:
            v.name = renames.get(v.name, v.name)


def _condition(n, types, fresh) -> list:
    """Nodes that make a one-element bool condition 0-d (ONNX allows any one-element bool
    tensor; TensorRT wants a scalar). None when it is one already."""
    from onnx import TensorProto, helper

    cond = types.get(n.input[0])
    if _elem(cond) != TensorProto.BOOL or _shape(cond) == []:
        return []  # a condition that is no bool is no valid ONNX: the check reports it
    shape, out = fresh("scalar_shape"), fresh("cond_scalar")
    nodes = [helper.make_node("Constant", [], [shape], name=shape,
                              value=helper.make_tensor(shape, TensorProto.INT64, [0], [])),
             helper.make_node("Reshape", [n.input[0], shape], [out], name=out)]
    n.input[0] = out
    return nodes


def _outputs_made_inside(b, used: set, fresh) -> None:
    """Route a branch output through an ``Identity`` in the branch when it is not made
    there or its name is already an output of this ``If``."""
    from onnx import helper

    made = {o for node in b.node for o in node.output if o}
    for v in b.output:
        if v.name in made and v.name not in used:
            used.add(v.name)
            continue
        out = fresh("branch_out")
        b.node.append(helper.make_node("Identity", [v.name], [out], name=out))
        v.name = out
        used.add(out)


def _int64_outputs(n, then, other, types, fresh, g) -> list:
    """Carry int64 branch outputs as int32 (TensorRT's If has no int64); cast back after."""
    import onnx
    from onnx import helper

    after = []
    for k, (a, b) in enumerate(zip(then.output, other.output)):
        ea, eb = _elem(_declared(a, types)), _elem(_declared(b, types))
        if ea != onnx.TensorProto.INT64 or eb != onnx.TensorProto.INT64:
            continue
        for branch, v in ((then, a), (other, b)):
            out = fresh("as_int32")
            branch.node.append(helper.make_node("Cast", [v.name], [out], to=onnx.TensorProto.INT32, name=out))
            v.name = out
            v.type.tensor_type.elem_type = onnx.TensorProto.INT32
        if k < len(n.output) and n.output[k]:
            narrow = fresh("if_int32")
            after.append(helper.make_node("Cast", [narrow], [n.output[k]], to=onnx.TensorProto.INT64, name=narrow + "_back"))
            n.output[k] = narrow
    return after


# -- building ------------------------------------------------------------------------

def _onnx_meta(path: str) -> dict:
    import onnx

    from lazypass.onnx import _meta

    proto = onnx.load(path, load_external_data=False)
    return _meta({p.key: p.value for p in proto.metadata_props}, path)


def build_engine(trt, onnx_file: str, *, workspace: int | None = None, fp16: bool = True, opt_level: int | None = None):
    """A serialized engine (bytes-like ``IHostMemory``) from the adapted ONNX file."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:  # TensorRT 10: opt in; 11: every network is strongly typed
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_file):  # resolves external data beside the file
        errors = [str(parser.get_error(k)) for k in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT's ONNX parser refused {onnx_file!r}: " + "; ".join(errors[:6]))
    config = builder.create_builder_config()
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if not fp16 and tf32 is not None:
        config.clear_flag(tf32)  # fp32 parity with the eager model (TF32 matmuls round to 10 bits)
    if opt_level is not None:
        config.builder_optimization_level = opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names in profiles
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_file!r} (its log above says why)")
    return engine


def _write(path: str, engine, meta: dict) -> list[str]:
    """The engine and ``<path>.json``, each through a temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    written = []
    for target, data in ((path, bytes(engine)), (path + ".json", json.dumps(meta, indent=1).encode())):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lazypass-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        written.append(target)
    return written


__all__ = ["OP_TYPES", "TensorRTConstraintError", "adapt_if", "build_engine", "check_if_constraints",
           "check_op_types", "export_tensorrt", "import_tensorrt", "prepare_onnx"]
