"""State of a lazy model's calls under ``torch.compile``.

Dynamo traces the lazy ``forward`` into :func:`compiled_call`. It must stay one graph
(``fullgraph=True``) that is never recompiled while sampling, so:

- nothing is traced here: the program must exist (an eager call, ``lazypass.trace`` or
  ``apply(example_inputs=...)`` made it); ``torch.export`` cannot run inside dynamo;
- the state lives in persistent buffers per program (:class:`Live`), allocated eagerly
  when the program is traced and only ever updated in place, so dynamo sees the same
  tensors with the same metadata on every call, and CUDA graphs see fixed addresses;
  ``reset`` and ``trajectory`` refill or swap their *contents* outside the graph;
- the per-call records go into ring buffers indexed by a call counter tensor (a Python
  list that grows would be a guard on its length and a recompile per call).

Eager and compiled calls keep separate caches; ``stats`` reads whichever ran last.

The buffers belong to the model, not to a run: ``trajectory`` swaps their contents on
enter and exit, so compiled runs go one at a time (``trajectory`` refuses a second one in
another thread or task). A compiled call does not look for changes to the model (that
would be Python on every call, a graph break): after changing the model, call it once
eagerly (or ``lazypass.trace``); the program key then holds a new ``generation``, which
dynamo guards on, so the compiled model is compiled again for the new program.

``torch.export.export(lazy_model, args)`` runs :func:`exported_call`: the same program on
the same buffers, which are registered on the model as ``model.lazy_state.p<i>.<state
name>`` (non-persistent, so not in the state dict) so that export sees them as module
buffers it may mutate, not as constants. The exported program carries them as explicit
buffer inputs and in-place updates (``BUFFER_MUTATION`` outputs after
``run_decompositions``); ``ep.module()`` keeps them, as torch.export does with every
buffer, so it threads the state between its calls and shares it with the model's
compiled calls.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from lazypass.tracing import flatten_inputs

RECORDS = 1024  # calls whose decisions ``stats`` can show (eager and compiled alike)

# id -> tensor, weakly: tensors compare elementwise, so a WeakSet cannot hold them
_STATE_TENSORS: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


@dataclass
class Live:
    """Buffers a compiled call reads and updates in place."""

    tensors: list[torch.Tensor]  # the state inputs after the threshold, as in state_specs[1:]
    threshold: torch.Tensor
    records: list[torch.Tensor]  # ring buffers: skipped (R, sites, B), saved (R, sites), scores (R, sites, B),
    #                              computed (R, sites): share of rows each branch computed
    count: torch.Tensor  # 0-d int64: calls made since the last reset

    def buffers(self) -> list[torch.Tensor]:
        return [*self.tensors, *self.records, self.count]


def is_state_tensor(t) -> bool:
    """Whether ``t`` is one of the buffers a lazy model's compiled calls update (the backend
    uses this to tell a lazy model's graph from a user graph that holds ``cond`` itself)."""
    return isinstance(t, torch.Tensor) and _STATE_TENSORS.get(id(t)) is t


def live_state(prog, threshold: torch.Tensor, device: torch.device) -> Live:
    tensors = [spec.initial(device) for spec in prog.state_specs[1:]]
    sites, batch = len(prog.sites), prog.batch
    records = [
        torch.zeros(RECORDS, sites, batch, dtype=torch.bool, device=device),
        torch.zeros(RECORDS, sites, dtype=torch.bool, device=device),
        torch.zeros(RECORDS, sites, batch, dtype=torch.float32, device=device),
        torch.zeros(RECORDS, sites, dtype=torch.float32, device=device),
    ]
    live = Live(tensors, threshold, records, torch.zeros((), dtype=torch.int64, device=device))
    for t in (*live.buffers(), threshold):
        _STATE_TENSORS[id(t)] = t
    return live


@torch.no_grad()
def reset_live(rt, keys=None) -> None:
    for key in rt.live if keys is None else keys:
        live = rt.live[key]
        for dst, spec in zip(live.tensors, rt.programs[key].state_specs[1:]):
            dst.fill_(spec.fill)
        live.count.zero_()


@torch.no_grad()
def swap_live(rt, snapshot: dict | None) -> dict | None:
    """Put ``snapshot`` (or empty caches) into the live buffers; return what they held."""
    if not rt.live:
        return None
    current = {key: [t.clone() for t in live.buffers()] for key, live in rt.live.items()}
    missing = []
    for key, live in rt.live.items():
        saved = (snapshot or {}).get(key)
        if saved is None:
            missing.append(key)
        else:
            for dst, src in zip(live.buffers(), saved):
                dst.copy_(src)
    reset_live(rt, missing)
    return current


