"""Tiny seeded transformers of five architectures, shared by the tests.

Each ``Arch`` builds a model and its inputs for a batch size and timestep, names the
modules whose outputs are the branch outputs ``F(Z)`` (for independent references made
with forward hooks), and lists the site kinds lazypass must find.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lazypass.models import tiny_dit


# The project's batch tolerance: a sample's result must not depend on the rest of its batch, but
# CPU kernels round differently for different batch sizes (and thread counts), and sampling
# magnifies model outputs (x0 = x_t / sqrt(abar)); so relative as well as absolute.
BATCH_TOL = 1e-5


def assert_batch_close(actual, expected, tol: float = BATCH_TOL) -> None:
    """Results of a batch and of its parts (one at a time, split CFG, shards) agree to ``tol``."""
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# seeds whose random gates mix skipping and computing on these archs under the default
# granularity="step" (only the first site's gate decides; seed 1 never skips there)
MIXED_GATE_SEED = {"diffusers_dit": 2, "sd3": 2}


def random_gates(model: nn.Module, seed: int = 1, std: float = 0.5) -> None:
    """Seeded random gate values, so that decisions differ between samples and steps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lazy_gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def nonzero(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Zero-initialised layers (adaLN-Zero) would make every branch a no-op: give every all-zero
    parameter small seeded random values. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@dataclass
class Arch:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int, int], tuple[tuple, dict]]  # (batch, timestep, seed) -> args, kwargs
    branches: list[str]  # module names whose outputs are the branch outputs, in site order
    kinds: list[str]
    output: Callable = lambda out: out[0] if isinstance(out, (tuple, list)) else out


def _ref_dit():
    return nonzero(tiny_dit(seed=0), 0)


def _ref_dit_inputs(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.full((b,), t), torch.randint(0, 10, (b,), generator=g)), {}


def diffusers_dit(seed: int = 0, classes: int = 10):
    """A 2-block DiTTransformer2DModel on 8x8x4 latents (also the transformer of tests/pipelines.py)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=classes, norm_num_groups=1,
    )
    return nonzero(m, seed)


def _diffusers_dit_inputs(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    return (), dict(
        hidden_states=torch.randn(b, 4, 8, 8, generator=g), timestep=torch.full((b,), t),
        class_labels=torch.randint(0, 10, (b,), generator=g), return_dict=False,
    )


def pixart(seed: int = 0):
    """A 2-block PixArtTransformer2DModel on 8x8x4 latents, 24-d captions (also in tests/pipelines.py)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=24,
        use_additional_conditions=False,
    )
    return nonzero(m, seed)


def _pixart_inputs(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    return (), dict(
        hidden_states=torch.randn(b, 4, 8, 8, generator=g), timestep=torch.full((b,), t),
        encoder_hidden_states=torch.randn(b, 5, 24, generator=g), return_dict=False,
    )


def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16,
    )
    return nonzero(m, 0)


def _sd3_inputs(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    return (), dict(
        hidden_states=torch.randn(b, 4, 8, 8, generator=g), timestep=torch.full((b,), t),
        encoder_hidden_states=torch.randn(b, 5, 16, generator=g),
        pooled_projections=torch.randn(b, 12, generator=g), return_dict=False,
    )


class _HandAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # written out by hand (matmul-softmax-matmul), not sdpa
        w = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((w @ v).transpose(1, 2).reshape(b, n, d))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _HandAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A plain pre-norm ViT: no timestep, no modulation."""

    def __init__(self, dim: int = 16, depth: int = 2, heads: int = 2):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.blocks = nn.ModuleList(_ViTBlock(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _vit():
    torch.manual_seed(0)
    return TinyViT().eval()


def _vit_inputs(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 10, 12, generator=g),), {}


ARCHS = {
    "ref_dit": Arch(
        "ref_dit", _ref_dit, _ref_dit_inputs,
        ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"], ["attn", "ffn"] * 2,
    ),
    "diffusers_dit": Arch(
        "diffusers_dit", diffusers_dit, _diffusers_dit_inputs,
        [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "ff")], ["attn", "ffn"] * 2,
    ),
    "pixart": Arch(
        "pixart", pixart, _pixart_inputs,
        [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "attn2", "ff")],
        ["attn", "attn", "ffn"] * 2,
    ),
    "sd3": Arch(
        "sd3", _sd3, _sd3_inputs,
        ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
         "transformer_blocks.1.attn", "transformer_blocks.1.ff"],
        ["attn", "ffn", "ffn", "attn", "ffn"],
    ),
    "vit": Arch(
        "vit", _vit, _vit_inputs,
        [f"blocks.{i}.{m}" for i in range(2) for m in ("attn", "mlp")], ["attn", "ffn"] * 2,
    ),
}

# The smallest lazy DiT (one block, two sites), for tests that run the real Inductor by default:
# Inductor's code generation, not the model, takes the time there.
ONE_BLOCK_DIT = Arch(
    "one_block_dit", lambda: nonzero(tiny_dit(seed=0, depth=1), 0), _ref_dit_inputs,
    ["blocks.0.attn", "blocks.0.mlp"], ["attn", "ffn"],
)
