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

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from lazypass.config import LazyConfig, check_threshold
from lazypass.gates import LazyGates
from lazypass.ops import shape
from lazypass.passes import ANALYSIS, INFERENCE, TRAINING, Site, run_passes
from lazypass.passes.match_sites import site_records
from lazypass.tracing import capture, flatten_inputs, signature


@dataclass
class Program:
    """One traced and rewritten graph, specialised to one input signature.

    ``mode`` is "hard" (gated conditionals with cache state, ``insert_gates``) or "soft"
    (the differentiable blend used for fitting, ``soft_blend``); ``state_specs`` lists the
    extra inputs after the user's: threshold and cache state, or mix and previous outputs.
    """

    key: tuple
    core: fx.GraphModule
    out_spec: object
    sites: list[Site]
    model_macs: int
    state_specs: list[tuple[str, tuple[int, ...], torch.dtype]]
    n_user_outputs: int
    has_timestep: bool
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
            prog = self._trace(key, args, kwargs, mode)
            self.programs[key] = prog
        return prog, leaves

    def _trace(self, key, args, kwargs, mode: str = "hard") -> Program:
        gm, out_spec = capture(self.model, self.forward, args, kwargs)
        gm = run_passes(gm, self.cfg, ANALYSIS)
        matches = gm.meta["lazypass.matches"]
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
        batch = shape(matches[0].streams[0].x)[0]
        sites = site_records(gm, self.cfg, batch)
        model_macs = gm.meta["lazypass.model_macs"]
        gm = run_passes(gm, self.cfg, _PASSES[mode])
        return Program(
            key=key,
            core=gm,
            out_spec=out_spec,
            sites=sites,
            model_macs=model_macs,
            state_specs=gm.meta["lazypass.state_specs"],
            n_user_outputs=gm.meta["lazypass.n_user_outputs"],
            has_timestep=gm.meta["lazypass.timestep"] is not None,
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
        if self.state is None or self.state.key != prog.key:
            self.state = self.fresh_state(prog, device)
        self.program = prog
        grad = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in leaves
        )
        with torch.set_grad_enabled(grad):
            outs = prog.core(*leaves, self.threshold_tensor(device), *self.state.tensors)
        n, k = prog.n_user_outputs, len(prog.state_specs) - 1
        self.state.tensors = list(outs[n : n + k])
        self.state.records.append(tuple(outs[n + k :]))
        return pytree.tree_unflatten(list(outs[:n]), prog.out_spec)


def _device(leaves, model) -> torch.device:
    for x in leaves:
        if isinstance(x, torch.Tensor):
            return x.device
    return next(model.parameters()).device


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

    def forward(*args, **kwargs):
        return rt(*args, **kwargs)

    forward.__doc__ = f"Lazy forward of {type(model).__name__} (lazypass)."
    model.forward = forward
    if example_inputs is not None or example_kwargs is not None:
        rt.program_for(tuple(example_inputs or ()), dict(example_kwargs or {}))
    return model


def reset(model: nn.Module) -> None:
    """Start a new sampling run: forget all caches (and the recorded decisions).

    Example:
        >>> lazypass.reset(model)  # doctest: +SKIP
    """
    rt = runtime(model)
    rt.state = None


@contextlib.contextmanager
def _swap(rt: Runtime, holder: "trajectory"):
    saved = rt.state
    rt.state = holder.state
    try:
        yield holder
    finally:
        holder.state = rt.state
        rt.state = saved


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


