"""The soft model: the model's ``soft_blend`` program, called with a mix and previous branch outputs.

``SoftModel.forward`` is what ``lazypass.fit`` installs as the model's forward while it
fits. The user's ``call(model, x, t, cond)`` runs between fit and that forward, so the
extra inputs (``mix``, ``Y_prev``) and outputs (raw branch outputs ``F(Z)``, gate scores) of
the program pass through the ``SoftModel`` object: :meth:`SoftModel.full` and
:meth:`SoftModel.soft` set them, call, read them back and clear them, all in one method.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lazypass.runtime import runtime

CallFn = Callable[[nn.Module, Tensor, Tensor, Any], Any]


def default_call(model: nn.Module, x: Tensor, t: Tensor, cond: Any) -> Tensor:
    """How ``fit`` calls the model unless told otherwise.

    ``cond`` None: ``model(x, t)``; a dict: ``model(x, timestep=t, **cond)`` (diffusers
    transformers: ``encoder_hidden_states=...``, ``class_labels=...``); anything else:
    ``model(x, t, cond)`` (the reference DiT's ``(x, t, y)``). The first tensor of a tuple
    output, or ``.sample`` of a diffusers output, is the prediction.
    """
    if cond is None:
        out = model(x, t)
    elif isinstance(cond, dict):
        out = model(x, timestep=t, **cond)
    else:
        out = model(x, t, cond)
    return prediction(out)


def prediction(out) -> Tensor:
    """The prediction tensor of a model output: itself, a tuple's first entry, or ``.sample``."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    raise TypeError(
        f"the model returned {type(out).__name__}; fit needs a tensor (or a tuple / diffusers output whose first "
        "entry is one): pass call=lambda model, x, t, cond: ... returning the prediction"
    )


def output_channels(pred: Tensor, x: Tensor) -> Tensor:
    """The prediction in the input's space: all of ``pred``, or its first C channels with a learned variance."""
    if pred.shape == x.shape:
        return pred
    if pred.dim() == x.dim() and pred.shape[0] == x.shape[0] and pred.shape[2:] == x.shape[2:] and pred.shape[1] > x.shape[1]:
        return pred[:, : x.shape[1]]
    raise ValueError(
        f"the model's prediction has shape {tuple(pred.shape)} for input {tuple(x.shape)}; fit expects a prediction "
        "with the input's shape (or with extra variance channels along dim 1): adapt it with call=..."
    )


class Full(NamedTuple):
    """A full-compute call: the prediction (input's channels), every site stream's ``F(Z)``,
    the token means of ``Z`` the gates' drift compares with and the token sums the gate
    weights multiply (both for every stream of every deciding site), and the timestep the
    graph reads (forecasting models only, else None)."""

    prediction: Tensor
    branch_outputs: list[Tensor]
    pooled: list[Tensor]
    sums: list[Tensor] = []
    t: Tensor | None = None


class Soft(NamedTuple):
    """A soft call: the prediction (input's channels), the gate scores (sites, rows), and
    what a full call also returns (with grad where the soft blend has it)."""

    prediction: Tensor
    scores: Tensor
    branch_outputs: list[Tensor]
    pooled: list[Tensor]
    sums: list[Tensor] = []
    t: Tensor | None = None


