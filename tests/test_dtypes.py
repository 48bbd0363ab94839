"""fp32, bf16 and fp16 models on CPU: same behaviour, gate scores always computed in fp32."""

import copy
import operator

import pytest
import torch

import lazypass
from lazypass.ops import value
from lazypass.runtime import runtime, traced_program
from tests.archs import ARCHS, BATCH_TOL, MIXED_GATE_SEED, assert_batch_close, random_gates

aten = torch.ops.aten
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TIMESTEPS = (900, 600)
# plain CPU kernels differ between batch sizes by about one rounding step of the dtype
TOL = {torch.float32: BATCH_TOL, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _cast(v, dtype):
    return v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v


def _inputs(arch, batch, t, seed, dtype):
    args, kwargs = arch.inputs(batch, t, seed)
    return tuple(_cast(a, dtype) for a in args), {k: _cast(v, dtype) for k, v in kwargs.items()}


def _run(model, arch, dtype, t, seed=0, batch=2, rows=None):
    args, kwargs = _inputs(arch, batch, t, seed, dtype)
    if rows is not None:
        args = tuple(a[rows] if torch.is_tensor(a) else a for a in args)
        kwargs = {k: v[rows] if torch.is_tensor(v) else v for k, v in kwargs.items()}
    with torch.no_grad():
        return arch.output(model(*args, **kwargs))


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).split(".")[-1])
def dtype(request):
    return request.param


@pytest.fixture(params=["pixart", pytest.param("diffusers_dit", marks=pytest.mark.slow)])
def arch(request):
    return ARCHS[request.param]


def _lazy(arch, dtype, **options):
    ref = arch.build().to(dtype)
    model = lazypass.apply(copy.deepcopy(ref), **options)
    args, kwargs = _inputs(arch, 2, TIMESTEPS[0], 0, dtype)
    lazypass.report(model, *args, print_table=False, **kwargs)
    return model, ref


def test_never_skipping_reproduces_the_model_in_its_dtype(arch, dtype):
    model, ref = _lazy(arch, dtype)
    random_gates(model, seed=0, std=1.0)
    lazypass.set_threshold(model, 1.5)
    for t in TIMESTEPS:
        out = _run(model, arch, dtype, t)
        assert out.dtype == dtype
        assert torch.equal(out, _run(ref, arch, dtype, t))


@pytest.mark.parametrize("cast_after_apply", [False, True])
def test_scores_are_fp32_in_the_graph_and_at_run_time(arch, dtype, cast_after_apply):
    if cast_after_apply:  # model.to(dtype) after tracing also casts the gates
        model, _ = _lazy(arch, torch.float32)
        model.to(dtype)
        assert model.lazy_gates.bias.dtype == dtype
    else:
        model, _ = _lazy(arch, dtype)
    _run(model, arch, dtype, TIMESTEPS[0])
    assert runtime(model).state.records[-1][2].dtype == torch.float32
    core = traced_program(model).core
    graph = core.graph
    # the threshold is compared with the logits; one sigmoid turns the stacked logits into scores
    sigmoids = [n for n in graph.nodes if n.target == aten.sigmoid.default]
    assert len(sigmoids) == 1 and sigmoids[0].args[0].target == aten.stack.default
    logits = sigmoids[0].args[0].args[0]
    assert len(logits) == len(model.lazy_gates.layout)
    for logit in dict.fromkeys(logits):
        terms, leaves = [logit], []  # logit = sum of mv terms (one per stream), bias, features
        while terms:
            node = terms.pop()
            if node.target == aten.add.Tensor:
                terms.extend(node.args)
            else:
                leaves.append(node)
        products = [n for n in leaves if n.target == aten.mv.default]
        assert products, "no token-sum . weight product feeds the gate"
        assert all(n.target in (aten.mv.default, aten.select.int, aten.mul.Tensor) for n in leaves)
        for mv in products:
            summed, weight = mv.args
            source = summed.args[0]
            while value(source) is None:  # the (B, tokens, D) view token_sums adds
                source = source.args[0]
            # sums in fp32: summed as fp32 where Z is fp32 already, else with dtype=float32
            assert summed.target == aten.sum.dim_IntList
            assert summed.kwargs.get("dtype", value(source).dtype) == torch.float32
            if weight.op == "get_attr":  # gates kept in fp32 are read as they are
                assert operator.attrgetter(weight.target)(core).dtype == torch.float32
            else:
                assert weight.target == aten._to_copy.default and weight.kwargs["dtype"] == torch.float32


def test_reuse_and_batch_independence_in_every_dtype(arch, dtype):
    model, ref = _lazy(arch, dtype)
    random_gates(model, seed=MIXED_GATE_SEED.get(arch.name, 1), std=0.5)
    batched = [_run(model, arch, dtype, t, seed=k, batch=3) for k, t in enumerate(TIMESTEPS)]
    skipped = lazypass.stats(model).skipped
    assert skipped[1].any(), "random gates skipped nothing; pick another seed"
    for i in range(3):
        with lazypass.trajectory(model):
            for k, t in enumerate(TIMESTEPS):
                single = _run(model, arch, dtype, t, seed=k, batch=3, rows=slice(i, i + 1))
                assert_batch_close(single.float(), batched[k][i : i + 1].float(), TOL[dtype])
            assert (lazypass.stats(model).skipped[:, :, 0] == skipped[:, :, i]).all()
    # a skipped branch really reused something: step 2 differs from the full model
    assert (batched[1].float() - _run(ref, arch, dtype, TIMESTEPS[1], seed=1, batch=3).float()).abs().max() > 1e-3
