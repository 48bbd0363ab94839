"""``lazypass.fit(..., scheduler=...)``: diffusers schedulers drive the trajectories, whatever the model predicts."""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

import lazypass
from lazypass.fitting.frozen import gates_only
from lazypass.fitting.objectives import Distill
from lazypass.fitting.sampler import Schedule
from lazypass.fitting.soft import SoftModel, default_call
from lazypass.fitting.source import BatchSource
from tests.archs import ARCHS
from tests.fitting import class_batches, lively_dit

T = 8


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sd3_batches(batch: int = 4, fixed: bool = False):
    """Noise and text conditioning for the tiny SD3 transformer (a flow-matching model)."""
    arch = ARCHS["sd3"]

    def sample(i):
        _, kw = arch.inputs(batch, 999, 0 if fixed else 100 + i)
        return {"noise": kw["hidden_states"],
                "cond": {"encoder_hidden_states": kw["encoder_hidden_states"],
                         "pooled_projections": kw["pooled_projections"]}}

    return sample


CASES = {  # model, sample_fn(fixed), scheduler
    "ddim": (lively_dit, lambda fixed: class_batches(8, fixed=fixed), lambda: DDIMScheduler(clip_sample=False)),
    "dpm_solver": (lively_dit, lambda fixed: class_batches(8, fixed=fixed), DPMSolverMultistepScheduler),
    "flow_match": (ARCHS["sd3"].build, lambda fixed: sd3_batches(4, fixed=fixed), FlowMatchEulerDiscreteScheduler),
}


def _run(model, scheduler, batch, steps=T):
    """A plain pipeline loop over the scheduler (no lazypass code but the model)."""
    s = copy.deepcopy(scheduler)
    s.set_timesteps(steps)
    x = batch["noise"] * getattr(s, "init_noise_sigma", 1.0)
    scale = getattr(s, "scale_model_input", lambda x, t: x)  # flow matching has none
    with torch.no_grad():
        for t in s.timesteps:
            out = default_call(model, scale(x, t), t.expand(len(x)), batch["cond"])
            x = s.step(out[:, : x.shape[1]], t, x).prev_sample
    return x


def _lazy_ratio(model, scheduler, batch, steps=T):
    with lazypass.trajectory(model):
        _run(model, scheduler, batch, steps)
        return lazypass.stats(model).lazy_ratio


def test_diffusers_ddim_gives_the_builtin_ddim_fit():
    runs = []
    for scheduler in (None, DDIMScheduler(clip_sample=False)):
        model = lazypass.apply(lively_dit())
        r = lazypass.fit(model, class_batches(4), scheduler=scheduler, objective="one_step", steps=6, lr=1e-3,
                         rho=1e-6, num_inference_steps=5, progress=False)  # fmt: skip
        runs.append(r.loss)
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fit_lowers_the_loss(case):
    build, batches, scheduler = CASES[case]
    model = lazypass.apply(build())
    r = lazypass.fit(model, batches(True), scheduler=scheduler(), objective="one_step", rho=1e-7, steps=6 * T,
                     lr=1e-3, num_inference_steps=T, progress=False)  # fmt: skip
    first, last = np.mean(r.loss[:T]), np.mean(r.loss[-T:])
    assert last < 0.8 * first, (first, last)
    assert np.mean(r.fidelity[-T:]) < 0.8 * np.mean(r.fidelity[:T])


@pytest.mark.parametrize("case", sorted(CASES))
def test_target_ratio_is_reached(case):
    build, batches, scheduler = CASES[case]
    model = lazypass.apply(build())
    target = 0.45
    # the default objective, on-policy: rollouts step private copies of any diffusers scheduler
    # on-policy gates of these tiny models vary a lot from sample to sample: calibrate on 16 batches
    r = lazypass.fit(model, batches(False), scheduler=scheduler(), target_ratio=target, steps=100, rounds=2,
                     num_inference_steps=T, calibration_batches=16, progress=False)  # fmt: skip
    assert abs(r.lazy_ratio - target) <= 0.02, r  # on the calibration batches
    # batches the calibration never saw, sampled by a plain loop over the scheduler (4-5 sites: ratios vary per batch)
    fresh = [_lazy_ratio(model, scheduler(), batches(False)(500 + i)) for i in range(8)]
    assert abs(np.mean(fresh) - target) <= 0.1, fresh


