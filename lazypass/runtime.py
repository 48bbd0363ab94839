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
import copy
import threading
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from lazypass.compiled import (RECORDS, StateBuffers, compiled_call, exported_call, live_state,
                               register_buffers, reset_live, swap_live)
from lazypass.config import LazyConfig, check_threshold
from lazypass.context import Run, bind, bound, bound_runs, unbind
from lazypass.gates import LazyGates
from lazypass.hooks import cache_hook_error
from lazypass.live import Watch
from lazypass.passes import (INFERENCE, TRAINING, NoSitesError, Site, StateSpec, compiled_writes, eager_twin,
                             run_passes)
from lazypass.passes.match_sites import site_records
from lazypass.sitemap import GateView, gate_index, gate_keys, site_keys, unknown_sites_error, untouched
from lazypass.timesteps import check_timestep_arg, timestep_index
from lazypass.tracing import analyse, differing_inputs, flatten_inputs, signature, unsupported_inputs


@dataclass
class Program:
    """One traced and rewritten graph, specialised to one input signature.

    ``core`` holds ``torch.ops.higher_order.cond`` nodes and is what compilers and
    exporters see; ``eager`` is its twin for eager calls (``passes/eager_twin.py``).
    ``mode`` is "hard" (gated conditionals with cache state, ``insert_gates``) or "soft"
    (the differentiable blend used for fitting, ``soft_blend``); ``state_specs`` lists the
    extra inputs after the user's: threshold and cache state, or mix and previous outputs.
    ``batch`` is the number of samples per call. ``timestep`` is the leaf index of the
    timestep input (None if the model has none); ``gate_index`` maps the program's sites to
    the gates' (None: the same order, ``lazypass/sitemap.py``).
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
    timestep: int | None = None
    gate_index: list[int] | None = None
    compiled: fx.GraphModule | None = None  # what dynamo traces: ``core`` writing only computed rows


_PASSES = {"hard": INFERENCE, "soft": TRAINING}


@dataclass
class State:
    """Caches and bookkeeping of one sampling run, plus what happened at its last calls."""

    key: tuple
    tensors: list  # per state spec: a (K, ...) tensor, or a list of its K rows (``Runtime.fresh_state``)
    records: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECORDS))

    def as_tensors(self) -> list[torch.Tensor]:
        """The run's state as the ``(K, ...)`` tensors the program takes (rows held as a list are
        stacked, a copy)."""
        return [torch.stack(s) if isinstance(s, list) else s for s in self.tensors]

    def load(self, tensors: list[torch.Tensor]) -> None:
        """Set the run's state to ``tensors``, shaped as :meth:`as_tensors` gives them."""
        for k, (held, new) in enumerate(zip(self.tensors, tensors, strict=True)):
            if isinstance(held, list):
                self.tensors[k] = list(new.clone().unbind(0))
            else:
                held.copy_(new)


