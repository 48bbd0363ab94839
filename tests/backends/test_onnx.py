"""ONNX export (``lazypass.export_onnx``) and the torch-free runner (``lazypass.onnx.load``).

Parity is checked over whole 10-step DDIM trajectories with gates that give mixed
decisions (``random_gates``): at every step the eager lazy model and the runner see the
same ``x_t`` (the eager model's trajectory), their outputs must agree to 1e-4 and every
site must take the same decision for every sample. A second trajectory follows without
a reset (the timestep rises: a new run, in the graph).

One export of the reference DiT is shared by the fast tests; the diffusers models, fp16,
the static flavour and the coverage models run with ``-m slow`` (an export takes 30-100 s
on the project's shared 2-core machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lazypass
from lazypass.runtime import NotTracedError, runtime, traced_program
from lazypass.sampling import ddim_step, ddim_timesteps
from tests.archs import ARCHS, MIXED_GATE_SEED, random_gates

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
try:
    import MNN  # noqa: F401

    HAS_MNN = True
except ImportError:
    HAS_MNN = False
needs_mnn = pytest.mark.skipif(not HAS_MNN, reason="MNN is not installed (pip install MNN)")

STEPS = 10
TOL = 1e-4


def _lazy(name, seed=1, **options):
    arch = ARCHS[name]
    model = lazypass.apply(arch.build(), **options)
    args, kwargs = arch.inputs(2, 999, 0)
    lazypass.trace(model, *args, **kwargs)
    random_gates(model, seed)
    return arch, model, args, kwargs


def _with_x(arch, t, seed, x):
    args, kwargs = arch.inputs(2, t, seed)
    if args:
        return (x,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=x)


def trajectories(arch, model, runner, runs=2, seed=3, before=None):
    """Eager lazy model and runner on the eager model's DDIM trajectory; ``runs`` runs in a
    row without a reset; ``before(i)`` runs before the i-th call of each run. Returns the max
    abs error, the eager model's stats and the runner's decisions."""
    lazypass.reset(model)
    runner.reset()
    ts = ddim_timesteps(STEPS)
    err = 0.0
    for run in range(runs):
        args, kwargs = arch.inputs(2, ts[0], seed + run)
        x = args[0] if args else kwargs["hidden_states"]
        for i, t in enumerate(ts):
            args, kwargs = _with_x(arch, t, seed + run, x)
            if before is not None:
                before(i)
            with torch.no_grad():
                ref = arch.output(model(*args, **kwargs))
            out = torch.as_tensor(arch.output(runner(*args, **kwargs)))
            assert out.dtype == ref.dtype or runner.meta["dtype"] == "float16"
            err = max(err, float((ref - out.to(ref.dtype)).abs().max()))
            x = ddim_step(x, ref[:, : x.shape[1]], t, ts[i + 1] if i + 1 < len(ts) else -1)
    return err, lazypass.stats(model), runner.skipped()


def check_parity(arch, model, runner):
    err, st, skipped = trajectories(arch, model, runner)
    assert err <= TOL, err
    assert skipped.shape == st.skipped.shape
    assert (skipped == st.skipped).all()  # the same decision at every call, site and sample
    assert 0 < st.lazy_ratio < 1 and st.saved.any()  # mixed decisions, some compute saved
    return err, st


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    arch, model, args, kwargs = _lazy("ref_dit")
    path = str(tmp_path_factory.mktemp("onnx") / "ref_dit.onnx")
    files = lazypass.export_onnx(model, path, example_inputs=args)
    assert files == [path]
    return arch, model, path


def test_file_is_checked_onnx_with_state_in_its_metadata(exported):
    _, model, path = exported
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["lazypass"])
    prog = traced_program(model)
    specs = prog.state_specs
    assert [s["name"] for s in meta["settings"]] == ["lazy_threshold"]
    assert [s["name"] for s in meta["state"]] == [s.name for s in specs[1:]]  # all of it, from the specs
    assert [s["output"] for s in meta["state"]] == [s.name + "_next" for s in specs[1:]]
    assert {s["name"]: (tuple(s["shape"]), s["fill"]) for s in meta["state"]} == {
        s.name: (s.shape, s.fill if np.isfinite(s.fill) else "inf") for s in specs[1:]}
    assert [e["name"] for e in meta["inputs"]] == ["x", "t", "y"] and meta["timestep"] == "t"
    assert [r["name"] for r in meta["records"]] == ["lazy_skipped", "lazy_saved", "lazy_scores", "lazy_computed"]
    assert [s["kind"] for s in meta["sites"]] == [s.kind for s in prog.sites]
    graph_inputs = [i.name for i in proto.graph.input]
    assert graph_inputs == ["x", "t", "y"] + [s.name for s in specs]
    assert not proto.functions
    ifs = [n for n in proto.graph.node if n.op_type == "If"]
    assert len(ifs) == len(prog.sites)  # one per site; the some-rows-skip If sits in its else branch


def test_onnxruntime_matches_eager_over_trajectories(exported):
    arch, model, path = exported
    runner = lazypass.onnx.load(path)
    check_parity(arch, model, runner)
    assert runner.records[-1]["scores"].dtype == np.float32


@needs_mnn
def test_mnn_matches_eager_over_trajectories(exported, tmp_path):
    arch, model, path = exported
    runner = lazypass.onnx.load(path, runtime="mnn", cache_dir=str(tmp_path))
    assert type(runner.engine).__name__ == "_Mnn"
    check_parity(arch, model, runner)


def test_parity_would_fail_if_the_caches_were_frozen(exported):
    """The same check with a runner that never passes its caches on fails: the parity above
    is evidence that the state flows between calls."""
    arch, model, path = exported
    runner = lazypass.onnx.load(path)
    run = runner.__call__

    def frozen(*args, **kwargs):
        caches = {k: v for k, v in runner.state.items() if k.startswith("lazy_cache")}
        out = run(*args, **kwargs)
        runner.state.update(caches)  # the next call reads the caches this one started with
        return out

    err, _, _ = trajectories(arch, model, type("Frozen", (), {"__call__": staticmethod(frozen), "reset": runner.reset,
                                                             "skipped": runner.skipped, "meta": runner.meta})())
    assert err > 10 * TOL  # the parity check (err <= TOL) would fail


def test_threshold_is_an_input(exported):
    arch, model, path = exported
    runner = lazypass.onnx.load(path)
    assert runner.threshold == pytest.approx(0.5)
    runner.set_threshold(1.5)  # never skips
    args, kwargs = arch.inputs(2, 900, 0)
    for t in (900, 800):
        args, kwargs = arch.inputs(2, t, 0)
        runner(*args, **kwargs)
    assert not runner.skipped().any()


def test_runner_imports_no_torch(exported, tmp_path):
    arch, model, path = exported
    args, _ = arch.inputs(2, 900, 0)
    lazypass.reset(model)
    lazypass.set_threshold(model, 0.5)
    with torch.no_grad():
        want = model(*args).numpy()
    np.savez(tmp_path / "io.npz", *[a.numpy() for a in args], want=want)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch fails
sys.path.insert(0, {root!r})
import numpy as np
import lazypass
from lazypass.onnx import load
io = np.load({str(tmp_path / "io.npz")!r})
out = load({path!r})(io["arr_0"], io["arr_1"], io["arr_2"])
assert isinstance(out, np.ndarray) and np.abs(out - io["want"]).max() < 1e-4
assert not hasattr(lazypass, "apply")
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_runner_refuses_a_file_not_made_by_lazypass(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain", [x], [y])
    path = str(tmp_path / "plain.onnx")
    onnx.save(helper.make_model(graph), path)
    for rt in ("onnxruntime", "mnn") if HAS_MNN else ("onnxruntime",):
        with pytest.raises(lazypass.onnx.FormatError, match="not written by lazypass"):
            lazypass.onnx.load(path, runtime=rt)
    with pytest.raises(FileNotFoundError):
        lazypass.onnx.load(str(tmp_path / "missing.onnx"))
    with pytest.raises(ValueError, match="runtime"):
        lazypass.onnx.load(path, runtime="tflite")


@pytest.mark.parametrize("edit", ["rename_state", "drop_output", "shape", "format"])
def test_runner_refuses_metadata_that_does_not_match_the_graph(exported, tmp_path, edit):
    _, _, path = exported
    proto = onnx.load(path)
    entry = next(p for p in proto.metadata_props if p.key == "lazypass")
    meta = json.loads(entry.value)
    if edit == "rename_state":
        meta["state"][0]["name"] = "lazy_age"
    elif edit == "drop_output":
        meta["records"] = meta["records"][:-1]
    elif edit == "shape":
        meta["inputs"][0]["shape"][0] = 3
    else:
        meta["format"] = "something-else"
    entry.value = json.dumps(meta)
    bad = str(tmp_path / "bad.onnx")
    onnx.save(proto, bad)
    match = "not written by lazypass" if edit == "format" else "does not match its graph"
    with pytest.raises(lazypass.onnx.FormatError, match=match):
        lazypass.onnx.load(bad)


def test_runner_input_errors(exported):
    arch, _, path = exported
    runner = lazypass.onnx.load(path)
    (x, t, y), _ = arch.inputs(2, 900, 0)
    with pytest.raises(ValueError, match="exported for"):
        runner(x[:1], t[:1], y[:1])
    with pytest.raises(TypeError, match="missing input 'y'"):
        runner(x, t)
    with pytest.raises(TypeError, match="dtype"):
        runner(x, t, y.float())
    out = runner(x=x.numpy(), t=t.numpy(), y=y.numpy())  # by keyword, numpy in, numpy out
    assert isinstance(out, np.ndarray)


# -- export errors: each is clear and writes nothing ---------------------------------

def _assert_nothing_written(folder):
    assert os.listdir(folder) == []


def test_export_refuses_a_model_that_is_not_lazy(tmp_path):
    arch = ARCHS["ref_dit"]
    args, _ = arch.inputs(2, 999, 0)
    with pytest.raises(ValueError, match="not lazy yet"):
        lazypass.export_onnx(arch.build(), str(tmp_path / "m.onnx"), example_inputs=args)
    _assert_nothing_written(tmp_path)


def test_export_refuses_a_model_never_traced(tmp_path):
    model = lazypass.apply(ARCHS["ref_dit"].build())
    with pytest.raises(NotTracedError, match="not been traced"):
        lazypass.export_onnx(model, str(tmp_path / "m.onnx"))
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("kw,match", [
    ({"flavour": "tflite"}, "flavour"),
    ({"dtype": torch.bfloat16}, "dtype"),
    ({"dtype": "int8"}, "dtype"),
    ({"opset": 11}, "opset"),
    ({"schedule": np.zeros((2, 4), bool)}, "schedule"),
])
def test_export_refuses_bad_options(tmp_path, kw, match):
    model = lazypass.apply(ARCHS["ref_dit"].build())
    args, _ = ARCHS["ref_dit"].inputs(2, 999, 0)
    with pytest.raises(ValueError, match=match):
        lazypass.export_onnx(model, str(tmp_path / "m.onnx"), example_inputs=args, **kw)
    _assert_nothing_written(tmp_path)
    assert "lazy_gates" not in dict(model.named_children())  # refused before tracing


def test_export_refuses_a_missing_directory(tmp_path):
    model = lazypass.apply(ARCHS["ref_dit"].build())
    args, _ = ARCHS["ref_dit"].inputs(2, 999, 0)
    with pytest.raises(ValueError, match="does not exist"):
        lazypass.export_onnx(model, str(tmp_path / "no" / "m.onnx"), example_inputs=args)
    with pytest.raises(ValueError, match="directory"):
        lazypass.export_onnx(model, str(tmp_path), example_inputs=args)
    _assert_nothing_written(tmp_path)


def test_static_needs_a_schedule(tmp_path):
    model = lazypass.apply(ARCHS["ref_dit"].build())
    args, _ = ARCHS["ref_dit"].inputs(2, 999, 0)
    with pytest.raises(ValueError, match="schedule"):
        lazypass.export_onnx(model, str(tmp_path / "m.onnx"), example_inputs=args, flavour="static")
    with pytest.raises(ValueError, match="first call"):
        lazypass.export_onnx(model, str(tmp_path / "m.onnx"), example_inputs=args, flavour="static",
                             schedule=np.ones((3, 4), bool))
    # with the default granularity="step" every site shares the call's one decision
    split = np.array([[0, 0, 0, 0], [1, 0, 1, 0]], bool)
    with pytest.raises(ValueError, match="row 1 decides differently for sites of one decision group"):
        lazypass.export_onnx(model, str(tmp_path / "m.onnx"), example_inputs=args, flavour="static", schedule=split)
    _assert_nothing_written(tmp_path)


# -- slow: the diffusers models, fp16, the static flavour ---------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffusers_dit", "pixart", "sd3"])
def test_diffusers_models_match_eager(name, tmp_path):
    arch, model, args, kwargs = _lazy(name, MIXED_GATE_SEED.get(name, 1))
    path = str(tmp_path / f"{name}.onnx")
    lazypass.export_onnx(model, path, example_inputs=args, example_kwargs=kwargs)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    check_parity(arch, model, lazypass.onnx.load(path))
    if HAS_MNN:
        check_parity(arch, model, lazypass.onnx.load(path, runtime="mnn"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ref_dit", "sd3"])
def test_fp16(name, tmp_path):
    """fp16 weights, activations and caches; gate scores in fp32. Errors against the fp32
    eager model are recorded in docs/phones.md; the bounds here catch regressions."""
    arch, model, args, kwargs = _lazy(name)
    path = str(tmp_path / f"{name}_fp16.onnx")
    lazypass.export_onnx(model, path, example_inputs=args, example_kwargs=kwargs, dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float32  # the model itself is not converted
    for rt in ("onnxruntime", "mnn") if HAS_MNN else ("onnxruntime",):
        runner = lazypass.onnx.load(path, runtime=rt)
        meta = runner.meta
        assert meta["dtype"] == "float16"
        assert next(s for s in meta["state"] if s["name"].startswith("lazy_cache"))["dtype"] == "float16"
        assert next(r for r in meta["records"] if r["name"] == "lazy_scores")["dtype"] == "float32"
        err, st, skipped = trajectories(arch, model, runner)
        assert err < 2e-2, err
        assert (skipped == st.skipped).mean() > 0.9


def _forced(model, schedule):
    """Before each call, gates that score 1 where the schedule skips and 0 elsewhere: the eager
    lazy model then runs that fixed schedule (a site skips where the schedule says and its
    cache is valid)."""

    def before(call):
        row = schedule[call] if call < len(schedule) else np.zeros(schedule.shape[1], bool)
        with torch.no_grad():
            for name, p in model.lazy_gates.named_parameters():
                if name == "bias":
                    p.copy_(torch.where(torch.from_numpy(row), 20.0, -20.0))
                else:
                    p.zero_()
    return before


@pytest.mark.slow
@pytest.mark.parametrize("name,granularity", [("ref_dit", "site"), ("sd3", "site"), ("ref_dit", "step")])
def test_static_flavour_equals_the_eager_model_on_its_schedule(name, granularity, tmp_path):
    arch, model, args, kwargs = _lazy(name, granularity=granularity)
    sites = len(traced_program(model).sites)
    rows = [[0] * sites, [1, 0] * sites, [0, 1] * sites, [1] * sites, [0] * sites, [1] * sites, [1, 0] * sites]
    schedule = np.array([r[:sites] for r in rows], bool)
    if granularity == "step":  # one decision per call: every site follows the first
        schedule = np.repeat(schedule[:, :1], sites, axis=1)
    path = str(tmp_path / f"{name}.onnx")
    files = lazypass.export_onnx(model, path, example_inputs=args, example_kwargs=kwargs, flavour="static",
                                 schedule=schedule)
    distinct = {tuple(r) for r in schedule.tolist()}
    assert len(files) == len(distinct) + 1 and files[-1] == path + ".data"
    for f in files[:-1]:
        proto = onnx.load(f)
        onnx.checker.check_model(proto)
        assert not [n for n in proto.graph.node if n.op_type == "If"]
        names = {i.name for i in proto.graph.input}
        # the schedule decides: no threshold; the valid flags stay only where a forecast reads them
        # (a run's first call leaves no previous output)
        assert "lazy_threshold" not in names
        assert runtime(model).cfg.reuse == "forecast" or not any(n.startswith("lazy_valid") for n in names)
    for rt in ("onnxruntime", "mnn") if HAS_MNN else ("onnxruntime",):
        runner = lazypass.onnx.load(path, runtime=rt)
        err, st, skipped = trajectories(arch, model, runner, before=_forced(model, schedule))
        assert err <= TOL, (rt, err)
        for run in (0, STEPS):  # the eager model did follow the schedule, in both runs
            assert (st.saved[run: run + len(schedule)] == schedule).all()
            assert (skipped[run: run + len(schedule)].all(-1) == schedule).all()
