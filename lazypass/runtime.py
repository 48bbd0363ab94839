"""The lazy model at run time: ``apply`` and the state a sampling run carries.

``apply`` keeps the user's model object and replaces only its ``forward``.  On a call
with inputs it has not seen (a new batch shape, dtype, device, or different constant
arguments) it captures the original forward with ``torch.export``, runs the passes, and
keeps the resulting functional graph (a *program*).  The program takes the cache state
as inputs and returns the new state; the runtime only keeps those tensors, so no value
is read on the host and nothing branches in Python on a tensor.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import types

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from lazypass.config import LazyConfig, check_threshold
from lazypass.gates import LazyGates
from lazypass.ops import shape
from lazypass.passes import ANALYSIS, INFERENCE, TRAINING, NoSitesError, Site, run_passes
from lazypass.passes.match_sites import site_records
from lazypass.tracing import capture, flatten_inputs, signature


@dataclass
class Program:
    """One traced and rewritten graph, specialised to one input signature.

    ``core`` holds ``torch.ops.higher_order.cond`` nodes and is what compilers and
    exporters see; ``eager`` is the same graph with each cond calling its branch
    directly, which is what the HOP itself does in eager mode minus ~0.1 ms of dispatch
    per call.

    ``mode`` is "hard" (gated conditionals with cache state, ``insert_gates``) or "soft"
    (the differentiable blend used for fitting, ``soft_blend``); ``state_specs`` lists the
    extra inputs after the user's: threshold and cache state, or mix and previous outputs.
    """

    key: tuple
    core: fx.GraphModule
    eager: fx.GraphModule
    out_spec: object
    sites: list[Site]
    model_macs: int
    state_specs: list[tuple[str, tuple[int, ...], torch.dtype]]
    n_user_outputs: int
    has_timestep: bool
    timestep_index: int | None = None  # which input leaf is the timestep
    mode: str = "hard"


_PASSES = {"hard": INFERENCE, "soft": TRAINING}


@dataclass
class State:
    """Caches and bookkeeping of one sampling run, plus what happened at each call."""

    key: tuple
    tensors: list[torch.Tensor]
    records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


class Runtime:
    def __init__(self, model: nn.Module, cfg: LazyConfig, forward):
        self.model = model
        self.cfg = cfg
        self.forward = forward
        self.programs: dict[tuple, Program] = {}
        self.state: State | None = None
        self.program: Program | None = None  # the one the current state belongs to
        self.threshold = cfg.threshold
        self._threshold_tensors: dict[torch.device, torch.Tensor] = {}
        self.pending_gates = None  # set by load_gates before the first trace: callable(LazyGates)
        self.live: dict[tuple, Live] = {}  # state of compiled calls, see "compiled calls" below
        self.compiled_last = False  # whether the last call ran inside torch.compile

    # -- tracing -------------------------------------------------------------------
    def program_for(self, args: tuple, kwargs: dict, mode: str = "hard") -> tuple[Program, list]:
        """The program for these inputs ("hard": inference, "soft": fitting), traced if needed."""
        if mode not in _PASSES:
            raise ValueError(f"mode must be one of {sorted(_PASSES)}, got {mode!r}")
        leaves, spec = flatten_inputs(args, kwargs)
        key = signature(self.model, leaves, spec)
        if mode != "hard":
            key = key + (mode,)
        prog = self.programs.get(key)
        if prog is None:
            _check_timestep_arg(self.forward, self.cfg, args, kwargs)
            try:
                prog = self._trace(key, args, kwargs, mode)
            except NoSitesError as e:
                if not self.programs:  # nothing lazy about this model: give it back unchanged
                    _undo(self.model)
                    raise NoSitesError(
                        f"{e} The model was left as it was before lazypass.apply and runs normally."
                    ) from None
                raise
            self.programs[key] = prog
            if mode == "hard":
                self.live[key] = _live_state(self, prog, _device(leaves, self.model))
        return prog, leaves

    def __deepcopy__(self, memo):
        # a copy of a lazy model gets its own runtime: no shared caches, programs traced again
        # for the copy's weights and gates (traced graphs hold fake tensors that cannot be copied)
        rt = Runtime(copy.deepcopy(self.model, memo), self.cfg, copy.deepcopy(self.forward, memo))
        rt.threshold = self.threshold
        return rt

    def _trace(self, key, args, kwargs, mode: str = "hard") -> Program:
        gm, out_spec = capture(self.model, self.forward, args, kwargs)
        gm = run_passes(gm, self.cfg, ANALYSIS)
        matches = gm.meta["lazypass.matches"]
        batch = gm.meta.get("lazypass.batch") or shape(matches[0].streams[0].x)[0]
        timestep_index = _timestep_index(gm, args, kwargs, batch)
        layout = [(m.kind, tuple(shape(s.z)[-1] for s in m.streams)) for m in matches]
        gates = getattr(self.model, "lazy_gates", None)
        if gates is None:
            param = next(self.model.parameters())
            gates = LazyGates(layout).to(param.device)
            if self.pending_gates is not None:
                self.pending_gates(gates)  # refuses a file made for other sites
                self.pending_gates = None
            self.model.lazy_gates = gates
        elif gates.layout != layout:
            raise ValueError(
                "the model's sites changed between traces (different inputs found a different set of "
                f"branches: {len(gates.layout)} sites before, {len(layout)} now); lazypass needs the same "
                "sites for every input shape"
            )
        gm.meta["lazypass.gates"] = gates
        sites = site_records(gm, self.cfg, batch)
        model_macs = gm.meta["lazypass.model_macs"]
        gm = run_passes(gm, self.cfg, _PASSES[mode])
        return Program(
            key=key,
            core=gm,
            eager=eager_twin(gm),
            out_spec=out_spec,
            sites=sites,
            model_macs=model_macs,
            state_specs=gm.meta["lazypass.state_specs"],
            n_user_outputs=gm.meta["lazypass.n_user_outputs"],
            has_timestep=gm.meta["lazypass.timestep"] is not None,
            timestep_index=timestep_index,
            mode=mode,
        )

    # -- state ---------------------------------------------------------------------
    def fresh_state(self, prog: Program, device: torch.device) -> State:
        tensors = []
        for name, shp, dtype in prog.state_specs[1:]:
            if name == "lazy_last_t":
                tensors.append(torch.full(shp, math.inf, dtype=dtype, device=device))
            else:
                tensors.append(torch.zeros(shp, dtype=dtype, device=device))
        return State(prog.key, tensors)

    def threshold_tensor(self, device: torch.device) -> torch.Tensor:
        t = self._threshold_tensors.get(device)
        if t is None:
            t = torch.tensor(self.threshold, dtype=torch.float32, device=device)
            self._threshold_tensors[device] = t
        return t

    def set_threshold(self, value: float) -> None:
        self.threshold = check_threshold(value)
        for t in self._threshold_tensors.values():
            t.fill_(self.threshold)  # in place: compiled graphs keep reading the same tensor

    # -- calling -------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        prog, leaves = self.program_for(args, kwargs)
        device = _device(leaves, self.model)
        state = self.state
        if state is None or state.key != prog.key:
            state = self.fresh_state(prog, device)
        grad = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in leaves
        )
        try:
            with torch.set_grad_enabled(grad):
                core = prog.core if torch.compiler.is_compiling() else prog.eager
                outs = core(*leaves, self.threshold_tensor(device), *state.tensors)
        except BaseException:
            # the core updates the state in place, so a call that failed part-way may have
            # written some caches: that run starts over from empty caches
            if self.state is state:
                self.state = None
            raise
        n = prog.n_user_outputs
        state.records.append(tuple(outs[n:]))
        self.state, self.program = state, prog
        self.compiled_last = False
        return pytree.tree_unflatten(list(outs[:n]), prog.out_spec)


def _direct_cond(pred, true_fn, false_fn, operands):
    return true_fn(*operands) if pred else false_fn(*operands)


def eager_twin(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose cond nodes call the chosen branch directly (eager only).

    Parameters and branch modules are shared with ``gm``, not copied.
    """
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    attrs = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            obj = operator.attrgetter(node.target)(gm)
            attrs[node.target] = eager_twin(obj) if isinstance(obj, fx.GraphModule) else obj
        elif node.target is torch.ops.higher_order.cond:
            node.target = _direct_cond
    return fx.GraphModule(attrs, graph)


