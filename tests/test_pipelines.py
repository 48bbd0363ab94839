"""diffusers pipelines end to end with a lazy transformer: CFG batches, split CFG, one at a time.

Gates are set to seeded random values (what matters here is that decisions are mixed
within a batch and across steps, not that they are good), so every test first checks that
the gates really skipped some rows and computed others.
"""

import numpy as np
import pytest
import torch

import lazypass
from tests.pipelines import dit_pipeline, dit_split_cfg, encode, pixart_pipeline, pixart_split_cfg
from tests.archs import assert_batch_close, random_gates

STEPS = 4
LABELS, SEEDS = [1, 207, 360], [0, 1, 2]


def _mixed(model):
    st = lazypass.stats(model)
    return bool((st.skipped.any(axis=2) & ~st.skipped.all(axis=2)).any()) and bool(st.skipped.any())


def _to_np(images: torch.Tensor) -> np.ndarray:
    """The pipelines' own post-processing of decoded images (output_type="np")."""
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


# -- DiT ----------------------------------------------------------------------------

def _dit(pipe, labels, seeds, guidance=4.0):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(class_labels=labels, generator=gens, num_inference_steps=STEPS, guidance_scale=guidance,
                output_type="np").images


@pytest.fixture(scope="module")
def dit():
    pipe = dit_pipeline()
    full = _dit(pipe, LABELS, SEEDS)
    pipe.transformer = lazypass.apply(pipe.transformer, granularity="site")
    assert (_dit(pipe, LABELS, SEEDS) == full).all()  # zero gates: nothing changes
    random_gates(pipe.transformer, seed=0)
    return pipe, full


def test_dit_pipeline_keeps_the_transformer_object_and_config(dit):
    pipe, _ = dit
    assert type(pipe.transformer).__name__ == "DiTTransformer2DModel"
    assert pipe.transformer.config.num_embeds_ada_norm == 1000
    assert hasattr(pipe.transformer, "lazy_gates")


def test_dit_cfg_batch_equals_one_label_at_a_time(dit):
    pipe, full = dit
    lazypass.reset(pipe.transformer)
    batched = _dit(pipe, LABELS, SEEDS)
    assert _mixed(pipe.transformer), "random gates gave no mixed CFG batch; pick another seed"
    assert np.abs(batched - full).max() > 1e-3  # the gates really changed the images
    for i, (label, seed) in enumerate(zip(LABELS, SEEDS)):
        lazypass.reset(pipe.transformer)
        single = _dit(pipe, [label], [seed])
        assert_batch_close(single[0], batched[i])
    # run 1 then run 2 with no reset between: the timestep rising again starts a new run
    again = [_dit(pipe, LABELS, SEEDS) for _ in range(2)]
    assert (again[0] == batched).all() and (again[1] == batched).all()


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])  # int64 / float32 timesteps
def test_dit_split_cfg_equals_batched_cfg(scheduler):
    pipe = dit_pipeline(scheduler=scheduler)
    pipe.transformer = lazypass.apply(pipe.transformer, granularity="site")
    _dit(pipe, LABELS[:2], SEEDS[:2])  # trace, create the gates
    random_gates(pipe.transformer, seed=3)
    lazypass.reset(pipe.transformer)
    batched = _dit(pipe, LABELS[:2], SEEDS[:2])
    assert _mixed(pipe.transformer)
    batched_rows = lazypass.stats(pipe.transformer).skipped.shape[0]

    lazypass.reset(pipe.transformer)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS[:2]]
    split = _to_np(dit_split_cfg(pipe, LABELS[:2], gens, STEPS, 4.0))
    st = lazypass.stats(pipe.transformer)
    assert st.skipped.shape[0] == 2 * batched_rows  # two calls per step
    assert st.skipped[1:].any()  # the second call at a timestep reused its own cache
    assert_batch_close(split, batched)


