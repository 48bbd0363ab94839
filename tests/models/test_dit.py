import pytest
import torch

from lazypass.models import DIT_CONFIGS, DiT, build_dit, dit_config, tiny_dit


def _inputs(batch: int = 3, size: int = 8, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, classes + 1, (batch,), generator=g)  # includes the null class
    return x, t, y


@pytest.mark.parametrize("learn_sigma, out_channels", [(True, 8), (False, 4)])
def test_tiny_output_shape(learn_sigma, out_channels):
    model = tiny_dit(learn_sigma=learn_sigma)
    out = model(*_inputs())
    assert out.shape == (3, out_channels, 8, 8)
    assert model.out_channels == out_channels


def test_tiny_patch_and_token_count():
    model = tiny_dit(patch_size=4, input_size=16)
    assert model.x_embedder.num_patches == 16
    assert model.pos_embed.shape == (1, 16, 32)
    assert model(*_inputs(size=16)).shape == (3, 8, 16, 16)


def test_unpatchify_inverts_patchify():
    model = tiny_dit(learn_sigma=False)
    x = torch.randn(2, 4, 8, 8)
    p = model.patch_size
    # (B, C, h, p, w, p) -> (B, h, w, p, p, C) -> (B, T, p*p*C): the inverse of unpatchify's layout
    tokens = x.reshape(2, 4, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 4)
    torch.testing.assert_close(model.unpatchify(tokens), x, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, depth, hidden, heads",
    [("DiT-S/2", 12, 384, 6), ("DiT-B/2", 12, 768, 12), ("DiT-L/2", 24, 1024, 16), ("DiT-XL/2", 28, 1152, 16)],
)
def test_official_configs(name, depth, hidden, heads):
    assert dit_config(name) == dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=2)
    for patch in (4, 8):
        assert DIT_CONFIGS[name[:-1] + str(patch)]["patch_size"] == patch


def test_unknown_config_raises():
    with pytest.raises(ValueError, match="unknown DiT config"):
        dit_config("DiT-M/2")


def test_dit_s2_parameter_count():
    with torch.device("meta"):
        model = build_dit("DiT-S/2")  # 32x32x4 latents, 1000 classes
    # The official count (33.0M) includes the fixed pos_embed, a buffer here.
    n = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    assert abs(n / 33.0e6 - 1) < 0.02


def test_official_init_outputs_zero():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DiT(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10, init="official").eval()
    x, t, y = _inputs()
    assert torch.count_nonzero(model(x, t, y)) == 0
    # adaLN-Zero: every block is the identity at init
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    torch.testing.assert_close(model.blocks[0](h, c), h, rtol=0, atol=0)


def test_random_init_has_nontrivial_branches():
    model = tiny_dit()
    x, t, y = _inputs()
    c = model.t_embedder(t) + model.y_embedder(y)
    gates = model.blocks[0].adaLN_modulation(c).chunk(6, dim=1)[2]
    assert gates.abs().min() > 0
    assert model(x, t, y).abs().mean() > 1e-2


def test_tiny_dit_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_dit(seed=0), tiny_dit(seed=0), tiny_dit(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.final_layer.linear.weight, c.final_layer.linear.weight)
    x, t, y = _inputs()
    assert torch.equal(a(x, t, y), b(x, t, y))


def test_label_dropout_only_in_training():
    model = tiny_dit(class_dropout_prob=1.0)
    x, t, _ = _inputs()
    y = torch.tensor([1, 2, 3])
    null = torch.full_like(y, 10)
    eval_out = model(x, t, y)
    assert not torch.allclose(eval_out, model(x, t, null))
    model.train()
    torch.testing.assert_close(model(x, t, y), model.eval()(x, t, null))
    forced = model.y_embedder(y, force_drop_ids=torch.tensor([1, 0, 0]))
    torch.testing.assert_close(forced, model.y_embedder(torch.tensor([10, 2, 3])))


def test_load_official_state_dict_with_pos_embed():
    model = tiny_dit()
    state = dict(model.state_dict())
    assert "pos_embed" not in state
    state["pos_embed"] = torch.zeros(1, 16, 32)  # the official checkpoints store it
    tiny_dit(seed=1).load_state_dict(state)  # strict: no unexpected key


def test_export():
    model = tiny_dit()
    args = _inputs()
    ep = torch.export.export(model, args)
    torch.testing.assert_close(ep.module()(*args), model(*args))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("scaled_dot_product_attention" in s for s in targets)
