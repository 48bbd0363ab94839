"""Reference DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023).

The architecture follows facebookresearch/DiT ``models.py``: patchify, fixed 2D sin-cos
positions, timestep and class embeddings summed into a conditioning vector ``c``, a stack of
adaLN-Zero blocks, an adaLN final layer and unpatchify. Module names match the official ones
(``x_embedder.proj``, ``blocks.i.attn.qkv``, ``blocks.i.adaLN_modulation.1``, ...) so an
official checkpoint loads with ``load_state_dict``; its ``pos_embed`` entry is ignored because
here the positional table is a non-persistent buffer recomputed at construction.

Two deliberate differences from the official code:

- attention calls ``F.scaled_dot_product_attention`` directly (no timm dependency);
- the label table always has the extra null class (row ``num_classes``) used by
  classifier-free guidance, whatever ``class_dropout_prob`` is.

Example:
    >>> import torch
    >>> from lazypass.models import build_dit
    >>> model = build_dit("DiT-S/8", input_size=16, num_classes=10).eval()
    >>> out = model(torch.randn(2, 4, 16, 16), torch.tensor([999, 10]), torch.tensor([3, 10]))
    >>> tuple(out.shape)
    (2, 8, 16, 16)
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DIT_CONFIGS",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "LabelEmbedder",
    "PatchEmbed",
    "TimestepEmbedder",
    "build_dit",
    "dit_config",
    "sincos_pos_embed_2d",
    "tiny_dit",
]

Init = Literal["official", "random"]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of tokens ``x`` (B, T, D) by per-sample ``shift``/``scale`` (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2D sin-cos table of shape (grid_size**2, dim), as in MAE / DiT.

    The first half of the channels encodes the column index, the second half the row index
    (the official code builds its meshgrid with w first); within each half, sines come before
    cosines. Computed in float64 and returned as float32.

    Example:
        >>> sincos_pos_embed_2d(8, 2).shape
        torch.Size([4, 8])
    """
    if dim % 4:
        raise ValueError(f"positional embedding dim must be divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: Tensor) -> Tensor:
        angles = p.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping ``patch x patch`` patches and project each to ``dim``."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of (possibly fractional) timesteps followed by a SiLU MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def frequencies(self, t: Tensor) -> Tensor:
        """(B,) timesteps -> (B, frequency_dim) features, cosines first (GLIDE / DiT order)."""
        half = self.frequency_dim // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        angles = t.float()[:, None] * freqs[None]
        emb = torch.cat([angles.cos(), angles.sin()], dim=-1)
        if self.frequency_dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: Tensor) -> Tensor:
        # frequencies in fp32, the MLP in the model's dtype (an fp16 model takes fp32 features otherwise)
        return self.mlp(self.frequencies(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label table with one extra "null" row (index ``num_classes``) for CFG.

    In training mode labels are replaced by the null class with probability
    ``dropout_prob``; ``force_drop_ids`` (1 = drop) makes that choice explicit and applies in
    any mode. In eval mode without ``force_drop_ids`` the labels are used as given, so pass
    ``num_classes`` yourself for the unconditional half of a guided batch.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is not None:
            drop = force_drop_ids == 1
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            return self.embedding_table(labels)
        return self.embedding_table(torch.where(drop, self.num_classes, labels))


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv projection, SDPA, output projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: two gated residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on the last hidden state, then a linear map to patch pixels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer (official DiT architecture).

    Args:
        input_size: latent height = width.
        patch_size: patch side; tokens = (input_size / patch_size) ** 2.
        in_channels: latent channels.
        hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP ratio.
        class_dropout_prob: label-drop probability in training (classifier-free guidance).
        num_classes: number of real classes; label ``num_classes`` is the null class.
        learn_sigma: predict a variance too, so ``out_channels = 2 * in_channels``
            (the first ``in_channels`` output channels are eps).
        init: ``"official"`` reproduces the official initialisation, in which every adaLN
            modulation and the final linear layer are zero, so a fresh model outputs exactly
            zero and every block is the identity (all gates are 0). ``"random"`` gives those
            layers N(0, 0.02) weights and biases instead, so that an untrained model has
            non-zero gates, non-trivial branch outputs and a non-zero prediction; tests of
            branch matching, caching and skipping need that, since with zero gates skipping a
            branch cannot change the result.

    ``forward(x, t, y)`` takes latents (B, C, H, W), timesteps (B,) and labels (B,) and
    returns (B, out_channels, H, W). Classifier-free guidance is left to the sampler.

    Example:
        >>> model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
        ...             num_classes=10, init="random").eval()
        >>> model(torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 9, 10])).shape
        torch.Size([3, 8, 8, 8])
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        init: Init = "official",
    ) -> None:
        super().__init__()
        if init not in ("official", "random"):
            raise ValueError(f"init must be 'official' or 'random', got {init!r}")
        self.config: dict[str, Any] = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels,
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob, num_classes=num_classes,
            learn_sigma=learn_sigma,
        )  # fmt: skip
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        pos = sincos_pos_embed_2d(hidden_size, self.x_embedder.grid_size).unsqueeze(0)
        self.register_buffer("pos_embed", pos, persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # Official checkpoints store the (fixed) positional table as a parameter; drop it.
        self._register_load_state_dict_pre_hook(_drop_pos_embed)
        self.initialize_weights(init)

    def initialize_weights(self, init: Init = "official") -> None:
        """(Re)initialise all parameters; see the class docstring for ``init``."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Patch projection initialised like a linear layer over the flattened patch.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        zero_init = [b.adaLN_modulation[-1] for b in self.blocks]
        zero_init += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zero_init:
            if init == "official":
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            else:
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.normal_(layer.bias, std=0.02)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p*p*C) patch tokens -> (B, C, H, W) image."""
        p, c = self.patch_size, self.out_channels
        h = w = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Predict (eps[, sigma]) for latents ``x`` (B, C, H, W) at timesteps ``t`` (B,) with labels ``y`` (B,)."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def _drop_pos_embed(state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
    state_dict.pop(prefix + "pos_embed", None)


DIT_CONFIGS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in {
        "S": (12, 384, 6),
        "B": (12, 768, 12),
        "L": (24, 1024, 16),
        "XL": (28, 1152, 16),
    }.items()
    for patch in (2, 4, 8)
}
"""Official model sizes: depth, hidden size, heads, patch size (Peebles & Xie, table 1)."""


