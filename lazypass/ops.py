"""What an FX node computes, in words the passes can match on.

Graphs reach lazypass from two capture paths: ``torch.export`` gives ATen ops
(``aten.linear.default``), dynamo gives torch-level callables
(``torch._C._nn.linear``, ``operator.add``).  The passes never look at targets
directly; they ask ``op_kind(node)`` for one of a few kinds and ``macs(node)``
for the multiply-accumulates of the heavy ones.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

# A "heavy" op carries the multiply-accumulates of a branch; a site needs one.
_KINDS: dict[str, list] = {
    "linear": [aten.linear.default, torch._C._nn.linear, torch.nn.functional.linear, aten.addmm.default],
    "matmul": [
        aten.mm.default, aten.bmm.default, aten.matmul.default, aten.baddbmm.default,
        torch.matmul, torch.bmm, torch.mm, torch.baddbmm, operator.matmul, torch.Tensor.matmul,
    ],
    "einsum": [aten.einsum.default, torch.einsum, torch.functional.einsum],
    "sdpa": [
        aten.scaled_dot_product_attention.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch._C._nn.scaled_dot_product_attention,
        torch.nn.functional.scaled_dot_product_attention,
    ],
    "conv": [
        aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
        torch.conv1d, torch.conv2d, torch.conv3d,
        torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
    ],
    "softmax": [
        aten._softmax.default, aten.softmax.int, torch.softmax, torch.nn.functional.softmax,
        torch.Tensor.softmax,
    ],
    "add": [aten.add.Tensor, aten.add_.Tensor, operator.add, operator.iadd, torch.add, torch.Tensor.add],
    "sin": [aten.sin.default, torch.sin, torch.Tensor.sin],
    "cos": [aten.cos.default, torch.cos, torch.Tensor.cos],
    "assert": [aten._assert_tensor_metadata.default, aten._assert_async.msg, aten._assert_scalar.default],
}
_BY_TARGET = {target: kind for kind, targets in _KINDS.items() for target in targets}
HEAVY = frozenset({"linear", "matmul", "einsum", "sdpa", "conv"})


def op_kind(node: fx.Node) -> str | None:
    """The kind of op ``node`` calls ("linear", "sdpa", "add", ...), or None."""
    if node.op == "call_function":
        return _BY_TARGET.get(node.target)
    if node.op == "call_method":
        return {"matmul": "matmul", "softmax": "softmax", "add": "add", "sin": "sin", "cos": "cos"}.get(
            node.target
        )
    return None


def is_heavy(node: fx.Node) -> bool:
    return op_kind(node) in HEAVY


def value(node) -> torch.Tensor | None:
    """The example (fake) tensor a capture recorded for ``node``, if any."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val", node.meta.get("example_value"))
    return v if isinstance(v, torch.Tensor) else None


def shape(node) -> tuple[int, ...] | None:
    v = value(node)
    if v is None:
        return None
    try:
        return tuple(int(s) for s in v.shape)
    except Exception:  # symbolic sizes; data-dependent ones raise a guard error, not TypeError
        return None


def _arg(node: fx.Node, index: int, name: str):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def macs(node: fx.Node) -> int:
    """Multiply-accumulates of one call of a heavy node (0 for anything else)."""
    kind = op_kind(node)
    out = shape(node)
    if kind is None or kind not in HEAVY or out is None:
        return 0
    if kind == "linear":
        if node.target is aten.addmm.default:
            a = shape(node.args[1])
            return math.prod(out) * (a[-1] if a else 0)
        w = shape(_arg(node, 1, "weight"))
        return math.prod(out) * (w[-1] if w else 0)
    if kind == "matmul":
        a = shape(node.args[1] if node.target is aten.baddbmm.default or node.target is torch.baddbmm else node.args[0])
        return math.prod(out) * (a[-1] if a else 0)
    if kind == "sdpa":
        q, k, v = (shape(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
        if not (q and k and v):
            return 0
        batch = math.prod(q[:-2])
        return batch * q[-2] * k[-2] * (q[-1] + v[-1])
    if kind == "conv":
        w = shape(_arg(node, 1, "weight"))
        return math.prod(out) * (math.prod(w[1:]) if w else 0)
    if kind == "einsum":
        return _einsum_macs(node)
    return 0


def _einsum_macs(node: fx.Node) -> int:
    equation = node.args[0]
    operands = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
    shapes = [shape(o) for o in operands]
    if not isinstance(equation, str) or any(s is None for s in shapes) or "..." in equation:
        return 0
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for letters, dims in zip(inputs, shapes):
        sizes.update(zip(letters, dims))
    return math.prod(sizes.values())


# ops whose output may share memory with their first input: a write through them shows there
_VIEWS = {
    "slice", "select", "view", "_unsafe_view", "reshape", "transpose", "permute", "unsqueeze", "squeeze",
    "expand", "unflatten", "flatten", "split", "split_with_sizes", "chunk", "unbind", "getitem", "t",
    "to", "type_as", "alias", "contiguous", "detach", "as_strided", "narrow", "diagonal", "movedim",
    "view_as", "expand_as", "unfold", "swapaxes", "real", "imag", "view_as_real", "view_as_complex",
}


def is_view(node: fx.Node) -> bool:
    """Whether ``node``'s output may share memory with its first input."""
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return name in _VIEWS
