"""``lazypass.fit_pipeline``: gates fitted through tiny diffusers pipelines, then used by ``pipe(...)`` unchanged.

Four pipelines built from seeded random components (nothing downloaded): DiT (DDIM, learned
sigma, CFG ``[cond, uncond]``), PixArt-alpha (DPM-Solver multistep, CFG ``[uncond, cond]``),
SD3 and Flux (flow-match Euler; Flux with dynamic shifting, packed latents, no CFG batch).
"""

import numpy as np
import pytest
import torch

import lazypass
from lazypass.fitting.calibrate import lazy_sampling
from lazypass.fitting.pipeline import plan_pipeline
from lazypass.fitting.sampler import Schedule
from tests.archs import random_gates
from tests.pipelines import dit_pipeline, flux_pipeline, pixart_pipeline, sd3_pipeline

STEPS = 6  # sampling steps
TEXT = ["a photo of a cat", "a red car", "a dog on the road", "a big tree", "the blue sky at night",
        "a small bird", "a city river", "a green mountain"]


@pytest.fixture(autouse=True)
def quiet_one_thread():
    import diffusers
    import transformers

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    levels = diffusers.utils.logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # tiny tokenizers: "truncated" warnings
    transformers.logging.set_verbosity_error()
    yield
    diffusers.utils.logging.set_verbosity(levels[0])
    transformers.logging.set_verbosity(levels[1])
    torch.set_num_threads(n)


class Case:
    """A pipeline builder, its prompts, the pipe(...) call and the extra fit_pipeline arguments."""

    def __init__(self, build, prompts, run, **fit_kwargs):
        self.build, self.prompts, self._run, self.fit_kwargs = build, prompts, run, fit_kwargs

    def pipe(self):
        pipe = self.build()
        pipe.transformer = lazypass.apply(pipe.transformer)
        return pipe

    def run(self, pipe, prompts, generators):
        """pipe(...) on one batch; returns (images, lazypass.stats of the run)."""
        lazypass.reset(pipe.transformer)
        images = self._run(pipe, prompts, generators).images
        return images, lazypass.stats(pipe.transformer)


TEXT_RUN = dict(num_inference_steps=STEPS, output_type="np", max_sequence_length=8)
CASES = {
    "dit": Case(dit_pipeline, [1, 207, 360, 5, 88, 999, 12, 400],
                lambda p, pr, g: p(class_labels=pr, generator=g, num_inference_steps=STEPS, output_type="np")),
    "pixart": Case(lambda: pixart_pipeline(tokenizer=True), TEXT,
                   lambda p, pr, g: p(pr, generator=g, use_resolution_binning=False, **TEXT_RUN),
                   max_sequence_length=8),
    "sd3": Case(sd3_pipeline, TEXT, lambda p, pr, g: p(pr, generator=g, **TEXT_RUN), max_sequence_length=8),
    "flux": Case(flux_pipeline, TEXT, lambda p, pr, g: p(pr, generator=g, height=8, width=8, **TEXT_RUN),
                 max_sequence_length=8, height=8, width=8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fit_samples_exactly_as_the_pipeline_does(name):
    """fit's lazy sampling loop (calibration) and pipe(...) take the same decisions on the same batch."""
    case = CASES[name]
    pipe = case.pipe()
    plan = plan_pipeline(pipe, case.prompts, num_inference_steps=STEPS, batch_size=4, **case.fit_kwargs)
    case.run(pipe, plan.prompts(0), plan.generators(0))  # traces, creates the gates
    random_gates(pipe.transformer, seed=0)
    _, want = case.run(pipe, plan.prompts(0), plan.generators(0))
    assert want.skipped.any() and not want.skipped.all()
    schedule = Schedule(plan.scheduler, STEPS, plan.set_timesteps_kwargs)
    ratio, _ = lazy_sampling(pipe.transformer, [plan.sample_fn(0)], plan.call, schedule, plan.guidance_scale)
    got = lazypass.stats(pipe.transformer)
    assert np.array_equal(got.skipped, want.skipped) and ratio == want.lazy_ratio
    assert np.abs(got.scores - want.scores).max() <= 1e-6


@pytest.mark.parametrize("name", sorted(CASES))
def test_fit_pipeline_reaches_the_target_through_the_pipeline(name, tmp_path):
    case = CASES[name]
    pipe = case.pipe()
    target = 0.4
    result = lazypass.fit_pipeline(pipe, case.prompts, num_inference_steps=STEPS, target_ratio=target, steps=60,
                                   rounds=2, batch_size=4, calibration_batches=8, progress=False, **case.fit_kwargs)
    assert abs(result.lazy_ratio - target) <= 0.02, result  # the calibration batches
    # pipe(...) on batches fit never saw (other noise seeds). Tiny models with 4-6 sites and 4 prompts a batch
    # give lazy ratios that spread by ~0.03-0.06 from batch to batch, and the threshold was calibrated on 8
    # batches: the mean of 8 fresh batches lands within 0.1 of the target.
    fresh = plan_pipeline(pipe, case.prompts, num_inference_steps=STEPS, batch_size=4, seed=7, **case.fit_kwargs)
    runs = [case.run(pipe, fresh.prompts(i), fresh.generators(i)) for i in range(8)]
    ratios = [st.lazy_ratio for _, st in runs]
    assert abs(np.mean(ratios) - target) <= 0.1, ratios

    path = tmp_path / f"{name}.safetensors"
    lazypass.save_gates(pipe.transformer, path)
    other = case.pipe()  # the same seeded weights, gates from the file only
    lazypass.load_gates(other.transformer, path)
    images, st = case.run(other, fresh.prompts(0), fresh.generators(0))
    assert np.array_equal(images, runs[0][0]) and np.array_equal(st.skipped, runs[0][1].skipped)


def test_bad_pipelines_are_refused_before_training():
    pipe = dit_pipeline()
    with pytest.raises(ValueError, match=r"pipe.transformer \(DiTTransformer2DModel\) is not lazy.*lazypass.apply"):
        lazypass.fit_pipeline(pipe, [1, 2], steps=1)
    assert not hasattr(pipe.transformer, "lazy_gates")

    class Other:
        transformer = lazypass.apply(dit_pipeline().transformer)

    with pytest.raises(TypeError, match="does not know Other; supported"):
        lazypass.fit_pipeline(Other(), [1, 2], steps=1)
    with pytest.raises(TypeError, match="takes.*scheduler.*from the pipeline"):
        lazypass.fit_pipeline(dit_pipeline(), [1, 2], steps=1, scheduler=None)