def _device(leaves, model) -> torch.device:
    for x in leaves:
        if isinstance(x, torch.Tensor):
            return x.device
    return next(model.parameters()).device


_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


def _check_timestep_arg(forward, cfg: LazyConfig, args: tuple, kwargs: dict) -> None:
    """Before tracing, check the argument named like a timestep (or ``timestep_arg``).

    A Python number would be traced as a constant of the graph: every step would retrace
    and start from empty caches, and an exported graph would hold one fixed step. A tensor
    of shape (B, 1) or with the wrong length often broadcasts silently inside the model.
    Both are refused here, before they can reach a graph; after tracing, the input found
    to feed the timestep embedding is checked again by ``_timestep_index``.
    """
    names = (cfg.timestep_arg,) if cfg.timestep_arg else _TIMESTEP_NAMES
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
            _check_timestep_shape(name, v, batch)


def _check_timestep_shape(name: str, t: torch.Tensor, batch: int | None) -> None:
    if t.dim() == 0 or (t.dim() == 1 and (batch is None or t.shape[0] in (1, batch))):
        return
    want = f"({batch},)" if batch is not None else "(batch,)"
    raise ValueError(
        f"the timestep {name!r} has shape {tuple(t.shape)}; lazypass needs a 0-d tensor, shape (1,) "
        f"or one timestep per sample, shape {want} (reshape it, e.g. t.reshape(-1))"
    )


