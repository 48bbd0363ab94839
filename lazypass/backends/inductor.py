"""``torch.compile(model, backend="lazydit")``: the lazy pass, then Inductor.

Dynamo hands the backend an FX graph of torch-level ops.  Two cases:

- **The model is lazy already** (``lazypass.apply``).  Dynamo traced the lazy shell, so
  the graph holds one ``torch.ops.higher_order.cond`` per site, the gate scores and the
  in-place state updates (see "compiled calls" in ``lazypass/runtime.py``).  The backend
  leaves the conditionals whole and gives the graph to Inductor's ``compile_fx``.  The
  state is read from and written to the runtime's persistent buffers, so ``reset``,
  ``trajectory``, ``set_threshold`` and ``stats`` work as in eager mode.
- **The model is not lazy.**  The backend runs the passes on the dynamo graph itself
  (prune, match sites, insert gates), with gates from the ``gates`` option (a
  ``LazyGates`` or a safetensors file of its ``state_dict``; zero gates by default, which
  never skip).  The cache state then lives in tensors held by the returned callable; a
  new sampling run is detected in the graph as for every lazy model (the timestep rises).
  There is no ``reset``/``stats`` for such a model: use ``lazypass.apply`` for those.

A graph that already contains ``cond`` is taken as case one and not rewritten again.
Options (``torch.compile(..., options={...})``) are the fields of ``LazyConfig`` plus
``gates`` and ``inductor`` (a dict of Inductor config patches); anything else is an error.
``mode`` ("reduce-overhead", "max-autotune", ...) maps to Inductor's options as it
does for ``backend="inductor"``.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.gates import LazyGates
from lazypass.ops import shape
from lazypass.passes import ANALYSIS, INFERENCE, run_passes

log = logging.getLogger(__name__)
NAME = "lazydit"


def lazydit_backend(gm: fx.GraphModule, example_inputs: list, *, mode: str | None = None,
                    options: dict | None = None, **kwargs):
    """The ``lazydit`` dynamo backend; use it through ``torch.compile``.

    Example:
        >>> import torch, lazypass
        >>> from lazypass.models import tiny_dit
        >>> x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.tensor([1, 2])
        >>> model = lazypass.apply(tiny_dit(), example_inputs=(x, t, y))
        >>> compiled = torch.compile(model, backend="lazydit", fullgraph=True)
        >>> out = compiled(x, t, y)  # doctest: +SKIP
    """
    opts = {**(options or {}), **kwargs}
    gates = opts.pop("gates", None)
    patches = dict(opts.pop("inductor", None) or {})
    cfg = LazyConfig.from_options(**opts)
    if mode is not None and mode != "default":
        patches = {**torch._inductor.list_mode_options(mode), **patches}
    from torch._inductor.compile_fx import compile_fx

    if _conds(gm):  # lazy already: keep the conditionals whole
        if gates is not None:
            raise ValueError("the 'gates' option is for models that are not lazy yet; this one has its "
                             "own model.lazy_gates (load gates into those instead)")
        log.info("lazydit: lazy graph with %d conditionals -> inductor", len(_conds(gm)))
        return compile_fx(gm, example_inputs, config_patches=patches)
    return _lazy_compile(gm, example_inputs, cfg, gates, patches)


def _conds(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.cond]


def _load_gates(gates, layout) -> LazyGates:
    if gates is None:
        return LazyGates(layout)
    if isinstance(gates, (str, os.PathLike)):
        from safetensors.torch import load_file

        loaded = LazyGates(layout)
        state = load_file(os.fspath(gates))
        expected = set(loaded.state_dict())
        if set(state) != expected:
            raise ValueError(f"gates file {os.fspath(gates)!r} does not fit this model's {len(layout)} sites: "
                             f"it holds {sorted(state)[:6]}..., expected {sorted(expected)[:6]}...")
        try:
            loaded.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"gates file {os.fspath(gates)!r} does not fit this model's sites: {e}") from None
        gates = loaded
    if not isinstance(gates, LazyGates):
        raise TypeError(f"the 'gates' option must be a LazyGates or a safetensors path, got {type(gates).__name__}")
    if gates.layout != layout:
        raise ValueError(f"the gates were made for other sites ({len(gates.layout)} sites, fingerprint "
                         f"{gates.fingerprint()}) than this model has ({len(layout)} sites, fingerprint "
                         f"{LazyGates(layout).fingerprint()})")
    return gates


def _lazy_compile(gm: fx.GraphModule, example_inputs: list, cfg: LazyConfig, gates, patches: dict):
    """Run the passes on a dynamo graph; the returned callable owns the cache state."""
    from torch._inductor.compile_fx import compile_fx

    gm = run_passes(_copy(gm), cfg, ANALYSIS)
    matches = gm.meta["lazypass.matches"]
    layout = [(m.kind, tuple(shape(s.z)[-1] for s in m.streams)) for m in matches]
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    gm.meta["lazypass.gates"] = _load_gates(gates, layout).to(device).requires_grad_(False)
    gm = run_passes(gm, cfg, INFERENCE)
    _name_new_params(gm)
    state = [torch.tensor(cfg.threshold, dtype=torch.float32, device=device)]
    for name, shp, dtype in gm.meta["lazypass.state_specs"][1:]:
        fill = math.inf if name == "lazy_last_t" else 0
        state.append(torch.full(shp, fill, dtype=dtype, device=device))
    n = gm.meta["lazypass.n_user_outputs"]
    log.info("lazydit: %d sites inserted into a dynamo graph -> inductor", len(matches))
    compiled = compile_fx(gm, list(example_inputs) + state, config_patches=patches)

    def run(*args):
        outs = compiled(*args, *state)  # the graph updates ``state`` in place
        return outs[:n] if isinstance(outs, (list, tuple)) else outs

    run.lazypass_state = state  # for tests and the curious: threshold, last_t, call index, valid, caches
    return run


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new graph over the same modules: dynamo reads the graph it handed over after the
    backend returns, so the passes must not rewrite that one in place."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    new = fx.GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    for old, node in env.items():
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = dict(gm._param_name_to_source)
    return new


def _name_new_params(gm: fx.GraphModule) -> None:
    """AOTAutograd maps every parameter of a dynamo graph back to where dynamo found it;
    the gate parameters the pass attached have no such place, so give them one."""
    from torch._dynamo.source import ConstantSource

    known = getattr(gm, "_param_name_to_source", None)
    if known is None:
        return
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in known:
            known[name] = ConstantSource(f"lazypass_{name}")
    for node in gm.graph.find_nodes(op="placeholder"):
        if not hasattr(node, "_dynamo_source"):  # the state inputs
            node._dynamo_source = None


def register() -> None:
    """Make ``backend="lazydit"`` known to dynamo (``import lazypass`` does this)."""
    from torch._dynamo.backends import registry

    # When dynamo loads us through the entry point it registers the function itself, and a
    # second registration under the same name is an error.
    if NAME not in registry._BACKENDS and NAME not in registry._COMPILER_FNS:
        registry.register_backend(lazydit_backend, name=NAME)


__all__ = ["lazydit_backend", "register"]
