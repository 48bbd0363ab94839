"""Deterministic DDIM sampling (eta = 0) over any eps-predicting callable.

Noise schedule: DiT's linear schedule, 1000 training steps, beta from 1e-4 to 0.02.
Timesteps: diffusers ``DDIMScheduler`` "leading" spacing with ``steps_offset=0`` and
``set_alpha_to_one=True``, so 10 steps visit 900, 800, ..., 0 and the last step lands on the
predicted clean sample. (The official DiT sampler respaces the schedule instead, 0, 111, ...,
999 for 10 steps; we follow diffusers because that is what pipelines users run.)

Classifier-free guidance is applied to eps only: with learned sigma, the extra variance
channels are dropped, which is harmless since DDIM with eta = 0 never uses a variance. The
official DiT code likewise guides only the eps channels (and, in some revisions, only the
first three of them, for reproducibility of its paper numbers); here all eps channels are
guided.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "ALPHAS_CUMPROD",
    "add_noise",
    "alphas_cumprod",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
]

ModelFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
Callback = Callable[[int, int, Tensor], None]


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Cumulative products of ``1 - beta`` for the linear schedule, float64, shape (T,).

    Example:
        >>> abar = alphas_cumprod()
        >>> abar.shape, round(abar[0].item(), 6)
        (torch.Size([1000]), 0.9999)
    """
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


ALPHAS_CUMPROD: Tensor = alphas_cumprod()
"""The DiT schedule's alpha-bar (float64, 1000 entries). Do not modify in place."""


def ddim_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced descending timesteps ("leading" spacing, offset 0).

    Example:
        >>> ddim_timesteps(10)
        [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {num_inference_steps}")
    ratio = num_train_timesteps // num_inference_steps
    return [i * ratio for i in reversed(range(num_inference_steps))]


def add_noise(x0: Tensor, noise: Tensor, t: Tensor | int, abar: Tensor = ALPHAS_CUMPROD) -> Tensor:
    """Forward diffusion ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise``.

    ``t`` is an int or a (B,) integer tensor (one timestep per sample). Used for the
    noise-prediction loss.

    Example:
        >>> x0, noise = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
        >>> add_noise(x0, noise, torch.tensor([0, 999]))[:, 0, 0, 0]
        tensor([0.9999, 0.0064])
    """
    a = abar.to(x0.device)[torch.as_tensor(t, device=x0.device)]
    a = a.reshape(a.shape + (1,) * (x0.dim() - a.dim())).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_step(x: Tensor, eps: Tensor, t: int, t_prev: int, abar: Tensor = ALPHAS_CUMPROD) -> Tensor:
    """One deterministic DDIM update from timestep ``t`` to ``t_prev`` (``t_prev < 0``: to x0).

    Example:
        >>> x = torch.ones(1, 4, 2, 2)
        >>> ddim_step(x, torch.zeros_like(x), 999, -1)[0, 0, 0, 0] > 100  # x0 = x / sqrt(abar_999)
        tensor(True)
    """
    a_t = abar[t].item()
    a_prev = abar[t_prev].item() if t_prev >= 0 else 1.0
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    noise: Tensor,
    num_inference_steps: int,
    cond: Tensor | None = None,
    guidance_scale: float = 1.0,
    null_cond: Tensor | None = None,
    learned_sigma: bool = True,
    split_cfg: bool = False,
    progress: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """Sample with DDIM (eta = 0) from ``noise`` (B, C, ...); returns the final x0 estimate.

    Args:
        model_fn: ``model_fn(x, t, cond) -> out`` with ``t`` a LongTensor of shape (B',) for
            the B' rows of that call. ``out[:, :C]`` is eps; with ``learned_sigma=False`` the
            output must have exactly C channels.
        noise: initial x_T.
        num_inference_steps: number of model evaluations (per guidance branch).
        cond: conditioning passed through to ``model_fn`` (e.g. class labels (B,)), or None.
        guidance_scale: classifier-free guidance scale ``s``; 1 disables guidance.
            Otherwise ``eps = eps_uncond + s * (eps_cond - eps_uncond)``.
        null_cond: unconditional conditioning (e.g. the null class); anything that broadcasts
            to ``cond``'s shape. Required when ``guidance_scale != 1``.
        learned_sigma: the model outputs eps and variance channels; keep the first C.
        split_cfg: with guidance, call the model twice per step (conditional rows, then
            unconditional rows, same timestep) instead of once on ``cat([x, x])`` with
            ``cat([cond, null_cond])``. Caches must cope with both patterns.
        progress: show a tqdm bar.
        callback: ``callback(step_index, t, x)`` after each step, with the updated x.

    Runs under ``torch.no_grad()``; fully deterministic.

    Example:
        >>> from lazypass.models import tiny_dit
        >>> model = tiny_dit()
        >>> x = ddim_sample(model, torch.randn(2, 4, 8, 8), 10, cond=torch.tensor([1, 2]),
        ...                 guidance_scale=4.0, null_cond=torch.tensor(model.num_classes))
        >>> x.shape
        torch.Size([2, 4, 8, 8])
    """
    guided = guidance_scale != 1.0
    if guided:
        if cond is None or null_cond is None:
            raise ValueError("guidance_scale != 1 needs both cond and null_cond")
        null_cond = torch.as_tensor(null_cond, device=cond.device).to(cond.dtype).expand_as(cond)
        if not split_cfg:
            batched_cond = torch.cat([cond, null_cond])

    channels = noise.shape[1]

    def eps_of(out: Tensor) -> Tensor:
        if not learned_sigma and out.shape[1] != channels:
            raise ValueError(f"model output has {out.shape[1]} channels, expected {channels} (learned_sigma=False)")
        return out[:, :channels]

    def timestep(t: int, rows: int) -> Tensor:
        return torch.full((rows,), t, dtype=torch.long, device=noise.device)

    timesteps = ddim_timesteps(num_inference_steps)
    ratio = len(ALPHAS_CUMPROD) // num_inference_steps
    steps = enumerate(timesteps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=len(timesteps), desc="DDIM")

    x = noise
    b = x.shape[0]
    for i, t in steps:
        if not guided:
            eps = eps_of(model_fn(x, timestep(t, b), cond))
        elif split_cfg:
            eps_c = eps_of(model_fn(x, timestep(t, b), cond))
            eps_u = eps_of(model_fn(x, timestep(t, b), null_cond))
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps_c, eps_u = eps_of(model_fn(torch.cat([x, x]), timestep(t, 2 * b), batched_cond)).chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = ddim_step(x, eps, t, t - ratio)
        if callback is not None:
            callback(i, t, x)
    return x
