import math

import pytest
import torch

from lazypass.models import tiny_dit
from lazypass.sampling import ALPHAS_CUMPROD, add_noise, alphas_cumprod, ddim_sample, ddim_timesteps
from tests.archs import assert_batch_close


def test_schedule():
    abar = alphas_cumprod()
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    torch.testing.assert_close(betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    # the schedule of diffusers' DDPM/DDIM schedulers with DiT's settings (they keep float32)
    from diffusers import DDIMScheduler

    theirs = DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear").alphas_cumprod
    torch.testing.assert_close(ALPHAS_CUMPROD.float(), theirs, rtol=1e-6, atol=0)


def test_timesteps():
    assert ddim_timesteps(10) == list(range(900, -1, -100))
    assert ddim_timesteps(20) == list(range(950, -1, -50))
    assert ddim_timesteps(7) == [i * 142 for i in range(6, -1, -1)]
    with pytest.raises(ValueError):
        ddim_timesteps(0)
    # what diffusers' DDIMScheduler visits with "leading" spacing and no offset
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(timestep_spacing="leading", steps_offset=0)
    for steps in (7, 10, 20, 50):
        sched.set_timesteps(steps)
        assert ddim_timesteps(steps) == sched.timesteps.tolist()


def test_add_noise():
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([10, 700])
    out = add_noise(x0, noise, t)
    for i in range(2):
        a = ALPHAS_CUMPROD[t[i]].item()
        torch.testing.assert_close(out[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i])
    torch.testing.assert_close(add_noise(x0, noise, 10)[0], out[0])


def test_zero_eps_closed_form():
    calls = []

    def model_fn(x, t, cond):
        calls.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    noise = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    seen = []
    out = ddim_sample(model_fn, noise, 10, callback=lambda i, t, x: seen.append((i, t, x)))
    # eps = 0: each step scales x by sqrt(abar_prev / abar_t); telescoped with abar_final = 1
    torch.testing.assert_close(out, noise / ALPHAS_CUMPROD[900].sqrt())
    i, t, x = seen[0]
    assert (i, t) == (0, 900)
    torch.testing.assert_close(x, noise * (ALPHAS_CUMPROD[800] / ALPHAS_CUMPROD[900]).sqrt())
    assert [t for _, t, _ in seen] == ddim_timesteps(10)
    assert all(c.dtype == torch.long and c.shape == (2,) for c in calls)
    assert [int(c[0]) for c in calls] == ddim_timesteps(10)


def _tiny_fn():
    model = tiny_dit()
    return model, lambda x, t, y: model(x, t, y)


def test_guidance_formula_and_row_order():
    model, fn = _tiny_fn()
    noise, y, null = torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.tensor(10)
    # scale 0 is the unconditional prediction alone: the null rows of the batched call
    unconditional = ddim_sample(fn, noise, 5, cond=torch.full((2,), 10))
    assert_batch_close(ddim_sample(fn, noise, 5, cond=y, guidance_scale=0.0, null_cond=null), unconditional)
    # with the null condition equal to the condition, any scale gives the unguided result
    assert_batch_close(ddim_sample(fn, noise, 5, cond=y, guidance_scale=4.0, null_cond=y),
                       ddim_sample(fn, noise, 5, cond=y))


def test_split_cfg_equals_batched_cfg():
    model, fn = _tiny_fn()
    batches = []

    def recording(x, t, y):
        batches.append(x.shape[0])
        return fn(x, t, y)

    noise, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 4, 9])
    kw = dict(cond=y, guidance_scale=4.0, null_cond=torch.tensor(10))
    batched = ddim_sample(recording, noise, 5, **kw)
    assert batches == [6] * 5
    batches.clear()
    split = ddim_sample(recording, noise, 5, split_cfg=True, **kw)
    assert batches == [3] * 10
    assert_batch_close(split, batched)
    assert not torch.allclose(batched, ddim_sample(fn, noise, 5, cond=y), atol=1e-4)


def test_guidance_needs_null_cond():
    with pytest.raises(ValueError, match="null_cond"):
        ddim_sample(lambda x, t, c: x, torch.zeros(1, 4, 2, 2), 2, cond=torch.tensor([1]), guidance_scale=2.0)


def test_learned_sigma_false_checks_channels():
    noise = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    out = ddim_sample(lambda x, t, c: torch.zeros_like(x), noise, 2, learned_sigma=False)
    torch.testing.assert_close(out, noise / ALPHAS_CUMPROD[500].sqrt())  # eps = 0 over 500, 0
    with pytest.raises(ValueError, match="channels"):
        ddim_sample(lambda x, t, c: torch.cat([x, x], 1), noise, 2, learned_sigma=False)


def _gaussian_eps(mu: float, sigma: float):
    """Exact E[eps | x_t] for data x0 ~ N(mu, sigma^2) per coordinate."""

    def eps(x, t, cond):
        a = ALPHAS_CUMPROD[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sigma**2 + 1 - a)

    return eps


def test_ddim_gaussian_toy_converges():
    mu, sigma = 0.5, 0.3
    fn = _gaussian_eps(mu, sigma)
    # With the exact eps, DDIM is a first-order solver of the probability-flow ODE, whose
    # solution here is affine: x0 = mu + sigma * (x_T - sqrt(a) mu) / sqrt(a sigma^2 + 1 - a),
    # a = abar at the first timestep. DDIM's map is affine too, so probe it at x_T = 0 and 1.
    errors = []
    for steps in (10, 50, 250):
        a = ALPHAS_CUMPROD[ddim_timesteps(steps)[0]].item()
        scale = sigma / math.sqrt(a * sigma**2 + 1 - a)
        probe = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
        out = ddim_sample(fn, probe, steps, learned_sigma=False).flatten()
        errors.append(abs(out[0].item() - (mu - scale * math.sqrt(a) * mu)) + abs((out[1] - out[0]).item() - scale))
    assert errors[0] > 3 * errors[1] > 9 * errors[2]
    assert errors[2] < 8e-3

    noise = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    samples = ddim_sample(fn, noise, 500, learned_sigma=False)
    assert abs(samples.mean().item() - mu) < 0.01
    assert abs(samples.std().item() / sigma - 1) < 0.02
