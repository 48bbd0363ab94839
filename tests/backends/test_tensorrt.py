"""TensorRT export (``lazypass.export_tensorrt``) and the engine runner (``lazypass.tensorrt.load``).

Without a GPU: the ONNX graph handed to TensorRT's parser meets every ``If`` rule
(``check_if_constraints``, plain ``onnx``), the adaptation fixes what it can on small
hand-made graphs without changing their results, and onnxruntime runs the adapted
export of the lazy model with the eager model's outputs and decisions over whole
trajectories. With CUDA and ``tensorrt``: the engine itself, over the same trajectories.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

import lazypass
from lazypass.backends.tensorrt import adapt_if, check_if_constraints, check_op_types, prepare_onnx
from lazypass.runtime import traced_program
from tests.archs import ARCHS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx import TensorProto, helper  # noqa: E402

from tests.backends.test_onnx import _lazy, check_parity, trajectories  # noqa: E402

try:
    import tensorrt  # noqa: F401

    HAS_TRT = True
except ImportError:
    HAS_TRT = False
GPU_REASON = ("needs an NVIDIA GPU and TensorRT (pip install \"lazypass[tensorrt]\"): "
              f"cuda available={torch.cuda.is_available()}, tensorrt importable={HAS_TRT}")
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRT), reason=GPU_REASON)


def _ifs(graph):
    found = []
    for n in graph.node:
        if n.op_type == "If":
            found.append(n)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                found += _ifs(a.g)
    return found


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    arch, model, args, kwargs = _lazy("ref_dit")
    path = str(tmp_path_factory.mktemp("trt") / "ref_dit_trt.onnx")
    assert prepare_onnx(model, path, example_inputs=args) == [path]
    return arch, model, path


def test_graph_for_the_parser_meets_every_if_rule(prepared):
    _, model, path = prepared
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert check_if_constraints(proto) == [] and check_op_types(proto) == []
    sites = len(traced_program(model).sites)
    top = [n for n in proto.graph.node if n.op_type == "If"]
    assert len(top) == sites and len(_ifs(proto.graph)) == 2 * sites  # the decisions are in the graph
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    for n in top:
        cond = types[n.input[0]]
        assert cond.elem_type == TensorProto.BOOL and len(cond.shape.dim) == 0
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["lazypass"])
    assert meta["flavour"] == "dynamic" and [s["name"] for s in meta["state"]][0] == "lazy_last_t"


def test_the_plain_export_needed_the_adaptation(prepared, tmp_path):
    """The exporter's own graph has ops the parser does not take on their types (the valid
    flags scattered as bool, the cache slot index clamped as int64); the prepared one not."""
    _, model, _ = prepared
    path = str(tmp_path / "plain.onnx")
    lazypass.export_onnx(model, path)
    problems = " | ".join(check_op_types(onnx.load(path)))
    assert "ScatterND" in problems and "on BOOL" in problems and "Clip" in problems


def test_onnxruntime_runs_the_adapted_graph_like_the_eager_model(prepared):
    arch, model, path = prepared
    check_parity(arch, model, lazypass.onnx.load(path))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3", "pixart", "diffusers_dit"])
def test_diffusers_models_adapt_and_match(name, tmp_path):
    arch, model, args, kwargs = _lazy(name)
    path = str(tmp_path / f"{name}.onnx")
    prepare_onnx(model, path, example_inputs=args, example_kwargs=kwargs)
    proto = onnx.load(path)
    assert check_if_constraints(proto) == [] and check_op_types(proto) == []
    check_parity(arch, model, lazypass.onnx.load(path))


@pytest.mark.slow
def test_fp16_graph_meets_the_rules(tmp_path):
    arch, model, args, kwargs = _lazy("ref_dit")
    path = str(tmp_path / "ref_dit_fp16.onnx")
    prepare_onnx(model, path, example_inputs=args, fp16=True)
    proto = onnx.load(path)
    assert check_if_constraints(proto) == [] and check_op_types(proto) == []
    err, st, skipped = trajectories(arch, model, lazypass.onnx.load(path))
    assert err < 2e-2 and (skipped == st.skipped).mean() > 0.9


# -- the checker and the adaptation on hand-made graphs --------------------------------

def _model(then_nodes, then_outs, else_nodes, else_outs, cond_shape=(), outs=None, check=True):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, list(cond_shape))
    then = helper.make_graph(then_nodes, "then", [], then_outs)
    other = helper.make_graph(else_nodes, "else", [], else_outs)
    names = [f"y{k}" for k in range(len(then_outs))]
    node = helper.make_node("If", ["c"], names, then_branch=then, else_branch=other, name="site")
    outs = outs or [helper.make_tensor_value_info(n, v.type.tensor_type.elem_type,
                                                  [d.dim_value for d in v.type.tensor_type.shape.dim])
                    for n, v in zip(names, then_outs)]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["x1"]), node], "g", [x, c], outs)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if check:
        onnx.checker.check_model(m, full_check=True)
    return m


def _f(name, shape=(2,)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _i64(name):
    return helper.make_tensor_value_info(name, TensorProto.INT64, [1])


def _run(m, c):
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([-1.5, 2.0], np.float32)
    return sess.run(None, {"x": x, "c": np.full(sess.get_inputs()[1].shape, c, bool)})


def _fixable(passthrough: bool):
    """A graph TensorRT's parser would refuse: a one-element rank-1 condition, both branches
    defining ``tmp`` and naming their output ``tmp``, int64 outputs and (``passthrough``) an
    outside tensor handed straight out under the same name by both branches, which
    onnx.checker and onnxruntime refuse too; without it, that output goes through an
    ``Identity`` in each branch (the same values)."""
    k = helper.make_tensor("k", TensorProto.INT64, [1], [7])
    j = helper.make_tensor("j", TensorProto.INT64, [1], [-3])
    then_nodes = [helper.make_node("Neg", ["x1"], ["tmp"]), helper.make_node("Constant", [], ["ki"], value=k)]
    else_nodes = [helper.make_node("Abs", ["x"], ["tmp"]), helper.make_node("Constant", [], ["ji"], value=j)]
    out_then, out_else = "x1", "x1"
    if not passthrough:
        then_nodes.append(helper.make_node("Identity", ["x1"], ["x1_then"]))
        else_nodes.append(helper.make_node("Identity", ["x1"], ["x1_else"]))
        out_then, out_else = "x1_then", "x1_else"
    return _model(then_nodes, [_f("tmp"), _f(out_then), _i64("ki")], else_nodes, [_f("tmp"), _f(out_else), _i64("ji")],
                  cond_shape=(1,), check=not passthrough)


def test_checker_reports_what_the_parser_refuses():
    problems = " | ".join(check_if_constraints(_fixable(passthrough=True)))
    assert "defined more than once" in problems and "'tmp'" in problems
    assert "not a 0-d bool" in problems
    assert "not distinct" in problems
    assert "not made inside the branch" in problems and "'x1'" in problems
    assert "INT64" in problems


@pytest.mark.parametrize("passthrough", [False, True])
def test_adaptation_fixes_it_and_keeps_the_results(passthrough):
    want = {c: _run(_fixable(passthrough=False), c) for c in (True, False)}
    m = _fixable(passthrough)
    assert len(check_if_constraints(m)) >= 4
    adapt_if(m)
    onnx.checker.check_model(m, full_check=True)
    assert check_if_constraints(m) == []
    for c in (True, False):
        got = _run(m, c)
        assert [g.dtype for g in got] == [w.dtype for w in want[c]]
        for g, w in zip(got, want[c]):
            np.testing.assert_array_equal(g, w)
    assert not np.array_equal(want[True][0], want[False][0])  # the two branches do differ


def _typed_graph():
    """A bool ScatterND and an int64 Clip with only an upper bound, as the exporter writes them."""
    flags = helper.make_tensor_value_info("flags", TensorProto.BOOL, [3, 2])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 1])
    upd = helper.make_tensor_value_info("upd", TensorProto.BOOL, [1, 2])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [])
    hi = helper.make_tensor("hi", TensorProto.INT64, [], [1])
    nodes = [helper.make_node("ScatterND", ["flags", "idx", "upd"], ["flags_next"]),
             helper.make_node("Clip", ["k", "", "hi"], ["k_clamped"])]
    graph = helper.make_graph(nodes, "g", [flags, idx, upd, k],
                              [helper.make_tensor_value_info("flags_next", TensorProto.BOOL, [3, 2]),
                               helper.make_tensor_value_info("k_clamped", TensorProto.INT64, [])], [hi])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(m, full_check=True)
    return m


def test_op_types_the_parser_lacks_are_rewritten_with_the_same_results():
    m = _typed_graph()
    problems = " | ".join(check_op_types(m))
    assert "ScatterND" in problems and "Clip" in problems
    rng = np.random.default_rng(0)
    feeds = [{"flags": rng.random((3, 2)) > 0.5, "idx": np.array([[i]]), "upd": rng.random((1, 2)) > 0.5,
              "k": np.array(k)} for i, k in ((0, -4), (2, 1), (1, 5))]
    run = lambda model, f: ort.InferenceSession(model.SerializeToString(),  # noqa: E731
                                                providers=["CPUExecutionProvider"]).run(None, f)
    want = [run(m, f) for f in feeds]
    adapt_if(m)
    onnx.checker.check_model(m, full_check=True)
    assert check_op_types(m) == [] and {n.op_type for n in m.graph.node} >= {"Min", "Cast"}
    for f, w in zip(feeds, want):
        got = run(m, f)
        for g, x in zip(got, w):
            assert g.dtype == x.dtype
            np.testing.assert_array_equal(g, x)
    assert [int(w[1]) for w in want] == [-4, 1, 1]  # the clamp did clamp


def test_checker_reports_what_cannot_be_adapted():
    crossing = _model([helper.make_node("Neg", ["x"], ["a"])], [_f("a")],
                      [helper.make_node("Abs", ["a"], ["b"])], [_f("b")], check=False)
    assert any("crosses from the other branch" in p for p in check_if_constraints(adapt_if(crossing)))
    types = _model([helper.make_node("Neg", ["x"], ["a"])], [_f("a")],
                   [helper.make_node("Cast", ["x"], ["b"], to=TensorProto.INT32)],
                   [helper.make_tensor_value_info("b", TensorProto.INT32, [2])], check=False)
    assert any("FLOAT in one branch, INT32 in the other" in p for p in check_if_constraints(adapt_if(types)))
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [2, 1])
    ranks = _model([helper.make_node("Neg", ["x"], ["a"])], [_f("a")],
                   [helper.make_node("Constant", [], ["s"], value=shape), helper.make_node("Reshape", ["x", "s"], ["b"])],
                   [_f("b", (2, 1))], check=False)
    assert any("rank 1 in one branch, 2 in the other" in p for p in check_if_constraints(adapt_if(ranks)))


# -- the engine runner over a stand-in engine (onnxruntime on the bound memory, CPU) -----

def _stand_in(path, tmp_path):
    """``lazypass.tensorrt``'s Runner and engine wrapper over ``_fake_tensorrt``: everything
    but TensorRT's kernels (see that module)."""
    from lazypass.tensorrt import Runner, _Trt
    from tests.backends import _fake_tensorrt

    engine = tmp_path / "stand_in.engine"
    engine.write_bytes(open(path, "rb").read())
    meta = json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["lazypass"])
    meta["tensorrt"] = {"version": _fake_tensorrt.__version__}
    cpu = torch.device("cpu")
    return Runner(str(engine), meta, _Trt(_fake_tensorrt, str(engine), meta, cpu), cpu)


