"""Bad input: each case is a clear error (or a documented safe behaviour) and corrupts nothing."""

import copy

import pytest
import torch
from torch import nn

import lazypass
from lazypass.config import LazyConfig
from lazypass.runtime import NotTracedError, runtime, traced_program
from tests.archs import ARCHS, random_gates

ARCH = ARCHS["ref_dit"]


@pytest.fixture(autouse=True)
def _inference():
    """These are inference calls: with grad on while parameters require grad, a lazy model
    runs its original forward (docs/live-model.md), so run them as pipelines do."""
    with torch.no_grad():
        yield


def _inputs(batch=2, t=900, seed=0):
    return ARCH.inputs(batch, t, seed)[0]


def _lazy(**options):
    ref = ARCH.build()
    return lazypass.apply(copy.deepcopy(ref), **options), ref


# -- a model with no sites ------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).eval()


def test_no_sites_at_apply_leaves_the_model_untouched():
    model, x = _mlp(), torch.randn(2, 5, 6)
    expected = model(x)
    with pytest.raises(lazypass.NoSitesError, match="no sites.*left as it was"):
        lazypass.apply(model, example_inputs=(x,))
    assert "forward" not in model.__dict__ and "_lazypass" not in model.__dict__
    assert not hasattr(model, "lazy_gates")
    assert torch.equal(model(x), expected)


def test_no_sites_at_first_call_restores_the_model():
    model, x = _mlp(), torch.randn(2, 5, 6)
    expected = model(x)
    lazypass.apply(model)
    with pytest.raises(lazypass.NoSitesError):
        model(x)
    assert torch.equal(model(x), expected)  # runs normally afterwards
    with pytest.raises(ValueError, match="not lazy"):
        runtime(model)


# -- NaN / Inf ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_output_is_never_reused(bad):
    model, ref = _lazy()
    lazypass.set_threshold(model, -0.5)  # skip whenever a cache is valid
    x, t, y = _inputs(t=900)
    x = x.clone()
    x[0, 0, 0, 0] = bad  # sample 0 turns non-finite, sample 1 stays clean
    with torch.no_grad():
        first = model(x, t, y)
        assert not first[0].isfinite().all() and first[1].isfinite().all()
        x2, t2, y2 = _inputs(t=600, seed=1)
        second = model(x2, t2, y2)
        third = model(*_inputs(t=300, seed=2))
        expected = ref(x2, t2, y2)
    st = lazypass.stats(model)
    assert not st.skipped[1, :, 0].any()  # sample 0 computes everything again
    assert st.skipped[1, :, 1].all()  # sample 1 reuses, as the threshold says
    assert (second[0] - expected[0]).abs().max() <= 1e-5
    assert st.skipped[2].all()  # the finite step 2 made sample 0's caches valid again
    assert third.isfinite().all()


@pytest.mark.parametrize("granularity", ["site", 2, "step"])
def test_cache_dtype_overflow_is_not_reused(granularity):
    """A row whose cached value overflows recomputes its decision group: that site alone with
    ``granularity="site"``, its group of two with ``2``, every site of the call with ``"step"``
    (a group shares one row state)."""
    arch = ARCHS["vit"]
    model = arch.build()
    with torch.no_grad():
        model.blocks[0].mlp[2].weight.mul_(1e6)  # this branch's outputs exceed fp16's range
    model = lazypass.apply(model, cache_dtype="float16", granularity=granularity)
    lazypass.set_threshold(model, -0.5)
    with torch.no_grad():
        for seed in range(2):
            (tokens,), _ = arch.inputs(2, 0, seed)
            model(tokens)
    st = lazypass.stats(model)
    kinds = [s.path for s in st.sites]
    overflow = kinds.index(next(p for p in kinds if p.startswith("blocks.0.mlp")))
    assert not st.skipped[1, overflow].any()
    groups = LazyConfig(granularity=granularity).group_of(len(kinds))
    group = [i for i in range(len(kinds)) if groups[i] == groups[overflow]]
    others = [i for i in range(len(kinds)) if i not in group]
    assert len(group) == {"site": 1, 2: 2, "step": len(kinds)}[granularity]
    assert not st.skipped[1, group].any()
    assert st.skipped[1, others].all()


# -- thresholds and options -----------------------------------------------------------

