"""State safety: separate models, interleaved trajectories, resets, exceptions, cache memory."""

import copy
import types

import pytest
import torch

import lazypass
from lazypass.runtime import runtime
from tests.archs import ARCHS, random_gates

ARCH = ARCHS["ref_dit"]
TIMESTEPS = (900, 700, 500, 300)


def _lazy(seed=1, **options):
    model = lazypass.apply(ARCH.build(), **{"granularity": "site", **options})  # random gates: mixed rows
    args, _ = ARCH.inputs(2, TIMESTEPS[0], 0)
    lazypass.report(model, *args, print_table=False)
    random_gates(model, seed)
    return model


def _step(model, k, seed=0, batch=2):
    args, _ = ARCH.inputs(batch, TIMESTEPS[k], seed * 100 + k)
    with torch.no_grad():
        return model(*args)


def _solo(model, seed, steps=len(TIMESTEPS)):
    lazypass.reset(model)
    return [_step(model, k, seed) for k in range(steps)]


def _cache_tensors(model):
    """The run's state tensors; eager runs hold some states as lists of rows."""
    return [t for s in runtime(model).state.tensors for t in (s if isinstance(s, list) else [s])]


def test_two_models_never_share_caches():
    a, b = _lazy(seed=1), _lazy(seed=2)
    ref_a, ref_b = _solo(a, seed=0), _solo(b, seed=1)
    lazypass.reset(a), lazypass.reset(b)
    for k in range(len(TIMESTEPS)):  # interleaved, different inputs, no contexts needed
        assert torch.equal(_step(a, k, seed=0), ref_a[k])
        assert torch.equal(_step(b, k, seed=1), ref_b[k])
    ptrs_a = {t.untyped_storage().data_ptr() for t in _cache_tensors(a)}
    ptrs_b = {t.untyped_storage().data_ptr() for t in _cache_tensors(b)}
    assert not ptrs_a & ptrs_b
    assert lazypass.stats(a).skipped.any() and lazypass.stats(b).skipped.any()


def test_deepcopy_of_a_lazy_model_gets_its_own_caches():
    a = _lazy()
    ref = _solo(a, seed=0)
    lazypass.reset(a)
    _step(a, 0, seed=0)
    b = copy.deepcopy(a)  # mid-trajectory
    assert runtime(b) is not runtime(a) and runtime(b).model is b
    assert b.forward.__self__ is b
    # the copy starts empty; the original goes on with its own caches
    assert torch.equal(_step(a, 1, seed=0), ref[1])
    assert _solo(b, seed=0)[2].sub(ref[2]).abs().max() == 0
    with torch.no_grad():
        b.lazy_gates.bias.fill_(-30.0)  # the copy's gates are its own
    assert torch.equal(_step(a, 2, seed=0), ref[2])


def test_interleaved_trajectories_stay_correct():
    model = _lazy()
    ref0, ref1 = _solo(model, seed=0), _solo(model, seed=1)
    lazypass.reset(model)
    outer = _step(model, 0, seed=2)  # state outside any context is kept aside too
    run0, run1 = lazypass.trajectory(model), lazypass.trajectory(model)
    for k in range(len(TIMESTEPS)):
        with run0:
            assert torch.equal(_step(model, k, seed=0), ref0[k])
        with run1:
            assert torch.equal(_step(model, k, seed=1), ref1[k])
    with run0:
        assert lazypass.stats(model).skipped.shape[0] == len(TIMESTEPS)
    assert lazypass.stats(model).skipped.shape[0] == 1
    assert outer.shape == ref0[0].shape


def test_rising_timestep_starts_a_new_run_without_reset():
    model = _lazy()
    first = _solo(model, seed=0)
    second = [_step(model, k, seed=0) for k in range(len(TIMESTEPS))]  # no reset in between
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    st = lazypass.stats(model)
    n = len(TIMESTEPS)
    assert st.skipped.shape[0] == 2 * n
    assert st.skipped[n - 1].any()  # the last call before the rise reused caches: they were valid
    # at the rise the gates wanted to skip, but the caches of the old run were dropped
    assert (st.scores[n] > runtime(model).threshold).any() and not st.skipped[n].any()


