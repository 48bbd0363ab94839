"""Matcher cases found on the diffusers zoo, each as a tiny hand-written block.

Every test builds the dataflow shape that a diffusers model has (named in the test) and
checks the sites found, their kinds, and that the lazy model still reproduces the
original (threshold > 1) and really reuses (threshold < 0).
"""

import copy
import math

import pytest
import torch
from torch import nn

import lazypass
from lazypass.runtime import runtime
from tests.archs import assert_batch_close, random_gates


def _temb(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class _Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class _Attn(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads = heads

    def split(self, x):
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, rope=None):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if rope is not None:
            q, k = rope(q), rope(k)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(o.transpose(1, 2).flatten(2))


class _LinearAttn(nn.Module):
    """Sana: relu(Q) (relu(K)^T V), normalised; no softmax anywhere."""

    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = torch.relu(self.q(x)), torch.relu(self.k(x)), self.v(x)
        kv = k.transpose(1, 2) @ v  # (B, D, D)
        num = q @ kv
        den = q @ k.sum(1, keepdim=True).transpose(1, 2)
        return self.o(num / (den + 1e-6))


def _interleaved_rope(x):
    """Wan: fill a fresh tensor slice by slice (in-place writes into ``empty_like``)."""
    n = x.shape[-2]
    angle = torch.arange(n, dtype=x.dtype)[:, None] * 0.1
    cos, sin = torch.cos(angle), torch.sin(angle)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


class _Block(nn.Module):
    def __init__(self, d, style):
        super().__init__()
        self.style = style
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _LinearAttn(d) if style == "linear_attn" else _Attn(d)
        self.mlp = _Mlp(d)
        self.ada = nn.Linear(d, 2 * d)

    def forward(self, x, c):
        g1, g2 = self.ada(c).unsqueeze(1).chunk(2, -1)
        if self.style == "cast":  # Wan: the branch first, then (x.float() + g * branch).type_as(x)
            a = self.attn(self.n1(x))
            x = (x.float() + g1 * a).type_as(x)
            f = self.mlp(self.n2(x))
            return (x.float() + g2 * f).type_as(x)
        if self.style == "aura":  # AuraFlow: the MLP output goes back onto the block input
            h = x + g1 * self.attn(self.n1(x))
            return x + g2 * self.mlp(self.n2(h))
        if self.style == "rope":
            x = x + g1 * self.attn(self.n1(x), rope=_interleaved_rope)
            return x + g2 * self.mlp(self.n2(x))
        x = x + g1 * self.attn(self.n1(x))
        return x + g2 * self.mlp(self.n2(x))


class _Model(nn.Module):
    def __init__(self, style, d=16, depth=2):
        super().__init__()
        self.style = style
        self.embed = nn.Linear(6, d)
        self.t = nn.Linear(d, d)
        self.blocks = nn.ModuleList(_Block(d, style) for _ in range(depth))
        self.head = nn.Linear(d, 6)

    def forward(self, x, t):
        h = self.embed(x)
        proj = _temb(t, self.t.in_features)
        if self.style == "type_as":  # Cosmos: the timestep projection takes the dtype of the hidden stream
            proj = proj.type_as(h)
        c = self.t(proj)
        if self.style == "folded":  # Latte: frames folded into the batch dim inside the blocks
            b, f, n, d = h.shape
            h = h.reshape(b * f, n, d)
            c = c.repeat_interleave(f, 0)
        for blk in self.blocks:
            h = blk(h, c)
        if self.style == "folded":
            h = h.reshape(b, f, n, -1)
        return self.head(h)


def _inputs(style, batch, t, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 2, 5, 6) if style == "folded" else (batch, 5, 6)
    return torch.randn(*shape, generator=g), torch.full((batch,), float(t))


def _build(style):
    torch.manual_seed(0)
    return _Model(style).eval()


def _sites(model, style):
    return lazypass.report(model, *_inputs(style, 2, 900, 0), print_table=False)


@pytest.mark.parametrize(
    "style, kinds",
    [
        ("plain", ["attn", "ffn"] * 2),
        ("linear_attn", ["attn", "ffn"] * 2),  # relu-kernel attention mixes tokens: attn, not ffn
        ("cast", ["attn", "ffn"] * 2),
        ("aura", ["attn", "ffn"] * 2),
        ("rope", ["attn", "ffn"] * 2),
        ("type_as", ["attn", "ffn"] * 2),
        ("folded", ["attn", "ffn"] * 2),
    ],
)
def test_sites_parity_and_reuse(style, kinds):
    model = _build(style)
    ref = copy.deepcopy(model)
    lazypass.apply(model)
    sites = _sites(model, style)
    assert [s.kind for s in sites] == kinds
    prog = next(iter(runtime(model).programs.values()))
    assert sum(s.macs for s in sites) / prog.model_macs > 0.8  # the blocks are nearly all the compute

    lazypass.set_threshold(model, 1.5)
    with lazypass.trajectory(model), torch.no_grad():
        for k, t in enumerate((900, 600)):
            x = _inputs(style, 2, t, k)
            assert (model(*x) - ref(*x)).abs().max() <= 1e-5

    lazypass.set_threshold(model, -0.5)
    with lazypass.trajectory(model), torch.no_grad():
        model(*_inputs(style, 2, 900, 0))
        x = _inputs(style, 2, 600, 1)
        second = model(*x)
        st = lazypass.stats(model)
    assert st.saved[1].all() and not st.saved[0].any()
    assert (second - ref(*x)).abs().max() > 1e-3


def test_linear_attention_has_no_softmax_but_is_attention():
    model = lazypass.apply(_build("linear_attn"))
    _sites(model, "linear_attn")
    core = next(iter(runtime(model).programs.values())).core
    targets = [n.target for m in core.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]
    assert torch.ops.aten._softmax.default not in targets and torch.ops.aten.softmax.int not in targets
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets


def test_folded_batch_gates_per_sample():
    """Rows (B * frames) share their sample's decision: batch results equal batch-of-one results."""
    model = lazypass.apply(_build("folded"), granularity="site")  # per-site random gates: mixed rows
    _sites(model, "folded")
    random_gates(model, seed=3, std=0.5)
    outs = []
    with lazypass.trajectory(model), torch.no_grad():
        for k, t in enumerate((900, 600, 300)):
            outs.append(model(*_inputs("folded", 3, t, k)))
        st = lazypass.stats(model)
    assert st.skipped.shape[1:] == (4, 3)  # per site, per *sample* (not per row)
    assert (st.skipped.any(axis=2) & ~st.skipped.all(axis=2)).any(), "no mixed batch; pick another seed"
    for i in range(3):
        with lazypass.trajectory(model), torch.no_grad():
            for k, t in enumerate((900, 600, 300)):
                x, tt = _inputs("folded", 3, t, k)
                single = model(x[i : i + 1], tt[i : i + 1])
                assert_batch_close(single, outs[k][i : i + 1])


class _InputBranch(nn.Module):
    """StableAudio: the first residual branch reads nothing but a graph input."""

    def __init__(self, d=6):
        super().__init__()
        self.mlp = _Mlp(d)

    def forward(self, x, t):
        return (x + self.mlp(x)) * torch.cos(t)[:, None, None]


def test_site_reading_only_graph_inputs():
    model = _InputBranch().eval()
    ref = copy.deepcopy(model)
    lazypass.apply(model)
    x = torch.randn(2, 5, 6)
    sites = lazypass.report(model, x, torch.full((2,), 0.9), print_table=False)
    assert [s.kind for s in sites] == ["ffn"]
    lazypass.set_threshold(model, 1.5)
    with torch.no_grad():
        assert (model(x, torch.full((2,), 0.9)) - ref(x, torch.full((2,), 0.9))).abs().max() <= 1e-6