@pytest.mark.parametrize("value", [3.0, -2.0, float("nan"), float("inf"), "0.5", True, None])
def test_threshold_outside_its_range_is_refused_and_changes_nothing(value):
    model, _ = _lazy()
    model(*_inputs())
    rt = runtime(model)
    before = rt.threshold_tensor(torch.device("cpu")).clone()
    with pytest.raises(ValueError, match="threshold"):
        lazypass.set_threshold(model, value)
    assert rt.threshold == 0.5 and torch.equal(rt.threshold_tensor(torch.device("cpu")), before)
    fresh = ARCH.build()
    with pytest.raises(ValueError, match="threshold"):
        lazypass.apply(fresh, threshold=value)
    assert "_lazypass" not in fresh.__dict__


def test_unknown_or_bad_options_are_refused():
    with pytest.raises(TypeError, match="unknown lazypass option"):
        lazypass.apply(ARCH.build(), sync=True)
    with pytest.raises(ValueError, match="sync_decisions"):
        lazypass.apply(ARCH.build(), sync_decisions="yes")
    with pytest.raises(ValueError, match="cache_dtype"):
        lazypass.apply(ARCH.build(), cache_dtype="float8")


def test_sync_decisions_without_a_process_group_is_a_clear_error():
    model, _ = _lazy(sync_decisions="sharded")
    with pytest.raises(RuntimeError, match="init_process_group"):
        model(*_inputs())
    auto, _ = _lazy()  # the default only syncs when a process group exists
    auto(*_inputs())
    assert not any("c10d" in str(n.target) for n in traced_program(auto).core.graph.nodes)


# -- timesteps ------------------------------------------------------------------------

@pytest.mark.parametrize("t", [500, 500.0])
def test_python_number_timestep_is_refused_before_tracing(t):
    model, _ = _lazy()
    x, _, y = _inputs()
    with pytest.raises(TypeError, match="Python number.*tensor"):
        model(x, t, y)
    assert not runtime(model).programs and runtime(model).state is None
    dit = lazypass.apply(ARCHS["diffusers_dit"].build())
    _, kwargs = ARCHS["diffusers_dit"].inputs(2, 900, 0)
    with pytest.raises(TypeError, match="timestep"):
        dit(**{**kwargs, "timestep": t})
    assert not runtime(dit).programs


@pytest.mark.parametrize("shape", [(2, 1), (3,), (1, 2)])
def test_timestep_of_the_wrong_shape_is_refused(shape):
    model, _ = _lazy()
    x, _, y = _inputs()
    with pytest.raises(ValueError, match=r"timestep.*shape"):
        model(x, torch.full(shape, 900), y)
    assert not runtime(model).programs
    model(*_inputs())  # and the model works afterwards


class _AnyTimestep(nn.Module):
    """Accepts a 0-d, (1,) or (B,) timestep, as diffusers pipelines may pass it."""

    def __init__(self):
        super().__init__()
        self.dit = ARCH.build()

    def forward(self, x, t, y):
        return self.dit(x, t.reshape(-1).expand(x.shape[0]), y)


@pytest.mark.parametrize("form", ["0d_long", "1_long", "B_float", "B_double", "0d_float"])
def test_timestep_forms_step_the_same(form):
    make = {
        "0d_long": lambda v: torch.tensor(v), "1_long": lambda v: torch.tensor([v]),
        "B_float": lambda v: torch.full((2,), float(v)), "B_double": lambda v: torch.full((2,), v, dtype=torch.float64),
        "0d_float": lambda v: torch.tensor(float(v)),
    }[form]
    outs = {}
    for name, maker in (("ref", lambda v: torch.full((2,), v)), (form, make)):
        model = lazypass.apply(_AnyTimestep().eval())  # train() mode runs the original forward
        lazypass.set_threshold(model, -0.5)
        got = []
        with torch.no_grad():
            for k, v in enumerate((900, 600, 600, 300)):  # 600 twice: the second call, own slot
                x, _, y = _inputs(seed=k)
                got.append(model(x, maker(v), y))
        outs[name] = (got, lazypass.stats(model).skipped)
    assert all(torch.equal(a, b) for a, b in zip(outs["ref"][0], outs[form][0]))
    assert (outs["ref"][1] == outs[form][1]).all()
    skipped = outs[form][1]
    assert not skipped[0].any() and skipped[1].all() and not skipped[2].any() and skipped[3].all()


