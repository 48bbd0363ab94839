"""DDIM over rows that may sit at different timesteps, and classifier-free guidance batching."""

from __future__ import annotations

import torch
from torch import Tensor

from lazypass.fitting.source import cat
from lazypass.sampling import ALPHAS_CUMPROD


def guided_inputs(x: Tensor, t: Tensor, cond, null, guided: bool):
    """The model's inputs: as given, or with guidance ``cat([x, x])``, ``cat([t, t])``, ``cat([cond, null])``."""
    if not guided:
        return x, t, cond
    return torch.cat([x, x]), torch.cat([t, t]), cat(cond, null)


def guide(out: Tensor, guided: bool, scale: float) -> Tensor:
    """``uncond + scale * (cond - uncond)`` of a guided batch (conditional rows first)."""
    if not guided:
        return out
    c, u = out.chunk(2)
    return u + scale * (c - u)


def ddim_rows(x: Tensor, eps: Tensor, t: Tensor, ratio: int) -> Tensor:
    """Per-row DDIM (eta 0) from timesteps ``t`` (B,) to ``t - ratio`` (to x0 below 0)."""
    abar = ALPHAS_CUMPROD.to(x.device)
    a_t = abar[t]
    prev = t - ratio
    a_p = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones_like(a_t))
    shape = (-1,) + (1,) * (x.dim() - 1)
    a_t, a_p = a_t.reshape(shape), a_p.reshape(shape)
    x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    return (a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps.double()).to(x.dtype)
