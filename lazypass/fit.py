"""Fit the gates of a lazy model (LazyDiT section 3.3): soft blending, model frozen.

Each site's branch output becomes ``(1 - s) * F(Z) + s * Y_prev`` (the ``soft_blend``
rewrite), with ``Y_prev`` the branch output of the previous sampling step computed at full
compute, and the loss is

    fidelity + rho_attn * mean_b sum_attn-sites (1 - s) + rho_ffn * mean_b sum_ffn-sites (1 - s).

**Self-distillation** (``loss="distill"``, the default, data-free): trajectories come from
the model's own DDIM sampler at full compute; a training pair is two consecutive steps of
one trajectory: the full model's branch outputs at step ``i - 1`` are ``Y_prev`` for the
soft model at step ``i``, and fidelity is the MSE to the full model's prediction at the same
``x_t``.  The batch rows run staggered trajectories (row ``g`` of the global batch starts
``g * T / G`` steps late), so every optimiser step sees a spread of timesteps while the only
thing kept between steps is one set of branch outputs: each iteration costs one full
forward (no grad) and one soft forward and backward.

**Diffusion loss** (``loss="diffusion"``, needs data): a random sampling step per row,
``x_t`` and ``x_{t_prev}`` noised from the same clean sample and noise; ``Y_prev`` comes
from the full model at ``x_{t_prev}`` and fidelity is the noise-prediction MSE.

``target_ratio`` adapts rho during fitting (multiplicatively, from the fraction of gate
scores above the threshold) and finally calibrates the threshold with real lazy sampling
runs, so the inference lazy ratio lands on the target.

Under ``torchrun`` (or any initialised process group) the gate parameters train with
DistributedDataParallel: each process brings its own batch, gradients are averaged, and
all ranks end with the same gates.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lazypass.config import check_threshold
from lazypass.runtime import runtime, trajectory
from lazypass.report import stats
from lazypass.sampling import ALPHAS_CUMPROD, add_noise, ddim_timesteps

CallFn = Callable[[nn.Module, Tensor, Tensor, Any], Any]
_KEYS = {"noise", "cond", "null_cond", "x0"}


@dataclass
class FitResult:
    """What happened while fitting.

    ``loss``, ``fidelity`` and ``lazy`` have one entry per optimiser step (``lazy`` is the
    fraction of gate scores above the threshold on the rows that had a previous step, the
    training-time view of the lazy ratio). ``rho_attn``/``rho_ffn`` are the final penalties
    (adapted when ``target_ratio`` was given), ``threshold`` the model's threshold at the
    end, and ``lazy_ratio`` the lazy ratio of real lazy sampling at the end (measured when
    ``target_ratio`` or ``measure=True`` was given, else None).
    """

    loss: list[float] = field(default_factory=list)
    fidelity: list[float] = field(default_factory=list)
    lazy: list[float] = field(default_factory=list)
    rho_attn: float = 0.0
    rho_ffn: float = 0.0
    threshold: float = 0.5
    lazy_ratio: float | None = None
    lazy_ratio_before_calibration: float | None = None


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
    return _prediction(out)


def fit(
    model: nn.Module,
    sample_fn: Callable[[int], dict],
    steps: int = 500,
    lr: float = 1e-4,
    rho: float | None = None,
    rho_attn: float | None = None,
    rho_ffn: float | None = None,
    target_ratio: float | None = None,
    loss: str = "distill",
    num_inference_steps: int = 20,
    guidance_scale: float = 1.0,
    call: CallFn | None = None,
    measure: bool = False,
    calibration_batches: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> FitResult:
    """Train only the gates of a lazy model; the model's own weights stay bit-identical.

    Args:
        model: a model after ``lazypass.apply`` (traced or not).
        sample_fn: ``sample_fn(i) -> dict`` gives batch ``i`` (``i = 0, 1, ...``) of this
            process, always with the same batch size ``B``, keys:
            ``"noise"``: x_T, (B, C, ...) (distill; optional for diffusion, drawn if absent);
            ``"cond"``: the conditioning passed to ``call`` (class labels (B,), text
            embeddings (B, L, D), a dict of such tensors, or None);
            ``"null_cond"``: the unconditional conditioning (same structure; each tensor
            broadcastable to its ``cond`` counterpart, e.g. the null class id), needed
            when ``guidance_scale != 1``;
            ``"x0"``: clean data (B, C, ...), for ``loss="diffusion"``.
            Distillation calls it once per trajectory (every ``num_inference_steps``
            iterations), the diffusion loss once per step. Under several processes each
            rank should return its own shard (e.g. seed with ``i`` and the rank).
        steps: optimiser steps.
        lr: AdamW learning rate (the paper: 1e-4, 500 steps).
        rho, rho_attn, rho_ffn: lazy-penalty weights; default the ones given to ``apply``.
        target_ratio: wanted lazy ratio of real sampling at ``num_inference_steps``: rho
            is adapted during fitting, then the threshold is calibrated (and set on the
            model) with lazy sampling runs on ``calibration_batches`` more batches.
        loss: ``"distill"`` (data-free self-distillation) or ``"diffusion"`` (noise
            prediction on ``x0``).
        num_inference_steps: DDIM steps of the trajectories (and of the sampling the gates
            are meant for).
        guidance_scale: classifier-free guidance of the distillation trajectories (and of
            the calibration runs); the model is then called on ``cat([x, x])`` with
            ``cat([cond, null_cond])``, as the sampler does, so gates see both halves.
        call: ``call(model, x, t, cond) -> prediction`` (eps, or eps and learned sigma
            along dim 1); default :func:`default_call`. For example a PixArt transformer:
            ``lambda m, x, t, c: m(x, encoder_hidden_states=c, timestep=t, return_dict=False)[0]``.
        measure: measure the lazy ratio of real sampling at the end even without a target.
        calibration_batches: batches (after the training ones) that the final measurement
            and threshold calibration sample; more gives a threshold that generalises better.
        seed: seeds the diffusion loss's timesteps and noise.
        progress: tqdm bar with loss, lazy ratio and rho (rank 0 only).

    The model runs in eval mode; its parameters are frozen while fitting (``requires_grad``
    and ``training`` are restored after), only ``model.lazy_gates`` trains.

    Example:
        >>> import torch, lazypass
        >>> from lazypass.models import tiny_dit
        >>> model = lazypass.apply(tiny_dit(), rho=1e-2)
        >>> def batches(i):
        ...     g = torch.Generator().manual_seed(i)
        ...     return {"noise": torch.randn(4, 4, 8, 8, generator=g), "cond": torch.randint(0, 10, (4,), generator=g)}
        >>> result = lazypass.fit(model, batches, steps=10, lr=1e-2, num_inference_steps=5, progress=False)
        >>> len(result.loss)
        10
    """
    rt = runtime(model)
    if loss not in ("distill", "diffusion"):
        raise ValueError(f'loss must be "distill" or "diffusion", got {loss!r}')
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    T = num_inference_steps
    ddim_timesteps(T)  # checks the step count
    if T < 2:
        raise ValueError("num_inference_steps must be >= 2: a step needs a previous step to be lazy")
    if not isinstance(calibration_batches, int) or calibration_batches < 1:
        raise ValueError(f"calibration_batches must be an int >= 1, got {calibration_batches!r}")
    if target_ratio is not None and not 0.0 <= target_ratio <= (T - 1) / T:
        raise ValueError(
            f"target_ratio must be in [0, {(T - 1) / T:.3f}]: the first of {T} steps always computes, got {target_ratio!r}"
        )
    rhos = _rhos(rt.cfg, rho, rho_attn, rho_ffn)
    call = call or default_call
    world, rank = _distributed(model)

    channel = _Channel()
    saved_forward = model.__dict__.get("forward")
    saved_training = model.training
    saved_flags: list[tuple[nn.Parameter, bool]] = []
    result = FitResult()
    model.eval()
    model.forward = _soft_forward(rt, channel)
    try:
        source = _Source(sample_fn, loss, guidance_scale, world, rank)
        source.batch(0)  # batch size and device
        # both run a first full forward, which traces the soft program and creates the gates
        if loss == "distill":
            train = _distill(model, source, call, channel, T, guidance_scale)
        else:
            train = _diffusion(model, source, call, channel, T, seed)
        gates = model.lazy_gates
        gate_params = {id(p) for p in gates.parameters()}
        saved_flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in saved_flags:
            p.requires_grad_(id(p) in gate_params)
        step_module = _Step(gates, train)
        runner = step_module
        if world > 1:
            runner = nn.parallel.DistributedDataParallel(step_module)
        opt = torch.optim.AdamW(gates.parameters(), lr=lr)
        kinds = [s.kind for s in channel.prog.sites]
        attn = torch.tensor([k == "attn" for k in kinds])
        control = None
        if target_ratio is not None:
            auto = rho is None and rho_attn is None and rho_ffn is None
            control = _Controller(target_ratio, T, rhos, auto, len(kinds))
        bar = _bar(steps, progress and rank == 0)
        for k in range(steps):
            out, target, scores, mask = runner()
            rows = out.shape[0]
            m = mask.to(out.dtype)
            per_row = ((out.float() - target.float()) ** 2).flatten(1).mean(1)
            fidelity = (per_row * m).sum() / rows
            if control and control.auto:
                control.start(_sum([fidelity.detach() / world], world)[0])
            rho_a, rho_f = control.rhos if control else rhos
            w = torch.where(attn.to(scores.device), rho_a, rho_f)[:, None]
            lazy_loss = ((1 - scores) * w).sum(0).mul(m).sum() / rows
            total = fidelity + lazy_loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            above = ((scores > rt.threshold) & mask[None]).float().sum()
            fid, tot, above, counted = _sum(
                [fidelity.detach() / world, total.detach() / world, above, mask.sum()], world
            )
            frac = above / max(counted * len(kinds), 1.0)
            result.loss.append(tot)
            result.fidelity.append(fid)
            result.lazy.append(frac)
            if control:
                control.update(frac)
            if bar is not None:
                bar.update(1)
                post = dict(loss=f"{tot:.4g}", lazy=f"{frac:.2f}")
                if control:
                    post["rho"] = f"{control.rhos[0]:.2g}"
                bar.set_postfix(post)
        if bar is not None:
            bar.close()
        result.rho_attn, result.rho_ffn = control.rhos if control else rhos
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        if saved_forward is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = saved_forward
        model.train(saved_training)
        channel.clear()

    if target_ratio is not None or measure:
        start = source.next_index
        calib = [source.batch(start + j) for j in range(calibration_batches)]
        model.eval()
        try:
            ratio, scores = _lazy_sampling(model, rt, calib, call, T, guidance_scale, world)
            result.lazy_ratio_before_calibration = ratio
            if target_ratio is not None:
                ratio = _calibrate(model, rt, calib, call, T, guidance_scale, world, target_ratio, ratio, scores)
            result.lazy_ratio = ratio
        finally:
            model.train(saved_training)
    result.threshold = rt.threshold
    return result


# -- the soft model ---------------------------------------------------------------------


class _Channel:
    """What fit passes to, and gets back from, a soft call besides the user's inputs/outputs."""

    def __init__(self):
        self.mix = 1.0
        self.prevs: list[Tensor] | None = None
        self.fz: list[Tensor] = []
        self.scores: Tensor | None = None
        self.prog = None
        self._mix: dict = {}

    def mix_tensor(self, device) -> Tensor:
        key = (str(device), self.mix)
        if key not in self._mix:
            self._mix[key] = torch.tensor(self.mix, dtype=torch.float32, device=device)
        return self._mix[key]

    def clear(self):
        self.prevs, self.fz, self.scores = None, [], None


