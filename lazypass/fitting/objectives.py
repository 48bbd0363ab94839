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

from lazypass.fitting.sampler import Schedule, Trajectory, guide, guided_inputs
from lazypass.fitting.soft import SoftModel
from lazypass.fitting.source import BatchSource, put


class StepOutput(NamedTuple):
    prediction: Tensor  # the soft model's prediction (rows, ...)
    target: Tensor  # what it should have predicted
    scores: Tensor  # gate scores (sites, rows)
    mask: Tensor  # (rows,) bool: the rows that count (those with a previous step)




class _Rows:
    """Rows of the batch that share a start offset, and their own trajectory (scheduler copy)."""

    def __init__(self, mask: Tensor, offset: int, trajectory: Trajectory):
        self.mask, self.offset, self.trajectory = mask, offset, trajectory
        self.started, self.pos = False, 0


class Distill:
    """Self-distillation on the model's own full-compute trajectories.

    A training pair is two consecutive steps of one trajectory: the full model's branch
    outputs at step ``i - 1`` are ``Y_prev`` of the soft model at step ``i``, and the target
    is the full model's prediction at the same ``x_t``. Row ``g`` of the global batch (``G``
    rows over all processes) starts ``g * L / G`` steps late (``L`` model calls per
    trajectory), so every step sees a spread of timesteps while only one step of branch
    outputs is kept: each step costs one full forward (no grad) and one soft forward and
    backward. A row that finishes a trajectory starts the next one from the next batch of
    ``sample_fn``.

    Schedulers are stateful (step index, and the history of multistep solvers), so rows that
    share an offset share a private copy of the scheduler, started afresh with each new
    trajectory: every row follows exactly the trajectory a pipeline would sample.
    """

    def __init__(self, soft: SoftModel, source: BatchSource, schedule: Schedule, guidance_scale: float):
        self.soft, self.source, self.schedule = soft, source, schedule
        self.L, self.scale, self.guided = schedule.calls, guidance_scale, guidance_scale != 1.0
        first = source.batch(0)
        B = self.B = source.size
        device = first["noise"].device
        G = B * source.world
        offsets = [((source.rank * B + b) * self.L) // G for b in range(B)]
        self.groups = [
            _Rows(torch.tensor([o == off for o in offsets], device=device), off, schedule.trajectory())
            for off in sorted(set(offsets))
        ]
        self.u = -max(offsets)  # steps since the first row started
        self.x = first["noise"] * self.groups[0].trajectory.init_noise_sigma
        self.cond, self.null = first.get("cond"), first.get("null_cond")
        self.timesteps = schedule.timesteps.to(device)
        self.prev: list[Tensor] | None = None
        self.prev_pooled: list[Tensor] | None = None

    def prepare(self) -> None:
        while self.u < 0:  # warm-up: the rows starting late reach their first step
            self._advance()
        if self.soft.program is None:  # no warm-up ran: trace the soft program (creating the gates) now
            t = self.timesteps[:1].expand(self.B)
            x = self.schedule.model_input(self.x, t)
            self.soft.full(*guided_inputs(x, t, self.cond, self.null, self.guided))

    def step(self) -> StepOutput:
        x, t, cond, target, (prev, pooled), mask = self._advance()
        if prev is None:  # the first step of every row: nothing counts, but the soft program still runs
            prev, pooled = [torch.zeros_like(f) for f in self.prev], None
        out = self.soft.soft(x, t, cond, prev, pools=pooled)
        return StepOutput(out.prediction, target, out.scores, mask)

    def _advance(self):
        """One full-compute step of every row; returns what training at this step needs."""
        x = self.x
        t = torch.empty(self.B, dtype=self.timesteps.dtype, device=self.timesteps.device)
        model_x = x.clone()
        counts = torch.zeros(self.B, dtype=torch.bool, device=x.device)
        for g in self.groups:
            p = g.offset + self.u  # steps since these rows started their first trajectory
            g.started, g.pos = p >= 0, max(p, 0) % self.L
            if g.started and g.pos == 0:  # a new trajectory: next batch, fresh scheduler state
                b = self.source.batch(p // self.L)
                g.trajectory = self.schedule.trajectory()
                x = self.x = put(x, b["noise"] * g.trajectory.init_noise_sigma, g.mask)
                self.cond = put(self.cond, b.get("cond"), g.mask)
                self.null = put(self.null, b.get("null_cond"), g.mask)
            t[g.mask] = g.trajectory.timesteps[g.pos].to(t.device)
            model_x[g.mask] = g.trajectory.model_input(x[g.mask], g.pos).to(x.dtype)
            if g.started and g.pos >= 1:
                counts |= g.mask
        xi, ti, ci = guided_inputs(model_x, t, self.cond, self.null, self.guided)
        full = self.soft.full(xi, ti, ci)
        guided = guide(full.prediction, self.guided, self.scale)
        stepped = x.clone()
        for g in self.groups:
            if g.started:
                stepped[g.mask] = g.trajectory.step(guided[g.mask], g.pos, x[g.mask]).to(x.dtype)
        self.x = stepped
        prev = (self.prev, self.prev_pooled)
        self.prev, self.prev_pooled = full.branch_outputs, full.pooled
        self.u += 1
        mask = torch.cat([counts, counts]) if self.guided else counts
        return xi, ti, ci, full.prediction, prev, mask


class Diffusion:
    """The denoising loss on data: a random sampling step per row, ``Y_prev`` from the full model one step earlier.

    ``x_t`` and ``x_{t_prev}`` are noised from the same clean sample and noise (the
    scheduler's ``add_noise``, or ``scale_noise`` for flow matching), ``Y_prev`` is the full
    model's branch outputs at ``x_{t_prev}`` (the previous, noisier sampling step) and the
    target is what the model predicts: the noise, ``v``, the clean sample or the velocity.
    Timesteps (and noise, when ``sample_fn`` gives none) are drawn for the global batch from
    ``seed`` and the step, so every process draws its own rows of the same draw.
    """

    def __init__(self, soft: SoftModel, source: BatchSource, schedule: Schedule, seed: int):
        self.soft, self.source, self.schedule, self.seed = soft, source, schedule, seed
        self.B = source.size
        self.G = self.B * source.world
        self.lo = source.rank * self.B
        self.k = 0

    def prepare(self) -> None:
        x0, noise, t, _, cond = self._inputs(0)
        self.soft.full(self._noised(x0, noise, t), t, cond)  # traces the soft program, creating the gates

    def step(self) -> StepOutput:
        x0, noise, t, t_prev, cond = self._inputs(self.k)
        self.k += 1
        prev = self.soft.full(self._noised(x0, noise, t_prev), t_prev, cond)
        out = self.soft.soft(self._noised(x0, noise, t), t, cond, prev.branch_outputs, pools=prev.pooled)
        target = self.schedule.target(x0, noise, t)
        return StepOutput(out.prediction, target, out.scores, torch.ones(self.B, dtype=torch.bool, device=x0.device))

    def _noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.schedule.model_input(self.schedule.noised(x0, noise, t), t)

    def _inputs(self, k: int):
        b = self.source.batch(k)
        x0 = b["x0"]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        pos = torch.randint(1, self.schedule.calls, (self.G,), generator=gen)[self.lo : self.lo + self.B]
        noise = b.get("noise")
        if noise is None:
            noise = torch.randn((self.G,) + tuple(x0.shape[1:]), generator=gen)[self.lo : self.lo + self.B]
            noise = noise.to(x0.device, x0.dtype)
        timesteps = self.schedule.timesteps.to(x0.device)
        pos = pos.to(x0.device)
        return x0, noise, timesteps[pos], timesteps[pos - 1], b.get("cond")
