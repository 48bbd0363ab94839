"""``torch.compile(model, backend="lazydit")``: the lazy pass, then Inductor.

Dynamo hands the backend an FX graph of torch-level ops.  Two cases:

- **The model is lazy already** (``lazypass.apply``).  Dynamo traced the lazy shell, so
  the graph holds one ``torch.ops.higher_order.cond`` per site, the gate scores and the
  in-place state updates (see ``lazypass/compiled.py``).  The backend
  leaves the conditionals whole and gives the graph to Inductor's ``compile_fx``.  The
  state is read from and written to the runtime's persistent buffers, so ``reset``,
  ``trajectory``, ``set_threshold`` and ``stats`` work as in eager mode.
- **The model is not lazy.**  The backend runs the passes on the dynamo graph itself
  (prune, match sites, insert gates), with gates from the ``gates`` option (a
  ``LazyGates`` or a file written by ``lazypass.save_gates``, whose threshold it uses; zero
  gates by default, which never skip).  The cache state then lives in tensors held by the returned callable; a
  new sampling run is detected in the graph as for every lazy model (the timestep rises).
  There is no ``reset``/``stats`` for such a model: use ``lazypass.apply`` for those.

A graph is taken as case one when its inputs include the lazy model's state buffers
(``lazypass/compiled.py``); a user graph holding ``torch.cond`` of its own is case two.
Options (``torch.compile(..., options={...})``) are the fields of ``LazyConfig`` plus
``gates`` and ``inductor`` (a dict of Inductor config patches); anything else is an error.
``mode`` ("reduce-overhead", "max-autotune", ...) maps to Inductor's options as it
does for ``backend="inductor"``.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.fx as fx

from lazypass.checkpoint import read_gates
from lazypass.compiled import is_state_tensor
from lazypass.config import LazyConfig
from lazypass.gates import LazyGates
from lazypass.passes import ANALYSIS, INFERENCE, compiled_writes, graph_info, run_passes

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

    if any(is_state_tensor(x) for x in example_inputs):  # a lazy model's graph: keep its conditionals
        if gates is not None:
            raise ValueError("the 'gates' option is for models that are not lazy yet; this one has its "
                             "own model.lazy_gates (load gates into those instead)")
        log.info("lazydit: lazy graph with %d conditionals -> inductor", len(_conds(gm)))
        return compile_fx(gm, example_inputs, config_patches=patches)
    return _lazy_compile(gm, example_inputs, cfg, gates, patches)


def _conds(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.cond]


def _gates(gates, layout, cfg: LazyConfig) -> tuple[LazyGates, float]:
    """The gates for a graph the backend made lazy, and the threshold to start from."""
    if gates is None:
        return LazyGates(layout, cfg.gate_inputs), cfg.threshold
    if isinstance(gates, (str, os.PathLike)):
        saved = read_gates(gates)  # every check load_gates makes, before anything is copied
        saved.check_config(cfg)
        loaded = LazyGates(layout, cfg.gate_inputs)
        saved.copy_into(loaded)
        return loaded, saved.threshold
    if not isinstance(gates, LazyGates):
        raise TypeError(f"the 'gates' option must be a LazyGates or a safetensors path, got {type(gates).__name__}")
    if gates.layout != layout:
        raise ValueError(f"the gates were made for other sites ({len(gates.layout)} sites, fingerprint "
                         f"{gates.fingerprint()}) than this model has ({len(layout)} sites, fingerprint "
                         f"{LazyGates(layout).fingerprint()})")
    return gates, cfg.threshold


def _lazy_compile(gm: fx.GraphModule, example_inputs: list, cfg: LazyConfig, gates, patches: dict):
    """Run the passes on a dynamo graph; the returned callable owns the cache state."""
    from torch._inductor.compile_fx import compile_fx

    gm = run_passes(_copy(gm), cfg, ANALYSIS)
    info = graph_info(gm)
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    gates, threshold = _gates(gates, info.layout, cfg)
    info.gates = gates.to(device).requires_grad_(False)
    gm = compiled_writes(run_passes(gm, cfg, INFERENCE))
    _name_new_params(gm)
    state = [torch.tensor(threshold, dtype=torch.float32, device=device)]
    state += [spec.initial(device) for spec in info.state_specs[1:]]
    n = info.n_user_outputs
    log.info("lazydit: %d sites inserted into a dynamo graph -> inductor", len(info.matches))
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
    """Make ``backend="lazydit"`` known to dynamo (``import lazypass`` calls this).

    An installed lazypass declares the backend through the ``torch_dynamo_backends`` entry
    point, which dynamo reads when the name is first looked up; then nothing is done here
    (and ``import lazypass`` does not import dynamo). A source checkout on ``PYTHONPATH``
    has no entry point, so the backend is registered with ``torch._dynamo.register_backend``.
    """
    from importlib.metadata import entry_points

    if any(ep.name == NAME for ep in entry_points(group="torch_dynamo_backends")):
        return
    import torch._dynamo

    if NAME not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(lazydit_backend, name=NAME)


__all__ = ["lazydit_backend", "register"]
