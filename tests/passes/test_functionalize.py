"""``functionalize``: in-place writes into graph-made tensors become ``slice_scatter``, and only those."""

import torch
from torch import nn

from lazypass.config import LazyConfig
from lazypass.passes.functionalize import functionalize
from lazypass.tracing import capture

aten = torch.ops.aten


def _graph(fn, *args):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, *a):
            return fn(*a) * self.w

    m = M()
    gm, _ = capture(m, m.forward, args, {})
    return gm


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _check(fn, *args, rewritten: bool):
    gm = _graph(fn, *args)
    expected = gm(*args)
    gm = functionalize(gm, LazyConfig())
    gm.recompile()
    assert (aten.copy_.default not in _targets(gm)) == rewritten
    assert (aten.slice_scatter.default in _targets(gm)) == rewritten
    assert torch.equal(gm(*args)[0] if isinstance(gm(*args), (tuple, list)) else gm(*args),
                       expected[0] if isinstance(expected, (tuple, list)) else expected)


def test_fill_of_a_fresh_tensor_becomes_scatter():
    def fill(x):
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 1::2] * 2
        out[..., 1::2] = x[..., 0::2] + 1
        return out

    _check(fill, torch.randn(2, 3, 4), rewritten=True)


def test_write_into_a_computed_tensor_read_before_becomes_scatter():
    def rope_tail(x):  # CogView4: q[:, 2:] = rotate(q[:, 2:])
        q = torch.layer_norm(x, [4])
        q[:, 2:] = q[:, 2:].flip(-1) * 3
        return q.sum(-1)

    _check(rope_tail, torch.randn(2, 5, 4), rewritten=True)


def test_write_seen_through_an_earlier_view_is_left_alone():
    def aliased(x):
        q = torch.layer_norm(x, [4])
        head = q[:, :2]  # a view taken before the write and read after it
        q[:, :2] = 0.0 * q[:, :2] + 1
        return head.sum() + q.sum()

    _check(aliased, torch.randn(2, 5, 4), rewritten=False)