def _timestep_index(gm: fx.GraphModule, args: tuple, kwargs: dict, batch: int) -> int | None:
    """Leaf index of the timestep input; checks its shape is one the step logic understands."""
    node = gm.meta.get("lazypass.timestep")
    if node is None:
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = placeholders.index(node)
    leaves, _ = flatten_inputs(args, kwargs)
    if isinstance(leaves[index], torch.Tensor):
        _check_timestep_shape(str(node.target), leaves[index], batch)
    return index


class NotTracedError(RuntimeError):
    """The lazy model has no traced program for what was asked (nothing to export yet)."""


def traced_program(model: nn.Module, *args, **kwargs) -> Program:
    """The traced and rewritten program of a lazy model, for exporters and inspection.

    Without inputs: the program of the last call (or the only one traced). With inputs:
    the program traced for exactly their signature. Never traces; if nothing fits,
    raises :class:`NotTracedError` saying how to trace first.

    Example:
        >>> import torch, lazypass
        >>> from lazypass.models import tiny_dit
        >>> x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.tensor([1, 2])
        >>> model = lazypass.apply(tiny_dit(), example_inputs=(x, t, y))
        >>> len(lazypass.runtime.traced_program(model).sites)
        4
    """
    rt = runtime(model)
    how = (
        "run the model once on the inputs to export (or pass example_inputs= to lazypass.apply) "
        "before exporting"
    )
    if args or kwargs:
        leaves, spec = flatten_inputs(args, kwargs)
        prog = rt.programs.get(signature(model, leaves, spec))
        if prog is None:
            raise NotTracedError(
                f"{type(model).__name__} was not traced for these inputs ({len(rt.programs)} other "
                f"input signature(s) traced); {how}"
            )
        return prog
    if rt.program is not None:
        return rt.program
    if len(rt.programs) == 1:
        return next(iter(rt.programs.values()))
    if not rt.programs:
        raise NotTracedError(f"{type(model).__name__} is lazy but has not been traced yet; {how}")
    raise NotTracedError(
        f"{type(model).__name__} was traced for {len(rt.programs)} input signatures and none has run "
        "yet; pass the example inputs to pick one"
    )


def runtime(model: nn.Module) -> Runtime:
    rt = model.__dict__.get("_lazypass")
    if rt is None:
        raise ValueError(f"{type(model).__name__} is not lazy yet: call lazypass.apply(model) first")
    return rt


