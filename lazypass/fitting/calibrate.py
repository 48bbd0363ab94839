"""Real lazy sampling runs: measuring the lazy ratio, and calibrating the threshold to a target."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lazypass.config import check_threshold
from lazypass.fitting.dist import all_sum
from lazypass.fitting.sampler import Schedule, guide, guided_inputs
from lazypass.fitting.soft import CallFn, output_channels, prediction
from lazypass.report import stats
from lazypass.runtime import runtime, trajectory


def lazy_sampling(
    model: nn.Module, batches: list[dict], call: CallFn, schedule: Schedule, guidance_scale: float, world: int = 1
) -> tuple[float, np.ndarray]:
    """Lazy sampling runs of ``batches`` at the current threshold, each with a fresh copy of the scheduler.

    Returns the lazy ratio (over all processes), counted in branch MACs per sample (a skipped
    branch counts its MACs; a sample's ratio is the share of its branch MACs it skipped), and
    this process's gate scores of the calls after the first step (where caches are valid),
    for the calibration's quantile guess.
    """
    guided = guidance_scale != 1.0
    skipped, total = 0.0, 0.0
    scores = []
    for k, batch in enumerate(batches):
        x = batch.get("noise")
        if x is None:
            g = torch.Generator().manual_seed(1234 + k)
            x = torch.randn(batch["x0"].shape, generator=g).to(batch["x0"].device, batch["x0"].dtype)
        run = schedule.trajectory()
        x = x * run.init_noise_sigma
        with trajectory(model), torch.no_grad():
            for i in range(schedule.calls):
                t = run.timesteps[i].to(x.device).expand(x.shape[0])
                xi, ti, ci = guided_inputs(run.model_input(x, i), t, batch.get("cond"), batch.get("null_cond"), guided)
                out = output_channels(prediction(call(model, xi, ti, ci)), xi)
                x = run.step(guide(out, guided, guidance_scale), i, x)
            st = stats(model)
        first = max(st.skipped.shape[0] // schedule.calls, 1)  # calls of the first step: caches not valid yet
        macs = np.array([float(s.macs) for s in st.sites], dtype=np.float64)[None, :, None]
        skipped += float((st.skipped * macs).sum())
        total += float(np.broadcast_to(macs, st.skipped.shape).sum())
        scores.append(st.scores[first:].ravel())
    skipped, total = all_sum([skipped, total], world)
    return skipped / total, np.concatenate(scores)


def calibrate_threshold(
    model: nn.Module,
    batches: list[dict],
    call: CallFn,
    schedule: Schedule,
    guidance_scale: float,
    target: float,
    ratio: float,
    scores: np.ndarray,
    world: int = 1,
    tol: float = 0.003,
    tries: int = 14,
) -> float:
    """Set the model's threshold so lazy sampling on ``batches`` hits ``target``; returns the ratio reached.

    ``ratio`` and ``scores`` are those of :func:`lazy_sampling` at the current threshold.
    Bisection on the threshold: the first guesses from the quantile of the recorded scores
    that would give the target (averaged over processes, so all ranks pick the same one),
    then the middle of the bracket in logit space; the best threshold seen is kept.
    """
    rt = runtime(model)
    lo, hi = -1.0, 2.0  # thresholds giving too many / too few skips
    best = (abs(ratio - target), rt.threshold, ratio)
    thr = rt.threshold
    for k in range(tries):
        if abs(ratio - target) <= tol:
            break
        if ratio > target:
            lo = max(lo, thr)
        else:
            hi = min(hi, thr)
        level = 1.0 - min(max(target * schedule.calls / (schedule.calls - 1), 0.0), 1.0)
        guess = float(np.quantile(scores, level)) if scores.size and k < 2 else _middle(lo, hi)
        guess = all_sum([guess / world], world)[0]
        thr = guess if lo < guess < hi else _middle(lo, hi)
        if not lo < thr < hi:
            thr = 0.5 * (lo + hi)
        rt.set_threshold(check_threshold(min(max(thr, -1.0), 2.0)))
        ratio, scores = lazy_sampling(model, batches, call, schedule, guidance_scale, world)
        if abs(ratio - target) < best[0]:
            best = (abs(ratio - target), thr, ratio)
    rt.set_threshold(best[1])
    return best[2]


def _middle(lo: float, hi: float) -> float:
    """The middle of a threshold bracket: in logit space (scores are sigmoids) within [0, 1]."""
    lo, hi = max(lo, 0.0), min(hi, 1.0)
    a, b = min(max(lo, 1e-7), 1 - 1e-7), min(max(hi, 1e-7), 1 - 1e-7)
    m = 0.5 * (np.log(a / (1 - a)) + np.log(b / (1 - b)))
    return float(1.0 / (1.0 + np.exp(-m)))