class Runtime:
    def __init__(self, model: nn.Module, cfg: LazyConfig, forward):
        self.model = model
        self.cfg = cfg
        self.forward = forward
        self.programs: dict[tuple, Program] = {}
        self.plain: set[tuple] = set()  # keys whose trace found no site (an option removed them all)
        self.default_run = Run()  # the run of calls outside any trajectory (lazypass/context.py)
        self.program: Program | None = None  # the one the last call ran (exporters take it)
        self.threshold = cfg.threshold
        self._threshold_tensors: dict[torch.device, torch.Tensor] = {}
        self.pending_gates = None  # set by load_gates before the first trace: callable(LazyGates)
        self.live = {}  # state of compiled calls per program key (lazypass/compiled.py)
        self.compiled_last = False  # whether the last call ran inside torch.compile
        self.compiled_ever = False  # whether dynamo has traced a call (its buffers are in use)
        self.generation = 0  # bumped when the model changed; part of every program key
        self._watch: Watch | None = None  # what the model looked like (lazypass/live.py)
        self.trajectories: set = set()  # entered trajectories (any context)
        self._lock = threading.RLock()  # tracing and dropping programs
        self._warned: set = set()

    # -- the model as it is now ------------------------------------------------------
    @property
    def watch(self) -> Watch:
        if self._watch is None:  # not in __init__: deepcopy makes the runtime before the model is filled
            self._watch = Watch(self.model)
        return self._watch

    def check_model(self) -> None:
        """Notice changes to the model since it was traced (every call; cheap): a changed
        model drops its programs and is traced again at this call; cache hooks are refused."""
        watch = self.watch
        if not watch.same():
            with self._lock:
                if watch.update():
                    self.drop_programs()
        if watch.cache:
            raise cache_hook_error(watch.cache)

    def drop_programs(self) -> None:
        """Forget every program (traced again at the next call); runs start from empty caches."""
        with self._lock:
            self.generation += 1
            self.programs.clear()
            self.plain.clear()
            self.live.clear()
            self.program = None
            if isinstance(getattr(self.model, "lazy_state", None), StateBuffers):
                register_buffers(self)  # no buffers of dropped programs held for torch.export

    def runs_plain(self) -> bool:
        """Whether this call runs the original forward: in ``train()`` mode, with grad on while
        a model parameter requires grad, or while hooks that must run per call are registered."""
        if self.model.training:
            return True
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.watch.params):
            return True
        other = self.watch.other
        if other:
            text = "; ".join(other)
            if text not in self._warned:
                self._warned.add(text)
                warnings.warn(
                    f"lazypass: {type(self.model).__name__} has hooks on its submodules ({text}); a lazy model runs "
                    "one traced graph, where hooks would run only once, when it is traced, so the model runs its "
                    "original forward (not lazy) while they are registered. Remove them to make it lazy again",
                    stacklevel=4,
                )
            return True
        return False

    def key_for(self, leaves, spec, mode: str = "hard") -> tuple:
        key = signature(self.model, leaves, spec) + (self.generation,)
        return key if mode == "hard" else key + (mode,)

    # -- tracing -------------------------------------------------------------------
    def program_for(self, args: tuple, kwargs: dict, mode: str = "hard", check: bool = True
                    ) -> tuple[Program | None, list]:
        """The program for these inputs ("hard": inference, "soft": fitting), traced if needed.

        ``(None, leaves)`` for a hard call whose inputs leave no site (an option removed them
        all, while other inputs have sites): that call runs the original forward. ``check``:
        look for changes to the model first (the lazy forward has looked already).
        """
        if mode not in _PASSES:
            raise ValueError(f"mode must be one of {sorted(_PASSES)}, got {mode!r}")
        if check:
            self.check_model()
        leaves, spec = flatten_inputs(args, kwargs)
        key = self.key_for(leaves, spec, mode)
        prog = self.programs.get(key)
        if prog is None and key not in self.plain:
            with self._lock:
                prog = self.programs.get(key)
                if prog is None and key not in self.plain:
                    prog = self._new_program(key, args, kwargs, leaves, spec, mode)
        return prog, leaves

    def _new_program(self, key, args, kwargs, leaves, spec, mode) -> Program | None:
        check_timestep_arg(self.forward, self.cfg, args, kwargs)
        others = [p.key for p in self.programs.values() if p.mode == mode]
        bad = unsupported_inputs(args, kwargs)
        if bad:
            raise TypeError(
                f"lazypass: {', '.join(bad)} cannot be an input of the lazy model's traced program: torch.export "
                "takes tensors, numbers, strings, None and lists, tuples and dicts of them, and lazypass keys its "
                "programs by the values of the non-tensor ones. Pass a tensor or a plain value instead, or set the "
                "object on the model before the call"
            )
        try:
            prog = self._trace(key, args, kwargs, mode)
        except NoSitesError as e:
            if not self.programs and not self.plain:  # nothing lazy about this model: give it back unchanged
                _undo(self.model)
                raise NoSitesError(
                    f"{e} The model was left as it was before lazypass.apply and runs normally."
                ) from None
            if mode != "hard":
                raise
            self.plain.add(key)  # e.g. skip_layers covering every block: nothing to gate
            return None
        except Exception as e:
            if others:
                e.add_note(f"lazypass: this call traced a new program; it differs from an earlier one in "
                           f"{differing_inputs(others[-1], key, args, kwargs)}")
            raise
        key = self.key_for(leaves, spec, mode)  # the gates may have been made again while tracing
        prog.key = key
        self.programs[key] = prog
        if mode == "hard":
            device = _device(leaves, self.model)
            self.live[key] = live_state(prog, self.threshold_tensor(device), device)
            register_buffers(self)  # model.lazy_state, for torch.export
        self.watch.update()  # tracing (and lazy_state) registers modules and hooks of its own: settle the counters
        return prog

    def __deepcopy__(self, memo):
        # a copy of a lazy model gets its own runtime: no shared caches, programs traced again
        # for the copy's weights and gates (traced graphs hold fake tensors that cannot be copied)
        rt = Runtime(copy.deepcopy(self.model, memo), self.cfg, copy.deepcopy(self.forward, memo))
        rt.threshold = self.threshold
        return rt

    def _trace(self, key, args, kwargs, mode: str = "hard") -> Program:
        gm, out_spec, info = analyse(self.model, self.forward, self.cfg, args, kwargs)
        t_index = timestep_index(gm, info.timestep, args, kwargs, info.batch)  # checks its shape
        info.gates = self._gates(info, key, args, kwargs)
        gm = run_passes(gm, self.cfg, _PASSES[mode])
        sites = site_records(info)
        index = info.gates.index if isinstance(info.gates, GateView) else None
        return Program(key, gm, eager_twin(gm), out_spec, sites, info.model_macs, info.state_specs,
                       info.n_user_outputs, info.batch, mode, t_index, index,
                       compiled_writes(gm) if mode == "hard" else None)

    def _gates(self, info, key, args, kwargs) -> LazyGates | GateView:
        """The gates for a traced graph: all of them, or a view of the ones of its sites."""
        layout, keys = info.layout, site_keys(info)
        gates = getattr(self.model, "lazy_gates", None)
        if gates is None:
            return self._new_gates(layout, keys)
        if not gate_keys(gates):  # gates made before sites had keys, or put there by hand
            if gates.layout != layout:
                raise ValueError(
                    f"the model's gates were made for other sites ({len(gates.layout)} sites, this graph has "
                    f"{len(layout)}); fit or load gates made for this model"
                )
            gates.site_keys = keys
        index = gate_index(gates, keys)
        if index is None:
            if untouched(gates) and set(gate_keys(gates)) <= set(keys):
                # the first trace had fewer sites (an option left some out) and nothing was fitted
                # or loaded yet: make the gates for the larger set, and trace the rest again
                self.drop_programs()
                return self._new_gates(layout, keys)
            others = [p.key for p in self.programs.values()]
            note = f"; this call differs from an earlier one in {differing_inputs(others[-1], key, args, kwargs)}" if others else ""
            raise unknown_sites_error(gates, keys, note)
        if index == list(range(len(gates.layout))):
            return gates
        return GateView(gates, index)

    def _new_gates(self, layout, keys) -> LazyGates:
        param = next(self.model.parameters())
        gates = LazyGates(layout, self.cfg.gate_inputs).to(param.device)
        gates.site_keys = keys
        if self.pending_gates is not None:
            self.pending_gates(gates)  # refuses a file made for other sites
            self.pending_gates = None
        self.model.lazy_gates = gates
        return gates

    # -- state ---------------------------------------------------------------------
    def current_run(self) -> Run:
        """The run of the current context: the innermost trajectory entered here, else the default one."""
        return bound(self) or self.default_run

    @property
    def state(self) -> State | None:
        return self.current_run().state

    @state.setter
    def state(self, value: State | None) -> None:
        self.current_run().state = value

    def fresh_state(self, prog: Program, device: torch.device) -> State:
        """Empty caches for a run of ``prog``'s eager twin: the states it only reads and writes by
        row as lists of rows (a write then rebinds a row instead of copying into it)."""
        rows = prog.eager.row_states
        return State(prog.key, [list(spec.initial(device).unbind(0)) if spec.name in rows else spec.initial(device)
                                for spec in prog.state_specs[1:]])

    def threshold_tensor(self, device: torch.device) -> torch.Tensor:
        t = self._threshold_tensors.get(device)
        if t is None:
            t = torch.tensor(self.threshold, dtype=torch.float32, device=device)
            self._threshold_tensors[device] = t
        return t

    def set_threshold(self, value: float) -> None:
        value = check_threshold(value)
        if value == self.threshold:
            return  # unchanged: the eager twin keeps its logit of it (a fill would look like a change)
        self.threshold = value
        for t in self._threshold_tensors.values():
            t.fill_(self.threshold)  # in place: compiled graphs keep reading the same tensor

    # -- calling -------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """A lazy call; the lazy forward has checked the model (``check_model``) first."""
        prog, leaves = self.program_for(args, kwargs, check=False)
        if prog is None:
            return self.forward(*args, **kwargs)
        device = _device(leaves, self.model)
        run = self.current_run()
        run.claim(lambda: _starts_new_run(run.state, prog, leaves))
        state = run.state
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
            if run.state is state:
                run.state = None
            raise
        n = prog.n_user_outputs
        state.records.append(outs[n])  # the twin's Records: computed when read
        run.state, run.program = state, prog
        self.program = prog
        self.compiled_last = False
        return pytree.tree_unflatten(list(outs[:n]), prog.out_spec)