@pytest.mark.parametrize("scheduler", [DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler])
def test_staggered_rows_follow_the_schedulers_own_trajectories(scheduler):
    """Rows start at different steps, each group with its own scheduler state: every row ends where a plain run ends."""
    build, batches = (lively_dit, class_batches(4)) if scheduler is DPMSolverMultistepScheduler else (
        ARCHS["sd3"].build, sd3_batches(4))
    model = lazypass.apply(build())
    reference = build()  # the same weights, not lazy
    steps, batch = 6, batches(0)
    want = _run(reference, scheduler(), batch, steps)

    soft = SoftModel(model, default_call)
    source = BatchSource(batches, "distill", guided=False)
    with gates_only(model, soft.forward):
        distill = Distill(soft, source, Schedule(scheduler(), steps), 1.0)
        offsets = [g.offset for g in distill.groups for _ in range(int(g.mask.sum()))]
        assert len(set(offsets)) > 1  # really staggered
        got = torch.empty_like(want)
        for _ in range(max(offsets) + steps):
            distill._advance()
            for g in distill.groups:  # rows that just finished their first trajectory
                if g.started and g.offset + distill.u - 1 == steps - 1:
                    got[g.mask] = distill.x[g.mask]
    assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))


def test_flow_matching_diffusion_loss_noises_and_targets_velocity():
    s = Schedule(FlowMatchEulerDiscreteScheduler(), T)
    assert s.prediction == "flow"
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = s.timesteps[torch.tensor([1, 3, 5])]
    sigma = (t / 1000).reshape(-1, 1, 1, 1)
    assert torch.allclose(s.noised(x0, noise, t), sigma * noise + (1 - sigma) * x0, atol=1e-6)
    assert torch.equal(s.target(x0, noise, t), noise - x0)

    model = lazypass.apply(ARCHS["sd3"].build())
    data = sd3_batches(4)

    def with_x0(i):
        b = data(i)
        return {"x0": b["noise"], "cond": b["cond"]}

    r = lazypass.fit(model, with_x0, scheduler=FlowMatchEulerDiscreteScheduler(), loss="diffusion",
                     objective="one_step", steps=3, lr=1e-3, num_inference_steps=T, progress=False)
    assert len(r.loss) == 3 and all(np.isfinite(r.loss))


def test_v_prediction_target():
    s = Schedule(DDIMScheduler(prediction_type="v_prediction"), T)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = s.timesteps[torch.tensor([2, 6])]
    abar = s.reference.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(s.target(x0, noise, t), abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-6)
    dpm = Schedule(DPMSolverMultistepScheduler(prediction_type="v_prediction"), T)  # no get_velocity there
    assert torch.allclose(dpm.target(x0, noise, t), abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-5)


# -- bad input: each a clear error before any training step ------------------------------------


class NoStep:
    config = {"prediction_type": "epsilon"}

    def set_timesteps(self, n):
        self.timesteps = torch.arange(n)


def test_bad_schedulers_and_batches_are_refused_before_training():
    model = lazypass.apply(lively_dit())
    fit = dict(steps=1, num_inference_steps=4, progress=False)
    with pytest.raises(TypeError, match="diffusers scheduler.*NoStep has no step"):
        lazypass.fit(model, class_batches(2), scheduler=NoStep(), **fit)
    with pytest.raises(ValueError, match="cannot interpret the prediction type 'mu_prediction'"):
        lazypass.fit(model, class_batches(2), scheduler=DDIMScheduler(prediction_type="mu_prediction"), **fit)

    def shrinking(i):
        return class_batches(4 - i)(i)

    with pytest.raises(ValueError, match="batch of 3, earlier batches had 4; keep the batch size fixed"):
        lazypass.fit(model, shrinking, **fit)
    with pytest.raises(ValueError, match="set_timesteps.*failed.*mu"):
        lazypass.fit(model, class_batches(2), scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), **fit)
    assert not hasattr(model, "lazy_gates")  # never traced: no training step ran