class StateBuffers(nn.Module):
    """``model.lazy_state``: the live buffers of every traced program, ``p<i>.<state name>``
    in the order the programs were traced, so that ``torch.export`` finds them."""

    def __init__(self, rt):
        super().__init__()
        self.keys = []
        for key, live in rt.live.items():
            child = nn.Module()
            for spec, t in zip(rt.programs[key].state_specs[1:], live.tensors):
                child.register_buffer(spec.name, t, persistent=False)
            self.add_module(f"p{len(self.keys)}", child)
            self.keys.append(key)

    def tensors(self, key) -> list[torch.Tensor]:
        child = getattr(self, f"p{self.keys.index(key)}")
        return list(child._buffers.values())  # in state_specs[1:] order; export's fakes while exporting


def register_buffers(rt) -> None:
    """(Re)build ``model.lazy_state`` from the runtime's live buffers."""
    rt.model.lazy_state = StateBuffers(rt)


def compiled_records(rt) -> list[tuple[torch.Tensor, ...]]:
    """The (skipped, saved, scores, computed) of the compiled calls since the last reset, oldest first."""
    if rt.program is None or rt.program.key not in rt.live:
        return []
    live = rt.live[rt.program.key]
    count = int(live.count)
    order = [i % RECORDS for i in range(max(0, count - RECORDS), count)]
    return [tuple(r[i] for r in live.records) for i in order]


def _traced(rt, leaves, spec, inside: str, before: str):
    key = rt.key_for(leaves, spec)
    prog = rt.programs.get(key)
    if prog is None:
        raise RuntimeError(
            f"lazypass: {type(rt.model).__name__} has not been traced for these inputs yet (or it changed "
            "since: new adapters, modules, hooks, options), and tracing (torch.export) cannot run inside "
            f"{inside}. Call the lazy model once eagerly with inputs of the same shapes, or use "
            f"lazypass.trace(model, *inputs), before {before}"
        )
    return key, prog


def exported_call(rt, args: tuple, kwargs: dict):
    """The lazy forward as ``torch.export`` traces it: the program on ``model.lazy_state``'s
    buffers (read through the module, so export sees them as buffers); the user's outputs only."""
    from torch.utils import _pytree as pytree

    if not torch.compiler.is_dynamo_compiling() and not rt.watch.same_structure():
        raise RuntimeError(
            f"lazypass: {type(rt.model).__name__} changed since it was traced (modules, adapters, attention "
            "processors or hooks), and tracing cannot run inside torch.export. Call the lazy model once eagerly "
            "(or lazypass.trace(model, *inputs)) after the change, then export"
        )
    leaves, spec = flatten_inputs(args, kwargs)
    key, prog = _traced(rt, leaves, spec, "torch.export", "exporting")
    state = getattr(rt.model, "lazy_state", None)
    if not isinstance(state, StateBuffers) or key not in state.keys:
        register_buffers(rt)  # a copy of the model, or buffers replaced by the user: too late for export
        raise RuntimeError(
            "lazypass: the state buffers of this model were not registered before torch.export started "
            "(model.lazy_state); they are now: export again"
        )
    # no grad-mode switch here: export turns one into a subgraph that cannot hold cond's branches
    outs = prog.core(*leaves, rt.live[key].threshold, *state.tensors(key))
    return pytree.tree_unflatten(list(outs[: prog.n_user_outputs]), prog.out_spec)


def compiled_call(rt, args: tuple, kwargs: dict):
    """The lazy forward as dynamo traces it: the program on the persistent buffers."""
    from torch.utils import _pytree as pytree

    leaves, spec = flatten_inputs(args, kwargs)
    key, prog = _traced(rt, leaves, spec, "torch.compile", "calling the compiled model")
    live = rt.live[key]
    grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)
    with torch.set_grad_enabled(grad):
        outs = (prog.compiled or prog.core)(*leaves, live.threshold, *live.tensors)
    n = prog.n_user_outputs
    with torch.no_grad():
        slot = torch.remainder(live.count, RECORDS).reshape(1)
        for buf, rec in zip(live.records, outs[n:]):
            buf.index_copy_(0, slot, rec.unsqueeze(0).to(buf.dtype))
        live.count.add_(1)
    rt.program = prog
    rt.compiled_last = True
    rt.compiled_ever = True
    return pytree.tree_unflatten(list(outs[:n]), prog.out_spec)