# -- export before tracing ------------------------------------------------------------

def test_traced_program_before_tracing_is_a_clear_error():
    model, _ = _lazy()
    with pytest.raises(NotTracedError, match="run the model once"):
        traced_program(model)
    with pytest.raises(ValueError, match="not lazy yet"):
        traced_program(ARCH.build())
    model(*_inputs())
    assert traced_program(model) is traced_program(model, *_inputs())
    with pytest.raises(NotTracedError, match="not traced for these inputs"):
        traced_program(model, *_inputs(batch=3))


# -- gate files -----------------------------------------------------------------------

def _gated(arch_name, seed=1, threshold=0.6, **options):
    arch = ARCHS[arch_name]
    # per-site random gates skip some branches; one random gate per step may skip none
    model = lazypass.apply(arch.build(), **{"granularity": "site", **options})
    args, kwargs = arch.inputs(2, 900, 0)
    lazypass.trace(model, *args, **kwargs)
    random_gates(model, seed)
    lazypass.set_threshold(model, threshold)
    return model, arch


def _trajectory(model, arch):
    lazypass.reset(model)
    outs = []
    with torch.no_grad():
        for k, t in enumerate((900, 600, 300)):
            args, kwargs = arch.inputs(2, t, k)
            outs.append(arch.output(model(*args, **kwargs)))
    return outs


def _refused_without_change(model, arch, path, match):
    """Loading ``path`` raises ``ValueError(match)`` and leaves gates, threshold and outputs alone."""
    gates, outs = [p.clone() for p in model.lazy_gates.parameters()], _trajectory(model, arch)
    assert lazypass.stats(model).skipped.any()  # the gates matter: a change would show
    with pytest.raises(ValueError, match=match):
        lazypass.load_gates(model, path)
    assert all(torch.equal(a, b) for a, b in zip(gates, model.lazy_gates.parameters()))
    assert runtime(model).threshold == 0.6
    assert all(torch.equal(a, b) for a, b in zip(outs, _trajectory(model, arch)))


def test_gate_file_of_another_model_changes_nothing(tmp_path):
    other, _ = _gated("pixart", seed=2, threshold=0.7)
    lazypass.save_gates(other, tmp_path / "pixart.safetensors")
    model, arch = _gated("diffusers_dit")
    _refused_without_change(model, arch, tmp_path / "pixart.safetensors", "different model.*Nothing was loaded")


def test_truncated_or_corrupt_gate_files_change_nothing(tmp_path):
    model, arch = _gated("diffusers_dit")
    lazypass.save_gates(model, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    bad = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "header": data[:8] + b"{" * header + data[8 + header :],
        "nan_values": data[: len(data) - 8] + b"\xff" * 8,  # the last values become NaN
    }
    for name, blob in bad.items():
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
        _refused_without_change(model, arch, tmp_path / f"{name}.safetensors", "truncated or corrupt|damaged|not finite")


def test_wrong_gate_file_before_tracing_refuses_until_right_gates_are_loaded(tmp_path):
    other, _ = _gated("pixart")
    lazypass.save_gates(other, tmp_path / "pixart.safetensors")
    good, arch = _gated("diffusers_dit")
    lazypass.save_gates(good, tmp_path / "dit.safetensors")
    expected = _trajectory(good, arch)

    model = lazypass.apply(arch.build(), granularity="site")
    lazypass.load_gates(model, tmp_path / "pixart.safetensors")  # sites unknown yet: checked at the trace
    args, kwargs = arch.inputs(2, 900, 0)
    for _ in range(2):  # refused every time rather than running with gates that were never loaded
        with pytest.raises(ValueError, match="different model"):
            model(*args, **kwargs)
    assert not hasattr(model, "lazy_gates")
    lazypass.load_gates(model, tmp_path / "dit.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(_trajectory(model, arch), expected))


def test_gate_file_fitted_under_other_options_changes_nothing(tmp_path):
    other, arch = _gated("diffusers_dit", max_age=1)
    lazypass.save_gates(other, tmp_path / "capped.safetensors")
    model, _ = _gated("diffusers_dit")
    _refused_without_change(model, arch, tmp_path / "capped.safetensors",
                            "fitted with max_age=1.*this model uses max_age=None")
