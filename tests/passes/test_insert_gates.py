"""The inference rewrite's options: forecast reuse, cache age, input drift, group decisions.

Each behaviour is checked against an independent reference: the plain model with forward
hooks that replay or extrapolate branch outputs, or the gate formula computed from the
branch inputs the hooks record.
"""

import copy
import math

import pytest
import torch

import lazypass
from tests.archs import ARCHS, random_gates

TIMESTEPS = (900, 750, 600, 450, 300, 150)


def _run(model, arch, t, seed, batch=2):
    args, kwargs = arch.inputs(batch, t, seed)
    with torch.no_grad():
        return arch.output(model(*args, **kwargs))


def _forced(arch, pattern, **options):
    """A lazy model whose every site skips exactly at the steps marked in ``pattern``."""
    model = arch.build()
    ref = copy.deepcopy(model)
    lazypass.apply(model, **options)
    outs = []
    for k, (t, skip) in enumerate(zip(TIMESTEPS, pattern)):
        lazypass.set_threshold(model, -0.5 if skip else 1.5)
        outs.append(_run(model, arch, t, seed=k))
    return model, ref, outs


def _hooked(ref, arch, pattern, extrapolate: bool):
    """The plain model whose branches return their last output (or a linear forecast from the
    last two, in timestep) at the steps marked in ``pattern``."""
    history: dict[str, list] = {name: [] for name in arch.branches}  # (t, output) of computed steps
    now = {"t": None, "skip": False}

    def hook(name):
        def fn(module, args, out):
            seen = history[name]
            if not now["skip"]:
                seen.append((now["t"], out))
                return out
            (t1, y1) = seen[-1]
            if not extrapolate or len(seen) < 2:
                return y1
            (t0, y0) = seen[-2]
            factor = (now["t"] - t1) / (t1 - t0)
            return torch.utils._pytree.tree_map(lambda a, b: a + (a - b) * factor, y1, y0)
        return fn

    handles = [ref.get_submodule(name).register_forward_hook(hook(name)) for name in arch.branches]
    outs = []
    for k, (t, skip) in enumerate(zip(TIMESTEPS, pattern)):
        now.update(t=float(t), skip=skip)
        outs.append(_run(ref, arch, t, seed=k))
    for h in handles:
        h.remove()
    return outs


@pytest.mark.parametrize("name", ["ref_dit", "pixart", "sd3"])
def test_forecast_extrapolates_the_last_two_computed_outputs(name):
    arch = ARCHS[name]
    pattern = (False, True, False, True, True, False)  # a copy at step 1, forecasts at 3 and 4
    model, ref, outs = _forced(arch, pattern, reuse="forecast")
    expected = _hooked(ref, arch, pattern, extrapolate=True)
    copies = _hooked(copy.deepcopy(ref), arch, pattern, extrapolate=False)
    for k, (got, want) in enumerate(zip(outs, expected)):
        assert (got - want).abs().max() <= 1e-4, f"step {k}"
    assert (outs[3] - copies[3]).abs().max() > 1e-3  # a forecast is not a copy
    assert (outs[1] - copies[1]).abs().max() <= 1e-4  # with one computed output it is
    assert lazypass.stats(model).saved[[1, 3, 4]].all()


def test_copy_reuse_matches_the_replaying_reference():
    arch = ARCHS["ref_dit"]
    pattern = (False, True, True, False, True, False)
    _, ref, outs = _forced(arch, pattern, reuse="copy")
    for got, want in zip(outs, _hooked(ref, arch, pattern, extrapolate=False)):
        assert (got - want).abs().max() <= 1e-4


def test_max_age_caps_consecutive_reuse():
    arch = ARCHS["ref_dit"]
    model, _, _ = _forced(arch, (False,) + (True,) * 5, max_age=2)
    skipped = lazypass.stats(model).skipped.all(axis=(1, 2))
    assert skipped.tolist() == [False, True, True, False, True, True]


@pytest.mark.parametrize("granularity,groups", [("step", [0, 0, 0, 0]), (2, [0, 0, 2, 2]), ("site", [0, 1, 2, 3])])
def test_groups_take_the_decision_of_their_first_site(granularity, groups):
    arch = ARCHS["ref_dit"]
    model = lazypass.apply(arch.build(), granularity=granularity)
    lazypass.trace(model, *arch.inputs(4, TIMESTEPS[0], 0)[0])
    random_gates(model)
    for k, t in enumerate(TIMESTEPS):
        _run(model, arch, t, seed=k, batch=4)
    st = lazypass.stats(model)
    for i, leader in enumerate(groups):
        assert (st.skipped[1:, i] == st.skipped[1:, leader]).all()
        assert (st.scores[:, i] == st.scores[:, leader]).all()
    mixed = st.skipped[1:].any(axis=2) & ~st.skipped[1:].all(axis=2)
    assert mixed.any() and st.skipped[1:].any() and not st.skipped[1:].all()
    if granularity == "site":
        assert (st.skipped[1:, 0] != st.skipped[1:, 1]).any()


