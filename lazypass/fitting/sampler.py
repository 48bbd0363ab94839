"""The sampler behind fitting: any diffusers scheduler (or lazypass's own DDIM), one private copy per trajectory.

A diffusers scheduler is stateful: ``set_timesteps`` builds the schedule, ``step`` advances
a step index and multistep solvers (DPM-Solver, UniPC) keep a history of model outputs. So
every trajectory gets its own copy of the scheduler (:meth:`Schedule.trajectory`), started
with ``set_timesteps`` and stepped once per model call, exactly as a pipeline runs it.
Self-distillation runs one copy per group of rows that share a start offset (see
``objectives.Distill``); calibration runs one per batch.

The model's prediction type comes from ``scheduler.config.prediction_type`` (``"epsilon"``,
``"v_prediction"``, ``"sample"``, ``"flow_prediction"``); flow-matching schedulers
(``FlowMatch*``, which have no prediction type) predict a velocity. It decides the target
of the diffusion loss and how data is noised (``add_noise``, or ``scale_noise`` for flow
matching); self-distillation compares predictions in the model's own output space
whatever it is. Anything else is refused.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import Tensor

from lazypass.fitting.source import cat
from lazypass.sampling import ALPHAS_CUMPROD, add_noise, ddim_timesteps

PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
_REQUIRED = ("set_timesteps", "step")


class LinearDDIM:
    """lazypass's own DDIM: DiT's linear schedule, eta 0, "leading" spacing (the default sampler).

    The same steps as :func:`lazypass.sampling.ddim_sample`, in the form of a diffusers
    scheduler, computed in float64 per row.
    """

    config = {"prediction_type": "epsilon"}
    init_noise_sigma = 1.0
    order = 1

    def __init__(self):
        self.timesteps: Tensor | None = None
        self.ratio = 0

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.timesteps = torch.tensor(ddim_timesteps(num_inference_steps), device=device)
        self.ratio = len(ALPHAS_CUMPROD) // num_inference_steps

    def scale_model_input(self, sample: Tensor, timestep) -> Tensor:
        return sample

    def step(self, model_output: Tensor, timestep, sample: Tensor) -> tuple[Tensor]:
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        return (ddim_rows(sample, model_output, t, self.ratio),)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return add_noise(original_samples, noise, timesteps)


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


def prediction_type(scheduler) -> str:
    """What the model predicts, from the scheduler: one of ``PREDICTIONS``; anything else is a ValueError."""
    config = getattr(scheduler, "config", None) or {}
    name = type(scheduler).__name__
    kind = config.get("prediction_type") if hasattr(config, "get") else None
    if kind is None and name.startswith("FlowMatch"):
        return "flow"  # flow-matching schedulers step a velocity and have no prediction type
    if kind in ("flow_prediction", "flow"):
        return "flow"
    if kind in ("epsilon", "v_prediction", "sample"):
        return kind
    raise ValueError(
        f"cannot interpret the prediction type {kind!r} of {name}: lazypass fits models that predict "
        "'epsilon', 'v_prediction', 'sample' or a flow velocity ('flow_prediction', FlowMatch* schedulers); "
        "set scheduler.config.prediction_type to what the model predicts"
    )


def check_scheduler(scheduler) -> str:
    """Refuse an object that is not a usable scheduler; returns its prediction type."""
    missing = [m for m in _REQUIRED if not callable(getattr(scheduler, m, None))]
    if missing:
        raise TypeError(
            f"scheduler must be a diffusers scheduler (set_timesteps, timesteps, scale_model_input, step); "
            f"{type(scheduler).__name__} has no {' or '.join(missing)}"
        )
    return prediction_type(scheduler)


class Trajectory:
    """One private, started copy of a scheduler: model input and step at position ``i`` of its schedule."""

    def __init__(self, scheduler, timesteps: Tensor):
        self.scheduler, self.timesteps = scheduler, timesteps
        self.init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))

    def model_input(self, x: Tensor, i: int) -> Tensor:
        scale = getattr(self.scheduler, "scale_model_input", None)
        return x if scale is None else scale(x, self.timesteps[i])

    def step(self, out: Tensor, i: int, x: Tensor) -> Tensor:
        res = self.scheduler.step(out, self.timesteps[i], x)
        prev = getattr(res, "prev_sample", None)
        return prev if isinstance(prev, Tensor) else res[0]


class Schedule:
    """A scheduler as fitting uses it: fresh trajectories, and per-row noising for the diffusion loss.

    ``calls`` is the number of model calls of one trajectory (``len(timesteps)`` after
    ``set_timesteps(num_inference_steps, **set_timesteps_kwargs)``), ``timesteps`` that
    schedule.
    """

    def __init__(self, scheduler, num_inference_steps: int, set_timesteps_kwargs: dict | None = None,
                 device: torch.device | None = None):
        self.prototype = LinearDDIM() if scheduler is None else scheduler
        self.prediction = check_scheduler(self.prototype)
        self.steps, self.kwargs, self.device = num_inference_steps, dict(set_timesteps_kwargs or {}), device
        self.reference = self._started(begin=False)  # noising and per-row inputs: no begin index
        self.timesteps = self.reference.timesteps
        self.calls = len(self.timesteps)
        if self.calls < 2:
            raise ValueError(f"the scheduler gives {self.calls} timesteps; a trajectory needs >= 2 model calls")

    def trajectory(self) -> Trajectory:
        """A fresh copy of the scheduler, started as a pipeline starts it."""
        return self._started(begin=True)

    def _started(self, begin: bool) -> Trajectory:
        s = copy.deepcopy(self.prototype)
        kwargs = dict(self.kwargs)
        if self.device is not None and "device" in inspect.signature(s.set_timesteps).parameters:
            kwargs.setdefault("device", self.device)
        try:
            if "sigmas" in kwargs or "timesteps" in kwargs:
                s.set_timesteps(**kwargs)  # custom schedules set their own length, as retrieve_timesteps does
            else:
                s.set_timesteps(self.steps, **kwargs)
        except Exception as e:
            raise ValueError(
                f"{type(s).__name__}.set_timesteps({self.steps}, **{sorted(self.kwargs)}) failed: {e}; pass what it "
                "needs with set_timesteps_kwargs (e.g. mu for dynamic shifting)"
            ) from e
        timesteps = getattr(s, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            raise TypeError(f"{type(s).__name__} has no timesteps after set_timesteps")
        timesteps = torch.as_tensor(timesteps)
        if self.device is not None:
            timesteps = timesteps.to(self.device)
        if begin and callable(getattr(s, "set_begin_index", None)):
            s.set_begin_index(0)
        return Trajectory(s, timesteps)

    # -- the diffusion loss: noising, targets and inputs at any timestep, per row -----------------
    def noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        s = self.reference.scheduler
        if self.prediction == "flow":
            if callable(getattr(s, "scale_noise", None)):
                return s.scale_noise(x0, t, noise)
            sigma = _rows(t.to(torch.float64) / 1000.0, x0)
            return (sigma * noise.double() + (1 - sigma) * x0.double()).to(x0.dtype)
        if not callable(getattr(s, "add_noise", None)):
            raise TypeError(f"the diffusion loss needs a scheduler with add_noise; {type(s).__name__} has none")
        return s.add_noise(x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "sample":
            return x0
        if self.prediction == "flow":
            return noise - x0
        s = self.reference.scheduler  # v_prediction
        if callable(getattr(s, "get_velocity", None)):
            return s.get_velocity(x0, noise, t)
        abar = getattr(s, "alphas_cumprod", None)
        if abar is None:
            raise TypeError(f"v_prediction with the diffusion loss needs get_velocity or alphas_cumprod on {type(s).__name__}")
        a = _rows(abar.to(x0.device, torch.float64)[t.long()], x0)
        return (a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()).to(x0.dtype)

    def model_input(self, x: Tensor, t: Tensor) -> Tensor:
        """``scale_model_input`` row by row at timesteps ``t`` (B,)."""
        s = self.reference.scheduler
        if getattr(s, "scale_model_input", None) is None:
            return x
        out = torch.empty_like(x)
        for value in torch.unique(t):
            rows = t == value
            one = copy.copy(s)  # the step index is found again from the timestep
            for attr in ("_step_index", "_begin_index"):
                if hasattr(one, attr):
                    setattr(one, attr, None)
            out[rows] = one.scale_model_input(x[rows], value).to(x.dtype)
        return out


def _rows(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def guided_inputs(x: Tensor, t: Tensor, cond: Any, null: Any, guided: bool):
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
