"""Behaviour of a lazy model over short trajectories, on five tiny architectures."""

import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lazypass
from tests.archs import ARCHS, assert_batch_close, random_gates

TIMESTEPS = (900, 600, 300)
aten = torch.ops.aten


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return ARCHS[request.param]


def _run(model, arch, batch, t, seed=0):
    args, kwargs = arch.inputs(batch, t, seed)
    with torch.no_grad():
        return arch.output(model(*args, **kwargs))


def _computes_everything(model, ref, arch, batch, t, seed=0):
    """The lazy model's call equals the original model's: nothing was reused."""
    assert (_run(model, arch, batch, t, seed) - _run(ref, arch, batch, t, seed)).abs().max() <= 1e-5


def _lazy(arch, **options):
    model = arch.build()
    ref = copy.deepcopy(model)
    return lazypass.apply(model, **options), ref


def _traced(arch):
    """A lazy model traced for a batch of two, and its sites."""
    model, _ = _lazy(arch)
    args, kwargs = arch.inputs(2, TIMESTEPS[0], 0)
    return model, lazypass.trace(model, *args, **kwargs)


def test_finds_expected_site_kinds(arch):
    model, sites = _traced(arch)
    assert [s.kind for s in sites] == arch.kinds
    assert all(s.macs > 0 and s.cache_bytes > 0 for s in sites)


def test_threshold_above_one_reproduces_original(arch):
    model, ref = _lazy(arch)
    lazypass.set_threshold(model, 1.5)
    for t in TIMESTEPS:
        out = _run(model, arch, 2, t)
        random_gates(model)  # gates with any values: never skip above 1
        assert (out - _run(ref, arch, 2, t)).abs().max() <= 1e-5
    assert not lazypass.stats(model).skipped.any()


def _reuse_reference(ref, arch, batch):
    """Step 1 in full, step 2 with every branch module returning its step-1 output (hooks)."""
    recorded, handles = {}, []
    replay = [False]

    def hook(name):
        def fn(module, inputs, output):
            if replay[0]:
                return recorded[name]
            recorded[name] = output
        return fn

    for name in arch.branches:
        handles.append(ref.get_submodule(name).register_forward_hook(hook(name)))
    _run(ref, arch, batch, TIMESTEPS[0], seed=0)
    replay[0] = True
    out = _run(ref, arch, batch, TIMESTEPS[1], seed=1)
    for h in handles:
        h.remove()
    return out


def test_threshold_below_zero_reuses_step_one(arch):
    model, ref = _lazy(arch)
    lazypass.set_threshold(model, -0.5)
    first = _run(model, arch, 2, TIMESTEPS[0], seed=0)
    second = _run(model, arch, 2, TIMESTEPS[1], seed=1)  # new inputs: reuse must show
    expected = _reuse_reference(ref, arch, 2)
    assert (second - expected).abs().max() <= 1e-5
    # and it really differs from computing step 2 in full
    assert (second - _run(ref, arch, 2, TIMESTEPS[1], seed=1)).abs().max() > 1e-3
    st = lazypass.stats(model)
    assert not st.saved[0].any() and st.saved[1].all()
    assert first.shape == second.shape


def test_batch_equals_batch_of_one(arch):
    model, _ = _lazy(arch, granularity="site")  # per-site random gates mix rows more often
    args, kwargs = arch.inputs(4, TIMESTEPS[0], 0)
    lazypass.report(model, *args, print_table=False, **kwargs)  # trace, creating the gates
    random_gates(model)
    batched = [_run(model, arch, 4, t) for t in TIMESTEPS]
    st = lazypass.stats(model)
    # the random gates must produce a mixed batch somewhere, or the test proves nothing
    mixed = st.skipped.any(axis=2) & ~st.skipped.all(axis=2)
    assert mixed.any(), "random gates gave no mixed decisions; pick another seed"
    for i in range(4):
        with lazypass.trajectory(model):
            for k, t in enumerate(TIMESTEPS):
                args, kwargs = arch.inputs(4, t, 0)
                args = tuple(a[i : i + 1] if torch.is_tensor(a) else a for a in args)
                kwargs = {n: v[i : i + 1] if torch.is_tensor(v) else v for n, v in kwargs.items()}
                with torch.no_grad():
                    single = arch.output(model(*args, **kwargs))
                assert_batch_close(single, batched[k][i : i + 1])


def test_rising_timestep_invalidates_caches(arch):
    if arch.name == "vit":
        pytest.skip("the plain ViT has no timestep input")
    model, ref = _lazy(arch)
    lazypass.set_threshold(model, -0.5)
    _run(model, arch, 2, TIMESTEPS[0])
    _run(model, arch, 2, TIMESTEPS[1])
    assert lazypass.stats(model).saved[1].all()  # the second step reused every cache
    # a new run starts (timestep goes up): nothing may be reused, although every gate wants to
    _computes_everything(model, ref, arch, 2, TIMESTEPS[0], seed=3)
    assert not lazypass.stats(model).skipped[2].any()