def dit_config(name: str) -> dict[str, int]:
    """Architecture numbers of an official DiT size, e.g. ``"DiT-XL/2"``.

    Example:
        >>> dit_config("DiT-S/2")
        {'depth': 12, 'hidden_size': 384, 'num_heads': 6, 'patch_size': 2}
    """
    try:
        return dict(DIT_CONFIGS[name])
    except KeyError:
        raise ValueError(f"unknown DiT config {name!r}; known: {sorted(DIT_CONFIGS)}") from None


def build_dit(
    name: str,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    init: Init = "official",
    **overrides: Any,
) -> DiT:
    """Build an official-size DiT; ``overrides`` replace any other :class:`DiT` argument.

    The defaults are those of the ImageNet 256x256 models (32x32x4 VAE latents, 1000 classes).

    Example:
        >>> model = build_dit("DiT-S/2")
        >>> round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        32.9
    """
    kwargs = dict(dit_config(name), input_size=input_size, in_channels=in_channels,
                  num_classes=num_classes, learn_sigma=learn_sigma, init=init)  # fmt: skip
    kwargs.update(overrides)
    return DiT(**kwargs)


def tiny_dit(seed: int = 0, **overrides: Any) -> DiT:
    """A very small, seeded, randomly initialised DiT for tests (eval mode).

    Defaults: 8x8x4 input, patch 2 (16 tokens), hidden 32, depth 2, 2 heads, 10 classes,
    ``learn_sigma=True``, ``init="random"``. The global RNG state is left untouched, and
    the same seed and overrides always give the same weights.

    Example:
        >>> model = tiny_dit()
        >>> model(torch.randn(2, 4, 8, 8), torch.tensor([10, 20]), torch.tensor([1, 10])).shape
        torch.Size([2, 8, 8, 8])
    """
    kwargs: dict[str, Any] = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32,
                                  depth=2, num_heads=2, num_classes=10, init="random")  # fmt: skip
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiT(**kwargs)
    return model.eval()