def test_runner_binds_and_threads_state_like_the_onnx_runner(prepared, tmp_path):
    arch, model, path = prepared
    runner = _stand_in(path, tmp_path)
    check_parity(arch, model, runner)  # two runs in a row: the second starts in the engine (timestep rises)
    assert runner.engine.context.calls == 2 * 10


def test_state_lives_in_two_buffers_that_swap(prepared, tmp_path):
    arch, _, path = prepared
    runner = _stand_in(path, tmp_path)
    (x, t, y), _ = arch.inputs(2, 900, 0)
    ptrs = {name: [] for name in runner.state}
    for step in (900, 800, 700, 600):
        runner(x, torch.full_like(t, step), y)
        for name, value in runner.state.items():
            assert isinstance(value, torch.Tensor)
            ptrs[name].append(value.data_ptr())
    for name, p in ptrs.items():
        assert p[0] == p[2] and p[1] == p[3] and p[0] != p[1], name
    assert runner.threshold == pytest.approx(0.5)
    runner.set_threshold(1.5)
    runner.reset()
    runner(x, torch.full_like(t, 900), y)
    runner(x, torch.full_like(t, 800), y)
    assert runner.skipped().shape == (2, len(runner.sites), 2) and not runner.skipped().any()


def test_runner_input_errors(prepared, tmp_path):
    arch, _, path = prepared
    runner = _stand_in(path, tmp_path)
    (x, t, y), _ = arch.inputs(2, 900, 0)
    with pytest.raises(TypeError, match="torch CUDA tensors"):
        runner(x.numpy(), t, y)
    with pytest.raises(ValueError, match="built for"):
        runner(x[:1], t[:1], y[:1])
    with pytest.raises(TypeError, match="dtype"):
        runner(x, t, y.float())


