"""``lazypass.fit_pipeline``: fit the gates of ``pipe.transformer`` the way the pipeline samples.

Each supported pipeline family gets a small adapter that reproduces what its ``__call__``
does around the transformer: the conditioning (``encode_prompt``, or class labels), the
latents (``prepare_latents`` with one generator per row, so a row's noise is what
``pipe(..., generator=...)`` draws), the scheduler (a copy, with the same
``set_timesteps`` arguments), the guidance batch (order of the conditional and
unconditional halves, as the pipeline concatenates them) and the transformer's extra
arguments (PixArt's ``added_cond_kwargs``, SD3/Flux ``pooled_projections``, Flux
``txt_ids``/``img_ids``/``guidance`` and its timestep in [0, 1]). ``lazypass.fit`` then
trains on those trajectories and calibrates the threshold with lazy runs of the same loop.

Supported: ``DiTPipeline``, ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline`` (and their subclasses). Not reproduced:
PixArt's resolution binning (pass the ``height``/``width`` you sample at), SD3's
skip-layer guidance, Flux's true CFG (``true_cfg_scale`` with a negative prompt: two
transformer calls per step).
"""

from __future__ import annotations

import copy
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lazypass.fitting.api import FitResult, fit
from lazypass.fitting.dist import world_and_rank
from lazypass.runtime import runtime

__all__ = ["PipelinePlan", "fit_pipeline", "plan_pipeline"]


@dataclass
class PipelinePlan:
    """What ``fit`` needs to sample like the pipeline.

    ``sample_fn``, ``call``, ``scheduler``, ``set_timesteps_kwargs`` and ``guidance_scale``
    go to :func:`lazypass.fit`; ``prompts(i)`` and ``generators(i)`` are the prompts (or
    class labels) and per-row generators of batch ``i``, so ``pipe(prompts(i),
    generator=generators(i), ...)`` samples exactly that batch.
    """

    sample_fn: Callable[[int], dict]
    call: Callable
    scheduler: Any
    set_timesteps_kwargs: dict
    guidance_scale: float
    prompts: Callable[[int], list]
    generators: Callable[[int], list]


def fit_pipeline(
    pipe,
    prompts: Sequence,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    target_ratio: float | None = None,
    steps: int = 500,
    batch_size: int | None = None,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
    seed: int = 0,
    **options,
) -> FitResult:
    """Fit the gates of ``pipe.transformer`` (already lazy) on the pipeline's own sampling.

    Args:
        pipe: a ``DiTPipeline``, ``PixArtAlphaPipeline``/``PixArtSigmaPipeline``,
            ``StableDiffusion3Pipeline`` or ``FluxPipeline`` whose transformer went through
            ``lazypass.apply``.
        prompts: the prompts to fit on (class ids or label names for ``DiTPipeline``),
            taken in turn, ``batch_size`` per batch; more prompts than batches give
            calibration batches the training never saw.
        num_inference_steps: the pipeline's steps the gates are fitted (and calibrated) for.
        guidance_scale: as given to ``pipe(...)``; default the pipeline's own default. CFG
            pipelines batch ``[cond, uncond]`` or ``[uncond, cond]`` as they do when it is
            above 1; for Flux it is the distilled guidance embedding.
        target_ratio: wanted lazy ratio of ``pipe(...)`` at ``num_inference_steps``.
        steps: optimiser steps.
        batch_size: prompts per batch (default ``min(len(prompts), 8)``), before CFG doubles it.
        negative_prompt: the unconditional prompt of CFG (default ``""``, as the pipelines).
        height, width: image size, default the pipeline's default.
        max_sequence_length: text length of ``encode_prompt`` (the pipeline's default if None);
            use the value you pass to ``pipe(...)``.
        seed: seeds the noise (one generator per row, see :func:`plan_pipeline`).
        options: other :func:`lazypass.fit` options (``lr``, ``rho``, ``calibration_batches``, ...).

    After it, ``pipe(...)`` samples lazily with the fitted gates and calibrated threshold.

    Example:
        >>> import lazypass                                                   # doctest: +SKIP
        >>> pipe.transformer = lazypass.apply(pipe.transformer)               # doctest: +SKIP
        >>> lazypass.fit_pipeline(pipe, prompts, num_inference_steps=20, target_ratio=0.4)  # doctest: +SKIP
    """
    reserved = {"scheduler", "set_timesteps_kwargs", "guidance_scale", "call", "loss"} & set(options)
    if reserved:
        raise TypeError(f"fit_pipeline takes {sorted(reserved)} from the pipeline; pass them to lazypass.fit instead")
    plan = plan_pipeline(
        pipe, prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        batch_size=batch_size, negative_prompt=negative_prompt, height=height, width=width,
        max_sequence_length=max_sequence_length, seed=seed,
    )
    return fit(
        pipe.transformer, plan.sample_fn, call=plan.call, scheduler=plan.scheduler,
        set_timesteps_kwargs=plan.set_timesteps_kwargs, guidance_scale=plan.guidance_scale,
        num_inference_steps=num_inference_steps, target_ratio=target_ratio, steps=steps, **options,
    )


