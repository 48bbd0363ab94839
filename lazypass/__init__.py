"""lazypass: LazyDiT as a compiler pass. Learned in-graph skip gates for diffusion transformers."""

from lazypass.checkpoint import load_gates, save_gates
from lazypass.config import LazyConfig
from lazypass.fitting import FitConfig, FitResult, fit, fit_pipeline
from lazypass.gates import LazyGates
from lazypass.passes import NoSitesError, Site
from lazypass.report import Stats, report, stats
from lazypass.runtime import apply, reset, set_threshold, trajectory
from lazypass.backends import inductor as _inductor

_inductor.register()  # torch.compile(model, backend="lazydit")

__all__ = [
    "FitConfig",
    "FitResult",
    "LazyConfig",
    "LazyGates",
    "NoSitesError",
    "Site",
    "Stats",
    "apply",
    "fit",
    "fit_pipeline",
    "load_gates",
    "report",
    "reset",
    "save_gates",
    "set_threshold",
    "stats",
    "trajectory",
]
__version__ = "0.1.0"
