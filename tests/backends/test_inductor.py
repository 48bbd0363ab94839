"""``torch.compile(model, backend="lazydit")``: one graph, no recompiles, eager-lazy numbers.

Inductor compiles take a minute or more per model on a small CPU, so most tests swap
Inductor's ``compile_fx`` for a recorder that runs the graph it is given (everything
lazypass and dynamo do is still real); one test per case runs the real Inductor on the
reference DiT, and the diffusers models under real Inductor are marked slow.

Host reads: the graphs hold none; Inductor's wrapper reads each conditional's predicate
(``if pred.item():``), which the real-Inductor tests count in the generated code and at
run time instead of denying, and each site's cache write (``lazypass::put_rows``) reads its
slot and row flags once per call (``tolist``), also counted.
"""

import copy
import importlib
import re
import tomllib
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.graph import GraphLowering

import lazypass
from lazypass.backends.inductor import lazydit_backend
from tests.archs import ARCHS, ONE_BLOCK_DIT, random_gates

TIMESTEPS = (900, 600, 300)
HOST_SYNC = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}
COND = torch.ops.higher_order.cond


class Recorder:
    """Stands in for Inductor's ``compile_fx``: keeps each graph it gets, runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs, config_patches=None):
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", rec)
    return rec


class PostGrad(CustomGraphPass):
    """Keeps the post-grad graphs Inductor really lowers."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        self.graphs.append(graph)

    def uuid(self):
        return None


class OutputCode:
    """Keeps the Python wrapper code Inductor generates (as ``run_and_get_code`` does)."""

    def __init__(self):
        self.codes = []
        self._patch = mock.patch.object(GraphLowering, "save_output_code", self.codes.append)

    def __enter__(self):
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        self._patch.__exit__(*exc)


# Inductor lowers each cond to a Python ``if pred.item():`` in its wrapper: the one documented
# host read per conditional (a device sync on a GPU). Anything else that reads values is a bug.
PREDICATE_READ = re.compile(r"^\s*if \w+\.item\(\):\s*$")
HOST_READ_CALLS = (".item(", ".cpu(", ".tolist(", ".numpy(", "_local_scalar_dense", "torch.equal(", "synchronize(")


def _check_output_code(codes, n_sites):
    lines = "\n".join(codes).splitlines()
    reads = [line for line in lines if PREDICATE_READ.match(line)]
    # cond(all skip, reuse, cond(any skip, mixed, compute)): two conditionals per site
    assert len(reads) == 2 * n_sites, reads
    others = [line for line in lines if any(c in line for c in HOST_READ_CALLS) and not PREDICATE_READ.match(line)]
    assert not others, others


def _count_predicate_reads(compiled, model, arch, seed=40):
    """Run one trajectory and count the ``Tensor.item`` and ``Tensor.tolist`` calls the compiled
    code makes."""
    reads = {"item": 0, "tolist": 0}
    real = {name: getattr(torch.Tensor, name) for name in reads}

    def counting(name):
        def read(self, *args):
            reads[name] += 1
            return real[name](self, *args)
        return read

    lazypass.reset(model)
    lazypass.set_threshold(model, 0.5)
    with mock.patch.object(torch.Tensor, "item", counting("item")), \
            mock.patch.object(torch.Tensor, "tolist", counting("tolist")):
        for k, t in enumerate(TIMESTEPS):
            _step(compiled, arch, t, seed + k)
    saved = lazypass.stats(model).saved
    assert saved.any() and not saved.all(), "random gates gave no mix of reused and computed sites"
    # one read per conditional executed: the outer one per site, the inner one unless all reused
    assert reads["item"] == int((2 - saved).sum())
    # one read per cache write: per site (each writes its streams' caches) and call
    assert reads["tolist"] == _writes(lazypass.runtime.traced_program(model)) * len(TIMESTEPS)


def _targets(graph):
    return [n.target for n in graph.nodes if n.op == "call_function"]


# per-site gates: random gates then give a mix of reused and computed rows within a call
SITE = {"granularity": "site"}


def _pair(arch):
    """A lazy model and an independent eager-lazy reference with the same random gates."""
    base = arch.build()
    ref = lazypass.apply(copy.deepcopy(base), **SITE)
    model = lazypass.apply(base, **SITE)
    args, kwargs = arch.inputs(2, TIMESTEPS[0], 0)
    for m in (model, ref):
        lazypass.report(m, *args, print_table=False, **kwargs)  # trace eagerly
    random_gates(model)
    ref.lazy_gates.load_state_dict(model.lazy_gates.state_dict())
    return model, ref


def _step(fn, arch, t, seed):
    args, kwargs = arch.inputs(2, t, seed)
    with torch.no_grad():
        return arch.output(fn(*args, **kwargs))


def _same_run(compiled, model, ref, arch, timesteps, seed=0, tol=1e-4):
    for k, t in enumerate(timesteps):
        got, want = _step(compiled, arch, t, seed + k), _step(ref, arch, t, seed + k)
        assert (got - want).abs().max() <= tol, f"t={t}"
    mine, theirs = lazypass.stats(model), lazypass.stats(ref)
    assert (mine.skipped == theirs.skipped).all() and (mine.saved == theirs.saved).all()
    return mine