# -- errors without TensorRT or a GPU --------------------------------------------------

def test_export_without_tensorrt_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if it were not installed
    model = lazypass.apply(ARCHS["ref_dit"].build())
    args, _ = ARCHS["ref_dit"].inputs(2, 999, 0)
    with pytest.raises(ImportError, match=r'pip install "lazypass\[tensorrt\]"'):
        lazypass.export_tensorrt(model, str(tmp_path / "m.engine"), example_inputs=args)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kw,match", [({"fp16": "yes"}, "fp16"), ({"workspace": -1}, "workspace")])
def test_export_refuses_bad_options(tmp_path, kw, match):
    model = lazypass.apply(ARCHS["ref_dit"].build())
    with pytest.raises(ValueError, match=match):
        lazypass.export_tensorrt(model, str(tmp_path / "m.engine"), **kw)
    with pytest.raises(ValueError, match="does not exist"):
        lazypass.export_tensorrt(model, str(tmp_path / "no" / "m.engine"))


def test_load_needs_the_layout_beside_the_engine(prepared, tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(FileNotFoundError, match="state layout"):
        lazypass.tensorrt.load(str(engine))
    _, _, path = prepared
    meta = json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["lazypass"])
    (tmp_path / "m.engine.json").write_text(json.dumps(meta))
    with pytest.raises(lazypass.onnx.FormatError, match="not written by lazypass.export_tensorrt"):
        lazypass.tensorrt.load(str(engine))
    (tmp_path / "m.engine.json").write_text(json.dumps(dict(meta, tensorrt={"version": "x"})))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            lazypass.tensorrt.load(str(engine))
    elif not HAS_TRT:
        with pytest.raises(ImportError, match="lazypass\\[tensorrt\\]"):
            lazypass.tensorrt.load(str(engine))


