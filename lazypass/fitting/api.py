"""``lazypass.fit``: train the gates of a lazy model (LazyDiT section 3.3), the model frozen.

The steps, each in its own module: build the options (:mod:`.config`), freeze all but the
gates and install the soft forward (:mod:`.frozen`, :mod:`.soft`), train on the chosen
objective (:mod:`.objectives`, :mod:`.train`) with optional rho control (:mod:`.control`),
then measure lazy sampling and calibrate the threshold (:mod:`.calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lazypass.fitting.calibrate import calibrate_threshold, lazy_sampling
from lazypass.fitting.config import FitConfig
from lazypass.fitting.control import RhoController, resolve_rhos
from lazypass.fitting.dist import world_and_rank
from lazypass.fitting.frozen import gates_only
from lazypass.fitting.objectives import Diffusion, Distill
from lazypass.fitting.on_policy import OnPolicy
from lazypass.fitting.sampler import Schedule
from lazypass.fitting.soft import CallFn, SoftModel, default_call
from lazypass.fitting.source import BatchSource
from lazypass.fitting.train import train_gates
from lazypass.runtime import runtime


@dataclass
class FitResult:
    """What happened while fitting.

    ``"one_step"``: ``loss``, ``fidelity`` and ``lazy`` have one entry per optimiser step
    (``lazy`` is the fraction of gate scores above the threshold on the rows that had a
    previous step, the training-time view of the lazy ratio); ``rho_attn``/``rho_ffn`` are
    the final penalties (adapted when ``target_ratio`` was given).
    ``"on_policy"``: ``loss`` has one entry per optimiser step of the gate fits (all rounds),
    ``fidelity`` and ``lazy`` one per round: the mean squared error of the round's final
    samples against the full model's and the lazy ratio (in MACs) of its behaviour policy.
    ``threshold`` is the model's threshold at the end, and ``lazy_ratio`` the lazy ratio of
    real lazy sampling on held-out batches at the end, counted in per-sample branch MACs
    (measured when ``target_ratio`` or ``measure=True`` was given, else None).
    """

    loss: list[float] = field(default_factory=list)
    fidelity: list[float] = field(default_factory=list)
    lazy: list[float] = field(default_factory=list)
    rho_attn: float = 0.0
    rho_ffn: float = 0.0
    threshold: float = 0.5
    lazy_ratio: float | None = None
    lazy_ratio_before_calibration: float | None = None


def fit(
    model: nn.Module,
    sample_fn: Callable[[int], dict],
    config: FitConfig | None = None,
    *,
    call: CallFn | None = None,
    **options,
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
        config: a :class:`FitConfig`; ``options`` (its field names: ``steps``, ``lr``,
            ``rho``, ``rho_attn``, ``rho_ffn``, ``target_ratio``, ``loss``,
            ``num_inference_steps``, ``scheduler``, ``set_timesteps_kwargs``,
            ``guidance_scale``, ``calibration_batches``, ``seed``, ``progress``, ``measure``)
            replace its fields; an unknown option is a TypeError. ``scheduler`` is any
            diffusers scheduler (default: DDIM on DiT's linear schedule, for eps models);
            see :class:`FitConfig`.
        call: ``call(model, x, t, cond) -> prediction`` in the model's own output space
            (eps, v or velocity, as the scheduler's prediction type says; extra learned
            variance channels along dim 1 are ignored); ``t`` is the scheduler's timestep per
            row. Default :func:`default_call`. For example a PixArt transformer:
            ``lambda m, x, t, c: m(x, encoder_hidden_states=c, timestep=t, return_dict=False)[0]``;
            a Flux transformer takes ``timestep=t / 1000``. For diffusers pipelines,
            :func:`lazypass.fit_pipeline` builds all of this.

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
    config = FitConfig.from_options(config, **options)
    rt = runtime(model)
    rhos = resolve_rhos(rt.cfg, config.rho, config.rho_attn, config.rho_ffn)
    call = call or default_call
    world, rank = world_and_rank(model)
    source = BatchSource(sample_fn, config.loss, config.guided, world, rank)
    device = source.peek(0)[source.main_key].device
    source.peek(1)  # a sample_fn whose batch size changes fails here, before any training
    schedule = Schedule(config.scheduler, config.num_inference_steps, config.set_timesteps_kwargs, device)
    L = schedule.calls  # model calls per trajectory
    if config.target_ratio is not None and config.target_ratio > (L - 1) / L:
        raise ValueError(
            f"target_ratio must be in [0, {(L - 1) / L:.3f}]: the first of {L} steps always computes, "
            f"got {config.target_ratio!r}"
        )

    soft = SoftModel(model, call)
    result = FitResult()
    if config.objective == "on_policy":
        if world > 1:
            raise ValueError(
                'objective="on_policy" runs in one process; under several processes pass objective="one_step"'
            )
        with gates_only(model, soft.forward):
            fitter = OnPolicy(soft, rt.cfg, source, schedule, config.guidance_scale, config.target_ratio, rhos)
            bar = _bar(config.rounds) if config.progress else None
            for r in range(config.rounds):
                error, ratio = fitter.collect(source.batch(r))
                result.fidelity.append(error)
                result.lazy.append(ratio)
                with torch.enable_grad():
                    result.loss += fitter.fit(config.steps, config.learning_rate, model.lazy_gates)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(dict(error=f"{error:.3g}", lazy=f"{ratio:.2f}"))
            if bar is not None:
                bar.close()
        rt.set_threshold(0.5)  # the fit centres every gate's decision on logit 0
        result.rho_attn, result.rho_ffn = rhos
        _measure(model, config, source, schedule, call, world, result)
        result.threshold = rt.threshold
        return result
    with gates_only(model, soft.forward):
        if config.loss == "distill":
            objective = Distill(soft, source, schedule, config.guidance_scale)
        else:
            objective = Diffusion(soft, source, schedule, config.seed)
        objective.prepare()  # the first soft call traces the soft program and creates the gates
        kinds = soft.kinds
        control = None
        if config.target_ratio is not None:
            control = RhoController(config.target_ratio, L, rhos, not config.user_rho, len(kinds))
        log = train_gates(
            model.lazy_gates, objective, kinds, config.steps, config.learning_rate, rhos, rt.threshold,
            control, world, config.progress and rank == 0,
        )
    result.loss, result.fidelity, result.lazy = log.loss, log.fidelity, log.lazy
    result.rho_attn, result.rho_ffn = control.rhos if control is not None else rhos

    _measure(model, config, source, schedule, call, world, result)
    result.threshold = rt.threshold
    return result


def _measure(model, config: FitConfig, source: BatchSource, schedule: Schedule, call, world: int,
             result: FitResult) -> None:
    """Lazy sampling on held-out batches (after every training batch): the measured lazy
    ratio in MACs, and the threshold calibrated to ``target_ratio`` when one was given."""
    if config.target_ratio is None and not config.measure:
        return
    start = source.next_index
    calib = [source.batch(start + j) for j in range(config.calibration_batches)]
    training = model.training
    model.eval()
    try:
        ratio, scores = lazy_sampling(model, calib, call, schedule, config.guidance_scale, world)
        result.lazy_ratio_before_calibration = ratio
        if config.target_ratio is not None:
            ratio = calibrate_threshold(
                model, calib, call, schedule, config.guidance_scale, config.target_ratio, ratio, scores, world
            )
        result.lazy_ratio = ratio
    finally:
        model.train(training)


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="lazypass.fit (on-policy rounds)")
