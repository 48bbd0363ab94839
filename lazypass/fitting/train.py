"""The training loop: AdamW on the gates, the loss, optional DDP, optional rho control."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lazypass.fitting.control import RhoController
from lazypass.fitting.dist import all_sum
from lazypass.fitting.objectives import StepOutput


@dataclass
class TrainLog:
    """Per optimiser step: total loss, fidelity, and the fraction of training scores above the threshold."""

    loss: list[float] = field(default_factory=list)
    fidelity: list[float] = field(default_factory=list)
    lazy: list[float] = field(default_factory=list)


class _GateStep(nn.Module):
    """The unit DistributedDataParallel wraps: the gates are its only parameters."""

    def __init__(self, gates: nn.Module, objective):
        super().__init__()
        self.gates = gates
        self._objective = objective

    def forward(self) -> StepOutput:
        return self._objective.step()


def lazy_loss(scores: Tensor, attn: Tensor, rhos: tuple[float, float], mask: Tensor) -> Tensor:
    """``rho_attn * sum_attn (1 - s) + rho_ffn * sum_ffn (1 - s)``, summed over counted rows, divided by all rows."""
    w = torch.where(attn.to(scores.device), rhos[0], rhos[1])[:, None]
    return ((1 - scores) * w).sum(0).mul(mask.to(scores.dtype)).sum() / scores.shape[1]


def fidelity_loss(out: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MSE per row, summed over counted rows, divided by all rows."""
    per_row = ((out.float() - target.float()) ** 2).flatten(1).mean(1)
    return (per_row * mask.to(per_row.dtype)).sum() / out.shape[0]


def train_gates(
    gates: nn.Module,
    objective,
    kinds: list[str],
    steps: int,
    lr: float,
    rhos: tuple[float, float],
    threshold: float,
    control: RhoController | None = None,
    world: int = 1,
    progress: bool = False,
) -> TrainLog:
    """``steps`` optimiser steps of AdamW on ``gates``; returns the log (averaged over processes).

    With ``control`` the penalties follow it (and it is updated with the training lazy
    ratio every step); otherwise they are ``rhos``. Under several processes the gates train
    with DistributedDataParallel, so every rank ends with the same gates.
    """
    runner = _GateStep(gates, objective)
    if world > 1:
        # sites that follow their group's gate (granularity "step" or groups) leave their own
        # gate parameters without gradient
        runner = nn.parallel.DistributedDataParallel(runner, find_unused_parameters=True)
    opt = torch.optim.AdamW(gates.parameters(), lr=lr)
    attn = torch.tensor([k == "attn" for k in kinds])
    log = TrainLog()
    bar = _bar(steps) if progress else None
    for _ in range(steps):
        out, target, scores, mask = runner()
        fidelity = fidelity_loss(out, target, mask)
        if control is not None and control.auto:
            control.start(all_sum([fidelity.detach() / world], world)[0])
        current = control.rhos if control is not None else rhos
        total = fidelity + lazy_loss(scores, attn, current, mask)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        above = ((scores > threshold) & mask[None]).float().sum()
        fid, tot, above, counted = all_sum(
            [fidelity.detach() / world, total.detach() / world, above, mask.sum()], world
        )
        frac = above / max(counted * len(kinds), 1.0)
        log.loss.append(tot)
        log.fidelity.append(fid)
        log.lazy.append(frac)
        if control is not None:
            control.update(frac)
        if bar is not None:
            bar.update(1)
            post = dict(loss=f"{tot:.4g}", lazy=f"{frac:.2f}")
            if control is not None:
                post["rho"] = f"{control.rhos[0]:.2g}"
            bar.set_postfix(post)
    if bar is not None:
        bar.close()
    return log


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="lazypass.fit")