def _soft_forward(rt, channel: _Channel):
    def forward(*args, **kwargs):
        prog, leaves = rt.program_for(args, kwargs, mode="soft")
        device = next((x.device for x in leaves if isinstance(x, Tensor)), None)
        prevs = channel.prevs
        if prevs is None:
            prevs = [torch.zeros(s.shape, dtype=s.dtype, device=device) for s in prog.state_specs[1:]]
        if len(prevs) != len(prog.state_specs) - 1:
            raise RuntimeError("internal: previous branch outputs do not match the soft program")
        outs = prog.core(*leaves, channel.mix_tensor(device), *prevs)
        n, k = prog.n_user_outputs, len(prog.state_specs) - 1
        channel.fz = list(outs[n : n + k])
        channel.scores = outs[n + k]
        channel.prog = prog
        return pytree.tree_unflatten(list(outs[:n]), prog.out_spec)

    forward.__doc__ = "Soft (training) forward installed by lazypass.fit."
    return forward


class _Step(nn.Module):
    """The unit DistributedDataParallel wraps: the gates are its only parameters."""

    def __init__(self, gates: nn.Module, train):
        super().__init__()
        self.gates = gates
        self._train = train

    def forward(self):
        return self._train()


def _prediction(out) -> Tensor:
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


def _eps(pred: Tensor, x: Tensor) -> Tensor:
    """The noise prediction: all of ``pred``, or its first C channels with a learned variance."""
    if pred.shape == x.shape:
        return pred
    if pred.dim() == x.dim() and pred.shape[0] == x.shape[0] and pred.shape[2:] == x.shape[2:] and pred.shape[1] > x.shape[1]:
        return pred[:, : x.shape[1]]
    raise ValueError(
        f"the model's prediction has shape {tuple(pred.shape)} for input {tuple(x.shape)}; fit expects eps with the "
        "input's shape (or eps and variance channels along dim 1): adapt it with call=..."
    )


