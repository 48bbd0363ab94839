"""Batches from the user's ``sample_fn``, checked once, and pytree helpers over conditioning."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

KEYS = frozenset({"noise", "cond", "null_cond", "x0"})


class BatchSource:
    """``sample_fn(i)`` checked and cached (the two most recent batches).

    Every batch must be a dict with keys among ``KEYS`` and the same batch size; ``"noise"``
    (self-distillation) or ``"x0"`` (diffusion loss) is required; with guidance
    ``"null_cond"`` is too, and a 0-d null class id is expanded to the batch.
    ``next_index`` is one past the highest batch used so far.
    """

    def __init__(self, sample_fn: Callable[[int], dict], loss: str, guided: bool, world: int = 1, rank: int = 0):
        self.sample_fn, self.loss, self.guided = sample_fn, loss, guided
        self.world, self.rank = world, rank
        self.size: int | None = None
        self.next_index = 0
        self._cache: dict[int, dict] = {}

    @property
    def main_key(self) -> str:
        return "noise" if self.loss == "distill" else "x0"

    def batch(self, i: int) -> dict:
        b = self.peek(i)
        self.next_index = max(self.next_index, i + 1)
        return b

    def peek(self, i: int) -> dict:
        """Batch ``i``, checked, without counting it as used."""
        if i in self._cache:
            return self._cache[i]
        b = self._check(i, self.sample_fn(i))
        self._cache = {k: v for k, v in self._cache.items() if k >= i - 1}
        self._cache[i] = b
        return b

    def _check(self, i: int, b) -> dict:
        if isinstance(b, Tensor):
            b = {"noise": b}
        if not isinstance(b, dict):
            raise TypeError(f"sample_fn({i}) must return a dict with keys among {sorted(KEYS)}, got {type(b).__name__}")
        b = dict(b)
        unknown = set(b) - KEYS
        if unknown:
            raise ValueError(f"sample_fn({i}) returned unknown keys {sorted(unknown)}; known keys are {sorted(KEYS)}")
        main = self.main_key
        if not isinstance(b.get(main), Tensor) or b[main].dim() < 2:
            raise ValueError(f'loss="{self.loss}" needs sample_fn to return "{main}" (a tensor of shape (B, C, ...))')
        size = b[main].shape[0]
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise ValueError(
                f"sample_fn({i}) returned a batch of {size}, earlier batches had {self.size}; keep the batch size fixed"
            )
        cond = b.get("cond")
        for leaf in pytree.tree_leaves(cond):
            if isinstance(leaf, Tensor) and (leaf.dim() == 0 or leaf.shape[0] != size):
                raise ValueError(f"sample_fn({i}): every conditioning tensor needs the batch ({size}) as first dim")
        if self.guided and "null_cond" not in b:
            raise ValueError('guidance_scale != 1 needs sample_fn to return "null_cond" (e.g. the null class id)')
        if "null_cond" in b:  # a 0-d null class id is allowed: give it the batch dim
            b["null_cond"] = expand_like(b["null_cond"], cond)
        return b


def expand_like(null, cond):
    """``null`` broadcast to the structure and shapes of ``cond``."""
    if isinstance(cond, Tensor):
        return torch.as_tensor(null, device=cond.device).to(cond.dtype).expand_as(cond)
    if isinstance(cond, dict):
        if not isinstance(null, dict) or set(null) != set(cond):
            raise ValueError("null_cond must be a dict with the same keys as cond")
        return {k: expand_like(null[k], v) for k, v in cond.items()}
    return null


def cat(a, b):
    """``a`` and ``b`` concatenated along the batch, leaf by leaf (non-tensors from ``a``)."""
    return pytree.tree_map(lambda u, v: torch.cat([u, v]) if isinstance(u, Tensor) else u, a, b)


def put(dst, src, rows: Tensor):
    """``dst[rows] = src[rows]`` leaf by leaf, returning new tensors."""

    def one(d, s):
        if not isinstance(d, Tensor):
            return d
        d = d.clone()
        d[rows] = s[rows].to(d.dtype)
        return d

    return pytree.tree_map(one, dst, src)
