"""Notice changes to a lazy model after it was traced, cheaply, at every call.

A traced program holds the model's structure as it was: which modules, parameters,
adapters, attention processors and hooks took part. ``Watch`` records that and tells,
at each call, whether it still holds. The check must cost next to nothing, so it has
two levels:

- counters that move on every change made through ``nn.Module``: a process-wide count of
  module / parameter / buffer registrations (torch's global registration hooks, installed
  once when this module is imported) and torch's hook-handle counter
  (``RemovableHandle.next_id``, which moves when any hook is registered anywhere);
- what changes without going through either: the identity of every parameter, the children
  of every module (``del parent.child``, ``ModuleList.pop``), ``forward`` of every submodule
  (diffusers' and accelerate's hooks replace it), attention processors that are not modules
  (and their attention backend), PEFT's adapter switches (enabled, active, merged, scaling),
  and the hook dicts of modules that had hooks.

Only when one of these differs is the whole model fingerprinted again (module and
parameter identities, hooks, adapters); if that fingerprint differs too, the model
changed. The costs are measured in ``docs/live-model.md``.
"""

from __future__ import annotations

import copy
import itertools

from torch import nn
from torch.nn.modules import module as _torch_module
from torch.utils.hooks import RemovableHandle

from lazypass.hooks import classify

_REGISTRATIONS = [0]


def _count(*_):
    _REGISTRATIONS[0] += 1


_torch_module.register_module_module_registration_hook(_count)
_torch_module.register_module_parameter_registration_hook(_count)
_torch_module.register_module_buffer_registration_hook(_count)

# instance attributes whose changes no counter sees (forward is watched on every submodule)
_ATTRS = ("processor", "_disable_adapters", "_active_adapter", "merged_adapters", "scaling")
_SKIP = ("lazy_gates", "lazy_state")  # lazypass's own submodules (gates; state buffers for export)


def _counters() -> tuple[int, int]:
    return _REGISTRATIONS[0], RemovableHandle.next_id


def _snap(v):
    return copy.copy(v) if isinstance(v, (list, dict, set)) else v


def _named_modules(model: nn.Module):
    for name, m in model.named_modules(remove_duplicate=False):
        if name.split(".", 1)[0] in _SKIP:
            continue
        yield name, m


class Watch:
    """What a lazy model looked like when its programs were traced.

    ``same()`` is the per-call check and ``update()`` the full look; ``cache`` and ``other`` are :func:`classify`'s
    findings at the last full look (refused cache hooks; reasons to run the original
    forward); ``params`` are the model's own parameters (not the gates).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._take()

    def _take(self) -> None:
        named = list(_named_modules(self.model))
        self.counters = _counters()
        self.fingerprint = _fingerprint(named)
        self.cache, self.other = classify(named)
        seen = set()
        self.params = [p for _, m in named for p in m._parameters.values()
                       if p is not None and id(p) not in seen and not seen.add(id(p))]
        dicts, keys = [], []
        for name, m in named:
            d = m.__dict__
            if name:
                dicts.append(d), keys.append("forward")
            if m._modules:  # by content: `del parent.child` and ModuleList.pop pass no hook
                dicts.append(d), keys.append("_modules")
            for k in _ATTRS:
                if k in d:
                    dicts.append(d), keys.append(k)
            proc = d.get("processor")
            if proc is not None and hasattr(proc, "__dict__"):
                dicts.append(proc.__dict__), keys.append("_attention_backend")
        self._dicts, self._keys = dicts, keys
        self._param_dicts = [m._parameters for _, m in named if m._parameters]
        self._param_ids = self._ids()
        self._values = self._probe()
        self._hooked = [h for _, m in named for h in (m._forward_hooks, m._forward_pre_hooks) if h]
        self._hooked += [h for h in (_torch_module._global_forward_hooks, _torch_module._global_forward_pre_hooks) if h]
        self._hook_keys = [tuple(h) for h in self._hooked]

    def _ids(self) -> list[int]:
        # a parameter put straight into ``_parameters`` (accelerate's loaders do) passes no hook
        return list(map(id, itertools.chain.from_iterable(map(dict.values, self._param_dicts))))

    def _probe(self) -> list:
        return [_snap(d.get(k)) for d, k in zip(self._dicts, self._keys)]

    def same(self) -> bool:
        """The per-call check: True if nothing that a change moves has moved (cheap)."""
        return (self.counters == _counters()
                and list(map(dict.get, self._dicts, self._keys)) == self._values
                and [tuple(h) for h in self._hooked] == self._hook_keys
                and self._ids() == self._param_ids)

    def same_structure(self) -> bool:
        """The per-call check without the counters and parameter identities, which
        ``torch.export`` moves while it traces (it swaps parameters for fakes): modules,
        processors, adapter switches and hooks are as they were."""
        return (list(map(dict.get, self._dicts, self._keys)) == self._values
                and [tuple(h) for h in self._hooked] == self._hook_keys)

    def update(self) -> bool:
        """Look at the whole model again; True if it changed since the last look.

        Example:
            >>> from torch import nn
            >>> m = nn.Sequential(nn.Linear(2, 2))
            >>> w = Watch(m)
            >>> w.same()
            True
            >>> _ = m.append(nn.ReLU())
            >>> w.same(), w.update(), w.same()
            (False, True, True)
        """
        old = self.fingerprint
        self._take()
        return self.fingerprint != old


def _fingerprint(named) -> tuple:
    out = []
    for name, m in named:
        d = m.__dict__
        out.append((
            name, id(m),
            tuple((k, id(v)) for k, v in m._parameters.items()),
            tuple((k, id(v)) for k, v in m._buffers.items()),
            tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
            id(d.get("forward")) if name else None,
            tuple((k, repr(_snap(d[k])) if k != "processor" else id(d[k])) for k in _ATTRS if k in d),
            getattr(d.get("processor"), "_attention_backend", None),
            tuple(getattr(_registry_hooks(m), "keys", dict)()),
        ))
    out.append((tuple(_torch_module._global_forward_hooks), tuple(_torch_module._global_forward_pre_hooks)))
    return tuple(out)


def _registry_hooks(m):
    return getattr(m.__dict__.get("_diffusers_hook"), "hooks", None) or {}


__all__ = ["Watch"]
