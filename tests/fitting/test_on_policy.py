"""objective="on_policy": its unroll is the lazy model's own run, it hits its budget, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lazypass
from lazypass.fitting.frozen import gates_only
from lazypass.fitting.on_policy import LazyRun
from lazypass.fitting.sampler import Schedule
from lazypass.fitting.soft import SoftModel, default_call
from lazypass.runtime import runtime, traced_program, trajectory
from tests.fitting import class_batches, lively_dit

STEPS = 8


def _fitted(batch: int = 8, calibration_batches: int = 2, **options):
    model = lazypass.apply(lively_dit(), **options)
    result = lazypass.fit(model, class_batches(batch), steps=60, rounds=2, num_inference_steps=STEPS, target_ratio=0.4,
                          calibration_batches=calibration_batches, progress=False)  # fmt: skip
    return model, result


def _lazy_model_skips(model, batch, schedule):
    """Real lazy sampling: the skip records (calls, sites, B) and the final sample."""
    run = schedule.trajectory()
    x = batch["noise"].clone()
    skips = []
    with trajectory(model), torch.no_grad():
        for i in range(schedule.calls):
            t = run.timesteps[i].expand(x.shape[0])
            out = model(x, t, batch["cond"])
            skips.append(lazypass.stats(model).skipped[-1])
            x = run.step(out[:, :4], i, x)
    return np.stack(skips), x


def _unroll_skips(model, batch, schedule):
    """The fitter's unroll at the model's threshold: its skip decisions (calls, sites, B) and final sample."""
    rt = runtime(model)
    soft = SoftModel(model, default_call)
    lazy = LazyRun(soft, rt.cfg)
    run = schedule.trajectory()
    x = batch["noise"].clone()
    skips = []
    with gates_only(model, soft.forward), torch.no_grad():
        t = run.timesteps[0].expand(x.shape[0])
        pred, state = lazy.start(x, t, batch["cond"])
        skips.append(np.zeros((lazy.n_sites, x.shape[0]), bool))
        x = run.step(pred, 0, x)
        thresholds = torch.full((lazy.n_sites,), rt.threshold)
        never = torch.zeros(lazy.n_sites, dtype=torch.bool)
        for i in range(1, schedule.calls):
            t = run.timesteps[i].expand(x.shape[0])
            pred, skip, _ = lazy.call(state, x, t, batch["cond"], thresholds, never)
            skips.append(skip.numpy())
            x = run.step(pred, i, x)
    return np.stack(skips), x


@pytest.mark.parametrize(
    "options",
    [dict(), dict(reuse="copy", granularity="site", max_age=2), dict(granularity=2, gate_inputs=("drift",))],
    ids=["defaults", "copy-site-max_age", "groups-drift-only"],
)
def test_unroll_decides_as_the_lazy_model(options):
    model, _ = _fitted(**options)
    schedule = Schedule(None, STEPS)
    batch = class_batches(8)(777)  # fresh noise
    real, x_real = _lazy_model_skips(model, batch, schedule)
    mine, x_mine = _unroll_skips(model, batch, schedule)
    assert real.shape == mine.shape
    assert 0 < real.mean() < 1, "the fitted gates should skip some, not all"
    np.testing.assert_array_equal(mine, real)
    torch.testing.assert_close(x_mine, x_real, rtol=1e-4, atol=1e-5)


def test_on_policy_hits_the_target_on_fresh_noise():
    # this tiny model's gates vary a lot per sample (sd of a sample's lazy ratio ~0.2), so the
    # threshold is calibrated on 1,024 held-out samples and checked on 1,024 fresh ones
    model, result = _fitted(batch=128, calibration_batches=8)
    assert abs(result.lazy_ratio - 0.4) <= 0.01
    # fresh noise, never seen by the fit or the calibration: lazy ratio counted in MACs per sample
    schedule = Schedule(None, STEPS)
    skips = np.concatenate([_lazy_model_skips(model, class_batches(256)(5000 + k), schedule)[0] for k in range(4)], 2)
    macs = np.array([s.macs for s in traced_program(model).sites], dtype=float)
    ratio = float((skips * macs[None, :, None]).sum() / (macs.sum() * skips.shape[0] * skips.shape[2]))
    assert abs(ratio - 0.4) <= 0.01, ratio
    assert len(result.fidelity) == 2 and len(result.loss) == 120


def test_one_step_objective_still_fits():
    model = lazypass.apply(lively_dit())
    result = lazypass.fit(model, class_batches(8), objective="one_step", steps=20, lr=1e-2, num_inference_steps=5,
                          target_ratio=0.4, progress=False)  # fmt: skip
    assert len(result.loss) == 20 and result.lazy_ratio is not None


def test_bad_objectives_are_refused():
    model = lazypass.apply(lively_dit())
    with pytest.raises(ValueError, match='objective must be "on_policy" or "one_step"'):
        lazypass.fit(model, class_batches(8), objective="rollout", progress=False)
    with pytest.raises(ValueError, match='objective="one_step"'):
        lazypass.fit(model, class_batches(8), loss="diffusion", progress=False)
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        lazypass.fit(model, class_batches(8), rounds=0, progress=False)