def _starts_new_run(state: State | None, prog: Program, leaves) -> bool:
    """Whether a call would start a new run anyway: every sample's timestep is above the
    last one (the program then drops the old caches). Read on the host; only asked when a
    second thread or task calls a run it does not own."""
    if state is None or state.key != prog.key or prog.timestep is None:
        return False
    names = [spec.name for spec in prog.state_specs[1:]]
    if "lazy_last_t" not in names:
        return False
    t = leaves[prog.timestep]
    last = state.tensors[names.index("lazy_last_t")]
    return bool((t.detach().float().reshape(-1) > last).all())


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
        prog = rt.programs.get(rt.key_for(leaves, spec))
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
    return prog.sites if prog is not None else []


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
    """Lazy forward (lazypass): gated branches with per-run caches.

    In ``train()`` mode, with grad on while a parameter requires grad, or while hooks that
    must run per call are registered on submodules, the original forward runs instead.
    """
    rt = runtime(self)
    if torch.compiler.is_exporting():
        return exported_call(rt, args, kwargs)
    if self.training:
        return rt.forward(*args, **kwargs)
    if torch.compiler.is_compiling():
        if torch.is_grad_enabled() and any(p.requires_grad for p in rt.watch.params):
            return rt.forward(*args, **kwargs)
        return compiled_call(rt, args, kwargs)
    rt.check_model()
    if rt.runs_plain():
        return rt.forward(*args, **kwargs)
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
    rt.current_run().reset()
    reset_live(rt)


