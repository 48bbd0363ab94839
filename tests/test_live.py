"""A lazy model stays a live model (issue 18), on tiny diffusers DiT, PixArt, SD3 and Flux.

Changes made after ``apply`` (adapters, processors, hooks, parameters) are followed at the
next call or refused; ``train()`` and autograd run the original forward; casting works;
per-call options get a program each; a run's caches belong to the run (threads, asyncio).
"""

import asyncio
import copy
import threading

import pytest
import torch
from torch import nn

import lazypass
from lazypass.context import ConcurrentRunError
from lazypass.hooks import CacheHookError
from lazypass.live import Watch
from lazypass.runtime import runtime
from lazypass.sitemap import gate_keys
from tests.archs import ARCHS, random_gates
from tests.zoo import ZOO

MODELS = ["dit", "pixart", "sd3", "flux"]
NEVER = 2.0  # a threshold above every score: the lazy model must equal the plain one


def _pair(name, threshold=NEVER):
    z = ZOO[name]
    model = z.build()
    plain = copy.deepcopy(model)
    return z, lazypass.apply(model, threshold=threshold), plain


def _run(z, model, t=900, seed=0, **extra):
    args, kwargs = z.inputs(2, t, seed)
    kwargs.update(extra)
    with torch.no_grad():
        return z.output(model(*args, **kwargs))


def _ran_lazy(model, fn):
    """Run ``fn()`` and tell whether the lazy program ran (rather than the original forward)."""
    rt = runtime(model)
    rt.program = None
    out = fn()
    return out, rt.program is not None


def _close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol


def _add_lora(model, name="a", seed=3, alpha=4):
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    torch.manual_seed(seed)
    if hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin (SD3, Flux)
        model.add_adapter(config, adapter_name=name)
    else:
        inject_adapter_in_model(config, model, adapter_name=name)


# -- changes after apply ------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_lora_added_after_the_first_call_changes_the_output_as_on_the_plain_model(name):
    z, model, plain = _pair(name)
    before = _run(z, model)
    for m in (model, plain):
        _add_lora(m)
    out, lazy = _ran_lazy(model, lambda: _run(z, model))
    assert lazy and runtime(model).generation >= 1
    assert _close(out, _run(z, plain))
    assert float((out - before).abs().max()) > 1e-3  # the adapter really changes it


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_adapter_switches_and_fusing_are_followed(name):
    z, model, plain = _pair(name)
    _run(z, model)
    for m in (model, plain):
        _add_lora(m, "a", seed=3)
        _add_lora(m, "b", seed=4, alpha=8)
    steps = [
        lambda m: m.set_adapter("b"),
        lambda m: m.disable_adapters(),
        lambda m: m.enable_adapters(),
        lambda m: m.set_adapters(["a", "b"], weights=[0.5, 1.5]),
        lambda m: m.fuse_lora(lora_scale=1.0),  # weights updated in place, adapters marked merged
        lambda m: m.unfuse_lora(),
    ]
    seen = []
    for step in steps:
        for m in (model, plain):
            step(m)
        out, lazy = _ran_lazy(model, lambda: _run(z, model))
        assert lazy and _close(out, _run(z, plain), 1e-4)
        seen.append(out)
    assert float((seen[0] - seen[1]).abs().max()) > 1e-3  # switching changed something


def test_a_lora_scale_per_call_gets_a_program_of_its_own():
    z, model, plain = _pair("sd3")
    _run(z, model)
    for m in (model, plain):
        _add_lora(m)
    outs = []
    for scale in (0.5, 1.0, 0.5):
        out, lazy = _ran_lazy(model, lambda: _run(z, model, joint_attention_kwargs={"scale": scale}))
        assert lazy and _close(out, _run(z, plain, joint_attention_kwargs={"scale": scale}))
        outs.append(out)
    assert not _close(outs[0], outs[1], 1e-3) and torch.equal(outs[0], outs[2])
    assert len(runtime(model).programs) == 2


