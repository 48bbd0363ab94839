"""``lazypass::put_rows``: the cache write of compiled calls."""

import pytest
import torch

import lazypass  # noqa: F401  (defines the op)
from lazypass.passes.compiled_writes import host_flags


def put_rows(cache, prev, slot, skip, valid, new):
    torch.ops.lazypass.put_rows(cache, prev, host_flags(slot, skip, valid), new)


def _reference(cache, prev, slot, skip, valid, new, per_sample):
    """The writes of the plain graph: index_copy_ of where(skip, old row, new) (and of prev)."""
    keep = skip.repeat_interleave(per_sample).reshape(-1, *[1] * (new.dim() - 1))
    old = cache[slot]
    if prev is not None:
        fresh = valid.repeat_interleave(per_sample).reshape(keep.shape)
        prev.index_copy_(0, torch.tensor([slot]), torch.where(keep, prev[slot], torch.where(fresh, old, new))[None])
    cache.index_copy_(0, torch.tensor([slot]), torch.where(keep, old, new)[None])


@pytest.mark.parametrize("per_sample", [1, 2])
@pytest.mark.parametrize("forecast", [True, False])
def test_put_rows_writes_what_the_plain_graph_writes(per_sample, forecast):
    gen = torch.Generator().manual_seed(per_sample)
    batch = 3
    for flags in range(2 ** batch):  # every pattern of skipping rows, with mixed validity
        skip = torch.tensor([bool(flags >> b & 1) for b in range(batch)])
        valid = torch.tensor([True, False, True])
        cache = torch.randn(2, batch * per_sample, 4, 5, generator=gen)
        prev = torch.randn(cache.shape, generator=gen) if forecast else None
        new = torch.randn(cache.shape[1:], generator=gen)
        want_cache, want_prev = cache.clone(), prev.clone() if forecast else None
        _reference(want_cache, want_prev, 1, skip, valid, new, per_sample)
        put_rows(cache, prev, torch.tensor([1]), skip, valid if forecast else None, new)
        assert torch.equal(cache, want_cache)
        if forecast:
            assert torch.equal(prev, want_prev)


def test_put_rows_leaves_the_state_alone_when_every_row_skips():
    cache, prev = torch.full((2, 2, 3), float("nan")), torch.zeros(2, 2, 3)
    before = cache.data_ptr(), prev.clone()
    put_rows(cache, prev, torch.tensor([0]), torch.tensor([True, True]), torch.tensor([True, True]), torch.ones(2, 3))
    assert cache.data_ptr() == before[0] and cache.isnan().all() and torch.equal(prev, before[1])
