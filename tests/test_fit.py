"""Fitting the gates: the soft program, lazypass.fit, target ratio, gate files, two processes."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lazypass
from lazypass.runtime import runtime
from tests.archs import ARCHS, assert_batch_close, random_gates
from tests.fitting import class_batches, lively_dit

T = 10  # sampling steps of the fits below


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models run faster on one thread, and the machine is shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fit(model, **kw):
    kw.setdefault("objective", "one_step")  # this file tests the paper's objective; on-policy: tests/fitting/
    kw.setdefault("sample_fn", class_batches(8))
    kw.setdefault("steps", 60)
    kw.setdefault("lr", 1e-3)
    kw.setdefault("num_inference_steps", T)
    kw.setdefault("progress", False)
    return lazypass.fit(model, **kw)


def _sample(model, batch: dict, steps: int = T, guidance_scale: float = 1.0, call=None):
    """Lazy DDIM on one batch; returns (x0, lazy ratio). ``call(model, x, t, cond)`` as in fit."""
    fn = model if call is None else (lambda x, t, c: call(model, x, t, c))
    with lazypass.trajectory(model):
        x = lazypass.sampling.ddim_sample(fn, batch["noise"], steps, cond=batch["cond"],
                                          guidance_scale=guidance_scale, null_cond=batch.get("null_cond"))
        return x, lazypass.stats(model).lazy_ratio


def _lazy_error(model, batches, **kw):
    """How far lazy sampling lands from full-compute sampling (same model, never skipping).

    Returns the mean squared difference of the final samples and the lazy ratio, over batches.
    """
    threshold = runtime(model).threshold
    lazypass.set_threshold(model, 1.5)
    full = [_sample(model, b, **kw)[0] for b in batches]
    lazypass.set_threshold(model, threshold)
    lazy = [_sample(model, b, **kw) for b in batches]
    error = np.mean([float((x - f).pow(2).mean()) for (x, _), f in zip(lazy, full)])
    return error, float(np.mean([r for _, r in lazy]))


def _random_gates_error(model, batches, ratio, **kw):
    """``_lazy_error`` of seeded random gates whose threshold gives ``ratio`` on these batches."""
    random_gates(model, seed=0, std=0.05)
    low, high = -0.5, 1.5
    for _ in range(10):  # the lazy ratio falls as the threshold rises
        lazypass.set_threshold(model, (low + high) / 2)
        if np.mean([_sample(model, b, **kw)[1] for b in batches]) > ratio:
            low = (low + high) / 2
        else:
            high = (low + high) / 2
    error, got = _lazy_error(model, batches, **kw)
    assert abs(got - ratio) <= 0.02, (got, ratio)
    return error


def _beats_random_gates(fitted, fresh, batches, **kw):
    """Fitted gates skip branches whose reuse costs less than random gates at the same lazy ratio."""
    error, ratio = _lazy_error(fitted, batches, **kw)
    assert 0.1 < ratio < 0.9, ratio
    baseline = _random_gates_error(fresh, batches, ratio, **kw)
    assert error < 0.2 * baseline, (error, baseline, ratio)


# -- the soft program ------------------------------------------------------------------------


def _soft_inputs(prog, mix: float, reuse=None, hard: float = 0.0):
    """The soft program's inputs after the user's: every row may skip, age 0, zero pools."""
    from lazypass.fitting.soft import _extra_inputs

    scalar = lambda v, device: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return _extra_inputs(prog.state_specs, dict(mix=mix, hard=hard, reuse=reuse), 0.5, None, scalar)


def _reuse_specs(prog):
    return [s for s in prog.state_specs if s.name.startswith("lazy_reuse_")]


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_soft_program_branch_outputs_and_full_mix(name):
    arch = ARCHS[name]
    model = arch.build()
    ref = arch.build()
    lazypass.apply(model, granularity="site", reuse="copy")  # a gate per site, the paper's copies
    args, kwargs = arch.inputs(2, 500, 0)
    prog, leaves = runtime(model).program_for(args, kwargs, mode="soft")
    targets = [n.target for n in prog.core.graph.nodes if n.op == "call_function"]
    assert torch.ops.higher_order.cond not in targets
    assert targets.count(torch.ops.aten.sigmoid.default) == len(arch.kinds)

    recorded = {}
    hooks = [ref.get_submodule(b).register_forward_hook(lambda m, i, o, b=b: recorded.setdefault(b, o))
             for b in arch.branches]
    with torch.no_grad():
        expected = arch.output(ref(*args, **kwargs))
    for h in hooks:
        h.remove()
    prevs = [torch.randn(s.shape) for s in _reuse_specs(prog)]
    with torch.no_grad():
        outs = prog.core(*leaves, *_soft_inputs(prog, 0.0, prevs))  # mix 0: the full model, exactly
    n = prog.n_user_outputs
    full = arch.output(torch.utils._pytree.tree_unflatten(list(outs[:n]), prog.out_spec))
    assert torch.equal(full, expected) or (full - expected).abs().max() <= 1e-6
    fz = list(outs[n : n + len(prevs)])
    assert len(fz) == sum(len(s.tokens) for s in prog.sites)
    for site, branch in zip(prog.sites, arch.branches):
        module_out = recorded[branch] if isinstance(recorded[branch], tuple) else (recorded[branch],)
        for tokens in site.tokens:
            # a joint attention module returns its streams (image, text) as a tuple; a stream
            # nothing reads (the text output of SD3's last block) is no stream of the site
            (want,) = [o for o in module_out if o is not None and o.shape[1] == tokens]
            got = fz.pop(0)
            assert got.shape == want.shape and (got - want).abs().max() <= 1e-6, branch
    assert not fz
    assert outs[n + len(prevs)].shape == (len(arch.kinds), 2)


def test_soft_blend_is_the_papers_blend():
    model = lazypass.apply(lively_dit(), granularity="site", reuse="copy")
    x, t, y = torch.randn(2, 4, 8, 8), torch.full((2,), 500), torch.tensor([1, 2])
    prog, leaves = runtime(model).program_for((x, t, y), {}, mode="soft")
    k = len(_reuse_specs(prog))
    with torch.no_grad():
        full = prog.core(*leaves, *_soft_inputs(prog, 0.0))
        fz = list(full[1 : 1 + k])
        same = prog.core(*leaves, *_soft_inputs(prog, 1.0, fz))  # Y_prev = F(Z): blend changes nothing
        assert (same[0] - full[0]).abs().max() <= 1e-5
        # gates forced to s ~ 1 with a stale Y_prev: the output is that of the reused branches
        model.lazy_gates.bias.fill_(30.0)
        stale = [torch.randn_like(f) for f in fz]
        lazy = prog.core(*leaves, *_soft_inputs(prog, 1.0, stale))
        assert (lazy[0] - full[0]).abs().max() > 1e-2
        assert torch.allclose(lazy[1 + k], torch.ones(4, 2))
        # hard decisions (straight-through): s ~ 1 > threshold, so exactly the reused branches
        hard = prog.core(*leaves, *_soft_inputs(prog, 1.0, stale, hard=1.0))
        assert (hard[0] - lazy[0]).abs().max() <= 1e-5
    scores = lazy[1 + k]
    assert scores.dtype == torch.float32


# -- fit ---------------------------------------------------------------------------------------


def test_fit_lowers_the_loss():
    model = lazypass.apply(lively_dit())
    # the same batch every time: iteration k and k + T see the same rows at the same steps
    result = _fit(model, sample_fn=class_batches(8, fixed=True), rho=1e-6, steps=6 * T)
    first, last = np.mean(result.loss[:T]), np.mean(result.loss[-T:])
    assert last < 0.8 * first, (first, last)
    assert len(result.loss) == len(result.fidelity) == len(result.lazy) == 6 * T


def test_laziness_grows_with_rho():
    ratios = []
    for rho in (1e-7, 1e-6, 1e-5):
        model = lazypass.apply(lively_dit(), granularity="site")  # per-site gates: the ratio moves in small steps
        ratios.append(_fit(model, rho=rho, measure=True).lazy_ratio)
    assert ratios[0] < ratios[1] < ratios[2], ratios
    assert ratios[2] - ratios[0] > 0.3, ratios


@pytest.fixture(scope="module")
def fitted_to_target():
    model = lazypass.apply(lively_dit())
    return model, _fit(model, target_ratio=0.45, steps=150, calibration_batches=4)


def test_target_ratio_is_reached(fitted_to_target):
    model, result = fitted_to_target
    target = 0.45
    assert abs(result.lazy_ratio - target) <= 0.02, result  # on the calibration batches
    assert result.threshold == runtime(model).threshold
    # the rho controller brought the training-time ratio near the target before calibration
    assert abs(np.mean(result.lazy[-20:]) - target) <= 0.15, result.lazy[-20:]
    # and on batches the calibration never saw (a 4-site model: lazy ratios vary a lot per batch)
    fresh = [_sample(model, class_batches(8)(500 + i))[1] for i in range(4)]
    assert abs(np.mean(fresh) - target) <= 0.1, fresh


def test_fitting_lowers_fidelity_while_skipping_more(fitted_to_target):
    _, result = fitted_to_target
    # at the start the zero gates blend s = 0.5 everywhere and skip nothing; at the end the
    # gates skip about the target share and the blend costs less than at the start
    assert np.mean(result.lazy[-10:]) > np.mean(result.lazy[:10]) + 0.3
    assert np.mean(result.fidelity[-10:]) < 0.5 * np.mean(result.fidelity[:10])


def test_fitted_gates_beat_random_gates_at_the_same_ratio(fitted_to_target):
    model, _ = fitted_to_target
    fresh = lazypass.apply(lively_dit())
    batches = [class_batches(8)(900 + i) for i in range(2)]
    lazypass.trace(fresh, batches[0]["noise"], torch.full((8,), 999), batches[0]["cond"])
    _beats_random_gates(model, fresh, batches)


def test_model_weights_untouched_and_flags_restored():
    model = lazypass.apply(lively_dit())
    model.blocks[0].attn.qkv.weight.requires_grad_(False)  # a mixed set of flags must come back as is
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("lazy_gates")}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    _fit(model, rho=1e-6, steps=5)
    after = {k: v for k, v in model.state_dict().items() if not k.startswith("lazy_gates")}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters() if not n.startswith("lazy_gates")} == {
        n: f for n, f in flags.items() if not n.startswith("lazy_gates")
    }
    assert all(p.requires_grad for p in model.lazy_gates.parameters())
    assert model.training
    assert any(p.abs().sum() > 0 for p in model.lazy_gates.parameters())  # the gates did train


def _guided(i):
    return {**class_batches(4)(i), "null_cond": 10}  # the DiT's null class


def test_fit_with_guidance_reaches_its_target_and_beats_random_gates():
    model = lazypass.apply(lively_dit())
    result = _fit(model, sample_fn=_guided, guidance_scale=3.0, target_ratio=0.4)
    assert abs(result.lazy_ratio - 0.4) <= 0.02, result
    # guided sampling calls the model on cat([x, x]) with cat([cond, null]); the gates saw both halves
    fresh = lazypass.apply(lively_dit())
    b = _guided(0)
    lazypass.trace(fresh, torch.cat([b["noise"]] * 2), torch.full((8,), 999), torch.cat([b["cond"], torch.full((4,), 10)]))
    _beats_random_gates(model, fresh, [_guided(900 + i) for i in range(2)], guidance_scale=3.0)


def test_fit_with_the_diffusion_loss_reaches_its_target():
    def data(i):
        g = torch.Generator().manual_seed(i)
        return {"x0": torch.randn(8, 4, 8, 8, generator=g), "cond": torch.randint(0, 10, (8,), generator=g)}

    model = lazypass.apply(lively_dit())
    result = _fit(model, sample_fn=data, loss="diffusion", target_ratio=0.4)
    assert all(np.isfinite(result.loss))
    assert abs(result.lazy_ratio - 0.4) <= 0.02, result
    fresh = [_sample(model, class_batches(8)(500 + i))[1] for i in range(2)]
    assert abs(np.mean(fresh) - 0.4) <= 0.1, fresh


def _pixart_call(model, x, t, cond):
    return model(x, timestep=t, **cond, return_dict=False)[0]


def test_fit_text_conditioned_diffusers_model():
    arch = ARCHS["pixart"]
    model = lazypass.apply(arch.build())

    def text(i):
        (_, kwargs) = arch.inputs(4, 999, i)
        return {"noise": kwargs["hidden_states"], "cond": {"encoder_hidden_states": kwargs["encoder_hidden_states"]}}

    r = _fit(model, sample_fn=text, steps=20, num_inference_steps=4, target_ratio=0.4)
    assert len(model.lazy_gates.layout) == len(arch.kinds)
    assert abs(r.lazy_ratio - 0.4) <= 0.02, r
    # the same ratio when the caller samples other prompts with the text embeddings as a dict
    fresh = [_sample(model, text(500 + i), steps=4, call=_pixart_call)[1] for i in range(2)]
    assert abs(np.mean(fresh) - 0.4) <= 0.1, fresh


def test_fit_refuses_bad_input():
    model = lazypass.apply(lively_dit())
    with pytest.raises(ValueError, match="unknown keys"):
        _fit(model, sample_fn=lambda i: {"noise": torch.randn(2, 4, 8, 8), "labels": 1}, steps=1)
    with pytest.raises(ValueError, match="null_cond"):
        _fit(model, guidance_scale=2.0, steps=1)
    with pytest.raises(ValueError, match="target_ratio"):
        _fit(model, target_ratio=0.95, steps=1)
    with pytest.raises(ValueError, match="loss"):
        _fit(model, loss="l2", steps=1)
    with pytest.raises(ValueError, match="not lazy"):
        lazypass.fit(lively_dit(), class_batches(2), steps=1)


# -- gate files ------------------------------------------------------------------------------


def _fitted(tmp_path):
    model = lazypass.apply(lively_dit())
    _fit(model, rho=1e-5, steps=20)
    lazypass.set_threshold(model, 0.55)
    path = tmp_path / "gates.safetensors"
    lazypass.save_gates(model, path)
    return model, path


def test_save_load_round_trip(tmp_path):
    model, path = _fitted(tmp_path)
    batch = class_batches(8)(77)
    out, ratio = _sample(model, batch)
    assert ratio > 0  # the gates do skip, so the comparison means something

    for traced in (True, False):  # loading before the first trace applies the gates at the trace
        other = lively_dit()
        if traced:
            lazypass.apply(other, example_inputs=(batch["noise"], torch.full((8,), 999), batch["cond"]))
        else:
            lazypass.apply(other)
        lazypass.load_gates(other, path)
        got, got_ratio = _sample(other, batch)
        assert torch.equal(got, out) and got_ratio == ratio
        assert runtime(other).threshold == 0.55
        for a, b in zip(other.lazy_gates.parameters(), model.lazy_gates.parameters()):
            assert torch.equal(a, b)


def test_mismatched_gate_files_are_refused(tmp_path):
    _, path = _fitted(tmp_path)
    x, t, y = torch.randn(2, 4, 8, 8), torch.full((2,), 999), torch.tensor([1, 2])

    deeper = lazypass.apply(lively_dit(depth=3), example_inputs=(x, t, y))
    before = [p.clone() for p in deeper.lazy_gates.parameters()]
    with pytest.raises(ValueError, match="different model.*4 sites.*6 sites"):
        lazypass.load_gates(deeper, path)
    assert all(torch.equal(a, b) for a, b in zip(before, deeper.lazy_gates.parameters()))  # nothing loaded
    assert runtime(deeper).threshold == 0.5

    wider = lazypass.apply(lively_dit(hidden_size=64))  # untraced: refused at the first trace
    lazypass.load_gates(wider, path)
    with torch.no_grad(), pytest.raises(ValueError, match="different model.*gate dims"):
        wider(x, t, y)  # (with grad on and trainable weights a lazy model runs its original forward)

    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) - 20])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        lazypass.load_gates(lazypass.apply(lively_dit()), tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x07" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        lazypass.load_gates(lazypass.apply(lively_dit()), tmp_path / "junk.safetensors")

    from safetensors.torch import save_file

    save_file({"weights.0": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a lazypass gates file"):
        lazypass.load_gates(lazypass.apply(lively_dit()), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not lazy"):
        lazypass.load_gates(lively_dit(), path)
    with pytest.raises(FileNotFoundError):
        lazypass.load_gates(lazypass.apply(lively_dit()), tmp_path / "missing.safetensors")


# -- two processes ------------------------------------------------------------------------------


def test_two_processes_match_one(tmp_path):
    from safetensors.torch import load_file

    steps, batch = 12, 8
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(root, "tests", "fit_ddp_worker.py"), str(tmp_path), str(steps), str(batch)]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])

    model = lazypass.apply(lively_dit())
    lazypass.fit(model, class_batches(batch), objective="one_step", steps=steps, lr=1e-3, rho=1e-6,
                 num_inference_steps=5, progress=False)  # fmt: skip
    single = {k: v.detach() for k, v in model.lazy_gates.state_dict().items()}
    assert max(v.abs().max() for v in single.values()) > 1e-3  # the gates moved
    for k in single:  # two ranks with half the batch each = one process with the whole batch
        assert_batch_close(ranks[0][k], single[k])


def test_a_0d_null_class_id_fits_like_one_per_row():
    base = class_batches(4)
    gates = []
    for null in (torch.tensor(10), 10, torch.full((4,), 10)):  # one id for every row, or one per row
        model = lazypass.apply(lively_dit())
        result = _fit(model, sample_fn=lambda i, null=null: {**base(i), "null_cond": null}, steps=3,
                      guidance_scale=2.0, rho=1e-5)
        gates.append((result.loss, [p.detach().clone() for p in model.lazy_gates.parameters()]))
    for loss, params in gates[1:]:
        assert loss == gates[0][0]
        assert all(torch.equal(a, b) for a, b in zip(params, gates[0][1]))
    assert any(p.abs().sum() > 0 for p in gates[0][1])
