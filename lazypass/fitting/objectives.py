"""What one training step compares: self-distillation on staggered trajectories, or the diffusion loss.

Both objectives have one interface: ``prepare()`` (before the first step: warm-up, and the
first soft call, which traces the soft program and creates the gates) and ``step()``, which
returns a :class:`StepOutput`: the soft model's prediction, its target, the gate scores and
which rows count.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lazypass.fitting.sampler import ddim_rows, guide, guided_inputs
from lazypass.fitting.soft import SoftModel
from lazypass.fitting.source import BatchSource, put
from lazypass.sampling import ALPHAS_CUMPROD, add_noise, ddim_timesteps


class StepOutput(NamedTuple):
    prediction: Tensor  # the soft model's prediction (rows, ...)
    target: Tensor  # what it should have predicted
    scores: Tensor  # gate scores (sites, rows)
    mask: Tensor  # (rows,) bool: the rows that count (those with a previous step)


class Distill:
    """Self-distillation on the model's own full-compute DDIM trajectories.

    A training pair is two consecutive steps of one trajectory: the full model's branch
    outputs at step ``i - 1`` are ``Y_prev`` of the soft model at step ``i``, and the target
    is the full model's prediction at the same ``x_t``. Row ``g`` of the global batch (``G``
    rows over all processes) starts ``g * T / G`` steps late, so every step sees a spread of
    timesteps while only one step of branch outputs is kept: each step costs one full
    forward (no grad) and one soft forward and backward. A row that finishes a trajectory
    starts the next one from the next batch of ``sample_fn``.
    """

    def __init__(self, soft: SoftModel, source: BatchSource, steps: int, guidance_scale: float):
        self.soft, self.source = soft, source
        self.T, self.scale, self.guided = steps, guidance_scale, guidance_scale != 1.0
        self.ratio = len(ALPHAS_CUMPROD) // steps
        first = source.batch(0)
        B = self.B = source.size
        device = first["noise"].device
        G = B * source.world
        self.offset = torch.tensor([((source.rank * B + b) * steps) // G for b in range(B)], device=device)
        self.timesteps = torch.tensor(ddim_timesteps(steps), device=device)
        self.u = -int(self.offset.max())  # steps since the first row started
        self.x = first["noise"].clone()
        self.cond, self.null = first.get("cond"), first.get("null_cond")
        self.prev: list[Tensor] | None = None

    def prepare(self) -> None:
        while self.u < 0:  # warm-up: the rows starting late reach their first step
            self._advance()
        if self.soft.program is None:  # no warm-up ran: trace the soft program (creating the gates) now
            t = self.timesteps[:1].expand(self.B)
            self.soft.full(*guided_inputs(self.x, t, self.cond, self.null, self.guided))

    def step(self) -> StepOutput:
        x, t, cond, target, prev, mask = self._advance()
        if prev is None:  # the first step of every row: nothing counts, but the soft program still runs
            prev = [torch.zeros_like(f) for f in self.prev]
        out = self.soft.soft(x, t, cond, prev)
        return StepOutput(out.prediction, target, out.scores, mask)

    def _advance(self):
        """One full-compute step of every row; returns what training at this step needs."""
        p = self.offset + self.u  # steps since the row started its first trajectory
        started = p >= 0
        pos = torch.where(started, p % self.T, torch.zeros_like(p))
        restart = started & (pos == 0)
        if bool(restart.any()):
            trajectory = torch.div(p, self.T, rounding_mode="floor")
            for j in torch.unique(trajectory[restart]).tolist():
                rows = restart & (trajectory == j)
                b = self.source.batch(int(j))
                self.x = put(self.x, b["noise"], rows)
                self.cond = put(self.cond, b.get("cond"), rows)
                self.null = put(self.null, b.get("null_cond"), rows)
        t = self.timesteps[pos]
        x = self.x
        xi, ti, ci = guided_inputs(x, t, self.cond, self.null, self.guided)
        full = self.soft.full(xi, ti, ci)
        mask = started & (pos >= 1)
        if self.guided:
            mask = torch.cat([mask, mask])
        stepped = ddim_rows(x, guide(full.prediction, self.guided, self.scale), t, self.ratio)
        self.x = torch.where(started.reshape((-1,) + (1,) * (x.dim() - 1)), stepped, x)
        prev, self.prev = self.prev, full.branch_outputs
        self.u += 1
        return xi, ti, ci, full.prediction, prev, mask


class Diffusion:
    """The denoising loss on data: a random sampling step per row, ``Y_prev`` from the full model one step earlier.

    ``x_t`` and ``x_{t_prev}`` are noised from the same clean sample and noise, ``Y_prev``
    is the full model's branch outputs at ``x_{t_prev}`` (the previous, noisier sampling
    step) and the target is the noise. Timesteps (and noise, when ``sample_fn`` gives none)
    are drawn for the global batch from ``seed`` and the step, so every process draws its
    own rows of the same draw.
    """

    def __init__(self, soft: SoftModel, source: BatchSource, steps: int, seed: int):
        self.soft, self.source, self.T, self.seed = soft, source, steps, seed
        self.ratio = len(ALPHAS_CUMPROD) // steps
        self.B = source.size
        self.G = self.B * source.world
        self.lo = source.rank * self.B
        self.timesteps = torch.tensor(ddim_timesteps(steps))
        self.k = 0

    def prepare(self) -> None:
        x0, noise, t, cond = self._inputs(0)
        self.soft.full(add_noise(x0, noise, t), t, cond)  # traces the soft program, creating the gates

    def step(self) -> StepOutput:
        x0, noise, t, cond = self._inputs(self.k)
        self.k += 1
        t_prev = t + self.ratio
        prev = self.soft.full(add_noise(x0, noise, t_prev), t_prev, cond).branch_outputs
        out = self.soft.soft(add_noise(x0, noise, t), t, cond, prev)
        return StepOutput(out.prediction, noise, out.scores, torch.ones(self.B, dtype=torch.bool, device=x0.device))

    def _inputs(self, k: int):
        b = self.source.batch(k)
        x0 = b["x0"]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        pos = torch.randint(1, self.T, (self.G,), generator=gen)[self.lo : self.lo + self.B]
        noise = b.get("noise")
        if noise is None:
            noise = torch.randn((self.G,) + tuple(x0.shape[1:]), generator=gen)[self.lo : self.lo + self.B]
            noise = noise.to(x0.device, x0.dtype)
        return x0, noise, self.timesteps[pos].to(x0.device), b.get("cond")