def test_gate_reads_age_and_drift_as_documented():
    """Scores equal sigmoid(sum_tokens(Z) . w + b + a * age + d * drift), with ``Z`` recorded by
    hooks on the plain model made to follow the lazy model's own decisions."""
    arch = ARCHS["ref_dit"]
    model = arch.build()
    ref = copy.deepcopy(model)
    lazypass.apply(model, gate_inputs=("age", "drift"), granularity="site", reuse="copy")
    lazypass.trace(model, *arch.inputs(2, TIMESTEPS[0], 0)[0])
    random_gates(model, seed=5, std=0.05)
    gates = model.lazy_gates
    with torch.no_grad():
        gates.bias.copy_(torch.tensor([2.0, -1.0, 0.5, 1.0]))
        gates.age.copy_(torch.tensor([-3.0, 1.0, -1.0, 0.5]))
        gates.drift.copy_(torch.tensor([2.0, -4.0, 3.0, -1.0]))
    lazypass.set_threshold(model, 0.6)
    lazy_outs = [_run(model, arch, t, seed=k) for k, t in enumerate(TIMESTEPS)]
    st = lazypass.stats(model)
    assert st.skipped[1:].any() and not st.skipped[1:].all()

    n = len(arch.branches)
    z, cache = [None] * n, [None] * n
    step = {"call": 0}

    def record(i):
        return lambda module, args: z.__setitem__(i, args[0])

    def follow(i):  # skipped rows take the cached output, as in the lazy model
        def fn(module, args, out):
            skip = torch.as_tensor(st.skipped[step["call"], i]).reshape(-1, *([1] * (out.dim() - 1)))
            cache[i] = out if cache[i] is None else torch.where(skip, cache[i], out)
            return cache[i]
        return fn

    for i, name in enumerate(arch.branches):
        ref.get_submodule(name).register_forward_pre_hook(record(i))
        ref.get_submodule(name).register_forward_hook(follow(i))
    age, pool, valid = torch.zeros(n, 2), torch.zeros(n, 2, z_dim := 32), torch.zeros(n, 2, dtype=torch.bool)
    for call, t in enumerate(TIMESTEPS):
        step["call"] = call
        out = _run(ref, arch, t, seed=call)
        assert (out - lazy_outs[call]).abs().max() <= 1e-4
        for i in range(n):
            summed = z[i].sum(1)
            mean = summed / z[i].shape[1]
            drift = (mean - pool[i]).norm(dim=1) / (pool[i].norm(dim=1) + 1e-6)
            drift = torch.where(valid[i], drift.clamp(max=4.0), 0.0)  # capped at gating.DRIFT_CAP
            logit = summed @ gates.weight(i, 0) + gates.bias[i] + gates.age[i] * age[i] + gates.drift[i] * drift
            assert torch.allclose(torch.as_tensor(st.scores[call, i]), torch.sigmoid(logit).detach(), atol=1e-5)
            skip = torch.as_tensor(st.skipped[call, i])
            age[i] = torch.where(skip, age[i] + 1, 0.0)
            pool[i] = torch.where(skip[:, None], pool[i], mean)
            valid[i] = True
    assert z_dim == z[0].shape[-1]


def _dispatched(fn) -> tuple[int, int]:
    """(aten ops dispatched, bytes written by copies into existing tensors) while ``fn`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = written = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            if func is torch.ops.aten.copy_.default:
                Count.written += args[0].numel() * args[0].element_size()
            return func(*args, **(kwargs or {}))

    with Count(), torch.no_grad():
        fn()
    return Count.ops, Count.written


@pytest.mark.parametrize("reuse", ["forecast", "copy"])
def test_eager_bookkeeping_is_a_few_ops_per_site_and_copies_no_output(reuse):
    """Op-count ceilings of the eager program (not timings): a call where nothing skips costs the
    original's ops plus a few per site (the group's decision and state are paid once per call with
    the default granularity="step"), and a call where every site skips a few more than the
    original's outside the sites. Neither copies a branch output: an eager run holds its caches as
    lists of rows, and a computed output becomes its cache row (and the old row ``prev`` when
    forecasting) without a copy."""
    arch = ARCHS["ref_dit"]
    ref = arch.build()
    model = lazypass.apply(copy.deepcopy(ref), reuse=reuse)
    sites = len(arch.branches)
    args, kwargs = arch.inputs(2, TIMESTEPS[0], 0)
    out_bytes = sum(s.out_shapes[0][0] and math.prod(s.out_shapes[0]) * 4 for s in
                    lazypass.report(model, *args, print_table=False, **kwargs))
    calls = iter(range(1, 100))

    def run(m, threshold=None):
        if threshold is not None:
            lazypass.set_threshold(m, threshold)
        a, k = arch.inputs(2, 999 - next(calls), 0)
        return lambda: m(*a, **k)

    for _ in range(2):
        run(model, 1.5)()  # caches valid, two computed outputs (forecast)
    original, _ = _dispatched(run(ref))
    never, never_bytes = _dispatched(run(model, 1.5))
    always, always_bytes = _dispatched(run(model, -0.5))
    # threshold, slot, timestep; the gate, its host read, the group's state; the records
    per_call = 90
    assert never - original <= per_call + 8 * sites, (never, original)
    assert always < never and always - original <= per_call + 6 * sites, (always, original)
    small = 4096  # per-row state written in place: valid flags, last timestep, call index
    assert out_bytes > small and never_bytes <= small and always_bytes <= small, (never_bytes, always_bytes)


@pytest.mark.parametrize("granularity,groups", [("step", 1), (2, 2), ("site", 4)])
def test_a_decision_group_keeps_one_row_state(granularity, groups):
    """Valid flags, ages and forecast timesteps are kept once per decision group (at its deciding
    site); caches and previous outputs once per site."""
    arch = ARCHS["ref_dit"]
    model = lazypass.apply(arch.build(), granularity=granularity, max_age=3)
    lazypass.trace(model, *arch.inputs(2, TIMESTEPS[0], 0)[0])
    names = [s.name for s in lazypass.runtime.traced_program(model).state_specs]
    for kind in ("valid", "age", "t_fill", "t_prev", "has_prev"):
        assert len([n for n in names if n.startswith(f"lazy_{kind}_")]) == groups, kind
    assert len([n for n in names if n.startswith("lazy_cache_")]) == len(arch.branches)
    assert len([n for n in names if n.startswith("lazy_prev_")]) == len(arch.branches)
