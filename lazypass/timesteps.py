"""Checks on the timestep input, before and after tracing.

The runtime starts a new sampling run for a sample when its timestep rises, and gives
the k-th call at one timestep the k-th cache slot. Both need the timestep as a tensor
with one value per sample (or one for all): a Python number would be traced as a constant
(every step would retrace and start from empty caches, and an exported graph would hold
one fixed step), and a tensor of shape (B, 1) or with the wrong length often broadcasts
silently inside the model.
"""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from lazypass.config import LazyConfig
from lazypass.tracing import flatten_inputs

NAMES = ("timestep", "timesteps", "t")


def check_timestep_arg(forward, cfg: LazyConfig, args: tuple, kwargs: dict) -> None:
    """Before tracing, check the argument named like a timestep (or ``timestep_arg``).

    After tracing, the input found to feed the timestep embedding is checked again by
    :func:`timestep_index`.
    """
    names = (cfg.timestep_arg,) if cfg.timestep_arg else NAMES
    try:
        bound = inspect.signature(forward).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = kwargs
    # the batch is the leading dim of the first tensor input in signature order (hidden_states)
    batch = next((x.shape[0] for x in pytree.tree_leaves(list(bound.values()))
                  if isinstance(x, torch.Tensor) and x.dim() >= 2), None)
    for name in names:
        v = bound.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            raise TypeError(
                f"{name}={v!r} is a Python number; lazypass needs the timestep as a tensor, e.g. "
                f"torch.full((batch,), {v!r}) (a number would be traced as a constant, so the model "
                "could not tell the sampling steps apart)"
            )
        if isinstance(v, torch.Tensor):
            check_timestep_shape(name, v, batch)


def check_timestep_shape(name: str, t: torch.Tensor, batch: int | None) -> None:
    if t.dim() == 0 or (t.dim() == 1 and (batch is None or t.shape[0] in (1, batch))):
        return
    want = f"({batch},)" if batch is not None else "(batch,)"
    raise ValueError(
        f"the timestep {name!r} has shape {tuple(t.shape)}; lazypass needs a 0-d tensor, shape (1,) "
        f"or one timestep per sample, shape {want} (reshape it, e.g. t.reshape(-1))"
    )


def timestep_index(gm: fx.GraphModule, timestep: fx.Node | None, args: tuple, kwargs: dict,
                   batch: int) -> int | None:
    """Leaf index of the timestep input; checks its shape is one the step logic understands."""
    if timestep is None:
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = placeholders.index(timestep)
    leaves, _ = flatten_inputs(args, kwargs)
    if isinstance(leaves[index], torch.Tensor):
        check_timestep_shape(str(timestep.target), leaves[index], batch)
    return index