def plan_pipeline(
    pipe,
    prompts: Sequence,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    batch_size: int | None = None,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
    seed: int = 0,
) -> PipelinePlan:
    """How to sample like ``pipe``: the ``sample_fn``, ``call`` and scheduler that ``fit`` takes.

    Row ``r`` of batch ``i`` (on process ``rank`` of ``world``) is global row
    ``g = (i * world + rank) * B + r``: prompt ``prompts[g % len(prompts)]`` and noise from
    ``torch.Generator().manual_seed(seed * 1_000_003 + g)``.
    """
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise TypeError(f"{type(pipe).__name__} has no transformer; fit_pipeline fits pipe.transformer")
    try:
        runtime(transformer)
    except ValueError:
        raise ValueError(
            f"pipe.transformer ({type(transformer).__name__}) is not lazy: run "
            "pipe.transformer = lazypass.apply(pipe.transformer) first"
        ) from None
    adapter = _adapter(pipe)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    B = batch_size or min(len(prompts), 8)
    if not isinstance(B, int) or B < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if guidance_scale is None:
        guidance_scale = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
    world, rank = world_and_rank(transformer)
    setup = adapter(pipe, guidance_scale, negative_prompt, height, width, max_sequence_length)

    def rows(i: int) -> list[int]:
        return [(i * world + rank) * B + r for r in range(B)]

    def batch_prompts(i: int) -> list:
        return [prompts[g % len(prompts)] for g in rows(i)]

    def generators(i: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed * 1_000_003 + g) for g in rows(i)]

    def sample_fn(i: int) -> dict:
        with torch.no_grad():
            cond, null = setup.encode(batch_prompts(i))
            batch = {"noise": setup.noise(B, generators(i)), "cond": cond}
        if setup.cfg != 1.0:
            batch["null_cond"] = null
        return batch

    return PipelinePlan(
        sample_fn=sample_fn, call=setup.call, scheduler=copy.deepcopy(pipe.scheduler),
        set_timesteps_kwargs=setup.timesteps_kwargs(num_inference_steps), guidance_scale=setup.cfg,
        prompts=batch_prompts, generators=generators,
    )


# -- adapters: what each pipeline's __call__ does around the transformer ---------------------------


