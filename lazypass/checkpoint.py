"""Save and load fitted gates with safetensors, checked against the model's sites.

A gates file holds the ``LazyGates`` tensors (``weights.K`` and ``bias``, float32) and, as
safetensors metadata, the site layout (kind and gate-input dims of every site, in order),
its fingerprint, the ``LazyConfig`` the gates were fitted under and the threshold in use
when they were saved (fitting with ``target_ratio`` calibrates it).  Loading checks the
whole file first and copies nothing unless every site matches: never a partial load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from lazypass.config import GATE_OPTIONS, LazyConfig, check_threshold
from lazypass.gates import LazyGates
from lazypass.runtime import runtime

FORMAT = "lazypass.gates/1"


def save_gates(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s gates to a safetensors file, with the site fingerprint and config.

    Example:
        >>> import torch, lazypass
        >>> from lazypass.models import tiny_dit
        >>> x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([9, 9]), torch.tensor([1, 2])
        >>> model = lazypass.apply(tiny_dit(), example_inputs=(x, t, y))
        >>> lazypass.save_gates(model, "/tmp/gates.safetensors")
        >>> lazypass.load_gates(lazypass.apply(tiny_dit(), example_inputs=(x, t, y)), "/tmp/gates.safetensors")
    """
    from safetensors.torch import save_file

    rt = runtime(model)
    gates = getattr(model, "lazy_gates", None)
    if gates is None:
        raise ValueError(
            "this lazy model has no gates yet: its sites are found when it is first traced; call it once "
            "(or pass example_inputs to lazypass.apply) and fit it before saving"
        )
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in gates.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "layout": json.dumps(gates.layout),
        "fingerprint": gates.fingerprint(),
        "config": json.dumps(rt.cfg.to_dict()),
        "threshold": repr(float(rt.threshold)),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_gates(model: nn.Module, path: str | os.PathLike, *, threshold: bool = True) -> None:
    """Load gates saved by :func:`save_gates` into a lazy model; refuses a file made for other sites.

    The file is checked in full (format, fingerprint, tensor names, shapes, finite values,
    and the options that change what a gate means, such as ``max_reuse``) before anything
    is copied. If the model has not been traced yet (``apply`` without ``example_inputs``
    and no call so far), its sites are unknown: the checked gates are kept and applied at
    the first trace, where a site mismatch raises instead of tracing. With
    ``threshold=True`` the threshold saved with the gates (the calibrated one, after
    ``fit(..., target_ratio=...)``) is set as well.

    Example:
        >>> lazypass.load_gates(model, "/tmp/gates.safetensors")  # doctest: +SKIP
    """
    rt = runtime(model)
    saved = read_gates(path)
    saved.check_config(rt.cfg)

    def install(gates: LazyGates) -> None:
        saved.copy_into(gates)
        if threshold:
            rt.set_threshold(saved.threshold)

    gates = getattr(model, "lazy_gates", None)
    if gates is None:
        rt.pending_gates = install
    else:
        install(gates)


@dataclass
class GateFile:
    """A checked gates file: its site layout, tensors, saved config and threshold."""

    path: str
    layout: list[tuple[str, tuple[int, ...]]]
    tensors: dict[str, torch.Tensor]
    config: dict
    threshold: float

    def check_layout(self, layout: list) -> None:
        _check_layout(self.layout, layout, self.path)

    def check_config(self, cfg: LazyConfig) -> None:
        """Refuse gates fitted under options that change what a gate's score means."""
        for name in GATE_OPTIONS:
            saved = self.config[name]
            if saved != getattr(cfg, name):
                raise ValueError(
                    f"the gates in {self.path!r} were fitted with {name}={saved!r}, but this model uses "
                    f"{name}={getattr(cfg, name)!r}; gates only work under the options they were fitted for. "
                    f"Apply lazypass with {name}={saved!r}, or fit gates for these options. Nothing was loaded"
                )

    def copy_into(self, gates: LazyGates) -> None:
        self.check_layout(gates.layout)
        if gates.inputs != self.config["gate_inputs"]:
            raise ValueError(f"the gates in {self.path!r} read {self.config['gate_inputs']}, these gates read "
                             f"{gates.inputs}; nothing was loaded")
        with torch.no_grad():
            for name, param in gates.state_dict(keep_vars=True).items():
                param.copy_(self.tensors[name].to(param.device, param.dtype))


def read_gates(path: str | os.PathLike) -> GateFile:
    """Read and check a whole gates file (nothing is loaded anywhere)."""
    layout, tensors, meta = _read(path)
    return GateFile(os.fspath(path), layout, tensors, _saved_config(meta), check_threshold(float(meta["threshold"])))


# What files written before an option existed were fitted under.
_LEGACY = {"max_age": None, "reuse": "copy", "granularity": "site", "gate_inputs": ()}


def _saved_config(meta: dict) -> dict:
    config = {**_LEGACY, **json.loads(meta["config"])}
    if config.pop("max_reuse", None) == 1:
        config["max_age"] = 1
    config["gate_inputs"] = tuple(config["gate_inputs"])
    return config


def _read(path) -> tuple[list, dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no gates file at {path!r}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise ValueError(
            f"{path!r} is not a readable safetensors file ({type(e).__name__}: {e}); it may be truncated or "
            "corrupt: save the gates again with lazypass.save_gates"
        ) from None
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path!r} is not a lazypass gates file (format {meta.get('format')!r}, expected {FORMAT!r}); "
            "write it with lazypass.save_gates"
        )
    try:
        layout = [(str(kind), tuple(int(d) for d in dims)) for kind, dims in json.loads(meta["layout"])]
        float(meta["threshold"])
        config = _saved_config(meta)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path!r}: damaged lazypass metadata ({e}); save the gates again") from None
    expected = LazyGates(layout, config["gate_inputs"])
    if expected.fingerprint() != meta.get("fingerprint"):
        raise ValueError(f"{path!r}: the site layout does not match its fingerprint; the file is damaged")
    shapes = {name: tuple(t.shape) for name, t in expected.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if shapes != found:
        raise ValueError(
            f"{path!r}: gate tensors {sorted(found.items())} do not match its own site layout "
            f"(expected {sorted(shapes.items())}); the file is damaged"
        )
    for name, t in tensors.items():
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path!r}: gate tensor {name!r} is not finite floating point; the file is damaged")
    return layout, tensors, meta


def _check_layout(saved: list, model: list, path) -> None:
    if saved == model:
        return

    def describe(layout):
        kinds = {k: sum(kind == k for kind, _ in layout) for k in sorted({kind for kind, _ in layout})}
        return f"{len(layout)} sites (" + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")"

    def site(layout, i):
        return f"{layout[i][0]} with gate dims {list(layout[i][1])}" if i < len(layout) else "no site"

    i = next((i for i, (a, b) in enumerate(zip(saved, model)) if a != b), min(len(saved), len(model)))
    raise ValueError(
        f"the gates in {os.fspath(path)!r} belong to a different model: the file has {describe(saved)}, this "
        f"model has {describe(model)}; first difference at site {i} (file: {site(saved, i)}, model: "
        f"{site(model, i)}). Nothing was loaded. Fit gates for this model with lazypass.fit, or load the "
        "file into the model it was made for"
    )


__all__ = ["GateFile", "load_gates", "read_gates", "save_gates"]