def _scenario(arch, backend, compiles):
    """Mixed decisions, forced skip, threshold changes, resets and new trajectories on one compile."""
    model, ref = _pair(arch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)

    st = _same_run(compiled, model, ref, arch, TIMESTEPS)
    mixed = st.skipped.any(axis=2) & ~st.skipped.all(axis=2)
    assert mixed.any(), "random gates gave no mixed decisions; pick another seed"
    assert compiles() == 1

    for m in (model, ref):  # forced skip from the second step on
        lazypass.reset(m)
        lazypass.set_threshold(m, -0.5)
    st = _same_run(compiled, model, ref, arch, TIMESTEPS, seed=10)
    assert not st.saved[0].any() and st.saved[1:].all()

    for m in (model, ref):
        lazypass.set_threshold(m, 1.5)  # never skip, same graph
    _same_run(compiled, model, ref, arch, TIMESTEPS[:2], seed=20)  # timestep rises: a new run
    assert not lazypass.stats(model).skipped[-2:].any()

    lazypass.set_threshold(model, -0.5)
    lazypass.set_threshold(ref, -0.5)
    with lazypass.trajectory(model), lazypass.trajectory(ref):
        st = _same_run(compiled, model, ref, arch, TIMESTEPS, seed=30)
        assert st.saved[1:].all() and len(st.saved) == 3
    assert compiles() == 1, "a decision, threshold, reset or trajectory change recompiled"
    return model, compiled


def _check_graph(graph, n_sites):
    targets = _targets(graph)
    assert targets.count(COND) == n_sites
    assert not HOST_SYNC & set(targets)


PUT_ROWS = torch.ops.lazypass.put_rows.default


def _writes(program) -> int:
    """The cache writes (``put_rows``) in the graph dynamo traces."""
    return _targets(program.compiled.graph).count(PUT_ROWS)


def _check_post_grad(graphs, n_sites, n_writes=None):
    """The graphs Inductor lowers (the outer one and the branch subgraphs): conds kept whole,
    and the cache writes of a lazy model left as ``put_rows`` calls, re-inplaced (no
    functionalized copy of the caches)."""
    outer = max(graphs, key=lambda g: len(g.nodes))
    assert _targets(outer).count(COND) == n_sites
    assert not any(HOST_SYNC & set(_targets(g)) for g in graphs)
    if n_writes is not None:
        assert _targets(outer).count(PUT_ROWS) == n_writes
        assert not any("auto_functionalized" in str(t) for t in _targets(outer))


# -- registration and options ------------------------------------------------------------

def test_backend_is_registered_and_declared_as_entry_point():
    assert torch._dynamo.lookup_backend("lazydit") is lazydit_backend
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    target = pyproject["project"]["entry-points"]["torch_dynamo_backends"]["lazydit"]
    module, name = target.split(":")
    assert getattr(importlib.import_module(module), name) is lazydit_backend


def test_unknown_option_is_an_error():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unknown lazypass option.*'treshold'"):
        lazydit_backend(gm, [torch.randn(1, 2)], options={"treshold": 0.5})


def test_untraced_lazy_model_is_a_clear_error(recorder):
    arch = ARCHS["ref_dit"]
    model = lazypass.apply(arch.build())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lazydit", fullgraph=True)
    with pytest.raises(Exception, match="has not been traced for these inputs"):
        _step(compiled, arch, 900, 0)


# -- a lazy model (lazypass.apply, then torch.compile) ----------------------------------

@pytest.mark.parametrize("name", ["ref_dit", "diffusers_dit", "pixart"])
def test_lazy_model_one_graph_no_recompiles(name, recorder):
    arch = ARCHS[name]
    model, _ = _scenario(arch, "lazydit", lambda: len(recorder.graphs))
    _check_graph(recorder.graphs[0].graph, len(model.lazy_gates.layout))


def _real_inductor(name):
    arch = ARCHS[name]
    post_grad = PostGrad()
    compiles = []

    def counting(gm, example_inputs, **kw):
        compiles.append(gm)
        return lazydit_backend(gm, example_inputs, **kw)

    with torch._inductor.config.patch(post_grad_custom_post_pass=post_grad, fx_graph_cache=False), \
            OutputCode() as code:
        model, compiled = _scenario(arch, counting, lambda: len(compiles))
    n_sites = len(model.lazy_gates.layout)
    _check_graph(compiles[0].graph, n_sites)
    _check_post_grad(post_grad.graphs, n_sites, _writes(lazypass.runtime.traced_program(model)))
    _check_output_code(code.codes, n_sites)
    _count_predicate_reads(compiled, model, arch)
    assert len(compiles) == 1


def test_lazy_model_real_inductor_ref_dit():
    _real_inductor("ref_dit")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffusers_dit", "pixart"])
def test_lazy_model_real_inductor_diffusers(name):
    _real_inductor(name)


