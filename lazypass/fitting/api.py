"""``lazypass.fit``: train the gates of a lazy model (LazyDiT section 3.3), the model frozen.

The steps, each in its own module: build the options (:mod:`.config`), freeze all but the
gates and install the soft forward (:mod:`.frozen`, :mod:`.soft`), train on the chosen
objective (:mod:`.objectives`, :mod:`.train`) with optional rho control (:mod:`.control`),
then measure lazy sampling and calibrate the threshold (:mod:`.calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from lazypass.fitting.calibrate import calibrate_threshold, lazy_sampling
from lazypass.fitting.config import FitConfig
from lazypass.fitting.control import RhoController, resolve_rhos
from lazypass.fitting.dist import world_and_rank
from lazypass.fitting.frozen import gates_only
from lazypass.fitting.objectives import Diffusion, Distill
from lazypass.fitting.sampler import Schedule
from lazypass.fitting.soft import CallFn, SoftModel, default_call
from lazypass.fitting.source import BatchSource
from lazypass.fitting.train import train_gates
from lazypass.runtime import runtime


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
            model.lazy_gates, objective, kinds, config.steps, config.lr, rhos, rt.threshold,
            control, world, config.progress and rank == 0,
        )
    result.loss, result.fidelity, result.lazy = log.loss, log.fidelity, log.lazy
    result.rho_attn, result.rho_ffn = control.rhos if control is not None else rhos

    if config.target_ratio is not None or config.measure:
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
    result.threshold = rt.threshold
    return result
