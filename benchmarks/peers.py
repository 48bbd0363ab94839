"""lazypass side by side with diffusers' cache hooks, fixed schedules and fewer steps (issue 13).

    PYTHONPATH=$PWD python benchmarks/peers.py                  # both digits models, writes docs/peers*
    PYTHONPATH=$PWD python benchmarks/peers.py --quick          # 64 samples, one setting per method: ~2 min
    PYTHONPATH=$PWD python benchmarks/peers.py --from-json a/peers/results.json b/peers/results.json  # rewrite, merged
    PYTHONPATH=$PWD python benchmarks/peers.py --models flow --threads 1 --note "busy machine"
    PYTHONPATH=$PWD python benchmarks/peers.py --quality-from docs/peers/results.json  # latency + correctness only

The run has two parts. The quality part (FD, PSNR and executed MACs of every setting at 1,000
samples) does not depend on the machine's load; latency does. ``--quality-from`` reads the first
from an earlier results.json (refused unless it has the same models, sweeps, samples, seeds and
weights, the same gate files by content and the same settings) and measures only latency and the
correctness checks, so the quality part can run on a busy machine and the rest on a quiet one.
With ``--no-compile`` as well, the torch.compile / torch.export results are kept from the earlier
run (they do not depend on load either) and only latency and *batch vs one* are measured.

The plain command does both in one go (``--jobs``, default 2 for the two models): each model's
quality part and compile / export checks in a process of its own, one thread each, both at once
(one per core), then latency and *batch vs one* in the main process on its own, from their merged
results (``--quality-from`` of them, ``--no-compile``): 20 minutes or less on 2 cores instead of
the 40 of one model after the other.

Two digits models, both in diffusers format, each sampled the way its pipeline would:

- ``dit``: the project's DiT digits model converted to ``DiTTransformer2DModel``
  (``digits_eval.to_diffusers_dit``), 20 steps of diffusers' ``DDIMScheduler`` set up as
  lazypass's own DDIM (``digits_eval.diffusers_ddim``);
- ``flow``: the flow-matching ``SD3Transformer2DModel`` (``digits_eval.load_flow_dit``), 8 steps
  of ``FlowMatchEulerDiscreteScheduler`` (docs/digits/flow_steps.md: halving 8 steps is where a
  step matters).

Every method starts from the same noise and labels (``--samples``, default 1,000, seed 0, labels
0-9 in turn), CFG 1, and runs a sweep of its own knob:

- ``fewer steps``: the sampler at fewer steps (the top point is full compute, the reference);
- ``lazypass``: gates fitted with ``lazypass.fit(model, sample_fn, scheduler=..., target_ratio=0.5,
  num_inference_steps=T)`` with the library's defaults, cached under ``--gates-dir`` keyed by the
  model's weights and every fit and pass option (so new defaults refit by themselves), then a
  threshold sweep: thresholds picked on separate calibration noise for a list of lazy ratios;
- ``fixed copy`` / ``fixed forecast``: every branch reused on evenly spread steps (never step 0),
  ``lazypass.apply(reuse="copy" | "forecast", max_age=None)`` with ``lazypass.set_threshold(model,
  -0.5 / 1.5)`` per step; the knob is the share of reused steps;
- each diffusers cache hook that applies (``HOOK_NOTES`` says why one does not, or how it was
  adapted): First Block Cache, TaylorSeer, MagCache, Pyramid Attention Broadcast, FasterCache,
  SeaCache.

Per setting: FD to the 1,797 real digits (classifier features, as in docs/digits), FD to the
full-compute samples, PSNR against the full-compute samples (same noise), executed MACs per image
and eager latency per image at batch 1 and batch 8 (median of interleaved repeats).

**MACs** are counted from the operations that really ran: the whole sampling run executes under a
dispatch mode with torch's FLOP formulas (matmuls, linears, convolutions and attention, including
CPU SDPA; not ``FlopCounterMode``, whose global module hooks make a lazy model run plain), so a hook
that skipped a block did not add its MACs. The images are sampled ``--eval-batch`` rows at a time
(default 100: a third faster on the CPU than all 1,000 at once). Hooks decide for the whole batch,
so what ran per image is the count divided by the rows. lazypass decides per sample and its images
do not depend on the batch (the correctness check measures it), so its MACs per image are those of
the image sampled on its own: the measured full-call MACs minus the MACs of the branches that sample
skipped (``lazypass.stats`` x ``Site.macs``). At the evaluation batch a branch runs on the rows that
compute, padded up to a bucket size (row compaction); what that executed is the ``batch MACs``
column.

**Correctness** per method, at the setting closest to 50% of full compute, on the first 8 samples:
batch of 8 against 8 runs of one (max abs difference of the images); ``torch.compile(fullgraph=True,
dynamic=False)`` of one sampling run of the first 2 samples (backend ``lazydit`` for lazypass,
``eager`` for the rest: the check is about dynamo's graph capture and guards) with the number of
recompiles it causes (from dynamo's ``recompiles`` log; when fullgraph fails on a graph break, again
with fullgraph=False); and ``torch.export.export`` of the model as the method leaves it, then a
sampling run of the 2 samples with the exported module compared with the method's eager run. At
batch 2 since a lazy graph at 4 samples or more also holds its row-compaction variants, which triple
the compile (``COMPILE_BATCH``).

Outputs under ``--out`` (default docs): ``peers.md`` (tables at about 50% and 70% of full compute,
interpolated along each method's curve and marked so, who wins, every setting, the correctness
checks), ``peers/fd_vs_macs.png``, ``peers/fd_vs_latency.png``, ``peers/results.json``. The last
line printed is the headline: lazypass's FD rank at each budget per model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import shlex
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import lazypass  # noqa: E402
from lazypass.checkpoint import read_gates  # noqa: E402
from digits_eval import (  # noqa: E402
    DIT_PATH, FLOW_LABELS_PATH, FLOW_WEIGHTS_PATH, classifier_outputs, diffusers_ddim, flow_cond,
    flow_scheduler, frechet_distance, gaussian_stats, load_classifier, load_diffusers_dit,
    load_digit_images, load_flow_dit, psnr,
)  # fmt: skip

BUDGETS = (0.5, 0.7)  # fractions of full compute the tables are read at
EVAL_SEED, FIT_SEED, CAL_SEED = 0, 10_000, 20_000  # noise of evaluation, fitting, calibration: never shared
# torch.compile / torch.export checks at batch 2: at 4 or more a lazy graph also holds its row-compaction
# variants (one per bucket size), which triple the lazydit compile of the flow model (373 s against 113 s);
# tests/passes/test_compact.py compiles those fullgraph
COMPILE_BATCH = 2
TOLERANCE = 0.01  # a setting within this (fraction of full compute) of a budget is read as measured

HOOKS = ("FirstBlockCache", "TaylorSeer", "MagCache", "PAB", "FasterCache", "SeaCache")
METHODS = ("fewer steps", "lazypass", "fixed copy", "fixed forecast", *HOOKS)  # as build_methods lists them

# Why a hook is left out on a model, or how it was adapted (one line each; shown in peers.md).
HOOK_NOTES = {
    "dit": {
        "SeaCache": "applied with the DDIM step mapped to the flow-matching sigma it expects "
                    "(sqrt(1-abar) / (sqrt(abar) + sqrt(1-abar))) and per-sample 8x8 latents as its `raw_vision`",
        "FasterCache": "its CFG cache needs a guided batch, so at CFG 1 it runs in `is_guidance_distilled` "
                       "mode: attention reuse with its extrapolation only",
        "TaylorSeer": "its default patterns (`^transformer_blocks.*attn`, fullmatch) hook nothing on DiT "
                      "(the modules are `attn1`): `cache_identifiers` set to every attention and MLP, "
                      "float32 factors; the sweep also varies the warm-up (`disable_cache_before_step`), "
                      "else interval 2 is its most expensive setting (56%)",
        "TextKVCache": "does not apply: DiT has no text stream to cache",
    },
    "flow": {
        "FirstBlockCache": "adapted: the last SD3 block is `context_pre_only` and returns no context stream, "
                           "which diffusers' FBC tail hook subtracts (TypeError); applied to blocks 0-2, block 3 "
                           "always computes",
        "SeaCache": "adapted: on the whole model it never skips (it records a residual only when the tail "
                    "block returns the context stream, and SD3's last block returns None); applied to "
                    "blocks 0-2 like FBC, with per-sample 8x8 latents as its `raw_vision`",
        "FasterCache": "its CFG cache needs a guided batch, so at CFG 1 it runs in `is_guidance_distilled` "
                       "mode: attention reuse with its extrapolation only",
        "TaylorSeer": "`cache_identifiers` set to every attention and MLP (the default hooks attention "
                      "only), float32 factors; the sweep also varies the warm-up (`disable_cache_before_step`, "
                      "default 3), since 3 of 8 steps is a large share",
        "TextKVCache": "does not apply: SD3's context stream is modulated by the timestep and rewritten by "
                       "every block, so its keys and values change at every step",
    },
}


# -- models ------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """One digits model and how its pipeline samples it."""

    name: str
    title: str
    steps: int  # full compute: the reference run and the step count of every caching method
    fewer: tuple[int, ...]  # the fewer-steps curve (steps < ``steps``)
    sweeps: dict[str, tuple]  # knob values per method (full mode)
    taylor_blocks: str  # regex (fullmatch) of the modules TaylorSeer caches
    shim_blocks: bool  # FBC / SeaCache on all blocks but the last (SD3)
    tail: tuple[str, ...] = ()  # methods a second process measures in a parallel run (``in_parallel``)
    transformer: Any = None
    label_embedding: Any = None

    def load(self):
        if self.name == "dit":
            self.transformer = load_diffusers_dit()
        else:
            self.transformer, self.label_embedding = load_flow_dit()
        return self.transformer

    def cond(self, labels: Tensor) -> dict:
        if self.name == "dit":
            return {"class_labels": labels}
        return {k: v.detach() for k, v in flow_cond(self.label_embedding, labels).items()}

    def scheduler(self):
        return diffusers_ddim() if self.name == "dit" else flow_scheduler()

    def sampler_name(self) -> str:
        return "DDIM (diffusers DDIMScheduler)" if self.name == "dit" else "Euler (FlowMatchEulerDiscreteScheduler)"

    def sigma(self, scheduler, i: int, t: Tensor) -> float:
        """The flow-matching sigma in [0, 1] of step ``i`` (SeaCache's cache context)."""
        if self.name == "flow":
            return float(scheduler.sigmas[i])
        a = float(scheduler.alphas_cumprod[int(t)])
        return math.sqrt(1 - a) / (math.sqrt(a) + math.sqrt(1 - a))

    def weight_files(self) -> list[Path]:
        return [DIT_PATH] if self.name == "dit" else [FLOW_WEIGHTS_PATH, FLOW_LABELS_PATH]

    def fingerprint(self, args) -> dict:
        """What the quality numbers depend on besides the gates: saved in results.json and compared
        by ``--quality-from`` (as JSON, so tuples read back as lists)."""
        return json.loads(json.dumps(dict(
            model=self.name, steps=self.steps, fewer=self.fewer, sweeps=self.sweeps, taylor_blocks=self.taylor_blocks,
            shim_blocks=self.shim_blocks, weights=file_hash(self.weight_files()), quick=bool(args.quick),
            samples=args.samples, eval_batch=args.eval_batch, seeds=[EVAL_SEED, FIT_SEED, CAL_SEED],
        )))  # fmt: skip


def specs() -> dict[str, Spec]:
    """The two models and their sweeps. Trimmed for the 20-minute budget (issue 13, item 5): each
    curve keeps the settings around 50% and 70% of full compute (from the 250-sample run of
    2026-12-01) and drops repeats of one compute share (MagCache and SeaCache past their floor,
    TaylorSeer's equal-cost pairs) and the far ends (PAB and FasterCache never reach 70%: their
    two ends only)."""
    return {
        "dit": Spec(
            "dit", "DiT digits (DiTTransformer2DModel, DDIM)", 20, (14, 12, 10, 8),
            sweeps=dict(lazypass=(0.25, 0.35, 0.5, 0.6), fixed=(0.3, 0.5),
                        FirstBlockCache=(0.05, 0.1, 0.2, 0.3), TaylorSeer=((2, 10), (2, 6), (2, 3), (3, 3)),
                        MagCache=(0.05, 0.12, 0.25), PAB=(2, 5), FasterCache=(2, 5),
                        SeaCache=(0.1, 0.25, 0.5)),
            taylor_blocks=r"transformer_blocks\.\d+\.(attn1|ff)", shim_blocks=False,
            tail=("SeaCache",),  # ~3 of DiT's ~17 minutes: after flow's ~11, both cores end together
        ),  # fmt: skip
        "flow": Spec(
            "flow", "flow-matching digits (SD3Transformer2DModel, Euler)", 8, (6, 5, 4, 3),
            sweeps=dict(lazypass=(0.25, 0.375, 0.5, 0.625), fixed=(0.25, 0.375, 0.5),
                        FirstBlockCache=(0.2, 0.4, 0.6), TaylorSeer=((2, 4), (2, 3), (3, 2)),
                        MagCache=(0.06, 0.12, 0.18), PAB=(2, 5), FasterCache=(2, 5),
                        SeaCache=(0.25, 0.5, 1.0)),
            taylor_blocks=r"transformer_blocks\.\d+\.(attn|ff|ff_context)", shim_blocks=True,
        ),  # fmt: skip
    }


# -- sampling ----------------------------------------------------------------------------------------------


class Clock:
    """The current timestep, for the hooks that ask for it by callback (PAB, FasterCache)."""

    t: float = 1000.0


def prediction(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


class Runner:
    """A model as one method leaves it: ``model`` is what the sampler calls."""

    kind = "plain"
    backend = "eager"  # torch.compile backend of the correctness check

    def __init__(self, module: torch.nn.Module, steps: int):
        self.module = module  # the nn.Module (hooks, lazypass state)
        self.model = module  # what is called (the module, or a compiled / exported stand-in)
        self.steps = steps

    def begin(self) -> None:
        pass

    def before_call(self, i: int, t: Tensor, sigma: float, steps: int) -> None:
        pass

    def end(self) -> None:
        pass


class LazyRunner(Runner):
    """A lazy model at a threshold, or on a fixed schedule of forced skips (``schedule[i]``)."""

    kind = "lazypass"
    backend = "lazydit"

    def __init__(self, module, steps, threshold: float | None = None, schedule: list[bool] | None = None):
        super().__init__(module, steps)
        self.threshold, self.schedule = threshold, schedule

    def begin(self) -> None:
        lazypass.reset(self.module)
        if self.threshold is not None:
            lazypass.set_threshold(self.module, self.threshold)

    def before_call(self, i, t, sigma, steps) -> None:
        if self.schedule is not None:
            lazypass.set_threshold(self.module, -0.5 if self.schedule[i] else 1.5)


class HookRunner(Runner):
    """A model with a diffusers cache hook: fresh hook state per run, a cache context per call."""

    kind = "hook"

    def __init__(self, module, steps, clock: Clock, registries: list, context: bool = True, extra=()):
        super().__init__(module, steps)
        self.clock, self.registries, self.context = clock, registries, context
        self.context_modules = [module, *extra]  # where the stateful hooks are (a Shim's root hook too)

    def begin(self) -> None:
        for registry in self.registries:
            registry.reset_stateful_hooks()

    def before_call(self, i, t, sigma, steps) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        self.clock.t = float(t)
        if self.context:
            ctx = CacheContext("cond", step_index=i, num_inference_steps=steps, timestep=t, sigma=sigma)
            for m in self.context_modules:
                _set_cache_context(m, ctx)

    def end(self) -> None:
        from diffusers.hooks.hooks import _set_cache_context

        if self.context:
            for m in self.context_modules:
                _set_cache_context(m, None)


@torch.no_grad()
def sample(runner: Runner, spec: Spec, noise: Tensor, labels: Tensor, steps: int | None = None) -> Tensor:
    """The pipeline's denoising loop: ``steps`` of ``spec.scheduler()``, CFG 1, one model call per step."""
    steps = steps or runner.steps
    sched = spec.scheduler()
    sched.set_timesteps(steps)
    cond = spec.cond(labels)
    x = noise * float(getattr(sched, "init_noise_sigma", 1.0))
    b = noise.shape[0]
    scale = getattr(sched, "scale_model_input", None)
    runner.begin()
    try:
        for i, t in enumerate(sched.timesteps):
            runner.before_call(i, t, spec.sigma(sched, i, t), steps)
            inp = x if scale is None else scale(x, t)
            out = prediction(runner.model(inp, timestep=t.expand(b), **cond))
            x = sched.step(out, t, x, return_dict=False)[0]
    finally:
        runner.end()
    return x


# -- counting MACs -----------------------------------------------------------------------------------------


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    *lead, s, d = q
    rows = math.prod(lead)
    return 2 * rows * s * k[-2] * d + 2 * rows * s * k[-2] * v[-1]


class flop_counter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the FLOPs of the matmuls, linears, convolutions and attention that run, with torch's
    own formulas (``torch.utils.flop_counter``), plus CPU SDPA (torch 2.13 registers only the GPU
    kernels). Not ``FlopCounterMode`` itself: its module tracker registers global module hooks,
    and a lazy model with hooks on its modules runs its original forward instead of the lazy one.
    """

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry, shape_wrapper

        self.registry = {**flop_registry, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_sdpa_flops)}
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self) -> int:
        return self.flops


# -- methods -----------------------------------------------------------------------------------------------


@dataclass
class Setting:
    method: str
    knob: str  # what was set, e.g. "threshold 0.73"
    value: float
    make: Callable[[], Runner]
    steps: int


@dataclass
class Method:
    name: str
    knob: str
    settings: list[Setting]
    note: str = ""


def fixed_skips(steps: int, ratio: float) -> list[bool]:
    """Steps at which every branch is reused: evenly spread, never step 0.

    Example:
        >>> [i for i, s in enumerate(fixed_skips(10, 0.3)) if s]
        [3, 6, 9]
    """
    return [math.floor((i + 1) * ratio + 1e-9) > math.floor(i * ratio + 1e-9) for i in range(steps)]


def _quiet_diffusers():
    import diffusers

    diffusers.utils.logging.set_verbosity_error()


class Shim(torch.nn.Module):
    """Holds a subset of a model's blocks under ``transformer_blocks`` so a hook that walks a
    module's block list (FBC, SeaCache) sees only those; the blocks stay the model's own."""

    def __init__(self, blocks):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(blocks)


def hook_methods(spec: Spec, base: torch.nn.Module, clock: Clock, quick: bool, cal: tuple,
                 ratios: list[float] | None = None) -> tuple[list[Method], list[float]]:
    """Each diffusers cache hook that applies to ``spec``, over its knob, and MagCache's ratios
    (calibrated here unless given)."""
    from diffusers.hooks import (
        FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
        SeaCacheConfig, TaylorSeerCacheConfig, apply_faster_cache, apply_first_block_cache, apply_mag_cache,
        apply_pyramid_attention_broadcast, apply_sea_cache, apply_taylorseer_cache,
    )  # fmt: skip
    from diffusers.hooks.hooks import HookRegistry

    _quiet_diffusers()
    T = spec.steps

    def pick(values):
        return (values[len(values) // 2],) if quick else values

    def registry(m):
        return HookRegistry.check_if_exists_or_initialize(m)

    def vision(module, args, kwargs):  # SeaCache's raw latents: (C, T, H, W) per sample
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return [row.unsqueeze(1) for row in x]

    def blocks_of(m):
        return Shim(list(m.transformer_blocks)[:-1]) if spec.shim_blocks else m

    def fbc(th):
        m = copy.deepcopy(base)
        target = blocks_of(m)
        apply_first_block_cache(target, FirstBlockCacheConfig(threshold=th))
        return HookRunner(m, T, clock, [registry(m)])

    def taylor(knob):
        n, warmup = knob
        m = copy.deepcopy(base)
        cfg = TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=warmup,
                                    taylor_factors_dtype=torch.float32, cache_identifiers=[spec.taylor_blocks])
        apply_taylorseer_cache(m, cfg)
        return HookRunner(m, T, clock, [registry(m)])

    ratios = list(ratios) if ratios is not None else mag_ratios(spec, base, clock, cal)

    def mag(th):
        m = copy.deepcopy(base)
        apply_mag_cache(m, MagCacheConfig(threshold=th, num_inference_steps=T, mag_ratios=list(ratios)))
        return HookRunner(m, T, clock, [registry(m)])

    def pab(n):
        m = copy.deepcopy(base)
        apply_pyramid_attention_broadcast(m, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=n, current_timestep_callback=lambda: clock.t))
        return HookRunner(m, T, clock, [registry(m)], context=False)

    def faster(n):
        m = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_faster_cache(m, FasterCacheConfig(spatial_attention_block_skip_range=n, is_guidance_distilled=True,
                                                    current_timestep_callback=lambda: clock.t))
        return HookRunner(m, T, clock, [registry(m)], context=False)

    def sea(th):
        m = copy.deepcopy(base)
        cfg = SeaCacheConfig(threshold=th, raw_vision_callback=vision)
        if not spec.shim_blocks:
            apply_sea_cache(m, cfg)
            return HookRunner(m, T, clock, [registry(m)])
        shim = Shim(list(m.transformer_blocks)[:-1])
        apply_sea_cache(shim, cfg)
        root = registry(shim).get_hook("sea_cache_root")  # runs at every model call, as on the model itself
        m.register_forward_pre_hook(lambda mod, a, kw: root.pre_forward(mod, *a, **kw), with_kwargs=True)
        m.register_forward_hook(lambda mod, a, out: root.post_forward(mod, out))
        return HookRunner(m, T, clock, [registry(m), registry(shim)], extra=[shim])

    notes = HOOK_NOTES[spec.name]
    table = [
        ("FirstBlockCache", "threshold", fbc, "threshold {:g}"),
        ("TaylorSeer", "cache_interval, disable_cache_before_step", taylor, "interval {0[0]}, warm-up {0[1]}"),
        ("MagCache", "threshold", mag, "threshold {:g}"),
        ("PAB", "spatial_attention_block_skip_range", pab, "skip range {:g}"),
        ("FasterCache", "spatial_attention_block_skip_range", faster, "skip range {:g}"),
        ("SeaCache", "threshold", sea, "threshold {:g}"),
    ]
    methods = []
    for name, knob, make, label in table:
        settings = [Setting(name, label.format(v), float(v[0] if isinstance(v, tuple) else v),
                            (lambda make=make, v=v: make(v)), T)
                    for v in pick(spec.sweeps[name])]  # fmt: skip
        methods.append(Method(name, knob, settings, notes.get(name, "")))
    return methods, ratios


def mag_ratios(spec: Spec, base, clock: Clock, cal: tuple) -> list[float]:
    """MagCache's magnitude ratios for this model and step count, from its own calibration mode on the
    calibration noise (printed by the hook; parsed here)."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache
    from diffusers.hooks.hooks import HookRegistry

    m = copy.deepcopy(base)
    apply_mag_cache(m, MagCacheConfig(calibrate=True, num_inference_steps=spec.steps))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        sample(HookRunner(m, spec.steps, clock, [HookRegistry.check_if_exists_or_initialize(m)]), spec, *cal)
    lists = re.findall(r"\[([^\[\]]+)\]", buf.getvalue())
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios: {buf.getvalue()[:200]!r}")
    ratios = [float(v) for v in lists[-1].split(",")]
    if len(ratios) != spec.steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {spec.steps} steps")
    return ratios


def file_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v)) for k, v in d.items()}


