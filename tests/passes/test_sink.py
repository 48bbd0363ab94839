"""A follower's norm and modulation run inside its branch: skipped with it, same results."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lazypass
from tests.archs import ARCHS


class _Norms(TorchDispatchMode):
    """Counts the layer norms dispatched (any of the aten forms export may leave)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "layer_norm" in str(func):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _norms_per_call(arch, granularity):
    model = arch.build()
    with torch.no_grad(), _Norms() as plain:
        model(*arch.inputs(2, 900, 0)[0], **arch.inputs(2, 900, 0)[1])
    lazypass.apply(model, granularity=granularity)
    counts = {}
    for k, (t, threshold) in enumerate(((900, 1.5), (800, 1.5), (700, -0.5))):  # compute, compute, skip
        lazypass.set_threshold(model, threshold)
        args, kwargs = arch.inputs(2, t, k)
        with torch.no_grad(), _Norms() as mode:
            model(*args, **kwargs)
        counts[threshold] = mode.count
    assert lazypass.stats(model).lazy_ratio > 0, "the last call should have skipped every site"
    return plain.count, counts[1.5], counts[-0.5], len(lazypass.trace(model, *args, **kwargs))


@pytest.mark.parametrize("name", ["ref_dit", "diffusers_dit"])
def test_skipped_followers_skip_their_norms(name):
    plain, computing, skipping, sites = _norms_per_call(ARCHS[name], "step")
    assert plain > 0 and computing == plain
    # one decision per call: only the first site's norm runs outside its branch
    assert skipping == plain - (sites - 1), (plain, skipping, sites)


def test_per_site_gates_keep_every_norm():
    plain, computing, skipping, _ = _norms_per_call(ARCHS["ref_dit"], "site")
    assert computing == skipping == plain
