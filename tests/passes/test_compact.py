"""``batch_compute="compact"`` (``insert_gates``): a branch computes only the rows that need it.

Checked against the same model computing whole batches (``"full"``) and against every sample
run alone: decisions and results agree, the branch really ran on fewer rows (``stats``'
``computed``), and under ``torch.compile(backend="lazydit", fullgraph=True)`` one graph serves
any number of skipping rows.
"""

import copy

import numpy as np
import pytest
import torch

import lazypass
from lazypass.passes.insert_gates import buckets
from tests.archs import ARCHS, assert_batch_close, random_gates

TIMESTEPS = (900, 750, 600, 450, 300, 150)
BATCH = 4


def _lazy(arch, batch=BATCH, **options):
    # per-site random gates: one gate per step would decide the same for most rows
    model = lazypass.apply(arch.build(), **{"granularity": "site", **options})
    args, kwargs = arch.inputs(batch, TIMESTEPS[0], 0)
    lazypass.trace(model, *args, **kwargs)
    random_gates(model)
    return model


def _run(model, arch, batch=BATCH, rows=None, lazy=None):
    outs = []
    lazypass.reset(lazy if lazy is not None else model)
    with torch.no_grad():
        for k, t in enumerate(TIMESTEPS):
            args, kwargs = arch.inputs(batch, t, k)
            if rows is not None:
                args = tuple(a[rows] if isinstance(a, torch.Tensor) and a.shape[:1] == (batch,) else a for a in args)
                kwargs = {n: a[rows] if isinstance(a, torch.Tensor) and a.shape[:1] == (batch,) else a
                          for n, a in kwargs.items()}
            outs.append(arch.output(model(*args, **kwargs)))
    return outs


def _expected_computed(skipped: np.ndarray) -> np.ndarray:
    """Share of rows a compacted branch runs on: the bucket holding the rows that compute."""
    batch = skipped.shape[-1]
    need = batch - skipped.sum(-1)
    sizes = np.array(buckets(batch) + [batch])
    bucket = np.where(need == 0, 0, sizes[np.searchsorted(sizes, np.maximum(need, 1))])
    return bucket / batch


@pytest.mark.parametrize("name", ["ref_dit", "pixart", "sd3"])
def test_compact_batch_equals_batch_of_one(name):
    arch = ARCHS[name]
    model = _lazy(arch, batch_compute="compact")
    batch = _run(model, arch)
    st = lazypass.stats(model)
    assert ((st.computed > 0) & (st.computed < 1)).any(), "no call ran a branch on part of the batch"
    for b in range(BATCH):
        solo = copy.deepcopy(model)
        alone = _run(solo, arch, batch=BATCH, rows=slice(b, b + 1))
        for k, (x, y) in enumerate(zip(batch, alone)):
            assert_batch_close(x[b:b + 1], y)
        assert (lazypass.stats(solo).skipped[:, :, 0] == st.skipped[:, :, b]).all()


@pytest.mark.parametrize("name", ["ref_dit", "sd3"])
def test_compact_computes_the_rows_that_need_it_and_stats_count_them(name):
    arch = ARCHS[name]
    full = _lazy(arch, batch_compute="full")
    compact = _lazy(arch)  # "auto": compact from 4 samples per call
    compact.lazy_gates.load_state_dict(full.lazy_gates.state_dict())
    for x, y in zip(_run(full, arch), _run(compact, arch)):
        assert_batch_close(x, y)
    a, b = lazypass.stats(full), lazypass.stats(compact)
    assert (a.skipped == b.skipped).all()
    assert np.array_equal(a.computed, 1.0 - a.saved)  # whole batches: all or nothing
    assert np.array_equal(b.computed, _expected_computed(b.skipped))
    assert b.compute_saved > a.compute_saved and b.macs_saved > a.macs_saved
    assert b.compute_saved == pytest.approx(1 - b.computed.mean())
    assert "compute saved" in str(b)


def test_auto_compacts_from_four_samples_per_call():
    arch = ARCHS["ref_dit"]
    for batch, compacted in ((2, False), (4, True)):
        model = _lazy(arch, batch=batch)
        _run(model, arch, batch=batch)
        computed = lazypass.stats(model).computed
        assert ((computed > 0) & (computed < 1)).any() == compacted


def test_buckets_are_a_few_fixed_row_counts_below_the_batch():
    assert buckets(1) == [] and buckets(2) == [1] and buckets(4) == [1, 2, 3]
    assert buckets(8) == [1, 2, 4, 6] and buckets(16) == [1, 2, 4, 8, 12] and len(buckets(1024)) == 11


def test_compact_under_compile_one_graph_for_any_number_of_skipping_rows(monkeypatch):
    """fullgraph compile; the graph given to Inductor (here run as is) serves every skip count."""
    graphs = []

    def record(gm, example_inputs, config_patches=None):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", record)
    arch, model, ref, compiled = _compiled_pair()
    counts = set()
    for threshold in (0.5, 0.3, 0.7):
        for m in (model, ref):
            lazypass.set_threshold(m, threshold)
        got, want = _run(compiled, arch, lazy=model), _run(ref, arch)
        for x, y in zip(got, want):
            assert_batch_close(x, y)
        st = lazypass.stats(model)
        assert (st.skipped == lazypass.stats(ref).skipped).all()
        assert np.array_equal(st.computed, _expected_computed(st.skipped))
        counts |= set(st.skipped.sum(-1).ravel().tolist())
    assert {1, 2, 3} <= counts, f"skip counts seen {counts}: not every bucket was exercised"
    assert len(graphs) == 1, "a different number of skipping rows recompiled"


def _compiled_pair():
    """A compacting lazy ref_dit compiled with lazydit, and an eager twin with the same gates."""
    arch = ARCHS["ref_dit"]
    model = _lazy(arch, batch_compute="compact")
    ref = _lazy(arch, batch_compute="compact")
    ref.lazy_gates.load_state_dict(model.lazy_gates.state_dict())
    torch._dynamo.reset()
    return arch, model, ref, torch.compile(model, backend="lazydit", fullgraph=True, dynamic=False)


def test_batch_compute_must_be_known():
    with pytest.raises(ValueError, match="batch_compute must be one of .*'auto', 'full', 'compact'.*got 'rows'"):
        lazypass.apply(ARCHS["ref_dit"].build(), batch_compute="rows")


@pytest.mark.slow
def test_compact_under_real_inductor_matches_eager():
    """The compacted branches lowered by Inductor (top-k, gather, scatter in nested conditionals)."""
    arch, model, ref, compiled = _compiled_pair()
    for threshold in (0.5, 0.3):
        for m in (model, ref):
            lazypass.set_threshold(m, threshold)
        for x, y in zip(_run(compiled, arch, lazy=model), _run(ref, arch)):
            assert_batch_close(x, y)
        st = lazypass.stats(model)
        assert np.array_equal(st.computed, _expected_computed(st.skipped))
    assert ((st.computed > 0) & (st.computed < 1)).any()