def gate_file(spec: Spec, directory: Path, fit_options: dict, fit_batch: int) -> tuple[Path, dict]:
    """Where gates fitted under exactly these options live: the name holds a hash of the model's
    weights, the pass's options (``LazyConfig`` defaults), every ``FitConfig`` field, the scheduler's
    config, the batch and seed, so a change of the library's defaults refits instead of loading."""
    sched = spec.scheduler()
    fit_config = dataclasses.asdict(lazypass.FitConfig(**fit_options))
    fit_config.pop("scheduler")
    fields = dict(
        model=spec.name, weights=file_hash(spec.weight_files()), conversion="to_diffusers_dit/1",
        lazy=_jsonable(lazypass.LazyConfig().to_dict()), fit=_jsonable(fit_config),
        scheduler=[type(sched).__name__, _jsonable({k: v for k, v in sched.config.items() if not k.startswith("_")})],
        batch=fit_batch, seed=FIT_SEED,
        lazypass=lazypass.__version__,
    )  # fmt: skip
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=repr).encode()).hexdigest()[:12]
    target = fit_options["target_ratio"]
    return directory / f"{spec.name}_{round(target * 100)}pct_{spec.steps}steps_{key}.safetensors", fields


def fit_or_load(spec: Spec, base, args, log) -> tuple[torch.nn.Module, dict]:
    """A lazy copy of ``base`` with the library's defaults and gates fitted by ``lazypass.fit``, loaded
    from the gate cache when a file fitted under exactly these options exists. ``--quick`` uses the
    full fit when it is cached, else fits for a few steps into the scratch dir."""
    options = dict(target_ratio=0.5, num_inference_steps=spec.steps, progress=False)
    if args.fit_steps is not None:
        options["steps"] = args.fit_steps
    path, fields = gate_file(spec, args.gates_dir, options, args.fit_batch)
    candidates = [(path, fields, options)]
    if args.quick:
        quick = dict(options, steps=args.fit_steps or 5)
        candidates.append((*gate_file(spec, args.scratch, quick, 8), quick))
    lazy = lazypass.apply(copy.deepcopy(base))
    for path, fields, options in candidates:
        if path.exists():
            lazypass.load_gates(lazy, path)
            side = path.with_suffix(".json")
            info = json.loads(side.read_text()) if side.exists() else {}
            log(f"  gates: loaded {_rel(path)}")
            # the calibrated threshold: load_gates sets it at the first trace, so read it from the file
            threshold = read_gates(path).threshold
            return lazy, {**info, "threshold": threshold, "path": str(path), "cached": True, "sha256": _sha(path)}
    path, fields, options = candidates[-1]
    if getattr(args, "quality_from", None) is not None:
        raise SystemExit(f"--quality-from: no gate file {_rel(candidates[0][0])}: the fit options or the library's "
                         f"defaults changed since the earlier run (its gates were fitted under others); run the "
                         f"whole benchmark again (without --quality-from)")  # fmt: skip
    batch = fields["batch"]

    def sample_fn(i: int) -> dict:
        g = torch.Generator().manual_seed(FIT_SEED + i)
        noise = torch.randn(batch, 1, 8, 8, generator=g)
        return {"noise": noise, "cond": spec.cond(torch.randint(0, 10, (batch,), generator=g))}

    log(f"  gates: fitting {_rel(path)} ...")
    start, cpu = time.perf_counter(), time.process_time()
    result = lazypass.fit(lazy, sample_fn, scheduler=spec.scheduler(), **options)
    info = dict(key_fields=fields, threshold=result.threshold, lazy_ratio=result.lazy_ratio,
                lazy_ratio_before_calibration=result.lazy_ratio_before_calibration,
                fit_seconds=round(time.perf_counter() - start, 1), fit_cpu_seconds=round(time.process_time() - cpu, 1),
                load_avg=round(os.getloadavg()[0], 1), threads=torch.get_num_threads())  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    lazypass.save_gates(lazy, path)
    path.with_suffix(".json").write_text(json.dumps(info, indent=1, default=repr) + "\n")
    log(f"  gates: fitted in {info['fit_seconds']} s, threshold {result.threshold:.4g}, lazy {result.lazy_ratio}")
    return lazy, {**info, "path": str(path), "cached": False, "sha256": _sha(path)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def sweep_thresholds(spec: Spec, lazy, targets, cal: tuple, fitted: float) -> list[tuple[float, float]]:
    """Thresholds for the wanted lazy ratios, picked on the calibration noise: quantiles of the gate
    scores of a run at the fitted threshold, then one correction from the measured ratio."""
    runner = LazyRunner(lazy, spec.steps, threshold=fitted)

    def ratio_at(th: float) -> tuple[float, np.ndarray]:
        runner.threshold = th
        sample(runner, spec, *cal)
        st = lazypass.stats(lazy)
        return st.lazy_ratio, st.scores

    base_ratio, scores = ratio_at(fitted)
    pool = np.sort(scores[1:].ravel())  # calls after the first (the first never skips)
    out = []
    for r in targets:
        if abs(r - 0.5) < 1e-9:  # the fitted threshold is calibrated to 0.5
            out.append((fitted, base_ratio))
            continue
        q = float(np.clip(1 - r, 0.0, 1.0))
        th = float(np.quantile(pool, q))
        got, _ = ratio_at(th)
        if abs(got - r) > 0.04:
            q = float(np.clip(q + (got - r), 0.0, 1.0))
            th = float(np.quantile(pool, q))
            got, _ = ratio_at(th)
        out.append((float(np.clip(th, -1.0, 2.0)), got))
    return out


def build_methods(spec: Spec, base, args, clock: Clock, cal: tuple, log,
                  saved: dict | None = None) -> tuple[list[Method], dict, dict]:
    """Every method's settings, the gate info and the calibration (lazypass thresholds, MagCache
    ratios). With ``saved`` (an earlier run's results), its calibration is used instead of redone."""
    T = spec.steps
    sweeps = spec.sweeps

    def pick(values):
        return (values[len(values) // 2],) if args.quick else values

    methods = []
    steps = (T,) + (spec.fewer[len(spec.fewer) // 2 :][:1] if args.quick else spec.fewer)
    methods.append(Method("fewer steps", "num_inference_steps", [
        Setting("fewer steps", f"{n} steps", float(n), (lambda n=n: Runner(base, n)), n) for n in steps]))

    lazy, gate_info = fit_or_load(spec, base, args, log)
    fitted = gate_info["threshold"]  # calibrated to target_ratio by fit
    targets = pick(sweeps["lazypass"])
    if saved is None:
        chosen = sweep_thresholds(spec, lazy, targets, cal, fitted)
    else:
        chosen = [(d["threshold"], d["calibration_ratio"]) for d in saved["gates"]["thresholds"]]
    gate_info["thresholds"] = [dict(target=r, threshold=th, calibration_ratio=got) for r, (th, got) in zip(targets, chosen)]
    log("  thresholds: " + ", ".join(f"{r:g} -> {th:.4g} ({got:.2f})" for r, (th, got) in zip(targets, chosen)))
    methods.append(Method("lazypass", "threshold", [
        Setting("lazypass", f"threshold {th:.4g} (cal. lazy {got:.2f})", th,
                (lambda th=th: LazyRunner(lazy, T, threshold=th)), T) for th, got in chosen]))

    for reuse in ("copy", "forecast"):
        model = lazypass.apply(copy.deepcopy(base), reuse=reuse, max_age=None)
        name = f"fixed {reuse}"
        methods.append(Method(name, "share of steps reused", [
            Setting(name, f"{sum(fixed_skips(T, r))}/{T} steps reused", r,
                    (lambda r=r, model=model: LazyRunner(model, T, schedule=fixed_skips(T, r))), T)
            for r in pick(sweeps["fixed"])]))  # fmt: skip
    hooks, ratios = hook_methods(spec, base, clock, args.quick, cal, saved and saved["calibration"]["mag_ratios"])
    return methods + hooks, gate_info, dict(mag_ratios=ratios)


# -- measuring ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    method: str
    knob: str
    value: float
    steps: int
    macs: float = 0.0  # per image, as the image runs on its own (lazypass: its per-sample decisions)
    batch_macs: float = 0.0  # per image at the evaluation batch (what the batch really ran)
    fraction: float = 0.0  # macs / full compute
    lazy_ratio: float | None = None
    fd: float = 0.0
    fd_full: float = 0.0  # FD to the full-compute samples
    psnr: float = 0.0
    finite: bool = True
    seconds: float = 0.0
    latency_b1: float | None = None  # ms per image
    latency_b8: float | None = None
    runner: Any = field(default=None, repr=False)
    images: Any = field(default=None, repr=False)

    def record(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("runner", "images")}


class Evaluator:
    def __init__(self, spec: Spec, classifier, real_stats, noise: Tensor, labels: Tensor, eval_batch: int):
        self.spec, self.classifier, self.real_stats = spec, classifier, real_stats
        self.noise, self.labels, self.eval_batch = noise, labels, eval_batch
        self.full: Tensor | None = None
        self.full_stats = None
        self.full_macs = 0.0

    def images(self, runner: Runner, steps: int) -> tuple[Tensor, float, Any]:
        """Images of every sample, executed MACs per image, and lazypass stats per chunk."""
        outs, flops, stats = [], 0, []
        for chunk in range(0, len(self.noise), self.eval_batch):
            sl = slice(chunk, chunk + self.eval_batch)
            if runner.kind == "lazypass":  # trace this batch size outside the counter (torch.export)
                sample(runner, self.spec, self.noise[sl], self.labels[sl], 1)
            with flop_counter() as fc:
                outs.append(sample(runner, self.spec, self.noise[sl], self.labels[sl], steps))
            flops += fc.get_total_flops()
            if runner.kind == "lazypass":
                stats.append(lazypass.stats(runner.module))
        return torch.cat(outs), flops / 2 / len(self.noise), stats

    def measure(self, setting: Setting) -> Row:
        start = time.perf_counter()
        runner = setting.make()
        images, batch_macs, stats = self.images(runner, setting.steps)
        row = Row(self.spec.name, setting.method, setting.knob, setting.value, setting.steps, runner=runner)
        row.batch_macs = row.macs = batch_macs
        if stats:
            per_image_saved, decisions = [], []
            for st in stats:
                rows = st.skipped.shape[2]
                site_macs = np.array([s.macs for s in st.sites], dtype=np.float64) / rows
                per_image_saved.append((st.skipped * site_macs[None, :, None]).sum((0, 1)))  # (rows,)
                decisions.append(st.skipped.mean())
            row.macs = self.per_call_full_macs() * setting.steps - float(np.concatenate(per_image_saved).mean())
            row.lazy_ratio = float(np.mean(decisions))
        row.finite = bool(torch.isfinite(images).all())
        feats = classifier_outputs(self.classifier, images)[0]
        stats_m = gaussian_stats(feats)
        row.fd = frechet_distance(stats_m, self.real_stats)
        if self.full is None:  # the first setting measured is full compute
            self.full, self.full_stats, self.full_macs = images, stats_m, row.macs
        row.fd_full = max(0.0, frechet_distance(stats_m, self.full_stats))
        row.psnr = math.inf if torch.equal(images, self.full) else psnr(images, self.full)
        row.fraction = row.macs / self.full_macs
        row.seconds = time.perf_counter() - start
        row.images = images[:8]
        return row

    def per_call_full_macs(self) -> float:
        return self.full_macs / self.spec.steps


def latency(rows: list[Row], spec: Spec, noise: Tensor, labels: Tensor, images: int, repeats: int) -> None:
    """Eager ms per image at batch 1 (``images`` samples one at a time) and batch 8, medians over
    ``repeats`` rounds that go through every setting in turn (load changes hit all alike)."""
    b1 = {id(r): [] for r in rows}
    b8 = {id(r): [] for r in rows}
    for r in rows:  # lazypass traces each new batch size once: not in the timings
        if r.runner.kind == "lazypass":
            sample(r.runner, spec, noise[:1], labels[:1], 1)
            sample(r.runner, spec, noise[:8], labels[:8], 1)
    for _ in range(repeats):
        for r in rows:
            for k in range(images):
                t0 = time.perf_counter()
                sample(r.runner, spec, noise[k : k + 1], labels[k : k + 1], r.steps)
                b1[id(r)].append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            sample(r.runner, spec, noise[:8], labels[:8], r.steps)
            b8[id(r)].append(1000 * (time.perf_counter() - t0) / 8)
    for r in rows:
        r.latency_b1, r.latency_b8 = float(np.median(b1[id(r)])), float(np.median(b8[id(r)]))


# -- correctness -------------------------------------------------------------------------------------------


class RecompileLog(logging.Handler):
    """Counts dynamo's "Recompiling function" records while enabled."""

    NAME = "torch._dynamo.guards.__recompiles"

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record) -> None:
        if "Recompiling" in record.getMessage():
            self.count += 1

    def __enter__(self):
        torch._logging.set_logs(recompiles=True)
        self.logger = logging.getLogger(self.NAME)
        self.propagate = self.logger.propagate
        self.logger.propagate = False  # counted here, not printed
        self.logger.addHandler(self)
        self.quiet = logging.getLogger("torch._dynamo")
        self.level = self.quiet.level
        self.quiet.setLevel(logging.ERROR)  # the "recompile limit hit" warning is in the count
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.propagate = self.propagate
        self.quiet.setLevel(self.level)
        torch._logging.set_logs()
        return False


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return text[:160]


def compile_check(row: Row, spec: Spec, noise, labels, eager: Tensor, backend: str | None) -> dict:
    import torch._dynamo

    runner = row.runner
    backend = backend or runner.backend
    out = dict(backend=backend)
    from torch._dynamo.utils import counters

    for fullgraph in (True, False):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(runner.module, backend=backend, fullgraph=fullgraph, dynamic=False)
        runner.model = compiled
        start = time.perf_counter()
        try:
            with RecompileLog() as rc, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                images = sample(runner, spec, noise, labels, row.steps)
            ok, err = True, ""
        except Exception as e:  # noqa: BLE001 - the check records whatever fails
            ok, err, images = False, _short(e), None
        finally:
            runner.model = runner.module
        key = "fullgraph" if fullgraph else "graphs"
        out[key] = dict(ok=ok, error=err, recompiles=rc.count, seconds=round(time.perf_counter() - start, 1),
                        graph_breaks=int(sum(counters["graph_break"].values())),
                        diff=float((images - eager).abs().max()) if ok else None)  # fmt: skip
        if ok or "recompile" in err.lower():
            break  # fullgraph works, or it failed only because every call recompiles
    torch._dynamo.reset()
    return out


def export_check(row: Row, spec: Spec, noise, labels, eager: Tensor, full_images: Tensor) -> dict:
    """``torch.export.export`` of the model as the method leaves it (state fresh, first call's
    inputs), then a whole sampling run with the exported module in its place."""
    runner = row.runner
    sched = spec.scheduler()
    sched.set_timesteps(row.steps)
    t0 = sched.timesteps[0]
    x = noise * float(getattr(sched, "init_noise_sigma", 1.0))
    kwargs = dict(timestep=t0.expand(noise.shape[0]), **spec.cond(labels))
    start = time.perf_counter()
    runner.begin()
    runner.before_call(0, t0, spec.sigma(sched, 0, t0), row.steps)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(runner.module, (x,), kwargs)
    except Exception as e:  # noqa: BLE001
        return dict(ok=False, error=_short(e), seconds=round(time.perf_counter() - start, 1))
    finally:
        runner.end()
    exported = ep.module()
    runner.model = exported
    try:
        images = sample(runner, spec, noise, labels, row.steps)
        diff = float((images - eager).abs().max())
        full = float((images - full_images).abs().max())
        return dict(ok=True, error="", diff=diff, diff_full=full, seconds=round(time.perf_counter() - start, 1))
    except Exception as e:  # noqa: BLE001
        return dict(ok=True, error="exported module fails in the sampling loop: " + _short(e),
                    seconds=round(time.perf_counter() - start, 1))
    finally:
        runner.model = runner.module


def correctness(rows: list[Row], full: Row, spec: Spec, noise: Tensor, labels: Tensor, args, log) -> list[dict]:
    """Per method, at its setting closest to 50% of full compute (``full``: the full-compute row)."""
    noise8, labels8 = noise[:8], labels[:8]
    small = slice(0, COMPILE_BATCH)
    full_small = sample(full.runner, spec, noise[small], labels[small], spec.steps) if args.compile else None
    out = []
    for method in dict.fromkeys(r.method for r in rows):
        candidates = [r for r in rows if r.method == method]
        row = min(candidates, key=lambda r: abs(r.fraction - 0.5))
        res = dict(model=spec.name, method=method, setting=row.knob, fraction=row.fraction)
        start = time.perf_counter()
        batch = sample(row.runner, spec, noise8, labels8, row.steps)
        ones = torch.cat([sample(row.runner, spec, noise8[k : k + 1], labels8[k : k + 1], row.steps) for k in range(8)])
        res["batch_vs_one"] = float((batch - ones).abs().max())
        if not args.compile:
            res["compile"] = res["export"] = None
        else:
            backend = None if row.runner.kind == "lazypass" and method == "lazypass" else "eager"
            eager = sample(row.runner, spec, noise[small], labels[small], row.steps)
            res["compile"] = compile_check(row, spec, noise[small], labels[small], eager, backend)
            res["export"] = export_check(row, spec, noise[small], labels[small], eager, full_small)
        res["seconds"] = round(time.perf_counter() - start, 1)
        log(f"  {method:16s} batch vs one {res['batch_vs_one']:.2g}  compile {_compile_text(res['compile'])}  "
            f"export {_export_text(res['export'])}  ({res['seconds']} s)")  # fmt: skip
        out.append(res)
    return out


def _compile_text(c: dict | None) -> str:
    if c is None:
        return "not run"
    f = c["fullgraph"]
    if f["ok"]:
        every = " (one per call: the hook's Python state is guarded)" if f["recompiles"] >= 2 else ""
        return f"fullgraph works ({c['backend']}), {f['recompiles']} recompiles{every}, diff {f['diff']:.1e}"
    text = f"fullgraph fails ({c['backend']}): {f['error']}"
    if "recompile" in f["error"].lower():
        text += f" after {f['recompiles']} recompiles (one per call: the hook's Python state is guarded)"
    g = c.get("graphs")
    if g is not None:
        if g["ok"]:
            text += (f"; fullgraph=False: {g['graph_breaks']} graph breaks, {g['recompiles']} recompiles, "
                     f"diff {g['diff']:.1e}")  # fmt: skip
        else:
            text += f"; fullgraph=False also fails: {g['error']}"
    return text


def _export_text(e: dict | None) -> str:
    if e is None:
        return "not run"
    if not e["ok"]:
        return f"fails: {e['error']}"
    if e["error"]:
        return f"exports; {e['error']}"
    if e["diff"] <= 1e-4:
        return f"exports and reproduces the run (diff {e['diff']:.1e})"
    frozen = " = full compute: the decisions are frozen at export time" if e["diff_full"] <= 1e-4 else ""
    return f"exports, but the exported run differs from the method's (diff {e['diff']:.2g}{frozen})"


# -- budgets, tables, plots ---------------------------------------------------------------------------------


def at_budget(rows: list[Row], budget: float) -> dict | None:
    """A method's FD, PSNR and latency at ``budget`` (fraction of full compute): a setting within
    ``TOLERANCE``, else linear interpolation between the two settings around it; None if its curve
    does not reach the budget."""
    pts = sorted(rows, key=lambda r: r.fraction)
    keys = ("fd", "fd_full", "psnr", "latency_b1", "latency_b8", "fraction")
    near = min(pts, key=lambda r: abs(r.fraction - budget))
    if abs(near.fraction - budget) <= TOLERANCE:
        return dict({k: getattr(near, k) for k in keys}, how="measured", source=near.knob)
    for a, b in zip(pts, pts[1:]):
        if a.fraction <= budget <= b.fraction and b.fraction > a.fraction:
            w = (budget - a.fraction) / (b.fraction - a.fraction)

            def lerp(k):
                va, vb = getattr(a, k), getattr(b, k)
                if va is None or vb is None:
                    return None
                if math.isinf(va) or math.isinf(vb):
                    return math.inf
                return va + w * (vb - va)

            return dict({k: lerp(k) for k in keys}, how="interpolated", source=f"{a.knob} .. {b.knob}")
    return None


def budget_tables(rows: list[Row]) -> dict:
    """{budget: {method: value dict or None}}, ranks by FD among the methods that reach it."""
    methods = list(dict.fromkeys(r.method for r in rows))
    out = {}
    for budget in BUDGETS:
        vals = {m: at_budget([r for r in rows if r.method == m], budget) for m in methods}
        ranked = sorted((m for m in methods if vals[m] is not None), key=lambda m: vals[m]["fd"])
        for i, m in enumerate(ranked):
            vals[m]["rank"] = i + 1
        out[budget] = dict(values=vals, ranked=ranked)
    return out


def _f(v, fmt="{:.2f}") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return fmt.format(v)


def who_wins(tables: dict) -> list[str]:
    lines = []
    for budget, t in tables.items():
        vals, ranked = t["values"], t["ranked"]
        pct = f"{budget:.0%}"
        if not ranked:
            lines.append(f"- {pct}: no method reaches this budget.")
            continue
        best = ranked[0]
        lp = vals.get("lazypass")
        if lp is None:
            lines.append(f"- {pct}: **{best}** has the lowest FD ({vals[best]['fd']:.2f}); lazypass's curve does "
                         f"not reach this budget.")  # fmt: skip
            continue
        rank = lp["rank"]
        if best == "lazypass":
            second = ranked[1] if len(ranked) > 1 else None
            margin = f", {vals[second]['fd'] - lp['fd']:.2f} FD ahead of {second} ({vals[second]['fd']:.2f})" if second else ""
            lines.append(f"- {pct}: **lazypass wins** with FD {lp['fd']:.2f}{margin}.")
        else:
            better = ", ".join(f"{m} {vals[m]['fd']:.2f}" for m in ranked[: rank - 1])
            lines.append(f"- {pct}: **{best} wins** with FD {vals[best]['fd']:.2f}; lazypass is {rank} of "
                         f"{len(ranked)} with FD {lp['fd']:.2f} ({lp['fd'] - vals[best]['fd']:+.2f} against the "
                         f"best); ahead of it: {better}.")  # fmt: skip
    return lines


def headline(all_tables: dict) -> str:
    parts = []
    for name, tables in all_tables.items():
        ranks = []
        for budget, t in tables.items():
            lp = t["values"].get("lazypass")
            ranks.append(f"{budget:.0%} {lp['rank']}/{len(t['ranked'])}" if lp else f"{budget:.0%} n/a")
        parts.append(f"{name} " + ", ".join(ranks))
    return "headline: lazypass FD rank (1 = best, of the methods reaching the budget): " + "; ".join(parts)


def markdown(results: dict, meta: dict) -> str:
    from tabulate import tabulate

    lines = [
        "# lazypass and its peers on the digits models",
        "",
        "Generated by `benchmarks/peers.py` (issue 13); the method, the counting rules and the decisions are in",
        "its docstring. Command:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"Conditions: {meta['conditions']}",
        "",
    ]
    if meta["note"]:
        lines += [f"**Note:** {meta['note']}", ""]
    lines += [
        "Reading the tables: *budget* is executed MACs per image as a share of full compute. Each",
        "method's FD, PSNR and latency there come from its own curve: a setting within 1 point of the",
        "budget (*measured*), or linear interpolation between the two settings around it (*interp.*,",
        "with the settings named). A method whose sweep does not reach the budget has no row. FD is",
        "to the 1,797 real digits (lower is better; three 1,000-image subsets of the real digits score",
        "0.9-1.7 against the whole set, about the noise of one FD); *FD vs full* is to the full-compute",
        "samples; PSNR is against the full-compute samples from the same noise. Latency is eager, per",
        "image, at batch 1 and batch 8.",
        "",
    ]
    for name, res in results.items():
        spec_title, full = res["title"], res["full"]
        lines += [f"## {spec_title}", ""]
        if res.get("stages"):
            lines += ["Wall time of this model's part: " + ", ".join(f"{k} {v:.0f} s" for k, v in res["stages"].items())
                      + ".", ""]
        lines += [f"{res['samples']} samples, CFG 1, {res['steps']} steps of {res['sampler']}; full compute: "
                  f"FD {full['fd']:.2f}, {full['macs'] / 1e6:.1f} M MACs per image, "
                  f"{_f(full['latency_b1'], '{:.1f}')} ms per image at batch 1, "
                  f"{_f(full['latency_b8'], '{:.1f}')} at batch 8.", ""]  # fmt: skip
        for budget, t in res["tables"].items():
            lines += [f"### About {budget:.0%} of full compute", ""]
            body = []
            for m in t["ranked"]:
                v = t["values"][m]
                how = "measured" if v["how"] == "measured" else "interp."
                body.append([v["rank"], f"**{m}**" if m == "lazypass" else m, f"{v['fd']:.2f}", _f(v["fd_full"]),
                             _f(v["psnr"]), _f(v["latency_b1"], "{:.1f}"), _f(v["latency_b8"], "{:.2f}"),
                             f"{how}: {v['source']}"])  # fmt: skip
            missing = [m for m, v in t["values"].items() if v is None]
            lines.append(tabulate(body, headers=["rank", "method", "FD", "FD vs full", "PSNR dB", "ms/img b=1",
                                                 "ms/img b=8", "from"], tablefmt="github"))  # fmt: skip
            if missing:
                reach = []
                for m in missing:
                    fr = [r["fraction"] for r in res["rows"] if r["method"] == m]
                    reach.append(f"{m} ({min(fr):.0%}-{max(fr):.0%})")
                lines += ["", "Not reaching this budget (their range of compute): " + ", ".join(reach) + "."]
            lines.append("")
        lines += ["### Who wins", ""] + res["who_wins"] + [""]
        lines += ["### Every setting", ""]
        body = []
        for r in res["rows"]:
            body.append([r["method"], r["knob"], f"{r['fraction']:.1%}", f"{r['macs'] / 1e6:.1f}",
                         f"{r['batch_macs'] / 1e6:.1f}", _f(r["lazy_ratio"], "{:.1%}"), f"{r['fd']:.2f}",
                         _f(r["fd_full"]), _f(r["psnr"]), _f(r["latency_b1"], "{:.1f}"),
                         _f(r["latency_b8"], "{:.2f}"), "yes" if r["finite"] else "**no**"])  # fmt: skip
        lines.append(tabulate(body, headers=["method", "setting", "compute", "M MACs/img", "batch M MACs/img",
                                             "lazy", "FD", "FD vs full", "PSNR dB", "ms/img b=1", "ms/img b=8",
                                             "finite"], tablefmt="github"))  # fmt: skip
        lines += ["", "*compute*: executed MACs per image / full compute. *batch M MACs/img*: what the "
                  f"evaluation batch of {res['eval_batch']} ran, per image (lazypass runs a branch there on the "
                  "rows that compute, padded up to a bucket size).", ""]  # fmt: skip
        lines += ["### Hooks on this model", ""]
        lines += [f"- **{k}**: {v}" for k, v in HOOK_NOTES[name].items()]
        plain = [m for m in HOOKS if m not in HOOK_NOTES[name]]
        lines += [f"- {', '.join(plain)}: apply as documented, with their defaults except the knob swept.", ""]
        gi = res["gates"]
        lines += ["### lazypass gates", "",
                  f"`lazypass.fit` with the library defaults, `target_ratio=0.5`, `num_inference_steps={res['steps']}`, "
                  f"its scheduler, batches of {meta['fit_batch']} from seeds {FIT_SEED}+ (never the evaluation noise); "
                  f"file `{Path(gi.get('path', '?')).name}` ({'cached' if gi.get('cached') else 'fitted in this run'}"
                  + (f", fitted in {gi['fit_seconds']} s" if gi.get("fit_seconds") is not None else "") + "). "
                  "Thresholds of the sweep, picked on calibration noise (seeds "
                  f"{CAL_SEED}+): " + ", ".join(f"{d['target']:g} -> {d['threshold']:.4g}" for d in gi.get("thresholds", []))
                  + ".", ""]  # fmt: skip
        if res["correctness"]:
            lines += ["### Correctness", "",
                      "At each method's setting closest to 50% of full compute. *batch vs one*: max abs difference "
                      "between the batch of the first 8 samples and 8 runs of one. torch.compile and torch.export: "
                      f"one sampling run of the first {COMPILE_BATCH} samples, against the method's eager run.", ""]  # fmt: skip
            body = [[c["method"], c["setting"], f"{c['batch_vs_one']:.1e}", _compile_text(c["compile"]),
                     _export_text(c["export"])] for c in res["correctness"]]  # fmt: skip
            lines.append(tabulate(body, headers=["method", "setting", "batch vs one", "torch.compile", "torch.export"],
                                  tablefmt="github"))  # fmt: skip
            if any(c.get("checks_from") for c in res["correctness"]):
                lines += ["", "The torch.compile and torch.export columns are from the run that measured FD / PSNR / "
                          "MACs (`--quality-from` with `--no-compile`); *batch vs one* was measured again."]
            lines.append("")
    lines += ["## Headline", "", "```", meta["headline"], "```", ""]
    return "\n".join(lines)


STYLE = {
    "fewer steps": ("black", "o", "-"), "lazypass": ("tab:red", "D", "-"), "fixed copy": ("tab:orange", "v", "--"),
    "fixed forecast": ("tab:brown", "^", "--"), "FirstBlockCache": ("tab:blue", "s", ":"),
    "TaylorSeer": ("tab:green", "P", ":"), "MagCache": ("tab:purple", "X", ":"), "PAB": ("tab:gray", "<", ":"),
    "FasterCache": ("tab:olive", ">", ":"), "SeaCache": ("tab:cyan", "*", ":"),
}  # fmt: skip


def _curves(ax, res: dict, key: str, scale: float = 1.0) -> None:
    """FD against ``key`` of every row, a curve per method, on ``ax``."""
    for method in dict.fromkeys(r["method"] for r in res["rows"]):
        pts = sorted((r for r in res["rows"] if r["method"] == method and r[key] is not None), key=lambda r: r[key])
        if pts:
            c, mk, ls = STYLE.get(method, ("k", ".", "-"))
            ax.plot([scale * p[key] for p in pts], [p["fd"] for p in pts], color=c, marker=mk, ls=ls,
                    lw=2.2 if method == "lazypass" else 1.2, label=method)  # fmt: skip
    ax.axhline(res["full"]["fd"], color="0.5", lw=0.8)
    ax.set_ylabel("FD to real digits (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)


def plots(results: dict, out: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    panels = {  # file: [(key, x scale, x label, title suffix)] as rows of panels
        "fd_vs_macs.png": [("fraction", 100, "executed MACs per image, % of full compute", "")],
        "fd_vs_latency.png": [("latency_b1", 1, "eager ms per image, batch 1", ", batch 1"),
                              ("latency_b8", 1, "eager ms per image, batch 8", ", batch 8")],
    }  # fmt: skip
    for file, rows in panels.items():
        fig, axes = plt.subplots(len(rows), len(names), figsize=(6.2 * len(names), 4.4 * len(rows)), squeeze=False)
        for i, (key, scale, xlabel, suffix) in enumerate(rows):
            for ax, name in zip(axes[i], names):
                _curves(ax, results[name], key, scale)
                if not ax.lines[:-1]:  # only the full-compute line: nothing measured (latency skipped)
                    ax.text(0.5, 0.5, "not measured in this run", transform=ax.transAxes, ha="center", color="0.4")
                if key == "fraction":
                    for b in BUDGETS:
                        ax.axvline(100 * b, color="0.7", lw=0.8, ls="--")
                ax.set_xlabel(xlabel)
                ax.set_title(results[name]["title"] + suffix, fontsize=10)
        if axes[0][-1].lines[:-1]:
            axes[0][-1].legend(fontsize=7, loc="upper right")
        if note:
            fig.suptitle(textwrap.fill(note, 180), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / file, dpi=110)
        plt.close(fig)


# -- main --------------------------------------------------------------------------------------------------


def run_model(spec: Spec, args, classifier, real_stats, log, saved: dict | None = None) -> dict:
    """One model's part. With ``saved`` (this model's entry of an earlier results.json, checked by
    ``check_saved``) FD, PSNR and MACs are read from it; latency and the correctness checks run."""
    t_model = time.perf_counter()
    base = spec.load()
    noise = torch.randn(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(EVAL_SEED))
    labels = torch.arange(args.samples) % 10
    g = torch.Generator().manual_seed(CAL_SEED)
    n_cal = 16 if args.quick else 64
    cal = (torch.randn(n_cal, 1, 8, 8, generator=g), torch.randint(0, 10, (n_cal,), generator=g))
    clock = Clock()
    log(f"[{spec.name}] {spec.title}: {args.samples} samples, {spec.steps} steps")
    stages, cpu = {}, {}

    @contextlib.contextmanager
    def stage(name: str):
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        stages[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0

    with stage("setup (load gates, calibration)" if saved else "setup (fit or load gates, thresholds, MagCache calibration)"):
        methods, gate_info, calibration = build_methods(spec, base, args, clock, cal, log, saved)
    reference = methods[0].settings[0]  # full compute: FD to it and PSNR of every setting
    if args.methods:  # one part of a model's methods (``in_parallel``)
        methods = [m for m in methods if m.name in args.methods]
    rows: list[Row] = []
    if saved is not None:
        check_saved(spec, saved, methods, gate_info, args)
        for method in methods:
            for setting, record in zip(method.settings, (r for r in saved["rows"] if r["method"] == method.name)):
                rows.append(Row(**{**record, "latency_b1": None, "latency_b8": None}, runner=setting.make()))
        log(f"  FD / PSNR / MACs of {len(rows)} settings read from the earlier run")
    else:
        ev = Evaluator(spec, classifier, real_stats, noise, labels, args.eval_batch)
        with stage("FD / PSNR / MACs of every setting"):
            if methods[0].settings[0] is not reference:
                full_row = ev.measure(reference)  # measured, not listed: another part lists it
            for method in methods:
                for setting in method.settings:
                    row = ev.measure(setting)
                    rows.append(row)
                    lazy = f" lazy {row.lazy_ratio:.1%}" if row.lazy_ratio is not None else ""
                    log(f"  {row.method:16s} {row.knob:34s} compute {row.fraction:6.1%} "
                        f"(batch {row.batch_macs / ev.full_macs:6.1%}){lazy}  FD {row.fd:7.2f}  "
                        f"PSNR {row.psnr:6.2f}  {row.seconds:5.1f} s")  # fmt: skip
    if args.latency_repeats > 0:
        with stage("latency"):
            latency(rows, spec, noise, labels, args.latency_images, args.latency_repeats)
        log(f"  latency measured in {stages['latency']:.0f} s")
    full = next((r for r in rows if r.method == "fewer steps" and r.steps == spec.steps), None)
    if full is None:
        full = full_row if saved is None else Row(**{**saved["full"], "latency_b1": None, "latency_b8": None})
        full.runner = reference.make()
    with stage("correctness checks"):
        checks = correctness(rows, full, spec, noise, labels, args, log)
    if saved is not None and not args.compile:  # compile / export results do not depend on load: keep the earlier
        before = {(c["method"], c["setting"]): c for c in saved["correctness"]}
        for c in checks:
            old = before.get((c["method"], c["setting"]))
            if old is not None and old.get("compile") is not None:
                c.update(compile=old["compile"], export=old["export"], checks_from="earlier run")
    tables = budget_tables(rows)
    if saved is not None:  # the quality stage of the run the numbers come from
        quality = {k: v for k, v in saved["stages"].items() if k.startswith("FD /")}
        stages.update({f"{k} (earlier run)": v for k, v in quality.items()})
        cpu.update({f"{k} (earlier run)": v for k, v in saved.get("stages_cpu", {}).items() if k.startswith("FD /")})
    return dict(
        title=spec.title, steps=spec.steps, sampler=spec.sampler_name(), samples=args.samples,
        eval_batch=args.eval_batch, spec=spec.fingerprint(args), full=full.record(),
        rows=[r.record() for r in rows], tables={b: dict(values=t["values"], ranked=t["ranked"]) for b, t in tables.items()},
        who_wins=who_wins(tables), gates=gate_info, calibration=calibration, correctness=checks,
        seconds=round(time.perf_counter() - t_model, 1), stages={k: round(v, 1) for k, v in stages.items()},
        stages_cpu={k: round(v, 1) for k, v in cpu.items()},
    )  # fmt: skip


class QualityMismatch(ValueError):
    """An earlier results.json that does not belong to this run's settings."""


def check_saved(spec: Spec, saved: dict, methods: list[Method], gate_info: dict, args) -> None:
    """``--quality-from``: the earlier run must have had the same models, sweeps, samples and seeds,
    the same gate file (by content) and the same settings, in the same order."""
    fix = ("run the whole benchmark again (without --quality-from) to measure FD / PSNR / MACs for "
           "these settings")
    want = spec.fingerprint(args)
    have = saved.get("spec")
    if have is None:
        raise QualityMismatch(f"{spec.name}: the earlier results.json has no spec fingerprint (written before "
                              f"--quality-from existed); {fix}")
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diff:
        detail = "; ".join(f"{k}: earlier {have.get(k)!r}, now {want.get(k)!r}" for k in diff)
        raise QualityMismatch(f"{spec.name}: the earlier run had other settings ({detail}); {fix}")
    if methods is None:
        return
    if saved["gates"].get("sha256") != gate_info["sha256"]:
        raise QualityMismatch(f"{spec.name}: the gates differ from the earlier run's (earlier "
                              f"{Path(saved['gates'].get('path', '?')).name} sha256 {saved['gates'].get('sha256')}, now "
                              f"{Path(gate_info['path']).name} sha256 {gate_info['sha256']}); {fix}")  # fmt: skip
    now = [(s.method, s.knob) for m in methods for s in m.settings]
    before = [(r["method"], r["knob"]) for r in saved["rows"]]
    if now != before:
        missing = [f"{m}: {k}" for m, k in now if (m, k) not in before][:4]
        extra = [f"{m}: {k}" for m, k in before if (m, k) not in now][:4]
        raise QualityMismatch(f"{spec.name}: the settings differ from the earlier run's (not measured then: "
                              f"{missing or 'none'}; measured then, not now: {extra or 'none'}); {fix}")


def main(argv=None, *, print_headline: bool = True) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dit", "flow"], choices=["dit", "flow"])
    p.add_argument("--quick", action="store_true", help="64 samples, one setting per method, no compile/export")
    p.add_argument("--samples", type=int, default=None, help="default 1000 (64 with --quick)")
    p.add_argument("--eval-batch", type=int, default=None, help="rows per sampling call (default 100)")
    p.add_argument("--latency-images", type=int, default=None, help="batch-1 images per round (default 2, quick 1)")
    p.add_argument("--latency-repeats", type=int, default=None, help="rounds (default 3, quick 1; 0: skip)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="the torch.compile / torch.export checks (default: on, off with --quick; with "
                        "--quality-from, --no-compile keeps the earlier run's results of these checks)")
    p.add_argument("--fit-steps", type=int, default=None, help="fit optimiser steps (default: lazypass.fit's)")
    p.add_argument("--fit-batch", type=int, default=32)
    p.add_argument("--gates-dir", type=Path, default=ROOT / "examples" / "assets" / "peers")
    p.add_argument("--scratch", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "lazypass-peers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=None, help=argparse.SUPPRESS)  # a part of a model (in_parallel)
    p.add_argument("--jobs", type=int, default=None,
                   help="quality processes at once (one per model, and one for a model's tail methods), one "
                        "thread each (default 2; 1 with --quick, --quality-from or one model: all in this process); "
                        "latency then runs on its own")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="peers.md and peers/*.png go here")
    p.add_argument("--note", default="", help="a line printed at the top of peers.md and the plots")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="write peers.md and the plots again from results.json files (nothing is run); "
                        "several files, e.g. one per model run apart, are merged")
    p.add_argument("--quality-from", type=Path, default=None, metavar="RESULTS_JSON",
                   help="read FD / PSNR / MACs from an earlier results.json of the same settings, samples and "
                        "gate files (checked) and measure only latency and the correctness checks: the part "
                        "that needs a quiet machine")
    args = p.parse_args(argv)
    if args.from_json is not None:
        return rewrite(args)
    unknown = [m for m in args.methods or () if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose among {', '.join(METHODS)}")
    if args.jobs is None:
        args.jobs = 1 if args.quick or args.quality_from is not None else min(2, len(args.models))
    if args.jobs > 1 and len(args.models) > 1:
        if args.quality_from is not None:
            raise SystemExit("--jobs runs the quality part in parallel; with --quality-from there is none to run "
                             "(leave out --jobs)")
        return in_parallel(args, argv if argv is not None else sys.argv[1:])
    earlier = None
    if args.quality_from is not None:
        earlier = load_earlier(args)
    args.samples = args.samples or (64 if args.quick else 1000)
    args.eval_batch = min(args.eval_batch or 100, args.samples)
    if args.latency_images is None:
        args.latency_images = 1 if args.quick else 2
    if args.latency_repeats is None:
        args.latency_repeats = 1 if args.quick else 3
    if args.compile is None:
        args.compile = not args.quick
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*upcast.*")
    start, cpu, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    classifier = load_classifier()
    real_stats = gaussian_stats(classifier_outputs(classifier, load_digit_images()[0])[0])
    results = {}
    for name in args.models:
        spec = specs()[name]
        saved = earlier["results"][name] if earlier else None
        if saved is not None:
            _check_fingerprint(spec, saved, args)  # before loading anything: a mismatch fails at once
        try:
            results[name] = run_model(spec, args, classifier, real_stats, log, saved)
        except QualityMismatch as e:
            raise SystemExit(f"--quality-from {args.quality_from}: {e}") from None
    wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    load1 = os.getloadavg()[0]
    all_tables = {n: r["tables"] for n, r in results.items()}
    head = headline(all_tables)
    command = "PYTHONPATH=$PWD python benchmarks/peers.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    conditions = (f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, torch "
                  f"{torch.__version__}, {args.threads} thread(s), load average {load0:.1f} at the start and "
                  f"{load1:.1f} at the end; whole run {wall / 60:.1f} min wall, {cpu_s / 60:.1f} min CPU "
                  f"(" + ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in results.items()) + ").")  # fmt: skip
    meta = dict(command=command.strip(), conditions=conditions, headline=head, note=args.note, fit_batch=args.fit_batch)
    if earlier is not None:  # FD / PSNR / MACs were measured by that run: its command and conditions first
        meta["command"] = earlier["meta"]["command"] + "\n" + meta["command"]
        meta["conditions"] = (f"FD / PSNR / MACs: {earlier['meta']['conditions']} Latency and correctness: "
                              f"{conditions}")
        meta["quality_from"] = dict(path=_rel(args.quality_from.resolve()), conditions=earlier["meta"]["conditions"])
    write(results, meta, args.out)
    log(conditions)
    if print_headline:
        print(head, flush=True)
    return dict(meta=meta, results=results)


def in_parallel(args, argv: list[str]) -> dict:
    """The whole benchmark with the models' quality parts (FD / PSNR / MACs and the torch.compile /
    torch.export checks, which do not depend on load) in ``args.jobs`` processes at once, one thread
    each, then latency and *batch vs one* in this process on its own (``--quality-from`` of their
    merged results, ``--no-compile``), so the timings are taken on a quiet machine."""
    import subprocess
    import threading

    start, load0 = time.perf_counter(), os.getloadavg()[0]
    work = args.scratch / f"parallel-{os.getpid()}"
    passed = _without(argv, {"--models": -1, "--methods": -1, "--jobs": 1, "--out": 1, "--threads": 1,
                             "--latency-repeats": 1, "--latency-images": 1, "--note": 1})  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def relay(name: str, stream) -> None:
        for line in stream:
            print(f"[{name}] {line}", end="", file=sys.stderr, flush=True)

    # one unit per model, and a second for the methods of a model's ``tail``, queued last: the longest
    # model starts first, and its tail runs on the core the shorter one leaves
    units = {name: () for name in args.models}
    for name in args.models:
        tail = specs()[name].tail
        if tail:
            units[name] = tuple(m for m in METHODS if m not in tail)
            units[f"{name}.tail"] = tail
    pending, relays = list(units), []
    running: dict[str, subprocess.Popen] = {}
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            model = name.split(".")[0]
            cmd = [sys.executable, str(Path(__file__).resolve()), *passed, "--models", model, "--jobs", "1",
                   "--threads", "1", "--latency-repeats", "0", "--out", str(work / name)]  # fmt: skip
            if units[name]:
                cmd += ["--methods", *units[name]]
            proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
            relays.append(threading.Thread(target=relay, args=(name, proc.stderr), daemon=True))
            relays[-1].start()
            running[name] = proc
        time.sleep(0.5)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode != 0:
                    failed.append(f"{name} (exit {proc.returncode})")
    for t in relays:
        t.join()
    if failed:
        raise SystemExit(f"the quality part failed for {', '.join(failed)}; its output is above")
    quality_wall = time.perf_counter() - start
    parts = {n: json.loads((work / n / "peers" / "results.json").read_text()) for n in units}
    results = {}
    for name, part in parts.items():
        model = name.split(".")[0]
        res = part["results"][model]
        results[model] = res if model not in results else _merge_parts(results[model], res)
    merged = dict(meta=dict(next(iter(parts.values()))["meta"]), results=results)
    merged["meta"]["conditions"] = " / ".join(f"{n}: {p['meta']['conditions']}" for n, p in parts.items())
    quality_json = work / "merged.json"
    quality_json.write_text(json.dumps(merged, indent=1, default=repr) + "\n")
    rest = _without(argv, {"--jobs": 1, "--compile": 0, "--no-compile": 0})
    out = main([*rest, "--jobs", "1", "--quality-from", str(quality_json), "--no-compile"], print_headline=False)
    meta = out["meta"]
    meta["command"] = ("PYTHONPATH=$PWD python benchmarks/peers.py " + shlex.join(argv)).strip()
    meta["conditions"] = (
        f"the quality parts in {len(units)} processes ({', '.join(_unit_text(n, m) for n, m in units.items())}), "
        f"{min(args.jobs, len(units))} at once, 1 thread each, {quality_wall / 60:.1f} min wall: "
        f"{merged['meta']['conditions']} Then latency and batch vs one on "
        f"their own: {meta['conditions'].split('Latency and correctness: ')[-1]} Load average {load0:.1f} at the "
        f"start; the whole command {(time.perf_counter() - start) / 60:.1f} min wall.")  # fmt: skip
    meta.pop("quality_from", None)
    write(out["results"], meta, args.out)
    print(meta["conditions"], file=sys.stderr, flush=True)
    print(meta["headline"], flush=True)
    return out


def _unit_text(name: str, methods: tuple[str, ...]) -> str:
    if not methods:
        return name
    return f"{name}: {' and '.join(methods)}" if name.endswith(".tail") else f"{name}: the other methods"


def _merge_parts(a: dict, b: dict) -> dict:
    """One model's results from two processes that measured different methods (same samples, gates
    and calibration): rows and checks in the methods' order, the stages' seconds added up."""
    def order(items):
        return sorted(items, key=lambda r: METHODS.index(r["method"]))  # stable: settings keep their order

    out = dict(a, rows=order(a["rows"] + b["rows"]), correctness=order(a["correctness"] + b["correctness"]))
    out["full"] = a["full"] if a["rows"] and a["rows"][0]["method"] == "fewer steps" else b["full"]
    for key in ("stages", "stages_cpu"):
        out[key] = {k: round(a[key].get(k, 0) + b[key].get(k, 0), 1) for k in {**a[key], **b[key]}}
    out["seconds"] = round(a["seconds"] + b["seconds"], 1)
    return out


def _without(argv: list[str], options: dict[str, int]) -> list[str]:
    """``argv`` less the given options (name -> number of values, -1: every value up to the next
    option; ``--name=value`` too)."""
    out, skip = [], 0
    for a in argv:
        if skip and not (skip < 0 and a.startswith("--")):
            skip -= 1
            continue
        skip = 0
        name = a.split("=", 1)[0]
        if name in options:
            skip = 0 if "=" in a else options[name]
            continue
        out.append(a)
    return out


def load_earlier(args) -> dict:
    """The results.json of ``--quality-from``, with every model asked for; samples default to its own."""
    path = args.quality_from
    if not path.is_file():
        raise SystemExit(f"--quality-from {path}: no such file; give the results.json of an earlier full run "
                         f"(e.g. docs/peers/results.json)")
    earlier = json.loads(path.read_text())
    missing = [m for m in args.models if m not in earlier.get("results", {})]
    if missing:
        raise SystemExit(f"--quality-from {path}: it has no results for {', '.join(missing)} (it has "
                         f"{', '.join(earlier.get('results', {})) or 'none'}); pass --models with those it has, or "
                         f"run the whole benchmark for the others")  # fmt: skip
    if args.samples is None:
        args.samples = earlier["results"][args.models[0]]["samples"]
    return earlier


def _check_fingerprint(spec: Spec, saved: dict, args) -> None:
    try:
        check_saved(spec, saved, None, None, args)
    except QualityMismatch as e:
        raise SystemExit(f"--quality-from {args.quality_from}: {e}") from None


def write(results: dict, meta: dict, out: Path) -> None:
    """``peers.md``, ``peers/results.json`` and the plots under ``out``."""
    figdir = out / "peers"
    figdir.mkdir(parents=True, exist_ok=True)
    (figdir / "results.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1, default=repr) + "\n")
    plots(results, figdir, meta["note"])
    (out / "peers.md").write_text(markdown(results, meta))


def rewrite(args) -> dict:
    """The outputs again from saved ``results.json`` files (budgets, who wins and headline recomputed)."""
    results, metas = {}, []
    for path in args.from_json:
        saved = json.loads(path.read_text())
        results.update(saved["results"])
        metas.append(saved["meta"])
    meta = dict(metas[0])
    if len(metas) > 1:  # runs made apart: every command and its conditions
        meta["command"] = "\n".join(m["command"] for m in metas)
        meta["conditions"] = " / ".join(m["conditions"] for m in metas)
    meta["note"] = args.note or meta.get("note", "")
    meta.setdefault("fit_batch", args.fit_batch)  # files written before it was saved
    for res in results.values():
        res["tables"] = {float(b): t for b, t in res["tables"].items()}
        res["who_wins"] = who_wins(res["tables"])
    meta["headline"] = headline({n: r["tables"] for n, r in results.items()})
    write(results, meta, args.out)
    print(meta["headline"], flush=True)
    return dict(meta=meta, results=results)


if __name__ == "__main__":
    main()