def _fail_at_last_site(model):
    """Make the last site raise while the call runs: earlier sites have already written caches.
    Its branches' ``forward`` is replaced (the eager twin calls branches through ``forward``)."""
    prog = runtime(model).program
    last = len(prog.sites) - 1
    handles = []

    def boom(*args):
        raise RuntimeError("interrupted")

    for gm in (prog.eager, prog.core):
        for name, child in gm.named_children():
            if name.startswith(f"lazy_site_{last}_"):
                child.forward = boom
                handles.append(types.SimpleNamespace(remove=lambda c=child: c.__dict__.pop("forward")))
    return handles


def test_exception_mid_call_never_leaves_half_updated_caches():
    model = _lazy()
    ref = _solo(model, seed=0)
    plain = copy.deepcopy(model)
    lazypass.set_threshold(plain, 1.5)  # same weights, never skips: the full model
    lazypass.reset(model)
    _step(model, 0), _step(model, 1)
    handles = _fail_at_last_site(model)
    with pytest.raises(RuntimeError, match="interrupted"):
        _step(model, 2)
    for h in handles:
        h.remove()
    # caches are updated in place, so the interrupted run is dropped as a whole: the next
    # call starts from empty caches (computes everything) instead of reading half a step
    assert runtime(model).state is None
    assert torch.equal(_step(model, 2), _step(plain, 2))
    assert not lazypass.stats(model).skipped.any()
    # reset after an exception, and a clean run equals an uninterrupted one
    handles = _fail_at_last_site(model)
    with pytest.raises(RuntimeError):
        _step(model, 3)
    for h in handles:
        h.remove()
    lazypass.reset(model)
    assert all(torch.equal(a, b) for a, b in zip(_solo(model, seed=0), ref))


def test_exception_inside_trajectory_restores_outer_state():
    model = _lazy()
    lazypass.reset(model)
    _step(model, 0)
    outer = runtime(model).state
    with pytest.raises(ValueError, match="boom"):
        with lazypass.trajectory(model):
            _step(model, 0, seed=5)
            raise ValueError("boom")
    assert runtime(model).state is outer


@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16"])
def test_cache_memory_is_reported_bounded_and_halved(cache_dtype):
    full, half = _lazy(), _lazy(cache_dtype=cache_dtype)
    args, _ = ARCH.inputs(2, TIMESTEPS[0], 0)
    sites_full = lazypass.report(full, *args, print_table=False)
    sites_half = lazypass.report(half, *args, print_table=False)
    for model, sites, dtype in ((full, sites_full, torch.float32), (half, sites_half, getattr(torch, cache_dtype))):
        specs = next(iter(runtime(model).programs.values())).state_specs[1:]
        lazypass.reset(model)
        held, caches = set(), set()
        for k in range(len(TIMESTEPS)):
            _step(model, k)
            named = [(spec, t) for spec, s in zip(specs, runtime(model).state.tensors, strict=True)
                     for t in (s if isinstance(s, list) else [s])]
            assert {t.dtype for spec, t in named if spec.name.startswith("lazy_cache_")} == {dtype}
            held.add(sum(t.nbytes for spec, t in named if spec.site is not None))
            caches.add(sum(t.nbytes for spec, t in named if spec.name.startswith("lazy_cache_")))
        # what report says is what is held, and it does not grow
        assert held == {sum(s.cache_bytes for s in sites)}
        if model is full:
            full_caches = caches
    assert {2 * c for c in caches} == full_caches  # the caches themselves take half the memory
    # fp16/bf16 caches: same decisions here, outputs within the cache's rounding
    lazypass.reset(full), lazypass.reset(half)
    for k in range(len(TIMESTEPS)):
        diff = (_step(full, k) - _step(half, k)).abs().max()
        assert diff <= 5e-2
    assert lazypass.stats(half).skipped.any()


def test_report_prints_total_cache_memory(capsys):
    model = _lazy(cache_dtype="float16")
    args, _ = ARCH.inputs(2, TIMESTEPS[0], 0)
    sites = lazypass.report(model, *args)
    text = capsys.readouterr().out
    total = sum(s.cache_bytes for s in sites)
    assert "caches" in text.splitlines()[-1]
    assert f"{total / 1024:.1f} KiB" in text.splitlines()[-1] or f"{total} B" in text.splitlines()[-1]


def test_old_state_is_dropped_on_a_new_batch_shape():
    model = _lazy()
    _step(model, 0, batch=2)
    _step(model, 0, batch=4)
    state = runtime(model).state
    assert state.tensors[0].shape == (4,)  # last_t of the new batch; the batch-2 caches are gone
