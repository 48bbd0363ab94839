"""What hooks on a lazy model's submodules mean for its traced program.

A lazy model runs one traced graph, so the Python code that hooks add to submodules runs
once, when the graph is traced, and never again. Each kind of hook is therefore either
traced, refused, or a reason to run the original forward:

- **casting** (diffusers' layerwise casting, and its PEFT input-cast hook): only tensor
  work, traced into the program (``traceable``): the weights stay in their storage dtype
  and the graph casts them to the compute dtype where they are used, as the hook does;
- **cache** (every *stateful* diffusers hook: FirstBlockCache, FasterCache, MagCache,
  TaylorSeer, PyramidAttentionBroadcast, ...): refused with :class:`CacheHookError`; such a
  hook decides on the host which blocks to recompute, lazypass decides in the graph, and
  under a lazy program the hook would silently do nothing;
- **other** (torch forward hooks and pre-hooks, any other forward wrapper such as group
  offloading or accelerate's hooks): the model runs its original forward while they are
  there, so they run on every call (with a warning that the model is not lazy meanwhile).

Hooks on the lazy model itself (the root) run around the lazy forward on every call and
need nothing; only its stateful diffusers hooks are refused.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

CASTING = ("layerwise_casting", "peft_autocast_disable")  # diffusers hook names


class CacheHookError(RuntimeError):
    """A cache hook from another library is on a lazy model."""


def _registry(module: nn.Module):
    return module.__dict__.get("_diffusers_hook")


def _wraps_forward(module: nn.Module) -> bool:
    """Whether an instance attribute replaces the module's forward (a bound class forward,
    which diffusers leaves behind when its last hook is removed, does not count)."""
    f = module.__dict__.get("forward")
    if f is None:
        return False
    return not (isinstance(f, types.MethodType) and f.__self__ is module and f.__func__ is type(module).forward)


def classify(named_modules) -> tuple[list[str], list[str]]:
    """``(cache, other)``: descriptions of the cache hooks (refused) and of the hooks that make
    the model run its original forward. ``named_modules`` yields ``(name, module)``, root first."""
    cache, other = [], []
    for name, m in named_modules:
        where = name or "<root>"
        registry = _registry(m)
        hooks = dict(getattr(registry, "hooks", None) or {})
        for hook_name, hook in hooks.items():
            if getattr(hook, "_is_stateful", False):
                cache.append(f"{where}: {type(hook).__name__} ({hook_name!r})")
            elif name and hook_name not in CASTING:
                other.append(f"{where}: diffusers hook {type(hook).__name__} ({hook_name!r})")
        if not name:
            continue  # the root's own hooks and wrappers run around the lazy forward
        if _wraps_forward(m) and not hooks:
            other.append(f"{where}: forward replaced by {getattr(m.forward, '__qualname__', type(m.forward).__name__)}")
        if m._forward_hooks or m._forward_pre_hooks:
            n = len(m._forward_hooks) + len(m._forward_pre_hooks)
            other.append(f"{where}: {n} torch forward hook(s)")
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        other.append("global torch forward hook(s) (register_module_forward_hook)")
    return cache, other


def cache_hook_error(found: list[str]) -> CacheHookError:
    return CacheHookError(
        "lazypass: a cache hook from another library is on this lazy model: " + "; ".join(found) + ". "
        "Such a hook decides on the host which blocks to recompute, lazypass decides that in the graph; "
        "combined, the lazy program would run past the hook and it would do nothing. Remove it "
        "(model.disable_cache() for diffusers' CacheMixin models) to use lazypass, or use that cache on a "
        "model that did not go through lazypass.apply"
    )


@contextlib.contextmanager
def traceable(model: nn.Module):
    """While the model is captured, make diffusers' layerwise casting hooks functional.

    The hook casts a module in place (``module.to(dtype)``) before and after its forward,
    which cannot be traced. Here ``module.to`` is shadowed for the capture: the cast to the
    compute dtype puts cast copies of the weights in place of the parameters (ops in the
    graph, read from the stored weights), and the cast back restores the parameters.
    """
    patched: dict[nn.Module, list] = {}  # module -> (slots, name, tensor, cast) its cast put aside
    for m in model.modules():
        registry = _registry(m)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        if hook is not None:
            m.__dict__["to"] = _functional_to(m, hook.compute_dtype, patched.setdefault(m, []))
    try:
        yield
    finally:
        for m, aside in patched.items():
            _restore(aside)  # a capture that failed inside the module never cast it back
            m.__dict__.pop("to", None)


def _functional_to(module: nn.Module, compute: torch.dtype, aside: list):
    def to(*args, dtype=None, **kwargs):
        if dtype is None:
            dtype = next((a for a in args if isinstance(a, torch.dtype)), None)
        if dtype == compute:
            for sub in module.modules():
                for slots in (sub._parameters, sub._buffers):
                    for name, t in list(slots.items()):
                        if t is not None and t.is_floating_point() and t.dtype != compute:
                            slots[name] = cast = t.to(compute)
                            aside.append((slots, name, t, cast))
        else:
            _restore(aside)
        return module

    return to


def _restore(aside: list) -> None:
    while aside:
        slots, name, t, cast = aside.pop()
        if slots.get(name) is cast:  # not already put back by export's own clean-up
            slots[name] = t


__all__ = ["CASTING", "CacheHookError", "cache_hook_error", "classify", "traceable"]
