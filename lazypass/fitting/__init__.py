"""Fitting the gates of a lazy model: ``fit``, its options ``FitConfig`` and its ``FitResult``.

Modules, one job each:

- ``config``: :class:`FitConfig`, the options, checked;
- ``source``: batches from the user's ``sample_fn``, checked;
- ``soft``: the soft model (the ``soft_blend`` program called with a mix and previous
  branch outputs) and how fit calls the model (``default_call``);
- ``frozen``: the context that freezes all but the gates and restores the model after;
- ``sampler``: the sampling steps the trajectories take;
- ``on_policy``: the default objective: rollouts of the lazy model itself (inference semantics),
  counterfactual final-sample costs, cost-sensitive gate fit;
- ``objectives``: what a one-step training step compares (self-distillation, diffusion loss);
- ``train``: the optimiser loop; ``control``: the lazy penalties and their control;
- ``calibrate``: lazy sampling runs, the measured lazy ratio and the threshold calibration;
- ``dist``: process-group plumbing;
- ``api``: ``fit`` itself; ``pipeline``: ``fit_pipeline``, fit through a diffusers pipeline.
"""

from lazypass.fitting.api import FitResult, fit
from lazypass.fitting.config import FitConfig
from lazypass.fitting.pipeline import fit_pipeline
from lazypass.fitting.soft import default_call

__all__ = ["FitConfig", "FitResult", "default_call", "fit", "fit_pipeline"]