# -- data -------------------------------------------------------------------------------


class _Source:
    """Batches from ``sample_fn``, checked once."""

    def __init__(self, sample_fn, loss, guidance_scale, world, rank):
        self.sample_fn, self.loss, self.guided = sample_fn, loss, guidance_scale != 1.0
        self.world, self.rank = world, rank
        self.size: int | None = None
        self.next_index = 0
        self._cache: dict[int, dict] = {}

    def batch(self, i: int) -> dict:
        if i in self._cache:
            return self._cache[i]
        b = self.sample_fn(i)
        if isinstance(b, Tensor):
            b = {"noise": b}
        if not isinstance(b, dict):
            raise TypeError(f"sample_fn({i}) must return a dict with keys among {sorted(_KEYS)}, got {type(b).__name__}")
        b = dict(b)
        unknown = set(b) - _KEYS
        if unknown:
            raise ValueError(f"sample_fn({i}) returned unknown keys {sorted(unknown)}; known keys are {sorted(_KEYS)}")
        main = "noise" if self.loss == "distill" else "x0"
        if not isinstance(b.get(main), Tensor):
            raise ValueError(f'loss="{self.loss}" needs sample_fn to return "{main}" (a tensor of shape (B, C, ...))')
        size = b[main].shape[0]
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise ValueError(f"sample_fn({i}) returned a batch of {size}, earlier batches had {self.size}; keep B fixed")
        cond = b.get("cond")
        for leaf in pytree.tree_leaves(cond):
            if isinstance(leaf, Tensor) and (leaf.dim() == 0 or leaf.shape[0] != size):
                raise ValueError(f"sample_fn({i}): every conditioning tensor needs the batch ({size}) as first dim")
        if self.guided and "null_cond" not in b:
            raise ValueError('guidance_scale != 1 needs sample_fn to return "null_cond" (e.g. the null class id)')
        if "null_cond" in b:  # a 0-d null class id is allowed: give it the batch dim
            b["null_cond"] = _expand_like(b["null_cond"], cond)
        self._cache = {k: v for k, v in self._cache.items() if k >= i - 1}
        self._cache[i] = b
        self.next_index = max(self.next_index, i + 1)
        return b