class trajectory:
    """A sampling run with its own caches: ``with lazypass.trajectory(model): ...``.

    Entering binds a fresh run to the current context (a ``contextvars`` variable): the
    calls made in this thread or asyncio task, and only those, use its caches, so runs in
    their own trajectories can go on concurrently in several threads or tasks and give
    exactly the results they give one after the other. The run is put aside on exit and
    taken up again if the same object is entered again, so two runs can also be interleaved
    in one thread. One object is one run: it cannot be entered twice at once.

    Under ``torch.compile`` the state lives in fixed buffers per program
    (``lazypass/compiled.py``): entering swaps their contents, and a trajectory cannot be
    entered while one on the same model is active in another thread or task.

    Example:
        >>> with lazypass.trajectory(model) as run:  # doctest: +SKIP
        ...     images = sample(model, noise)
    """

    def __init__(self, model: nn.Module):
        self.runtime = runtime(model)
        self.run = Run()
        self._token = None
        self._live = None  # this run's compiled state, while it is put aside
        self._saved_live = None  # the compiled state this run put aside when entered

    @property
    def state(self) -> State | None:
        return self.run.state

    def __enter__(self) -> "trajectory":
        rt = self.runtime
        if self._token is not None:
            raise RuntimeError("this lazypass.trajectory is entered already (here or in another thread or task); "
                               "make one trajectory object per run")
        with rt._lock:
            if rt.compiled_ever:
                here = set(map(id, bound_runs(rt)))
                if any(id(t.run) not in here for t in rt.trajectories):
                    raise RuntimeError(
                        "lazypass: a trajectory on this model is active in another thread or task, and the model "
                        "runs under torch.compile, whose calls keep their state in one set of fixed buffers per "
                        "program; concurrent compiled runs would share them. Run them one after the other, or "
                        "give each thread its own compiled copy (copy.deepcopy(model), then torch.compile)"
                    )
                self._saved_live = swap_live(rt, self._live)
            self._token = bind(rt, self.run)
            rt.trajectories.add(self)
        return self

    def __exit__(self, *exc) -> None:
        rt = self.runtime
        with rt._lock:
            unbind(self._token)
            self._token = None
            rt.trajectories.discard(self)
            if rt.compiled_ever:
                self._live = swap_live(rt, self._saved_live)
            self._saved_live = None


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
