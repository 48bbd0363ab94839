"""The flow-matching digits model (diffusers SD3Transformer2DModel, examples/assets/digits_flow):
it loads offline, samples sanely in 4 Euler steps, its labels steer it, and its training is seeded."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from digits_eval import (  # noqa: E402
    FLOW_CONFIG_PATH, FLOW_DIR, FLOW_LABELS_PATH, FLOW_SHIFT, FLOW_WEIGHTS_PATH, NULL_CLASS, flow_cond,
    flow_metadata, flow_sample, flow_scheduler, load_classifier, load_flow_dit,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches of 8 at 8x8: one thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def flow():
    return load_flow_dit()


def test_committed_flow_model_loads(flow):
    transformer, label_embedding = flow
    assert type(transformer).__name__ == "SD3Transformer2DModel"
    config = json.loads(FLOW_CONFIG_PATH.read_text())
    assert config["_class_name"] == "SD3Transformer2DModel"
    assert all(transformer.config[k] == v for k, v in config.items() if not k.startswith("_"))
    assert FLOW_WEIGHTS_PATH.stat().st_size + FLOW_LABELS_PATH.stat().st_size < 5 * 2**20
    assert label_embedding.context.shape[0] == label_embedding.pooled.shape[0] == NULL_CLASS + 1
    meta = flow_metadata()
    for key in ("seed", "config", "steps", "train_seconds", "train_cpu_seconds", "load_avg_1min", "sigma_sampling"):
        assert key in meta, key
    assert meta["config"] == {k: v for k, v in config.items() if not k.startswith("_") and k in meta["config"]}
    assert flow_scheduler().config.shift == FLOW_SHIFT


def test_four_step_sample_is_sane(flow):
    transformer, label_embedding = flow
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8)
    x = flow_sample(transformer, label_embedding, noise, labels, 4)
    assert x.shape == (8, 1, 8, 8) and torch.isfinite(x).all()
    assert x.abs().max() < 2.0 and 0.3 < x.std() < 1.2  # data lie in [-1, 1], std 0.75
    with torch.no_grad():
        predicted = load_classifier()(x.clamp(-1, 1)).argmax(1)
    assert (predicted == labels).sum() >= 6, predicted.tolist()  # it draws the digits asked for


def test_labels_steer_the_model(flow):
    transformer, label_embedding = flow
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)).expand(2, -1, -1, -1)
    t = torch.full((2,), 500.0)
    cond = flow_cond(label_embedding, torch.tensor([3, 7]))
    assert cond["encoder_hidden_states"].shape == (2, 4, transformer.config.joint_attention_dim)
    assert cond["pooled_projections"].shape == (2, transformer.config.pooled_projection_dim)
    with torch.no_grad():
        v = transformer(x, timestep=t, return_dict=False, **cond)[0]
    assert (v[0] - v[1]).abs().mean() > 0.05  # same input, different label: different velocity
    noise = x[:1].expand(4, -1, -1, -1)
    labels = torch.tensor([3, 7, 3, 7])
    plain = flow_sample(transformer, label_embedding, noise[:2], labels[:2], 4)
    guided = flow_sample(transformer, label_embedding, noise, labels, 4, guidance_scale=2.0)
    assert (plain[0] - plain[1]).abs().mean() > 0.1
    assert torch.allclose(guided[:2], guided[2:], atol=1e-5)  # CFG batch: a sample does not depend on its neighbours
    assert (guided[:2] - plain).abs().mean() > 1e-3


def test_offline_from_pretrained_matches(flow):
    from diffusers import SD3Transformer2DModel

    transformer, label_embedding = flow
    again = SD3Transformer2DModel.from_pretrained(FLOW_DIR / "transformer", local_files_only=True).eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = label_embedding(torch.tensor([0, NULL_CLASS]))
    kw = dict(timestep=torch.tensor([900.0, 100.0]), return_dict=False, **cond)
    with torch.no_grad():
        torch.testing.assert_close(again(x, **kw)[0], transformer(x, **kw)[0])


def test_training_is_seeded():
    import train_digits

    tiny = dict(json.loads(FLOW_CONFIG_PATH.read_text()), num_layers=1)
    tiny = {k: v for k, v in tiny.items() if not k.startswith("_")}
    runs = [train_digits.train_flow(3, 8, 1e-3, seed=5, ema_decay=0.9, config=tiny) for _ in range(2)]
    (m1, l1, meta), (m2, l2, _) = runs
    for a, b in ((m1, m2), (l1, l2)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    # the CPU time is recorded; three tiny steps on an idle machine may round to 0.0
    assert meta["steps"] == 3 and meta["seed"] == 5 and meta["train_cpu_seconds"] >= 0