def _expand_like(null, cond):
    if isinstance(cond, Tensor):
        return torch.as_tensor(null, device=cond.device).to(cond.dtype).expand_as(cond)
    if isinstance(cond, dict):
        if not isinstance(null, dict) or set(null) != set(cond):
            raise ValueError("null_cond must be a dict with the same keys as cond")
        return {k: _expand_like(null[k], v) for k, v in cond.items()}
    return null


def _rows(tree, index: Tensor):
    return pytree.tree_map(lambda v: v[index] if isinstance(v, Tensor) else v, tree)


def _cat(a, b):
    return pytree.tree_map(lambda u, v: torch.cat([u, v]) if isinstance(u, Tensor) else u, a, b)


def _put(dst, src, rows: Tensor):
    """``dst[rows] = src[rows]`` leaf by leaf, returning new tensors."""
    def put(d, s):
        if not isinstance(d, Tensor):
            return d
        d = d.clone()
        d[rows] = s[rows].to(d.dtype)
        return d
    return pytree.tree_map(put, dst, src)


def _model_inputs(x, t, cond, null, guided):
    if not guided:
        return x, t, cond
    return torch.cat([x, x]), torch.cat([t, t]), _cat(cond, null)


def _ddim_rows(x: Tensor, eps: Tensor, t: Tensor, ratio: int) -> Tensor:
    """Per-row DDIM (eta 0) from timesteps ``t`` (B,) to ``t - ratio`` (to x0 below 0)."""
    abar = ALPHAS_CUMPROD.to(x.device)
    a_t = abar[t]
    prev = t - ratio
    a_p = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones_like(a_t))
    shape = (-1,) + (1,) * (x.dim() - 1)
    a_t, a_p = a_t.reshape(shape), a_p.reshape(shape)
    x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    return (a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps.double()).to(x.dtype)


