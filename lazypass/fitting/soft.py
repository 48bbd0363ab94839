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
    """A full-compute call: the prediction (input's channels) and every site stream's ``F(Z)``."""

    prediction: Tensor
    branch_outputs: list[Tensor]


class Soft(NamedTuple):
    """A soft call: the prediction (input's channels) and the gate scores (sites, rows)."""

    prediction: Tensor
    scores: Tensor


class SoftModel:
    """Calls a lazy model's soft program through the user's ``call``.

    ``full(x, t, cond)`` runs ``mix = 0`` (the full model exactly) without grad and returns
    the branch outputs to reuse next step; ``soft(x, t, cond, prevs)`` runs the paper's
    blend ``(1 - s) * F(Z) + s * Y_prev`` with grad to the gates. ``forward`` is the
    function fit installs as ``model.forward``.
    """

    def __init__(self, model: nn.Module, call: CallFn):
        self.model, self.call = model, call
        self.rt = runtime(model)
        self.program = None  # the last soft program called (sites, kinds)
        self._mix = 1.0
        self._prevs: list[Tensor] | None = None
        self._outputs: tuple[list[Tensor], Tensor | None] = ([], None)
        self._mix_tensors: dict = {}

    @property
    def kinds(self) -> list[str]:
        if self.program is None:
            raise RuntimeError("internal: the soft program has not been traced yet")
        return [s.kind for s in self.program.sites]

    def full(self, x: Tensor, t: Tensor, cond: Any) -> Full:
        with torch.no_grad():
            pred = self._run(0.0, None, x, t, cond)
        fz, _ = self._outputs
        self._outputs = ([], None)
        return Full(pred, [f.detach() for f in fz])

    def soft(self, x: Tensor, t: Tensor, cond: Any, prevs: list[Tensor]) -> Soft:
        pred = self._run(1.0, prevs, x, t, cond)
        _, scores = self._outputs
        self._outputs = ([], None)
        return Soft(pred, scores)

    def _run(self, mix: float, prevs, x, t, cond) -> Tensor:
        self._mix, self._prevs = mix, prevs
        try:
            return output_channels(prediction(self.call(self.model, x, t, cond)), x)
        finally:
            self._mix, self._prevs = 1.0, None

    def forward(self, *args, **kwargs):
        """Soft (training) forward installed by lazypass.fit."""
        prog, leaves = self.rt.program_for(args, kwargs, mode="soft")
        device = next((v.device for v in leaves if isinstance(v, Tensor)), None)
        specs = prog.state_specs[1:]
        prevs = self._prevs
        if prevs is None:
            prevs = [torch.zeros(s.shape, dtype=s.dtype, device=device) for s in specs]
        if len(prevs) != len(specs):
            raise RuntimeError("internal: previous branch outputs do not match the soft program")
        outs = prog.core(*leaves, self._mix_tensor(device), *prevs)
        n, k = prog.n_user_outputs, len(specs)
        self._outputs = (list(outs[n : n + k]), outs[n + k])
        self.program = prog
        return pytree.tree_unflatten(list(outs[:n]), prog.out_spec)

    def _mix_tensor(self, device) -> Tensor:
        key = (str(device), self._mix)
        if key not in self._mix_tensors:
            self._mix_tensors[key] = torch.tensor(self._mix, dtype=torch.float32, device=device)
        return self._mix_tensors[key]