def apply(
    model: nn.Module,
    rho: float = 1e-2,
    *,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    **options,
) -> nn.Module:
    """Make ``model`` lazy: gate and cache every attention and MLP branch. Returns the same object.

    The model keeps its class, attributes, ``config`` and methods; only ``forward`` is
    replaced. Sites are found when the model is traced: at once if ``example_inputs``
    (and/or ``example_kwargs``) are given, otherwise at the first call. Options are the
    fields of :class:`LazyConfig` (``threshold``, ``calls_per_step``, ``timestep_arg``,
    ``cache_dtype``, ...); an unknown option is an error.

    Example:
        >>> import torch, lazypass
        >>> from lazypass.models import tiny_dit
        >>> model = tiny_dit()
        >>> x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.tensor([1, 2])
        >>> model = lazypass.apply(model, rho=1e-2, example_inputs=(x, t, y))
        >>> out = model(x, t, y)
    """
    cfg = LazyConfig.from_options(rho=rho, **options)
    existing = model.__dict__.get("_lazypass")
    if existing is not None:
        if existing.cfg == cfg:
            return model
        raise ValueError(
            "this model is already lazy with different options; change the threshold with "
            "lazypass.set_threshold, or apply to a fresh model"
        )
    if not any(True for _ in model.parameters()):
        raise ValueError("lazypass.apply needs a model with parameters")
    rt = Runtime(model, cfg, model.forward)
    model.__dict__["_lazypass"] = rt
    pending = model.__dict__.pop("_lazypass_pending_threshold", None)
    if pending is not None:
        rt.set_threshold(pending)

    # a bound method, not a closure: copy.deepcopy(model) rebinds it to the copy
    model.forward = types.MethodType(_lazy_forward, model)
    if example_inputs is not None or example_kwargs is not None:
        rt.program_for(tuple(example_inputs or ()), dict(example_kwargs or {}))
    return model


def _lazy_forward(self, *args, **kwargs):
    """Lazy forward (lazypass): gated branches with per-run caches."""
    rt = runtime(self)
    if torch.compiler.is_compiling():
        return _compiled_call(rt, args, kwargs)
    return rt(*args, **kwargs)


def _undo(model: nn.Module) -> None:
    """Put the model back as it was before ``apply`` (used when no site was found)."""
    model.__dict__.pop("_lazypass", None)
    model.__dict__.pop("forward", None)


def reset(model: nn.Module) -> None:
    """Start a new sampling run: forget all caches (and the recorded decisions).

    Example:
        >>> lazypass.reset(model)  # doctest: +SKIP
    """
    rt = runtime(model)
    rt.state = None
    _reset_live(rt)


@contextlib.contextmanager
def _swap(rt: Runtime, holder: "trajectory"):
    saved = rt.state
    rt.state = holder.state
    saved_live = _swap_live(rt, holder.__dict__.pop("_live", None))
    try:
        yield holder
    finally:
        holder.state = rt.state
        rt.state = saved
        holder._live = _swap_live(rt, saved_live)


class trajectory:
    """A sampling run with its own caches: ``with lazypass.trajectory(model): ...``.

    Entering starts from empty caches; the state is put aside on exit and restored if the
    same object is entered again, so two runs can be interleaved on one model.

    Example:
        >>> with lazypass.trajectory(model) as run:  # doctest: +SKIP
        ...     images = sample(model, noise)
    """

    def __init__(self, model: nn.Module):
        self.runtime = runtime(model)
        self.state: State | None = None
        self._ctx = None

    def __enter__(self) -> "trajectory":
        self._ctx = _swap(self.runtime, self)
        return self._ctx.__enter__()

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        self._ctx = None


def set_threshold(model: nn.Module, threshold: float) -> None:
    """Set the score above which a branch is skipped (default 0.5).

    ``> 1`` never skips, ``< 0`` always skips once a cache is valid. Changing it does not
    retrace or recompile. On a model that is not lazy yet the value is remembered and
    used by ``apply``.

    Example:
        >>> lazypass.set_threshold(model, 0.7)  # doctest: +SKIP
    """
    value = check_threshold(threshold)
    rt = model.__dict__.get("_lazypass")
    if rt is None:
        model.__dict__["_lazypass_pending_threshold"] = value
        return
    rt.set_threshold(value)