class _Adapter:
    """One pipeline family. ``cfg``: the guidance fit applies (1: none); ``uncond_first``: CFG batch order."""

    uncond_first = False

    def __init__(self, pipe, guidance_scale, negative_prompt, height, width, max_sequence_length):
        self.pipe, self.tr = pipe, pipe.transformer
        self.guidance_scale = float(guidance_scale)
        self.cfg = self.guidance_scale if self.guidance_scale > 1 else 1.0  # pipelines guide when > 1
        self.negative = negative_prompt
        self.device, self.dtype = pipe._execution_device, self.tr.dtype
        self.height, self.width, self.max_sequence_length = height, width, max_sequence_length

    @property
    def guided(self) -> bool:
        return self.cfg != 1.0

    def encode(self, prompts: list) -> tuple[dict, dict | None]:
        raise NotImplementedError

    def noise(self, batch: int, generators: list) -> Tensor:
        raise NotImplementedError

    def timesteps_kwargs(self, steps: int) -> dict:
        return {}

    def forward(self, model: nn.Module, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        raise NotImplementedError

    def call(self, model: nn.Module, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        """fit's ``call``: fit batches ``[cond, uncond]``; swap to the pipeline's order and back."""
        if not (self.guided and self.uncond_first):
            return self.forward(model, x, t, cond)
        swap = _swap_halves
        return swap(self.forward(model, x, t, {k: swap(v) for k, v in cond.items()}))

    def _size(self) -> tuple[int, int]:
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return self.height or default, self.width or default

    def _text_kwargs(self) -> dict:
        return {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}


def _swap_halves(v):
    if not isinstance(v, Tensor):
        return v
    a, b = v.chunk(2)
    return torch.cat([b, a])


class _DiT(_Adapter):
    """DiTPipeline: class labels, null class 1000, ``[cond, uncond]``, learned sigma (fit keeps the first C channels)."""

    def encode(self, prompts):
        labels = [self.pipe.get_label_ids([p])[0] if isinstance(p, str) else int(p) for p in prompts]
        labels = torch.tensor(labels, device=self.device).reshape(-1)
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels, 1000)}

    def noise(self, batch, generators):
        from diffusers.utils.torch_utils import randn_tensor

        size, channels = self.tr.config.sample_size, self.tr.config.in_channels
        return randn_tensor((batch, channels, size, size), generator=generators, device=self.device, dtype=self.dtype)

    def forward(self, model, x, t, cond):
        return model(x, timestep=t, class_labels=cond["class_labels"]).sample