# -- on a GPU ---------------------------------------------------------------------------

class _OnCuda:
    """The engine runner called with the CPU tensors of ``trajectories``; CPU tensors out."""

    def __init__(self, runner):
        self.runner, self.meta = runner, runner.meta

    def __call__(self, *args, **kwargs):
        move = lambda v: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
        out = self.runner(*[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()})
        return out.cpu() if isinstance(out, torch.Tensor) else type(out)(o.cpu() for o in out)

    def reset(self):
        self.runner.reset()

    def skipped(self):
        return self.runner.skipped()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if not (torch.cuda.is_available() and HAS_TRT):
        pytest.skip(GPU_REASON)
    arch, model, args, kwargs = _lazy("ref_dit")
    path = str(tmp_path_factory.mktemp("engine") / "ref_dit.engine")
    files = lazypass.export_tensorrt(model, path, example_inputs=args, fp16=False)
    assert files == [path, path + ".json"]
    return arch, model, path


@needs_gpu
def test_engine_matches_eager_over_trajectories(engine):
    arch, model, path = engine
    runner = lazypass.tensorrt.load(path)
    err, st, skipped = trajectories(arch, model, _OnCuda(runner))
    assert err <= 1e-3, err
    assert (skipped == st.skipped).all() and 0 < st.lazy_ratio < 1


@needs_gpu
def test_state_stays_on_the_gpu_in_two_swapping_buffers(engine):
    arch, _, path = engine
    runner = lazypass.tensorrt.load(path)
    args, _ = arch.inputs(2, 900, 0)
    args = [a.cuda() for a in args]
    name = next(s["name"] for s in runner.meta["state"] if s["name"].startswith("lazy_cache"))
    ptrs = []
    for t in (900, 800, 700, 600):
        runner(args[0], torch.full_like(args[1], t), args[2])
        assert runner.state[name].is_cuda
        ptrs.append(runner.state[name].data_ptr())
    assert ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3] and ptrs[0] != ptrs[1]


@needs_gpu
def test_a_reusing_call_runs_fewer_layers(engine):
    """TensorRT's per-layer profile: a call where every site reuses reports less layer time
    than one where every site computes (the skipped branch does not run)."""
    import tensorrt as trt

    arch, _, path = engine
    runner = lazypass.tensorrt.load(path)

    class Profile(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.layers = {}

        def report_layer_time(self, layer_name, ms):
            self.layers[layer_name] = self.layers.get(layer_name, 0.0) + ms

    args, _ = arch.inputs(2, 900, 0)
    args = [a.cuda() for a in args]
    profiles = []
    for t, threshold in ((900, 1.5), (800, -0.5)):  # compute (scores < 1.5), then reuse (scores > -0.5)
        runner.set_threshold(threshold)
        profile = Profile()
        profiles.append(profile)  # kept alive while the context may call it
        runner.engine.context.profiler = profile
        runner(args[0], torch.full_like(args[1], t), args[2])
        torch.cuda.synchronize()
    skipped = runner.skipped()
    assert not skipped[0].any() and skipped[1].all()
    computing, reusing = profiles[0].layers, profiles[1].layers
    assert computing and sum(reusing.values()) < sum(computing.values()), (len(computing), len(reusing))


@needs_gpu
def test_fp16_engine(tmp_path):
    arch, model, args, kwargs = _lazy("ref_dit")
    path = str(tmp_path / "ref_dit16.engine")
    lazypass.export_tensorrt(model, path, example_inputs=args, fp16=True)
    runner = lazypass.tensorrt.load(path)
    assert runner.meta["dtype"] == "float16"
    err, st, skipped = trajectories(arch, model, _OnCuda(runner))
    assert err < 2e-2 and (skipped == st.skipped).mean() > 0.9