class SoftModel:
    """Calls a lazy model's soft program (``passes/soft_blend.py``) through the user's ``call``.

    ``full(x, t, cond)`` runs ``mix = 0`` (the full model exactly) without grad;
    ``soft(x, t, cond, reuse, ...)`` runs the blend ``(1 - w) * F(Z) + w * reuse`` with grad
    to the gates: ``w`` the gate score (``hard=False``, the paper's soft blend) or the hard
    decision with a straight-through gradient (``hard=True``), only for rows in ``may``.
    ``age`` (sites, rows) and ``pools`` (the ``pooled`` of the call that filled each cache)
    feed the gate inputs of the same names. ``forward`` is what fit installs as
    ``model.forward``.
    """

    def __init__(self, model: nn.Module, call: CallFn):
        self.model, self.call = model, call
        self.rt = runtime(model)
        self.program = None  # the last soft program called (sites, kinds)
        self._inputs: dict | None = None
        self._outputs: tuple | None = None
        self._scalars: dict = {}

    @property
    def kinds(self) -> list[str]:
        if self.program is None:
            raise RuntimeError("internal: the soft program has not been traced yet")
        return [s.kind for s in self.program.sites]

    def full(self, x: Tensor, t: Tensor, cond: Any) -> Full:
        with torch.no_grad():
            pred, (fz, _, pooled, sums, tg) = self._run(dict(mix=0.0), x, t, cond)
        return Full(pred, [f.detach() for f in fz], [p.detach() for p in pooled], [s.detach() for s in sums], tg)

    def soft(self, x: Tensor, t: Tensor, cond: Any, reuse: list[Tensor], *, may: Tensor | None = None,
             age: Tensor | None = None, pools: list[Tensor] | None = None, hard: bool = False,
             threshold: Tensor | float | None = None, forecast: dict | None = None) -> Soft:
        """The soft call; ``threshold`` (a float or one per site) replaces the model's,
        ``forecast`` gives the inputs of the forecast reuse (``prev``: a list per site
        stream like ``reuse``; ``tfill``, ``tprev``, ``hasprev``: (sites, rows))."""
        inputs = dict(mix=1.0, hard=1.0 if hard else 0.0, reuse=reuse, may=may, age=age, pools=pools,
                      threshold=threshold, **(forecast or {}))
        pred, (fz, scores, pooled, sums, tg) = self._run(inputs, x, t, cond)
        return Soft(pred, scores, fz, pooled, sums, tg)

    def _run(self, inputs: dict, x, t, cond):
        self._inputs, self._outputs = inputs, None
        try:
            pred = output_channels(prediction(self.call(self.model, x, t, cond)), x)
            return pred, self._outputs
        finally:
            self._inputs, self._outputs = None, None

    def forward(self, *args, **kwargs):
        """Soft (training) forward installed by lazypass.fit."""
        prog, leaves = self.rt.program_for(args, kwargs, mode="soft")
        device = next((v.device for v in leaves if isinstance(v, Tensor)), None)
        extra = _extra_inputs(prog.state_specs, self._inputs or dict(mix=1.0), self.rt.threshold, device,
                              self._scalar)
        outs = prog.core(*leaves, *extra)
        n = prog.n_user_outputs
        k = sum(spec.name.startswith("lazy_reuse_") for spec in prog.state_specs)
        forecast = any(spec.name.startswith("lazy_tfill_") for spec in prog.state_specs)
        rest = list(outs[n + k + 1 :])
        t = rest.pop() if forecast else None
        half = len(rest) // 2  # token means, then token sums, of every deciding site stream
        self._outputs = (list(outs[n : n + k]), outs[n + k], rest[:half], rest[half:], t)
        self.program = prog
        return pytree.tree_unflatten(list(outs[:n]), prog.out_spec)

    def _scalar(self, value: float, device) -> Tensor:
        key = (str(device), value)
        if key not in self._scalars:
            self._scalars[key] = torch.tensor(value, dtype=torch.float32, device=device)
        return self._scalars[key]


def _extra_inputs(specs, given: dict, threshold: float, device, scalar) -> list[Tensor]:
    """The soft program's inputs after the user's, from what the caller gave (defaults: the
    full model's view: every row may skip, age 0, no pools, zero reuse values, no forecast)."""
    streams = {kind: iter(given.get(kind) or ()) for kind in ("reuse", "pool", "prev")}
    streams["pool"] = iter(given.get("pools") or ())
    out = []
    for spec in specs:
        kind, _, rest = spec.name[len("lazy_"):].partition("_")
        if kind in ("mix", "hard"):
            out.append(scalar(given.get(kind, 0.0), device))
        elif kind == "threshold":
            value = given.get("threshold")
            value = threshold if value is None else value
            if isinstance(value, Tensor):
                out.append(value.to(device, torch.float32).expand(spec.shape))
            else:
                out.append(torch.full(spec.shape, float(value), dtype=torch.float32, device=device))
        elif kind in ("may", "age", "tfill", "tprev", "hasprev"):
            value = given.get(kind)
            if value is not None:
                out.append(value[int(rest)])
            elif kind == "may":
                out.append(torch.ones(spec.shape, dtype=torch.bool, device=device))
            else:
                out.append(torch.zeros(spec.shape, dtype=spec.dtype, device=device))
        else:  # pool, reuse, prev: one tensor per spec, in order
            value = next(streams[kind], None)
            out.append(value if value is not None else torch.zeros(spec.shape, dtype=spec.dtype, device=device))
    return out