class _PixArt(_Adapter):
    """PixArt-alpha/sigma: T5 embeddings and mask, ``[uncond, cond]``, ``added_cond_kwargs``."""

    uncond_first = True

    def encode(self, prompts):
        emb, mask, neg, neg_mask = self.pipe.encode_prompt(
            prompts, self.guided, negative_prompt=self.negative or "", device=self.device,
            clean_caption=False, **self._text_kwargs(),
        )
        cond = {"encoder_hidden_states": emb, "encoder_attention_mask": mask}
        return cond, ({"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask} if self.guided else None)

    def _size(self):
        default = self.tr.config.sample_size * self.pipe.vae_scale_factor
        return self.height or default, self.width or default

    def noise(self, batch, generators):
        h, w = self._size()
        latents = self.pipe.prepare_latents(batch, self.tr.config.in_channels, h, w, self.dtype, self.device, generators)
        return latents / self.pipe.scheduler.init_noise_sigma  # fit scales x_T by the scheduler's own

    def forward(self, model, x, t, cond):
        added = {"resolution": None, "aspect_ratio": None}
        if self.tr.config.sample_size == 128:  # as the pipeline: size conditioning of the 1024px model
            h, w = self._size()
            added = {"resolution": torch.tensor([h, w], dtype=x.dtype, device=x.device).repeat(x.shape[0], 1),
                     "aspect_ratio": torch.tensor([float(h / w)], dtype=x.dtype, device=x.device).repeat(x.shape[0], 1)}
        return model(x, encoder_hidden_states=cond["encoder_hidden_states"],
                     encoder_attention_mask=cond["encoder_attention_mask"], timestep=t,
                     added_cond_kwargs=added, return_dict=False)[0]


class _SD3(_Adapter):
    """StableDiffusion3Pipeline: CLIP+T5 embeddings and pooled projections, ``[uncond, cond]``, flow match."""

    uncond_first = True

    def encode(self, prompts):
        emb, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=self.guided,
            negative_prompt=self.negative, **self._text_kwargs(),
        )
        cond = {"encoder_hidden_states": emb, "pooled_projections": pooled}
        return cond, ({"encoder_hidden_states": neg, "pooled_projections": neg_pooled} if self.guided else None)

    def noise(self, batch, generators):
        h, w = self._size()
        return self.pipe.prepare_latents(batch, self.tr.config.in_channels, h, w, self.dtype, self.device, generators)

    def timesteps_kwargs(self, steps):
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", None):
            return {}
        h, w = self._size()
        p = self.tr.config.patch_size
        f = self.pipe.vae_scale_factor
        seq = (h // f // p) * (w // f // p)
        return {"mu": _calculate_shift(self.pipe, seq, config, max_shift=1.16)}

    def forward(self, model, x, t, cond):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"], joint_attention_kwargs=None,
                     return_dict=False)[0]


class _Flux(_Adapter):
    """FluxPipeline: packed latents and their ids, timestep / 1000, guidance embedding; no CFG batch."""

    def __init__(self, *args):
        super().__init__(*args)
        self.cfg = 1.0  # Flux's guidance_scale is an input of the transformer, not CFG
        self.text_ids = None  # set by encode (zeros of the text length)
        self.image_ids = self._latents(1, [torch.Generator().manual_seed(0)])[1]

    def encode(self, prompts):
        emb, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, **self._text_kwargs(),
        )
        self.text_ids = text_ids
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}, None

    def _latents(self, batch, generators):
        h, w = self._size()
        channels = self.tr.config.in_channels // 4
        return self.pipe.prepare_latents(batch, channels, h, w, self.dtype, self.device, generators)

    def noise(self, batch, generators):
        return self._latents(batch, generators)[0]

    def timesteps_kwargs(self, steps):
        config = self.pipe.scheduler.config
        kwargs = {} if config.get("use_flow_sigmas", False) else {"sigmas": np.linspace(1.0, 1 / steps, steps)}
        kwargs["mu"] = _calculate_shift(self.pipe, self.image_ids.shape[0], config, max_shift=1.15)
        return kwargs

    def forward(self, model, x, t, cond):
        guidance = None
        if self.tr.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=torch.float32)
        return model(hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                     pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
                     txt_ids=self._text_ids(cond["encoder_hidden_states"]), img_ids=self.image_ids,
                     joint_attention_kwargs={}, return_dict=False)[0]

    def _text_ids(self, emb: Tensor) -> Tensor:
        """``encode_prompt``'s text ids (zeros of the text length); built from ``emb`` before any encode."""
        if self.text_ids is None or self.text_ids.shape[0] != emb.shape[1]:
            return torch.zeros(emb.shape[1], 3, device=emb.device, dtype=emb.dtype)
        return self.text_ids


def _calculate_shift(pipe, seq_len: int, config, max_shift: float) -> float:
    """The pipeline module's own ``calculate_shift`` with the scheduler's config, as its ``__call__`` does."""
    fn = getattr(sys.modules.get(type(pipe).__module__), "calculate_shift", None)
    if fn is None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift as fn
    return fn(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
              config.get("base_shift", 0.5), config.get("max_shift", max_shift))


_ADAPTERS = {
    "DiTPipeline": _DiT,
    "PixArtAlphaPipeline": _PixArt,
    "PixArtSigmaPipeline": _PixArt,
    "StableDiffusion3Pipeline": _SD3,
    "FluxPipeline": _Flux,
}


def _adapter(pipe) -> type[_Adapter]:
    for cls in type(pipe).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    raise TypeError(
        f"fit_pipeline does not know {type(pipe).__name__}; supported: {sorted(_ADAPTERS)} (and subclasses). "
        "For another pipeline call lazypass.fit with its sample_fn, call and scheduler"
    )