# -- PixArt-alpha ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def pixart():
    pipe = pixart_pipeline()
    g = torch.Generator().manual_seed(0)
    emb, mask = encode(pipe, torch.randint(1, 64, (3, 6), generator=g))
    neg, neg_mask = encode(pipe, torch.zeros(3, 6, dtype=torch.long))
    latents = torch.randn(3, 4, 8, 8, generator=g)
    inputs = (emb, mask, neg, neg_mask, latents)
    full = _pixart(pipe, inputs, slice(None))
    pipe.transformer = lazypass.apply(pipe.transformer, granularity="site")
    _pixart(pipe, inputs, slice(None))
    random_gates(pipe.transformer, seed=0)
    return pipe, inputs, full


def _pixart(pipe, inputs, rows, guidance=4.5):
    emb, mask, neg, neg_mask, latents = (x[rows] for x in inputs)
    return pipe(negative_prompt=None, prompt_embeds=emb, prompt_attention_mask=mask,
                negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask, latents=latents,
                num_inference_steps=STEPS, guidance_scale=guidance, output_type="np",
                use_resolution_binning=False).images


def test_pixart_cfg_batch_equals_one_prompt_at_a_time(pixart):
    pipe, inputs, full = pixart
    lazypass.reset(pipe.transformer)
    batched = _pixart(pipe, inputs, slice(None))
    assert _mixed(pipe.transformer)
    assert np.abs(batched - full).max() > 1e-3
    for i in range(3):
        lazypass.reset(pipe.transformer)
        single = _pixart(pipe, inputs, slice(i, i + 1))
        assert_batch_close(single[0], batched[i])


def test_pixart_split_cfg_equals_batched_cfg(pixart):
    pipe, inputs, _ = pixart
    lazypass.reset(pipe.transformer)
    batched = _pixart(pipe, inputs, slice(None))
    lazypass.reset(pipe.transformer)
    split = _to_np(pixart_split_cfg(pipe, *inputs[:4], inputs[4], STEPS, 4.5))
    assert lazypass.stats(pipe.transformer).skipped.any()
    assert_batch_close(split, batched)


# -- fitted gates, saved and loaded -------------------------------------------------------

def _fitted_gates_from_a_file(tmp_path, labels, seeds, fit_steps, one_at_a_time=True):
    """Gates fitted through a CFG pipeline's transformer, saved, loaded into a fresh pipeline."""
    pipe = dit_pipeline()
    pipe.transformer = lazypass.apply(pipe.transformer, granularity="site")
    rows = len(labels)  # fit at the batch the pipeline samples with: one traced program less

    def batches(i):
        g = torch.Generator().manual_seed(i)
        return {"noise": torch.randn(rows, 4, 8, 8, generator=g),
                "cond": {"class_labels": torch.randint(0, 1000, (rows,), generator=g)},
                "null_cond": {"class_labels": torch.full((rows,), 1000)}}

    result = lazypass.fit(pipe.transformer, batches, steps=fit_steps, lr=5e-2, num_inference_steps=STEPS,
                          guidance_scale=4.0, target_ratio=0.4, progress=False)
    assert abs(result.lazy_ratio - 0.4) <= 0.05, result
    lazypass.save_gates(pipe.transformer, tmp_path / "dit.safetensors")

    fresh = dit_pipeline()  # same seeded weights, gates only from the file
    fresh.transformer = lazypass.apply(fresh.transformer, granularity="site")
    lazypass.load_gates(fresh.transformer, tmp_path / "dit.safetensors")
    batched = _dit(fresh, labels, seeds)
    assert lazypass.stats(fresh.transformer).skipped.any()
    assert (batched == _dit(pipe, labels, seeds)).all()
    for i, (label, seed) in enumerate(zip(labels, seeds) if one_at_a_time else ()):
        single = _dit(fresh, [label], [seed])
        assert_batch_close(single[0], batched[i])


def test_dit_pipeline_with_fitted_gates_from_a_file_fast(tmp_path):
    # one traced batch size per pipeline (batch vs one at a time is tested above and when slow)
    _fitted_gates_from_a_file(tmp_path, LABELS[:2], SEEDS[:2], fit_steps=3, one_at_a_time=False)


@pytest.mark.slow
def test_dit_pipeline_with_fitted_gates_from_a_file(tmp_path):
    _fitted_gates_from_a_file(tmp_path, LABELS, SEEDS, fit_steps=8)
