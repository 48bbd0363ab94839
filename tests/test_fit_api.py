"""The shape of ``lazypass.fit``: its options, its config object, and the frozen-model context."""

import dataclasses

import pytest
import torch

import lazypass
from lazypass.fitting.frozen import gates_only
from tests.fitting import class_batches, lively_dit


def test_options_build_a_checked_config():
    cfg = lazypass.FitConfig.from_options(steps=3, lr=1e-3)
    assert (cfg.steps, cfg.lr, cfg.num_inference_steps) == (3, 1e-3, 20)
    assert lazypass.FitConfig.from_options(cfg, lr=1e-2) == dataclasses.replace(cfg, lr=1e-2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 4
    with pytest.raises(TypeError, match=r"unknown fit option.*\['stpes'\].*known options.*'steps'"):
        lazypass.FitConfig.from_options(stpes=3)
    for bad in (dict(steps=0), dict(lr=-1.0), dict(rho=float("nan")), dict(num_inference_steps=1),
                dict(target_ratio=1.0), dict(calibration_batches=0), dict(loss="l1"), dict(steps=True),
                dict(objective="rollout"), dict(rounds=0), dict(loss="diffusion")):
        with pytest.raises(ValueError):
            lazypass.FitConfig(**bad)


def test_fit_takes_a_config_and_options_and_refuses_unknown_ones():
    model = lazypass.apply(lively_dit())
    with pytest.raises(TypeError, match="unknown fit option.*known options"):
        lazypass.fit(model, class_batches(2), steps=1, learning_rate=1e-3)
    with pytest.raises(TypeError, match="config must be a FitConfig"):
        lazypass.fit(model, class_batches(2), 5)  # the old positional steps
    cfg = lazypass.FitConfig(objective="one_step", steps=2, lr=1e-3, num_inference_steps=4, progress=False)
    r = lazypass.fit(model, class_batches(2), cfg, steps=3)  # options replace config fields
    assert len(r.loss) == 3


def test_gates_only_restores_the_model_on_error():
    model = lively_dit().train()
    model.blocks[0].mlp.fc1.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    own = model.forward

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with gates_only(model, boom):
            assert not model.training and not any(p.requires_grad for p in model.parameters())
            model(torch.zeros(1))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training and "forward" not in model.__dict__ and model.forward == own
