"""``torch.export.export(lazy_model, args)``: the common root of the ONNX, AOTInductor and
ExecuTorch paths. The exported program carries the cache state as buffers it updates in
place (``model.lazy_state``), and ``ep.module()`` runs a trajectory exactly as the eager
lazy model does."""

import pytest
import torch

import lazypass
from lazypass.runtime import traced_program
from tests.archs import ARCHS, MIXED_GATE_SEED, random_gates

STEPS = (999, 900, 800, 700, 600, 999, 900)  # two runs: the timestep rises at the sixth call


def _lazy(name):
    arch = ARCHS[name]
    model = lazypass.apply(arch.build())
    args, kwargs = arch.inputs(2, STEPS[0], 0)
    with torch.no_grad():
        model(*args, **kwargs)
    random_gates(model, MIXED_GATE_SEED.get(name, 1))
    return arch, model, args, kwargs


@pytest.mark.parametrize("name,strict", [
    ("ref_dit", False),
    pytest.param("ref_dit", True, marks=pytest.mark.slow),  # dynamo's export
    pytest.param("sd3", False, marks=pytest.mark.slow),  # joint attention: a site with two caches
])
def test_export_matches_eager_over_a_trajectory(name, strict):
    arch, model, args, kwargs = _lazy(name)
    ep = torch.export.export(model, args, kwargs, strict=strict)

    prog = traced_program(model)
    state = [s.name for s in prog.state_specs[1:]]
    buffers = {s.target for s in ep.graph_signature.input_specs if s.kind.name == "BUFFER"}
    assert {f"lazy_state.p0.{n}" for n in state} <= buffers
    mutated = set(ep.run_decompositions().graph_signature.buffers_to_mutate.values())
    assert mutated == {f"lazy_state.p0.{n}" for n in state}

    module = ep.module()
    lazypass.reset(model)
    reused = False
    full = lazypass.apply(arch.build(), threshold=1.5)  # never skips: the plain model
    for k, t in enumerate(STEPS):
        a, kw = arch.inputs(2, t, k)
        with torch.no_grad():
            ref = arch.output(model(*a, **kw))
            out = arch.output(module(*a, **kw))
            plain = arch.output(full(*a, **kw))
        assert (out - ref).abs().max() <= 1e-5, (k, t)
        reused |= bool((ref - plain).abs().max() > 1e-4)
    st = lazypass.stats(model)
    assert 0 < st.lazy_ratio < 1 and reused  # mixed decisions: frozen caches would have failed above


def test_state_buffers_stay_out_of_the_state_dict():
    _, model, _, _ = _lazy("ref_dit")
    assert any(n.startswith("lazy_state.") for n, _ in model.named_buffers())
    assert not any(k.startswith("lazy_state") for k in model.state_dict())


def test_export_before_tracing_is_a_clear_error():
    arch = ARCHS["ref_dit"]
    model = lazypass.apply(arch.build())
    args, kwargs = arch.inputs(2, 999, 0)
    with pytest.raises(RuntimeError, match="not been traced"):
        torch.export.export(model, args, kwargs)


def test_export_decomposes_a_site_whose_streams_share_one_output():
    """CogVideoX's attention ends in one node that both streams read: the compute branch of
    the ``cond`` must not return it twice (aliased outputs), or decomposing the export fails."""
    from tests.zoo import ZOO

    tiny = ZOO["cogvideox"]
    args, kwargs = tiny.inputs(2, STEPS[0], 0)
    model = lazypass.apply(tiny.build(), example_inputs=args, example_kwargs=kwargs, threshold=-0.5)
    ep = torch.export.export(model, args, kwargs, strict=False).run_decompositions()
    module = ep.module()  # step 0 computes, step 1 reuses every site
    for k, t in enumerate(STEPS[:2]):
        a, kw = tiny.inputs(2, t, k)
        with torch.no_grad():
            assert (tiny.output(module(*a, **kw)) - tiny.output(model(*a, **kw))).abs().max() <= 1e-5
    assert lazypass.stats(model).saved[1].all()