def test_new_batch_shape_invalidates_caches(arch):
    model, ref = _lazy(arch)
    lazypass.set_threshold(model, -0.5)
    _run(model, arch, 2, TIMESTEPS[0])
    _computes_everything(model, ref, arch, 3, TIMESTEPS[1])
    assert not lazypass.stats(model).skipped.any()


def test_reset_invalidates_caches(arch):
    model, ref = _lazy(arch)
    lazypass.set_threshold(model, -0.5)
    _run(model, arch, 2, TIMESTEPS[0])
    lazypass.reset(model)
    _computes_everything(model, ref, arch, 2, TIMESTEPS[1])


# ops that read a tensor's value on the host (a device sync on a GPU)
HOST_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default}


def _graphs(gm):
    """A graph module's graph and those of its branch subgraphs, recursively."""
    yield gm.graph
    for child in gm.children():
        if isinstance(child, torch.fx.GraphModule):
            yield from _graphs(child)


def test_graph_has_one_cond_per_site_and_no_host_read(arch):
    model, sites = _traced(arch)
    core = lazypass.runtime.traced_program(model).core
    targets = [[n.target for n in g.nodes if n.op == "call_function"] for g in _graphs(core)]
    # cond(all skip, reuse, cond(any skip, mixed, compute)): one per site outside, one inside
    assert targets[0].count(torch.ops.higher_order.cond) == len(sites)
    assert sum(t.count(torch.ops.higher_order.cond) for t in targets) == 2 * len(sites)
    assert not any(HOST_READS & set(t) for t in targets)


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host, by name."""

    def __init__(self):
        super().__init__()
        self.reads = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["ref_dit", "sd3", "vit"])
def test_eager_program_reads_one_decision_per_group_and_nothing_else(name, monkeypatch):
    """Eager calls run the twin (``Program.eager``), whose conds take their predicates from the host.

    Those are the host reads of an eager call: one per decision group (here every site is its
    own group), which gives both predicates of the group's conditionals and whether every row's
    cache is valid, and one per call for the cache slot.
    """
    arch = ARCHS[name]
    # per-site random gates give a mix of reused and computed; compact adds one read per bucket tried
    model = lazypass.apply(arch.build(), batch_compute="full", granularity="site")
    args, kwargs = arch.inputs(4, TIMESTEPS[0], 0)
    lazypass.trace(model, *args, **kwargs)
    random_gates(model)
    python_reads = collections.Counter()
    for method in ("tolist", "numpy", "__array__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _m=method, _f=original, **k: (
            python_reads.update([_m]), _f(self, *a, **k))[1])
    counter = _HostReads()
    with counter, torch.no_grad():
        for t in TIMESTEPS:
            args, kwargs = arch.inputs(4, t, 0)
            model(*args, **kwargs)
    monkeypatch.undo()
    saved = lazypass.stats(model).saved
    assert saved.any() and not saved.all(), "random gates gave no mix of reused and computed sites"
    assert counter.reads == {"aten._local_scalar_dense.default": saved.size + len(TIMESTEPS)}
    assert not python_reads


def test_apply_keeps_the_model_object():
    arch = ARCHS["diffusers_dit"]
    model = arch.build()
    config, cls, blocks = model.config, type(model), model.transformer_blocks
    same = lazypass.apply(model)
    assert same is model and type(model) is cls
    assert model.config is config and model.transformer_blocks is blocks
    assert model.dtype == torch.float32  # diffusers properties still work
    args, kwargs = arch.inputs(2, 900, 0)
    out = model(*args, **{**kwargs, "return_dict": True})  # the output structure is kept
    assert type(out).__name__ == "Transformer2DModelOutput"


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="unknown lazypass option.*'treshold'"):
        lazypass.apply(ARCHS["ref_dit"].build(), treshold=0.3)


def test_threshold_set_before_apply_is_remembered():
    arch = ARCHS["ref_dit"]
    model = arch.build()
    lazypass.set_threshold(model, -0.5)
    lazypass.apply(model)
    _run(model, arch, 2, TIMESTEPS[0])
    _run(model, arch, 2, TIMESTEPS[1])
    assert lazypass.stats(model).saved[1].all()


def test_gates_are_registered_parameters_and_caches_are_not_state():
    arch = ARCHS["ref_dit"]
    model = lazypass.apply(arch.build())
    _run(model, arch, 2, TIMESTEPS[0])
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("lazy_gates.") for n in names)
    assert not any("cache" in k for k in model.state_dict())


@pytest.mark.parametrize("name", ["ref_dit", "sd3"])
@pytest.mark.parametrize("options", [{}, {"reuse": "forecast", "granularity": 2, "max_age": 2},
                                     {"reuse": "copy", "threshold": -0.5}],
                         ids=["defaults", "forecast-groups", "copy-all-skip"])
def test_cond_graph_and_eager_twin_agree(name, options):
    """The graph compilers and exporters see (cond HOPs) computes what eager mode runs, also where
    the twin leaves a follower site's norm and modulation out of calls that skip it, and so does
    the graph dynamo traces (cache writes by ``put_rows``)."""
    arch = ARCHS[name]
    model = lazypass.apply(arch.build(), **options)
    args, kwargs = arch.inputs(4, 900, 0)
    lazypass.report(model, *args, print_table=False, **kwargs)
    random_gates(model)
    rt = lazypass.runtime.runtime(model)
    prog, leaves = rt.program_for(args, kwargs)
    if options.get("granularity", "step") != "site":
        assert any(n.startswith("lazy_twin_prelude_") for n, _ in prog.eager.named_children())
    state = [spec.initial("cpu") for spec in prog.state_specs[1:]]
    threshold = torch.tensor(options.get("threshold", 0.5))
    twin_state = [s.clone() for s in state]
    compiled_state = [s.clone() for s in state]
    rows = rt.fresh_state(prog, torch.device("cpu")).tensors  # what eager runs hold: some states as lists of rows
    assert any(isinstance(r, list) for r in rows)
    n = prog.n_user_outputs
    with torch.no_grad():
        for t in TIMESTEPS:
            args, kwargs = arch.inputs(4, t, 0)
            _, leaves = rt.program_for(args, kwargs)
            a = prog.core(*leaves, threshold, *state)
            c = prog.compiled(*leaves, threshold, *compiled_state)
            assert all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
            assert all(torch.equal(x, y) for x, y in zip(state, compiled_state, strict=True))
            for s in (twin_state, rows):
                b = prog.eager(*leaves, threshold, *s)
                b = (*b[:n], *b[n])  # the twin's records come computed when read
                for x, y in zip(a, b, strict=True):
                    assert torch.equal(x, y)
                for x, y in zip(state, s, strict=True):
                    assert torch.equal(x, torch.stack(y) if isinstance(y, list) else y)
    assert a[-2].any() or a[-3].any()  # something was skipped on the last step


def test_one_tensor_for_two_inputs_at_trace_time_does_not_alias_them():
    arch = ARCHS["ref_dit"]
    ref = arch.build()
    model = lazypass.apply(arch.build())
    x, t = torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        model(x, t, t)  # traced with the same tensor as timestep and label
        lazypass.reset(model)
        t2, y2 = torch.tensor([5, 6]), torch.tensor([3, 4])
        assert torch.equal(model(x, t2, y2), ref(x, t2, y2))


@pytest.mark.parametrize("name", ["ref_dit", "pixart"])
def test_max_age_one_never_reuses_a_cache_twice_in_a_row(name):
    arch = ARCHS[name]
    model = lazypass.apply(arch.build(), max_age=1)
    ref = lazypass.apply(arch.build())
    lazypass.set_threshold(model, -0.5)  # every branch wants to skip at every step
    lazypass.set_threshold(ref, 1.5)
    timesteps = (900, 700, 500, 300)
    for k, t in enumerate(timesteps):
        out = _run(model, arch, 2, t, seed=k)
        # the reference reuses on odd steps only: force it with the threshold
        lazypass.set_threshold(ref, -0.5 if k % 2 else 1.5)
        expected = _run(ref, arch, 2, t, seed=k)
        assert (out - expected).abs().max() <= 1e-5
    saved = lazypass.stats(model).saved
    assert saved[[1, 3]].all() and not saved[[0, 2]].any()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_age_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="max_age"):
        lazypass.apply(ARCHS["ref_dit"].build(), max_age=bad)


def test_max_reuse_points_to_max_age():
    with pytest.raises(TypeError, match="max_reuse was replaced by max_age"):
        lazypass.apply(ARCHS["ref_dit"].build(), max_reuse=1)


def test_report_on_a_model_that_is_not_lazy_is_a_dry_run(capsys):
    arch = ARCHS["pixart"]
    model = arch.build()
    forward = model.forward
    args, kwargs = arch.inputs(2, 900, 0)
    sites = lazypass.report(model, *args, **kwargs)
    assert [s.kind for s in sites] == arch.kinds
    assert "sites" in capsys.readouterr().out
    assert "_lazypass" not in model.__dict__ and not hasattr(model, "lazy_gates")
    assert model.forward == forward


def test_trace_creates_the_gates_before_any_call():
    arch = ARCHS["ref_dit"]
    model = lazypass.apply(arch.build())
    assert not hasattr(model, "lazy_gates")
    args, kwargs = arch.inputs(2, 900, 0)
    sites = lazypass.trace(model, *args, **kwargs)
    assert [s.kind for s in sites] == arch.kinds
    assert len(model.lazy_gates.layout) == len(sites)
    assert lazypass.stats(model).skipped.shape[0] == 0  # tracing is not a call


def test_eager_records_stay_bounded_without_a_reset():
    from lazypass.compiled import RECORDS

    arch = ARCHS["ref_dit"]
    model = lazypass.apply(arch.build())
    x, _, y = arch.inputs(1, 900, 0)[0]
    with torch.no_grad():
        for k in range(RECORDS + 5):  # a falling timestep: one run that is never reset
            model(x, torch.tensor([5000 - k]), y)
    assert lazypass.stats(model).skipped.shape[0] == RECORDS
