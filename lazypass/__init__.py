"""lazypass: LazyDiT as a compiler pass. Learned in-graph skip gates for diffusion transformers."""

from lazypass.config import LazyConfig
from lazypass.gates import LazyGates
from lazypass.passes import NoSitesError, Site
from lazypass.report import Stats, report, stats
from lazypass.runtime import apply, reset, set_threshold, trajectory
from lazypass.backends import inductor as _inductor

_inductor.register()  # torch.compile(model, backend="lazydit")

__all__ = [
    "LazyConfig",
    "LazyGates",
    "NoSitesError",
    "Site",
    "Stats",
    "apply",
    "report",
    "reset",
    "set_threshold",
    "stats",
    "trajectory",
]
__version__ = "0.1.0"
