"""The lazy model at run time: ``apply`` and the state a sampling run carries.

``apply`` keeps the user's model object and replaces only its ``forward``.  On a call
with inputs it has not seen (a new batch shape, dtype, device, or different constant
arguments) it captures the original forward with ``torch.export``, runs the passes, and
keeps the resulting functional graph (a *program*).  The program takes the cache state
as inputs and returns the new state; the runtime only keeps those tensors, so no value
is read on the host and nothing branches in Python on a tensor.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import types
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from lazypass.compiled import (RECORDS, compiled_call, exported_call, live_state, register_buffers,
                               reset_live, swap_live)
from lazypass.config import LazyConfig, check_threshold
from lazypass.gates import LazyGates
from lazypass.passes import INFERENCE, TRAINING, NoSitesError, Site, StateSpec, eager_twin, run_passes
from lazypass.passes.match_sites import site_records
from lazypass.timesteps import check_timestep_arg, timestep_index
from lazypass.tracing import analyse, flatten_inputs, signature


@dataclass
class Program:
    """One traced and rewritten graph, specialised to one input signature.

    ``core`` holds ``torch.ops.higher_order.cond`` nodes and is what compilers and
    exporters see; ``eager`` is its twin for eager calls (``passes/eager_twin.py``).
    ``mode`` is "hard" (gated conditionals with cache state, ``insert_gates``) or "soft"
    (the differentiable blend used for fitting, ``soft_blend``); ``state_specs`` lists the
    extra inputs after the user's: threshold and cache state, or mix and previous outputs.
    ``batch`` is the number of samples per call.
    """

    key: tuple
    core: fx.GraphModule
    eager: fx.GraphModule
    out_spec: object
    sites: list[Site]
    model_macs: int
    state_specs: list[StateSpec]
    n_user_outputs: int
    batch: int
    mode: str = "hard"


_PASSES = {"hard": INFERENCE, "soft": TRAINING}


@dataclass
class State:
    """Caches and bookkeeping of one sampling run, plus what happened at its last calls."""

    key: tuple
    tensors: list[torch.Tensor]
    records: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECORDS))


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
        self.live = {}  # state of compiled calls per program key (lazypass/compiled.py)
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
            check_timestep_arg(self.forward, self.cfg, args, kwargs)
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
                device = _device(leaves, self.model)
                self.live[key] = live_state(prog, self.threshold_tensor(device), device)
                register_buffers(self)  # model.lazy_state, for torch.export
        return prog, leaves

    def __deepcopy__(self, memo):
        # a copy of a lazy model gets its own runtime: no shared caches, programs traced again
        # for the copy's weights and gates (traced graphs hold fake tensors that cannot be copied)
        rt = Runtime(copy.deepcopy(self.model, memo), self.cfg, copy.deepcopy(self.forward, memo))
        rt.threshold = self.threshold
        return rt

    def _trace(self, key, args, kwargs, mode: str = "hard") -> Program:
        gm, out_spec, info = analyse(self.model, self.forward, self.cfg, args, kwargs)
        timestep_index(gm, info.timestep, args, kwargs, info.batch)  # checks its shape
        info.gates = self._gates(info.layout)
        gm = run_passes(gm, self.cfg, _PASSES[mode])
        sites = site_records(info)
        return Program(key, gm, eager_twin(gm), out_spec, sites, info.model_macs, info.state_specs,
                       info.n_user_outputs, info.batch, mode)

    def _gates(self, layout) -> LazyGates:
        gates = getattr(self.model, "lazy_gates", None)
        if gates is None:
            param = next(self.model.parameters())
            gates = LazyGates(layout, self.cfg.gate_inputs).to(param.device)
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
        return gates

    # -- state ---------------------------------------------------------------------
    def fresh_state(self, prog: Program, device: torch.device) -> State:
        return State(prog.key, [spec.initial(device) for spec in prog.state_specs[1:]])

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
                outs = prog.eager(*leaves, self.threshold_tensor(device), *state.tensors)
        except BaseException:
            # the program updates the state in place, so a call that failed part-way may have
            # written some caches: that run starts over from empty caches
            if self.state is state:
                self.state = None
            raise
        n = prog.n_user_outputs
        state.records.append(tuple(outs[n:]))
        self.state, self.program = state, prog
        self.compiled_last = False
        return pytree.tree_unflatten(list(outs[:n]), prog.out_spec)


def _device(leaves, model) -> torch.device:
    for x in leaves:
        if isinstance(x, torch.Tensor):
            return x.device
    return next(model.parameters()).device


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


def trace(model: nn.Module, *args, **kwargs) -> list[Site]:
    """Trace a lazy model now for these inputs (creating its gates); returns its sites.

    A model is otherwise traced at its first call. Tracing first is needed before
    ``torch.compile`` or an export, and before fitting or loading gates into a model
    whose gates must exist.

    Example:
        >>> import torch, lazypass
        >>> from lazypass.models import tiny_dit
        >>> model = lazypass.apply(tiny_dit())
        >>> x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.tensor([1, 2])
        >>> [s.kind for s in lazypass.trace(model, x, t, y)]
        ['attn', 'ffn', 'attn', 'ffn']
    """
    prog, _ = runtime(model).program_for(args, kwargs)
    return prog.sites


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
    if torch.compiler.is_exporting():
        return exported_call(rt, args, kwargs)
    if torch.compiler.is_compiling():
        return compiled_call(rt, args, kwargs)
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
    reset_live(rt)


@contextlib.contextmanager
def _swap(rt: Runtime, holder: "trajectory"):
    saved = rt.state
    rt.state = holder.state
    saved_live = swap_live(rt, holder.__dict__.pop("_live", None))
    try:
        yield holder
    finally:
        holder.state = rt.state
        rt.state = saved
        holder._live = swap_live(rt, saved_live)


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
