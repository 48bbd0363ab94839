"""Capture a model's forward as an FX graph with ``torch.export`` and key it by its inputs."""

from __future__ import annotations

import enum

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


def differing_inputs(old_key: tuple, new_key: tuple, args: tuple, kwargs: dict) -> str:
    """The inputs in which the call ``(args, kwargs)`` (key ``new_key``) differs from the one
    that made ``old_key``, named as the user passed them, for error messages."""
    if old_key[0] != new_key[0]:
        return "which arguments are passed, or their structure (a list or dict of another length)"
    flat, _ = pytree.tree_flatten_with_path((tuple(args), {k: kwargs[k] for k in sorted(kwargs)}))
    names = []
    for i, (a, b) in enumerate(zip(old_key[1], new_key[1])):
        if a != b:
            path, leaf = flat[i]
            what = "shape/dtype/device" if a[0] == "T" and b[0] == "T" else f"value {leaf!r}"
            names.append(f"{_name(path)} ({what})")
    if old_key[2:4] != new_key[2:4]:
        names.append("the model's dtype, device or training mode")
    return ", ".join(names) or "nothing it passes (the model itself changed)"


def unsupported_inputs(args: tuple, kwargs: dict) -> list[str]:
    """Inputs a traced program cannot take: anything but tensors and plain values (``torch.export``
    refuses other objects, and bakes a module passed as an argument into the graph)."""
    flat, _ = pytree.tree_flatten_with_path((tuple(args), {k: kwargs[k] for k in sorted(kwargs)}))
    ok = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device, enum.Enum)
    return [f"{_name(path)} ({type(leaf).__name__})" for path, leaf in flat if not isinstance(leaf, ok)]


def _name(path) -> str:
    first, *rest = path
    head = f"argument {rest[0].idx}" if first.idx == 0 else str(rest[0].key)
    return head + "".join(str(k) for k in rest[1:])


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
    from lazypass.hooks import traceable

    with torch.no_grad(), traceable(model):
        ep = torch.export.export(_Capture(model, forward), tuple(args), kwargs, strict=False)
    gm = ep.module()
    _forget_real_tensors(gm)
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


def _forget_real_tensors(gm: fx.GraphModule) -> None:
    """Drop the fake-tensor converter's memo of the real tensors it met while tracing.

    The graph keeps fake tensors (``meta["val"]``), which keep their ``FakeTensorMode``
    alive, whose converter holds a weak reference to every parameter it converted. A
    parameter with a weak reference cannot be swapped (``torch.utils.swap_tensors``:
    ``set_swap_module_params_on_conversion(True)``, ``enable_layerwise_casting``, ...).
    Nothing converts real tensors with this mode after tracing, so the memo is not needed.
    """
    modes = {id(v.fake_mode): v.fake_mode for n in gm.graph.nodes
             if (v := n.meta.get("val")) is not None and hasattr(v, "fake_mode")}
    for mode in modes.values():
        converter = mode.fake_tensor_converter.meta_converter
        converter.tensor_memo.clear()
        converter.storage_memo.clear()
        converter.describer.lookup_tensor = type(converter.describer.lookup_tensor)()
        converter.describer.lookup_storage = type(converter.describer.lookup_storage)()
        mode.fake_tensor_converter.constant_storage_mapping.clear()


def analyse(model: nn.Module, forward, cfg, args: tuple, kwargs: dict):
    """Capture ``forward`` and find its sites: ``(gm, out_spec, GraphInfo)``; changes nothing
    on the model (``report`` uses this for a dry run on a model that is not lazy)."""
    from lazypass.passes import ANALYSIS, graph_info, run_passes

    gm, out_spec = capture(model, forward, args, kwargs)
    gm = run_passes(gm, cfg, ANALYSIS)
    return gm, out_spec, graph_info(gm)