def test_a_replaced_processor_is_followed():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class Halved(JointAttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            return tuple(o * 0.5 for o in out) if isinstance(out, tuple) else out * 0.5

    z, model, plain = _pair("sd3")
    before = _run(z, model)
    for m in (model, plain):
        m.set_attn_processor(Halved())
    out, lazy = _ran_lazy(model, lambda: _run(z, model))
    assert lazy and _close(out, _run(z, plain)) and not _close(out, before, 1e-3)


def test_a_parameter_replaced_by_a_new_tensor_is_followed():
    z, model, plain = _pair("pixart")
    _run(z, model)
    g = torch.Generator().manual_seed(5)
    for how in ("setattr", "dict"):  # nn.Module.__setattr__, and straight into _parameters (accelerate)
        new = torch.randn(16, 16, generator=g) * 0.3
        for m in (model, plain):
            lin = m.transformer_blocks[0].attn1.to_q
            if how == "setattr":
                lin.weight = nn.Parameter(new.clone())
            else:
                lin._parameters["weight"] = nn.Parameter(new.clone())
        out, lazy = _ran_lazy(model, lambda: _run(z, model))
        assert lazy and _close(out, _run(z, plain))


def test_a_deleted_module_is_followed():
    z, model, plain = _pair("pixart")
    before = _run(z, model)
    for m in (model, plain):  # ModuleList.__delitem__ passes no registration hook
        del m.transformer_blocks[-1]
    out, lazy = _ran_lazy(model, lambda: _run(z, model))
    assert lazy and _close(out, _run(z, plain)) and not _close(out, before, 1e-3)
    assert len(runtime(model).program.sites) < len(model.lazy_gates.layout)  # the gates of the blocks left


def test_an_export_after_a_change_exports_the_new_program():
    z, model, plain = _pair("pixart")
    _run(z, model)
    for m in (model, plain):
        _add_lora(m)
    args, kwargs = z.inputs(2, 900, 0)
    with pytest.raises(RuntimeError, match="changed since it was traced.*once eagerly"):
        torch.export.export(model, args, kwargs, strict=False)
    _run(z, model)
    names = {n.split(".")[1] for n, _ in model.named_buffers() if n.startswith("lazy_state.")}
    assert names == {"p0"}  # the dropped program's buffers are gone
    ep = torch.export.export(model, args, kwargs, strict=False)
    with torch.no_grad():
        assert _close(z.output(ep.module()(*args, **kwargs)), z.output(plain(*args, **kwargs)))


def test_in_place_weight_updates_need_no_new_trace():
    z, model, plain = _pair("pixart")
    _run(z, model)
    generation = runtime(model).generation
    for m in (model, plain):
        with torch.no_grad():
            m.transformer_blocks[0].ff.net[2].weight.mul_(1.5)
    assert _close(_run(z, model), _run(z, plain))
    assert runtime(model).generation == generation


def test_an_unchanged_model_is_not_looked_at_again(monkeypatch):
    arch = ARCHS["ref_dit"]
    model = lazypass.apply(arch.build())
    args, _ = arch.inputs(2, 900, 0)
    with torch.no_grad():
        model(*args)
        model(*args)
    looks = []
    monkeypatch.setattr(Watch, "update", lambda self: looks.append(1) or False)
    with torch.no_grad():
        for _ in range(3):
            model(*args)
    assert not looks and runtime(model).watch.same()


# -- hooks --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_a_registered_hook_runs_and_removing_it_makes_the_model_lazy_again(name):
    z, model, plain = _pair(name)
    _run(z, model)
    calls = []
    attn = next(m for n, m in model.named_modules() if n.endswith(".attn") or n.endswith(".attn1"))
    handle = attn.register_forward_hook(lambda *a: calls.append(1))
    with pytest.warns(UserWarning, match="hooks on its submodules.*original forward"):
        out, lazy = _ran_lazy(model, lambda: _run(z, model))
    assert calls == [1] and not lazy and _close(out, _run(z, plain))
    handle.remove()
    out, lazy = _ran_lazy(model, lambda: _run(z, model))
    assert lazy and calls == [1] and _close(out, _run(z, plain))


@pytest.mark.parametrize("config", ["FirstBlockCacheConfig", "TaylorSeerCacheConfig", "PyramidAttentionBroadcastConfig"])
def test_a_cache_hook_from_diffusers_is_refused(config):
    import diffusers

    options = {
        "FirstBlockCacheConfig": dict(threshold=0.2),
        "TaylorSeerCacheConfig": dict(),
        "PyramidAttentionBroadcastConfig": dict(spatial_attention_block_skip_range=2,
                                                current_timestep_callback=lambda: 500),
    }[config]
    z, model, plain = _pair("flux")
    _run(z, model)
    model.enable_cache(getattr(diffusers, config)(**options))
    with pytest.raises(CacheHookError, match=r"cache hook.*disable_cache"):
        _run(z, model)
    model.disable_cache()
    out, lazy = _ran_lazy(model, lambda: _run(z, model))
    assert lazy and _close(out, _run(z, plain))


# -- training and autograd ----------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_training_steps_run_and_eval_brings_the_lazy_program_back(name):
    z, model, plain = _pair(name)
    _run(z, model)
    losses = {}
    for key, m in (("lazy", model), ("plain", plain)):
        m.train()
        params = [p for n, p in m.named_parameters() if not n.startswith("lazy_gates.")]
        opt = torch.optim.SGD(params, lr=1e-2)
        for step in range(2):
            torch.manual_seed(step)  # label / caption dropout draw the same numbers for both
            args, kwargs = z.inputs(2, 900, step)
            loss = z.output(m(*args, **kwargs)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.setdefault(key, []).append(loss.item())
        m.eval()
    assert losses["lazy"] == losses["plain"]
    out, lazy = _ran_lazy(model, lambda: _run(z, model))
    assert lazy and _close(out, _run(z, plain))
    # eval with grad on while parameters require grad: the original forward, gradients flow
    args, kwargs = z.inputs(2, 900, 0)
    z.output(model(*args, **kwargs)).sum().backward()
    assert next(model.parameters()).grad is not None


def test_lora_training_of_a_lazy_model():
    z, model, plain = _pair("sd3")
    _run(z, model)
    for m in (model, plain):
        m.requires_grad_(False)
        _add_lora(m)
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        for step in range(2):
            args, kwargs = z.inputs(2, 900, step)
            loss = z.output(m(*args, **kwargs)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
    out, lazy = _ran_lazy(model, lambda: _run(z, model))
    assert lazy and _close(out, _run(z, plain))


# -- casting and moving -------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_layerwise_casting_runs_lazily(name):
    z, model, plain = _pair(name, threshold=-0.5)  # skip whenever a cache is valid
    _run(z, model)
    for m in (model, plain):
        m.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert torch.bfloat16 in {p.dtype for p in model.parameters()}
    lazypass.set_threshold(model, NEVER)
    out, lazy = _ran_lazy(model, lambda: _run(z, model))
    assert lazy and _close(out, _run(z, plain))
    lazypass.set_threshold(model, -0.5)  # and it skips: caches (fp32, the compute dtype) are reused
    lazypass.reset(model)
    _run(z, model, 900, seed=0)
    _run(z, model, 800, seed=1)
    assert lazypass.stats(model).skipped[1].all()
    caches = _caches(model)
    assert {t.dtype for t in caches} == {torch.float32}


def _caches(model):
    """The branch caches of the current run (not the fp32 gate statistics such as pools)."""
    rt = runtime(model)
    names = [spec.name for spec in rt.program.state_specs[1:]]
    return [t for name, t in zip(names, rt.state.as_tensors()) if name.startswith("lazy_cache_")]


@pytest.mark.parametrize("name", ["pixart", "flux"])
@pytest.mark.parametrize("swap", [False, True])
def test_to_another_dtype_and_the_caches_follow(name, swap):
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        z, model, plain = _pair(name)
        _run(z, model)
        model.to(torch.float64), plain.to(torch.float64)
        args, kwargs = z.inputs(2, 900, 0)
        kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        with torch.no_grad():
            out = z.output(model(*args, **kwargs))
            assert out.dtype == torch.float64 and _close(out, z.output(plain(*args, **kwargs)), 1e-10)
        caches = _caches(model)
        assert caches and {t.dtype for t in caches} == {torch.float64}
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


# -- per-call options ---------------------------------------------------------------------

def test_skip_layers_gets_a_program_of_its_own_that_matches_the_plain_model():
    z, model, plain = _pair("sd3")
    full = _run(z, model)
    for value in ([1], [0], [0, 1]):
        out, lazy = _ran_lazy(model, lambda: _run(z, model, skip_layers=value))
        assert _close(out, _run(z, plain, skip_layers=value))
        assert not _close(out, full, 1e-3)
    rt = runtime(model)
    sizes = sorted(len(p.sites) for p in rt.programs.values())
    assert sizes[-1] == 5 and all(s < 5 for s in sizes[:-1]) and len(rt.plain) == 1  # [0, 1]: no site left
    assert _close(_run(z, model), _run(z, plain))


def test_a_program_with_fewer_sites_reads_the_gates_of_its_sites():
    z, model, _ = _pair("sd3", threshold=0.5)
    _run(z, model)
    random_gates(model)
    lazypass.reset(model)
    _run(z, model)
    full = lazypass.stats(model)
    lazypass.reset(model)
    _run(z, model, skip_layers=[1])
    part = lazypass.stats(model)
    rt = runtime(model)
    prog = next(p for p in rt.programs.values() if p.gate_index is not None)
    keys = gate_keys(model.lazy_gates)
    assert [keys[i][0] for i in prog.gate_index] == [s.kind for s in prog.sites]
    assert [keys[i][1][0].split(".")[:2] for i in prog.gate_index] == [["transformer_blocks", "0"]] * 2
    # block 0 sees the same input either way, so its sites score the same with the same gates
    for j, i in enumerate(prog.gate_index):
        assert torch.equal(torch.as_tensor(part.scores[0, j]), torch.as_tensor(full.scores[0, i]))


def test_fewer_sites_first_then_all_makes_untouched_gates_again():
    z, model, plain = _pair("sd3")
    _run(z, model, skip_layers=[1])
    assert len(model.lazy_gates.layout) < 5
    assert _close(_run(z, model), _run(z, plain))
    assert len(model.lazy_gates.layout) == 5
    assert _close(_run(z, model, skip_layers=[1]), _run(z, plain, skip_layers=[1]))


def test_sites_without_gates_are_an_error_that_names_them():
    z, model, _ = _pair("sd3")
    _run(z, model, skip_layers=[1])
    random_gates(model)  # the gates now hold values that belong to these sites only
    with pytest.raises(ValueError, match=r"no gate: .*transformer_blocks\.1.*skip_layers"):
        _run(z, model)


def test_option_values_that_cannot_be_traced_are_refused_naming_them():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.dit = ARCHS["ref_dit"].build()

        def forward(self, x, t, y, options=None):
            return self.dit(x, t, y) * (options.scale if options is not None else 1.0)

    class Scale(nn.Module):  # a module passed as an argument: export would bake it into the graph
        scale = 2.0

    class Options:  # an object torch.export cannot take as an input
        scale = 2.0

    model = lazypass.apply(Wrapped().eval())
    args, _ = ARCHS["ref_dit"].inputs(2, 900, 0)
    with torch.no_grad():
        model(*args)
        for value, name in ((Options(), "Options"), (Scale(), "Scale")):
            with pytest.raises(TypeError, match=rf"options \({name}\) cannot be an input"):
                model(*args, options=value)
        model(*args, options=None)


# -- concurrency --------------------------------------------------------------------------

TIMESTEPS = (900, 700, 500, 300)


def _dit_model():
    arch = ARCHS["ref_dit"]
    model = lazypass.apply(arch.build())
    args, _ = arch.inputs(2, TIMESTEPS[0], 0)
    lazypass.trace(model, *args)
    random_gates(model)
    return model


def _step(model, k, seed):
    args, _ = ARCHS["ref_dit"].inputs(2, TIMESTEPS[k], seed * 100 + k)
    with torch.no_grad():
        return model(*args)


def _sequential(model, seed):
    with lazypass.trajectory(model):
        out = [_step(model, k, seed) for k in range(len(TIMESTEPS))]
        assert lazypass.stats(model).skipped.any()
    return out


class _Turns:
    """Make threads take turns, one model call each: thread 0, thread 1, thread 0, ..."""

    def __init__(self, n):
        self.n, self.turn, self.cond = n, 0, threading.Condition()

    def wait(self, i):
        with self.cond:
            self.cond.wait_for(lambda: self.turn % self.n == i)

    def done(self):
        with self.cond:
            self.turn += 1
            self.cond.notify_all()


def _in_threads(work, n=2):
    results, errors = [None] * n, [None] * n

    def body(i):
        try:
            results[i] = work(i)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors[i] = e

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results, errors


def test_threads_in_their_own_trajectories_give_their_sequential_results():
    model = _dit_model()
    expected = [_sequential(model, seed) for seed in range(2)]
    turns = _Turns(2)

    def work(i):
        out = []
        with lazypass.trajectory(model):
            for k in range(len(TIMESTEPS)):
                turns.wait(i)
                try:
                    out.append(_step(model, k, seed=i))
                finally:
                    turns.done()
        return out

    results, errors = _in_threads(work)
    assert errors == [None, None]
    for got, want in zip(results, expected):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_interleaved_threads_outside_trajectories_are_refused_never_mixed():
    model = _dit_model()
    expected = _sequential(model, 0)
    lazypass.reset(model)
    turns = _Turns(2)

    def work(i):
        out, error = [], None
        for k in range(len(TIMESTEPS)):
            turns.wait(i)
            try:
                if error is None:
                    out.append(_step(model, k, seed=i))
            except ConcurrentRunError as e:
                error = e  # keep taking turns, so that the other thread goes on
            finally:
                turns.done()
        if error is not None:
            raise error
        return out

    results, errors = _in_threads(work)
    assert errors[0] is None and isinstance(errors[1], ConcurrentRunError)
    assert "lazypass.trajectory" in str(errors[1])
    assert all(torch.equal(a, b) for a, b in zip(results[0], expected))


def test_a_new_run_from_another_thread_after_the_first_one_is_allowed():
    model = _dit_model()
    expected = [_sequential(model, seed) for seed in range(2)]
    lazypass.reset(model)
    first_done, second_done = threading.Event(), threading.Event()

    def work(i):
        if i == 1:
            first_done.wait()
        out = [_step(model, k, seed=i) for k in range(len(TIMESTEPS))]
        if i == 0:
            first_done.set()
            second_done.wait()  # still alive while the other thread samples
        else:
            second_done.set()
        return out

    results, errors = _in_threads(work)
    assert errors == [None, None]
    for got, want in zip(results, expected):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_asyncio_tasks_in_their_own_trajectories_and_outside_them():
    model = _dit_model()
    expected = [_sequential(model, seed) for seed in range(2)]

    async def sample(seed, own):
        out = []
        if own:
            with lazypass.trajectory(model):
                for k in range(len(TIMESTEPS)):
                    out.append(_step(model, k, seed))
                    await asyncio.sleep(0)
        else:
            for k in range(len(TIMESTEPS)):
                out.append(_step(model, k, seed))
                await asyncio.sleep(0)
        return out

    async def both(own):
        return await asyncio.gather(sample(0, own), sample(1, own), return_exceptions=True)

    results = asyncio.run(both(True))
    for got, want in zip(results, expected):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    lazypass.reset(model)
    results = asyncio.run(both(False))
    assert isinstance(results[1], ConcurrentRunError)
    assert all(torch.equal(a, b) for a, b in zip(results[0], expected[0]))


def test_a_trajectory_object_is_one_run():
    model = _dit_model()
    run = lazypass.trajectory(model)
    with run:
        with pytest.raises(RuntimeError, match="entered already"):
            run.__enter__()


def test_compiled_runs_go_one_at_a_time():
    model = _dit_model()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    args, _ = ARCHS["ref_dit"].inputs(2, TIMESTEPS[0], 0)
    with torch.no_grad():
        compiled(*args)
    inside, release = threading.Event(), threading.Event()

    def hold():
        with lazypass.trajectory(model):
            inside.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait()
    try:
        with pytest.raises(RuntimeError, match="torch.compile.*one after the other"):
            with lazypass.trajectory(model):
                pass
    finally:
        release.set()
        holder.join()
    with lazypass.trajectory(model):  # free again
        pass


def test_a_compiled_model_follows_a_change_after_an_eager_call():
    z, model, plain = _pair("pixart")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    _run(z, model)
    _run(z, compiled)
    for m in (model, plain):
        _add_lora(m)
    _run(z, model)  # the eager call notices the change and traces again
    assert _close(_run(z, compiled), _run(z, plain))