# -- a model that is not lazy: the backend runs the passes ------------------------------

def _plain_pair(arch):
    base = arch.build()
    ref = lazypass.apply(copy.deepcopy(base), **SITE)
    args, kwargs = arch.inputs(2, TIMESTEPS[0], 0)
    lazypass.report(ref, *args, print_table=False, **kwargs)
    random_gates(ref)
    return base, ref


def _plain_run(compiled, ref, arch, seed=0):
    for k, t in enumerate(TIMESTEPS + TIMESTEPS[:2]):  # two runs: the rising timestep resets caches
        got, want = _step(compiled, arch, t, seed + k), _step(ref, arch, t, seed + k)
        assert (got - want).abs().max() <= 1e-4, f"call {k}"
    st = lazypass.stats(ref)
    assert (st.skipped.any(axis=2) & ~st.skipped.all(axis=2)).any(), "no mixed decisions"
    return st


@pytest.mark.parametrize("how", ["gates", "file"])
def test_plain_model_runs_the_pass(how, recorder, tmp_path):
    arch = ARCHS["ref_dit"]
    base, ref = _plain_pair(arch)
    gates = copy.deepcopy(ref.lazy_gates)
    if how == "file":  # a file also brings its saved threshold
        lazypass.set_threshold(ref, 0.45)
        gates = tmp_path / "gates.safetensors"
        lazypass.save_gates(ref, gates)
    torch._dynamo.reset()
    compiled = torch.compile(base, backend="lazydit", fullgraph=True, dynamic=False, options={"gates": gates, **SITE})
    _plain_run(compiled, ref, arch)
    assert len(recorder.graphs) == 1
    _check_graph(recorder.graphs[0].graph, len(ref.lazy_gates.layout))


def test_plain_model_refuses_a_file_that_is_not_a_gates_file(tmp_path):
    from safetensors.torch import save_file

    arch = ARCHS["ref_dit"]
    base, ref = _plain_pair(arch)
    raw = tmp_path / "raw.safetensors"
    save_file({k: v.contiguous() for k, v in ref.lazy_gates.state_dict().items()}, raw)
    torch._dynamo.reset()
    compiled = torch.compile(base, backend="lazydit", options={"gates": raw})
    with pytest.raises(Exception, match="not a lazypass gates file"):
        _step(compiled, arch, 900, 0)


def test_plain_model_with_zero_gates_is_unchanged(recorder):
    arch = ARCHS["pixart"]
    base = arch.build()
    ref = copy.deepcopy(base)
    torch._dynamo.reset()
    compiled = torch.compile(base, backend="lazydit", fullgraph=True, options={"threshold": 0.7})
    for k, t in enumerate(TIMESTEPS):
        assert (_step(compiled, arch, t, k) - _step(ref, arch, t, k)).abs().max() <= 1e-5
    assert _targets(recorder.graphs[0].graph).count(COND) == 6


def test_plain_model_gates_of_other_sites_are_an_error(recorder):
    arch = ARCHS["ref_dit"]
    wrong = lazypass.LazyGates([("attn", (16,))])
    torch._dynamo.reset()
    compiled = torch.compile(arch.build(), backend="lazydit", options={"gates": wrong})
    with pytest.raises(Exception, match="gates were made for other sites"):
        _step(compiled, arch, 900, 0)


def _plain_real_inductor(arch):
    base, ref = _plain_pair(arch)
    post_grad = PostGrad()
    torch._dynamo.reset()
    with torch._inductor.config.patch(post_grad_custom_post_pass=post_grad, fx_graph_cache=False), \
            OutputCode() as code:
        compiled = torch.compile(base, backend="lazydit", fullgraph=True, dynamic=False,
                                 options={"gates": copy.deepcopy(ref.lazy_gates), **SITE})
        _plain_run(compiled, ref, arch)
    n_sites = len(ref.lazy_gates.layout)
    _check_post_grad(post_grad.graphs, n_sites)
    _check_output_code(code.codes, n_sites)


def test_plain_model_real_inductor_one_block():
    _plain_real_inductor(ONE_BLOCK_DIT)


@pytest.mark.slow
def test_plain_model_real_inductor():
    _plain_real_inductor(ARCHS["ref_dit"])


class _CondDiT(torch.nn.Module):
    """A user model that holds ``torch.cond`` of its own around a DiT."""

    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    def forward(self, x, t, y):
        out = self.dit(x, t, y)
        return torch.cond(out.sum() > 0, lambda o: o * 1.0, lambda o: o * -1.0, (out,))


def test_a_user_graph_with_its_own_cond_is_made_lazy(recorder):
    arch = ARCHS["ref_dit"]
    model = _CondDiT(arch.build())
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lazydit", fullgraph=True)
    args, _ = arch.inputs(2, 900, 0)
    assert torch.allclose(compiled(*args), ref(*args), atol=1e-5)  # zero gates: unchanged
    # the backend ran the pass on it: one cond per site besides the user's own
    assert _targets(recorder.graphs[0].graph).count(COND) == len(arch.kinds) + 1