# -- compiled calls ---------------------------------------------------------------------
# Under ``torch.compile`` dynamo traces the shell ``forward`` into ``_compiled_call``.  It
# must stay one graph (``fullgraph=True``) that is never recompiled while sampling, so:
# - nothing is traced here: the program must exist (an eager call, ``report`` or
#   ``apply(example_inputs=...)`` made it); ``torch.export`` cannot run inside dynamo;
# - the state lives in persistent buffers per program (``Live``), allocated eagerly when
#   the program is traced and only ever updated in place, so dynamo sees the same tensors
#   with the same metadata on every call, and CUDA graphs see fixed addresses;
#   ``reset`` and ``trajectory`` refill or swap their *contents* outside the graph;
# - the per-call records go into ring buffers indexed by a call counter tensor (no Python
#   list that grows, which would be a guard on its length and a recompile per call).
# Eager and compiled calls keep separate caches; ``stats`` reads whichever ran last.

RECORDS = 1024  # calls whose decisions ``stats`` can show after compiled calls


@dataclass
class Live:
    """Buffers a compiled call reads and updates in place."""

    tensors: list[torch.Tensor]  # the state inputs after the threshold, as in state_specs[1:]
    threshold: torch.Tensor
    records: list[torch.Tensor]  # ring buffers: skipped (R, sites, B), executed (R, sites), scores (R, sites, B)
    count: torch.Tensor  # 0-d int64: calls made since the last reset

    def buffers(self) -> list[torch.Tensor]:
        return [*self.tensors, *self.records, self.count]


def _live_state(rt: Runtime, prog: Program, device: torch.device) -> Live:
    tensors = rt.fresh_state(prog, device).tensors
    sites, batch = len(prog.sites), prog.state_specs[1][1][0]
    records = [
        torch.zeros(RECORDS, sites, batch, dtype=torch.bool, device=device),
        torch.zeros(RECORDS, sites, dtype=torch.bool, device=device),
        torch.zeros(RECORDS, sites, batch, dtype=torch.float32, device=device),
    ]
    count = torch.zeros((), dtype=torch.int64, device=device)
    return Live(tensors, rt.threshold_tensor(device), records, count)


@torch.no_grad()
def _reset_live(rt: Runtime, keys=None) -> None:
    for key in rt.live if keys is None else keys:
        live = rt.live[key]
        for dst, src in zip(live.tensors, rt.fresh_state(rt.programs[key], live.count.device).tensors):
            dst.copy_(src)
        live.count.zero_()


@torch.no_grad()
def _swap_live(rt: Runtime, snapshot: dict | None) -> dict | None:
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
    _reset_live(rt, missing)
    return current


def compiled_records(rt: Runtime) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The (skipped, executed, scores) of the compiled calls since the last reset, oldest first."""
    if rt.program is None or rt.program.key not in rt.live:
        return []
    live = rt.live[rt.program.key]
    count = int(live.count)
    order = [i % RECORDS for i in range(max(0, count - RECORDS), count)]
    return [tuple(r[i] for r in live.records) for i in order]


def _compiled_call(rt: Runtime, args: tuple, kwargs: dict):
    leaves, spec = flatten_inputs(args, kwargs)
    key = signature(rt.model, leaves, spec)
    prog = rt.programs.get(key)
    if prog is None:
        raise RuntimeError(
            f"lazypass: {type(rt.model).__name__} has not been traced for these inputs yet, and tracing "
            "(torch.export) cannot run inside torch.compile. Call the lazy model once eagerly with inputs "
            "of the same shapes, or pass example_inputs to lazypass.apply, before calling the compiled model"
        )
    live = rt.live[key]
    grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)
    with torch.set_grad_enabled(grad):
        outs = prog.core(*leaves, live.threshold, *live.tensors)
    n = prog.n_user_outputs
    with torch.no_grad():
        slot = torch.remainder(live.count, RECORDS).reshape(1)
        for buf, rec in zip(live.records, outs[n:]):
            buf.index_copy_(0, slot, rec.unsqueeze(0).to(buf.dtype))
        live.count.add_(1)
    rt.program = prog
    rt.compiled_last = True
    return pytree.tree_unflatten(list(outs[:n]), prog.out_spec)
