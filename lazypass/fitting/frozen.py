"""A context in which only the gates of a model can train."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn


@contextmanager
def gates_only(model: nn.Module, forward: Callable) -> Iterator[nn.Module]:
    """Freeze every parameter but ``model.lazy_gates``, install ``forward``, switch to eval mode.

    On exit (also on error) every parameter's ``requires_grad``, the training mode and the
    model's own forward come back as they were. Gates that do not exist yet (the model is
    traced inside the context) are created trainable and stay so.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2).train()
        >>> with gates_only(m, lambda x: x):
        ...     m.weight.requires_grad, m.training
        (False, False)
        >>> m.weight.requires_grad, m.training, "forward" in m.__dict__
        (True, True, False)
    """
    saved_forward = model.__dict__.get("forward")
    saved_training = model.training
    gates = getattr(model, "lazy_gates", None)
    gate_ids = {id(p) for p in gates.parameters()} if gates is not None else set()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in gate_ids)
        model.eval()
        model.forward = forward
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if saved_forward is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = saved_forward
        model.train(saved_training)