def _guide(eps: Tensor, guided: bool, scale: float) -> Tensor:
    if not guided:
        return eps
    c, u = eps.chunk(2)
    return u + scale * (c - u)


# -- the two kinds of training pair ------------------------------------------------------


def _distill(model, source, call, channel, T, guidance_scale):
    """The training closure of self-distillation; it advances the staggered trajectories."""
    guided = guidance_scale != 1.0
    ratio = len(ALPHAS_CUMPROD) // T
    first = source.batch(0)
    B = source.size
    device = first["noise"].device
    G = B * source.world
    offset = torch.tensor([((source.rank * B + b) * T) // G for b in range(B)], device=device)
    steps_t = torch.tensor(ddim_timesteps(T), device=device)
    state = {"u": -int(offset.max()),
             "x": first["noise"].clone(), "cond": first.get("cond"), "null": first.get("null_cond"),
             "prev": None}

    def advance():
        """One full-compute step of every row; returns what training at this step needs."""
        u = state["u"]
        p = offset + u  # steps since row started its first trajectory
        started = p >= 0
        pos = torch.where(started, p % T, torch.zeros_like(p))
        restart = started & (pos == 0)
        if bool(restart.any()):
            for j in torch.unique(torch.div(p[restart], T, rounding_mode="floor")).tolist():
                rows = restart & (torch.div(p, T, rounding_mode="floor") == j)
                b = source.batch(int(j))
                state["x"] = _put(state["x"], b["noise"], rows)
                state["cond"] = _put(state["cond"], b.get("cond"), rows)
                state["null"] = _put(state["null"], b.get("null_cond"), rows)
        t = steps_t[pos]
        x = state["x"]
        xi, ti, ci = _model_inputs(x, t, state["cond"], state["null"], guided)
        channel.mix, channel.prevs = 0.0, None
        with torch.no_grad():
            full = _eps(call(model, xi, ti, ci), xi)
        fz = [f.detach() for f in channel.fz]
        mask = started & (pos >= 1)
        if guided:
            mask = torch.cat([mask, mask])
        state["x"] = torch.where(
            started.reshape((-1,) + (1,) * (x.dim() - 1)), _ddim_rows(x, _guide(full, guided, guidance_scale), t, ratio), x
        )
        prev, state["prev"] = state["prev"], fz
        state["u"] = u + 1
        return xi, ti, ci, full, prev, mask

    while state["u"] < 0:
        advance()

    def train():
        xi, ti, ci, full, prev, mask = advance()
        channel.mix = 1.0
        channel.prevs = prev if prev is not None else [torch.zeros_like(f) for f in state["prev"]]
        out = _eps(call(model, xi, ti, ci), xi)
        scores = channel.scores
        channel.prevs = None
        return out, full, scores, mask

    if channel.prog is None:  # no warm-up ran: trace the soft program (creating the gates) now
        probe = _model_inputs(state["x"], steps_t[:1].expand(B), state["cond"], state["null"], guided)
        channel.mix, channel.prevs = 0.0, None
        with torch.no_grad():
            call(model, *probe)
    return train


def _diffusion(model, source, call, channel, T, seed):
    """The training closure of a noise-prediction step, with Y_prev from the full model at t_prev."""
    ratio = len(ALPHAS_CUMPROD) // T
    B = source.size
    G = B * source.world
    lo = source.rank * B
    counter = {"k": 0}
    steps_t = torch.tensor(ddim_timesteps(T))

    def batch_inputs(k):
        b = source.batch(k)
        x0 = b["x0"]
        kgen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        pos = torch.randint(1, T, (G,), generator=kgen)[lo : lo + B]
        noise = b.get("noise")
        if noise is None:
            noise = torch.randn((G,) + tuple(x0.shape[1:]), generator=kgen)[lo : lo + B].to(x0.device, x0.dtype)
        t = steps_t[pos].to(x0.device)
        return x0, noise, t, b.get("cond")

    def train():
        k = counter["k"]
        counter["k"] += 1
        x0, noise, t, cond = batch_inputs(k)
        channel.mix, channel.prevs = 0.0, None
        with torch.no_grad():
            call(model, add_noise(x0, noise, t + ratio), t + ratio, cond)
        prev = [f.detach() for f in channel.fz]
        channel.mix, channel.prevs = 1.0, prev
        x_t = add_noise(x0, noise, t)
        out = _eps(call(model, x_t, t, cond), x_t)
        channel.prevs = None
        return out, noise, channel.scores, torch.ones(B, dtype=torch.bool, device=x0.device)

    x0, noise, t, cond = batch_inputs(0)
    channel.mix, channel.prevs = 0.0, None
    with torch.no_grad():
        call(model, add_noise(x0, noise, t), t, cond)  # traces the soft program, creating the gates
    return train


# -- rho and threshold -------------------------------------------------------------------


class _Controller:
    """Control of log rho toward a lazy ratio, measured on the training rows (fraction of scores above the threshold).

    Without a rho from the user, the start is set from the first fidelity so that the lazy
    loss starts at a tenth of it (the useful rho depends on the model's output scale: the
    paper sweeps 1e-7 to 1e-2); starting higher overshoots, the gates lagging behind rho.
    """

    def __init__(self, target: float, T: int, rhos: tuple[float, float], auto: bool, sites: int):
        self.target = target * T / (T - 1)  # the first step never skips at inference
        base = max(rhos[0], rhos[1])
        self.share = (rhos[0] / base, rhos[1] / base) if base > 0 else (1.0, 1.0)
        self.log_rho = math.log(base) if base > 0 else None
        self.integral = self.log_rho
        self.auto, self.sites = auto or base == 0, sites
        self.ema: float | None = None

    @property
    def rhos(self) -> tuple[float, float]:
        r = math.exp(self.log_rho) if self.log_rho is not None else 0.0
        return r * self.share[0], r * self.share[1]

    def start(self, fidelity: float) -> None:
        self.auto = False
        self.log_rho = self.integral = math.log(max(fidelity, 1e-12) / (5.0 * self.sites))

    def update(self, frac: float) -> None:
        self.ema = frac if self.ema is None else 0.9 * self.ema + 0.1 * frac
        err = self.target - self.ema
        # PI control of log rho. The integral is slow on purpose: the gates follow rho with a
        # lag (Adam momentum), and AdamW's second moment remembers old gradient sizes, so
        # jumps of rho by orders of magnitude stall the gates; the proportional term reacts
        # at once without winding up.
        self.integral = min(max(self.integral + 0.05 * err, math.log(1e-12)), math.log(1e3))
        self.log_rho = self.integral + 2.0 * err


def _lazy_sampling(model, rt, batches, call, T, guidance_scale, world):
    """Lazy DDIM runs at the current threshold: (lazy ratio, recorded scores once caches are valid)."""
    guided = guidance_scale != 1.0
    ratio = len(ALPHAS_CUMPROD) // T
    skipped, total = 0.0, 0.0
    scores = []
    for k, batch in enumerate(batches):
        x = batch.get("noise")
        if x is None:
            g = torch.Generator().manual_seed(1234 + k)
            x = torch.randn(batch["x0"].shape, generator=g).to(batch["x0"].device, batch["x0"].dtype)
        with trajectory(model), torch.no_grad():
            for t in ddim_timesteps(T):
                tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
                xi, ti, ci = _model_inputs(x, tt, batch.get("cond"), batch.get("null_cond"), guided)
                eps = _guide(_eps(call(model, xi, ti, ci), xi), guided, guidance_scale)
                x = _ddim_rows(x, eps, tt, ratio)
            st = stats(model)
        first = max(st.skipped.shape[0] // T, 1)  # calls of the first step: caches not valid yet
        skipped += float(st.skipped.sum())
        total += float(st.skipped.size)
        scores.append(st.scores[first:].ravel())
    skipped, total = _sum([skipped, total], world)
    return skipped / total, np.concatenate(scores)


def _calibrate(model, rt, batch, call, T, guidance_scale, world, target, ratio, scores, tol=0.01, tries=6):
    """Set the threshold so lazy sampling on ``batch`` hits ``target``; returns the ratio reached."""
    lo, hi = -1.0, 2.0  # thresholds giving too many / too few skips
    best = (abs(ratio - target), rt.threshold, ratio)
    thr = rt.threshold
    for _ in range(tries):
        if abs(ratio - target) <= tol:
            break
        if ratio > target:
            lo = max(lo, thr)
        else:
            hi = min(hi, thr)
        level = 1.0 - min(max(target * T / (T - 1), 0.0), 1.0)
        guess = float(np.quantile(scores, level)) if scores.size else 0.5 * (lo + hi)
        guess = _sum([guess / world], world)[0]  # every rank must pick the same threshold
        thr = guess if lo < guess < hi else 0.5 * (max(lo, 0.0) + min(hi, 1.0))
        if not lo < thr < hi:
            thr = 0.5 * (lo + hi)
        rt.set_threshold(check_threshold(min(max(thr, -1.0), 2.0)))
        ratio, scores = _lazy_sampling(model, rt, batch, call, T, guidance_scale, world)
        if abs(ratio - target) < best[0]:
            best = (abs(ratio - target), thr, ratio)
    rt.set_threshold(best[1])
    return best[2]


# -- plumbing ------------------------------------------------------------------------------


def _sum(values: list, world: int) -> list[float]:
    """Sums over all processes (one all-reduce) of scalars or 0-d tensors, as floats."""
    if world == 1:
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _rhos(cfg, rho, rho_attn, rho_ffn) -> tuple[float, float]:
    base_a, base_f = (cfg.rho_attn, cfg.rho_ffn) if rho is None else (rho, rho)
    a = base_a if rho_attn is None else rho_attn
    f = base_f if rho_ffn is None else rho_ffn
    for name, v in (("rho_attn", a), ("rho_ffn", f)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(a), float(f)


def _distributed(model) -> tuple[int, int]:
    """(world size, rank); initialises the process group under torchrun if nobody did."""
    if not dist.is_available():
        return 1, 0
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = next(model.parameters()).device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def _bar(total: int, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="lazypass.fit")


__all__ = ["fit", "FitResult", "default_call"]
