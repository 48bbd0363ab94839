"""lazypass: LazyDiT as a compiler pass. Learned in-graph skip gates for diffusion transformers."""

try:
    import torch as _torch
except ImportError:  # a runner-only install (a phone, a server without torch): lazypass.onnx still works
    _torch = None

if _torch is not None:
    from lazypass.checkpoint import load_gates, save_gates
    from lazypass.cpu_allocator import tune_cpu_allocator
    from lazypass.config import LazyConfig
    from lazypass.gates import LazyGates
    from lazypass.passes import NoSitesError, Site
    from lazypass.report import Stats, report, stats
    from lazypass.runtime import apply, reset, set_threshold, trace, trajectory
    from lazypass.backends import inductor as _inductor

    _inductor.register()  # torch.compile(model, backend="lazydit")

# Fitting pulls in torch.distributed and the samplers, export_onnx the ONNX exporter,
# lazypass.onnx onnxruntime / MNN, export_tensorrt and lazypass.tensorrt TensorRT; each loads
# on first use.
_LAZY = {name: "lazypass.fitting" for name in ("fit", "fit_pipeline", "FitConfig", "FitResult")}
_LAZY["export_onnx"] = "lazypass.backends.onnx"
_LAZY["export_tensorrt"] = "lazypass.backends.tensorrt"


def __getattr__(name):
    import importlib

    if name in ("onnx", "tensorrt"):  # the runner modules (lazypass.onnx is torch-free)
        return importlib.import_module(f"lazypass.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lazypass' has no attribute {name!r}")


__all__ = [
    "FitConfig",
    "FitResult",
    "LazyConfig",
    "LazyGates",
    "NoSitesError",
    "Site",
    "Stats",
    "apply",
    "export_onnx",
    "export_tensorrt",
    "fit",
    "fit_pipeline",
    "load_gates",
    "onnx",
    "report",
    "reset",
    "save_gates",
    "set_threshold",
    "stats",
    "tensorrt",
    "trace",
    "trajectory",
    "tune_cpu_allocator",
]
__version__ = "0.1.0"
