"""Capture a model's forward as an FX graph with ``torch.export`` and key it by its inputs."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree


class _Capture(nn.Module):
    """Runs the model's original forward (the lazy one replaced ``model.forward``)."""

    def __init__(self, model: nn.Module, forward):
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


def flatten_inputs(args: tuple, kwargs: dict):
    """Leaves and spec of a call; kwargs are sorted so the order they were given in does not matter."""
    return pytree.tree_flatten((tuple(args), {k: kwargs[k] for k in sorted(kwargs)}))  # dynamo-traceable


def signature(model: nn.Module, leaves, spec) -> tuple:
    """What a traced graph is specialised to: input shapes/dtypes/devices, constants, the model's dtype/device."""
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(("T", tuple(leaf.shape), leaf.dtype, str(leaf.device)))
        else:
            try:
                hash(leaf)
                parts.append(("C", type(leaf).__name__, leaf))
            except TypeError:
                parts.append(("C", type(leaf).__name__, repr(leaf)))
    param = next(model.parameters(), None)
    where = (param.dtype, str(param.device)) if param is not None else None
    return (str(spec), tuple(parts), where, model.training)


def capture(model: nn.Module, forward, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, object]:
    """Export ``forward(*args, **kwargs)``; returns a flat-input GraphModule and the output spec.

    ``torch.export`` is used rather than ``symbolic_trace``, which fails on diffusers models.
    The returned module takes the flattened leaves of ``(args, sorted kwargs)`` and returns
    flat outputs; ``pytree.tree_unflatten(out, out_spec)`` rebuilds the user's structure.
    """
    kwargs = dict(sorted(kwargs.items()))
    # One tensor passed for two inputs would become one graph input, and later calls with
    # different tensors would read the first for both: give every input its own tensor.
    seen: set[int] = set()

    def distinct(leaf):
        if isinstance(leaf, torch.Tensor):
            if id(leaf) in seen:
                return leaf.clone()
            seen.add(id(leaf))
        return leaf

    args, kwargs = pytree.tree_map(distinct, (tuple(args), kwargs))
    with torch.no_grad():
        ep = torch.export.export(_Capture(model, forward), tuple(args), kwargs, strict=False)
    gm = ep.module()
    out_spec = gm._out_spec
    gm._forward_pre_hooks.clear()
    gm._forward_hooks.clear()
    # export's input guards re-check what our signature key already pinned down
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph._codegen = fx.graph.CodeGen()
    gm.recompile()
    return gm, out_spec


def analyse(model: nn.Module, forward, cfg, args: tuple, kwargs: dict):
    """Capture ``forward`` and find its sites: ``(gm, out_spec, GraphInfo)``; changes nothing
    on the model (``report`` uses this for a dry run on a model that is not lazy)."""
    from lazypass.passes import ANALYSIS, graph_info, run_passes

    gm, out_spec = capture(model, forward, args, kwargs)
    gm = run_passes(gm, cfg, ANALYSIS)
    return gm, out_spec, graph_info(gm)
