"""``FitConfig``: every option of ``lazypass.fit`` in one frozen dataclass, checked on creation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lazypass.fitting.sampler import check_scheduler

LOSSES = ("distill", "diffusion")
OBJECTIVES = ("on_policy", "one_step")


@dataclass(frozen=True)
class FitConfig:
    """Options of ``lazypass.fit``.

    Args:
        objective: ``"on_policy"`` (default): the gates are fitted on the lazy model's own
            runs with inference semantics (stale or forecast caches, age, drift), each
            decision priced by its effect on the final sample against the full model from
            the same noise (see ``lazypass/fitting/on_policy.py``); self-distillation only.
            ``"one_step"``: the paper's objective, the soft blend against the full model's
            branch outputs one step earlier (both losses).
        steps: optimiser steps (``"on_policy"``: of the gate fit after each round).
        lr: learning rate of the gates; default 1e-4 for ``"one_step"`` (AdamW, the paper:
            1e-4, 500 steps) and 0.05 for ``"on_policy"`` (Adam on standardised features).
        rounds: ``"on_policy"`` only: rounds of rollouts (one batch of ``sample_fn`` each),
            the first along a fixed schedule, the next along the gates fitted so far.
        rho: lazy-penalty weight for both kinds of site; default the ones given to
            ``lazypass.apply``.
        rho_attn: penalty of attention sites (default ``rho``).
        rho_ffn: penalty of MLP sites (default ``rho``).
        target_ratio: wanted lazy ratio of real sampling at ``num_inference_steps``: rho is
            adapted while fitting, then the threshold is calibrated (and set on the model)
            with lazy sampling runs on ``calibration_batches`` more batches. At most
            ``(L - 1) / L`` for ``L`` model calls per trajectory: the first always computes.
        loss: ``"distill"`` (data-free self-distillation on the model's own trajectories)
            or ``"diffusion"`` (the denoising loss on ``"x0"`` from ``sample_fn``).
        num_inference_steps: sampling steps of the trajectories (and of the sampling the
            gates are meant for), >= 2.
        scheduler: the diffusers scheduler that samples the trajectories and calibration
            runs (DDIM, DPM-Solver, flow-match Euler, ...; a private copy per trajectory,
            the object itself is never stepped). Its config gives the model's prediction
            type (``prediction_type``; flow-matching schedulers predict a velocity), which
            sets the target of the diffusion loss; an unknown type is a ValueError. Default
            None: lazypass's own DDIM on DiT's linear schedule, for eps models.
        set_timesteps_kwargs: extra arguments of ``scheduler.set_timesteps`` (e.g. ``mu``
            for dynamic shifting, or ``sigmas``), as the pipeline passes them.
        guidance_scale: classifier-free guidance of the trajectories and calibration runs;
            1 disables it. With guidance the model is called on ``cat([x, x])`` with
            ``cat([cond, null_cond])``, as samplers do, so the gates see both halves.
        calibration_batches: batches (after the training ones) that the final measurement
            and threshold calibration sample.
        seed: seeds the diffusion loss's timesteps and noise.
        progress: a tqdm bar with loss, lazy ratio and rho (rank 0 only).
        measure: measure the lazy ratio of real sampling at the end even without a target.

    Example:
        >>> FitConfig(steps=100, target_ratio=0.5).learning_rate
        0.05
        >>> FitConfig(objective="one_step").learning_rate
        0.0001
    """

    objective: str = "on_policy"
    steps: int = 500
    lr: float | None = None
    rounds: int = 3
    rho: float | None = None
    rho_attn: float | None = None
    rho_ffn: float | None = None
    target_ratio: float | None = None
    loss: str = "distill"
    num_inference_steps: int = 20
    scheduler: Any = None
    set_timesteps_kwargs: dict | None = None
    guidance_scale: float = 1.0
    calibration_batches: int = 2
    seed: int = 0
    progress: bool = True
    measure: bool = False

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f'objective must be "on_policy" or "one_step", got {self.objective!r}')
        if self.loss not in LOSSES:
            raise ValueError(f'loss must be "distill" or "diffusion", got {self.loss!r}')
        if self.objective == "on_policy" and self.loss != "distill":
            raise ValueError(
                'objective="on_policy" unrolls the lazy model from noise (loss="distill"); for the diffusion loss '
                'pass objective="one_step"'
            )
        if not _int(self.rounds) or self.rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {self.rounds!r}")
        if not _int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if self.lr is not None and not (_number(self.lr) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("rho", "rho_attn", "rho_ffn"):
            v = getattr(self, name)
            if v is not None and not (_number(v) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not _int(self.num_inference_steps) or self.num_inference_steps < 2:
            raise ValueError(
                f"num_inference_steps must be an int >= 2 (a step needs a previous step to be lazy), "
                f"got {self.num_inference_steps!r}"
            )
        if self.scheduler is not None:
            check_scheduler(self.scheduler)
        if self.set_timesteps_kwargs is not None and not isinstance(self.set_timesteps_kwargs, dict):
            raise ValueError(f"set_timesteps_kwargs must be a dict, got {type(self.set_timesteps_kwargs).__name__}")
        if self.target_ratio is not None and not (_number(self.target_ratio) and 0.0 <= self.target_ratio < 1.0):
            raise ValueError(f"target_ratio must be in [0, 1): the first step always computes, got {self.target_ratio!r}")
        if not (_number(self.guidance_scale) and math.isfinite(self.guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number, got {self.guidance_scale!r}")
        if not _int(self.calibration_batches) or self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be an int >= 1, got {self.calibration_batches!r}")
        if not _int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the objective's default."""
        if self.lr is not None:
            return float(self.lr)
        return 0.05 if self.objective == "on_policy" else 1e-4

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def user_rho(self) -> bool:
        """Whether any penalty was given (else the target-ratio control picks the start)."""
        return not (self.rho is None and self.rho_attn is None and self.rho_ffn is None)

    @classmethod
    def from_options(cls, config: "FitConfig | None" = None, **options) -> "FitConfig":
        """``config`` (default: the defaults) with ``options`` replacing its fields; unknown ones are a TypeError."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"unknown fit option(s) {unknown}; known options are {sorted(known)}")
        if config is None:
            return cls(**options)
        if not isinstance(config, cls):
            raise TypeError(f"config must be a FitConfig, got {type(config).__name__}")
        return dataclasses.replace(config, **options) if options else config


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
