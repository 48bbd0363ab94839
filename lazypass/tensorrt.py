"""Run an engine written by ``lazypass.export_tensorrt``: torch CUDA tensors in and out.

    runner = lazypass.tensorrt.load("dit.engine")     # reads dit.engine.json beside it
    eps = runner(x, t, y)                             # CUDA tensors, called like the model
    runner.reset()                                    # a new sampling run
    runner.set_threshold(0.7)                         # the threshold is an engine input

This is ``lazypass.onnx``'s runner (input binding, state threading, records, ``reset``,
``set_threshold``, the output structure) over TensorRT; only the buffers differ. Every
setting and state tensor is a CUDA tensor bound to the engine by address
(``IExecutionContext.set_tensor_address``). Each state input has a twin buffer that the
engine writes its ``*_next`` output into; after the call the two swap roles, so the
caches stay on the GPU, and nothing is copied or allocated for them between calls. The
engine itself starts a new run when the timestep rises (the ``lazy_last_t`` state), as
the torch runtime and the ONNX runner do.

TensorRT evaluates each ``If`` condition on the host (a device-to-host read per site and
call), and an engine with conditionals cannot be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from lazypass import onnx as _onnx
from lazypass.onnx import FormatError, Output

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
          "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
_TRT_TYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
              "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def load(path, device=None) -> "Runner":
    """Load an engine written by ``lazypass.export_tensorrt`` (and its ``<path>.json``).

    Args:
        path: the engine file.
        device: the CUDA device to run on (default: the current one).

    Example:
        >>> runner = lazypass.tensorrt.load("dit.engine")  # doctest: +SKIP
        >>> eps = runner(x.cuda(), t.cuda(), y.cuda())       # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    layout = path + ".json"
    if not os.path.isfile(layout):
        raise FileNotFoundError(f"{layout!r} is missing: export_tensorrt writes the state layout beside the engine, "
                                "and the runner needs it")
    with open(layout) as f:
        meta = _onnx._meta({"lazypass": f.read()}, layout)
    if "tensorrt" not in meta:
        raise FormatError(f"{layout!r} was not written by lazypass.export_tensorrt (no 'tensorrt' entry)")
    if meta["flavour"] != "dynamic":
        raise FormatError(f"{layout!r}: TensorRT engines are built from the dynamic flavour, not {meta['flavour']!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("lazypass.tensorrt.load needs a CUDA GPU (torch.cuda.is_available() is False)")
    from lazypass.backends.tensorrt import import_tensorrt

    trt = import_tensorrt()
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return Runner(path, meta, _Trt(trt, path, meta, device), device)


class Runner(_onnx.Runner):
    """A TensorRT engine of a lazy model; call it like the model with CUDA tensors. See :func:`load`."""

    def __init__(self, path: str, meta: dict, engine, device: torch.device):
        self.device = device
        super().__init__(path, meta, engine, "tensorrt")

    def _value(self, shape, value, dtype):
        if isinstance(value, str):
            value = float(value)  # "inf"
        return torch.full(tuple(shape), value, dtype=_TORCH[dtype], device=self.device)

    def _feed(self, value, entry):
        name = entry["name"]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"input {name!r} is a {type(value).__name__}; the TensorRT runner takes torch CUDA tensors")
        if value.device != self.device:
            raise ValueError(f"input {name!r} is on {value.device}, the engine runs on {self.device}: "
                             f"move it there (.to({str(self.device)!r}))")
        want = _TORCH[entry["dtype"]]
        if value.dtype != want:
            same_kind = value.dtype.is_floating_point == want.is_floating_point and \
                (value.dtype == torch.bool) == (want == torch.bool)
            if not same_kind:
                raise TypeError(f"input {name!r} has dtype {value.dtype}, the model was exported with {want}")
            value = value.to(want)
        if list(value.shape) != list(entry["shape"]):
            raise ValueError(
                f"input {name!r} has shape {list(value.shape)}, the engine was built for {entry['shape']} "
                "(an engine has the shapes it was exported with: export again for other shapes)"
            )
        return value.contiguous(), True

    def _result(self, value, as_torch: bool):
        return value

    def set_threshold(self, value: float) -> None:
        """Change the skip threshold (an engine input; no rebuild)."""
        if "lazy_threshold" not in self.settings:
            raise ValueError("this engine has no threshold input")
        self.settings["lazy_threshold"].fill_(float(value))

    def skipped(self) -> np.ndarray:
        """(calls, sites, B) bool: which samples took a site's cache, per call since the reset
        (read from the GPU when called)."""
        if not self.records:
            return np.zeros((0, len(self.sites), 0), bool)
        return torch.stack([r["skipped"] for r in self.records]).cpu().numpy()


class _Trt:
    """The engine, its execution context and the twin buffers of the state outputs. (A CPU
    device is for the tests' stand-in engine, which runs onnxruntime on the bound memory.)"""

    def __init__(self, trt, path: str, meta: dict, device: torch.device):
        with open(path, "rb") as f:
            blob = f.read()
        self.device = device
        cuda = device.type == "cuda"
        with torch.cuda.device(device) if cuda else contextlib.nullcontext():
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(blob)
            if self.engine is None:
                raise FormatError(f"TensorRT {trt.__version__} cannot load {path!r} (built by TensorRT "
                                  f"{meta['tensorrt'].get('version')}; engines are tied to the release and the GPU)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device) if cuda else None
        self.inputs, self.outputs = [], []
        io_in, io_out = {}, {}
        for k in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(k)
            kind = self.engine.get_tensor_dtype(name).name
            dims = self.engine.get_tensor_shape(name)
            spec = (_TRT_TYPES.get(kind, kind), [int(dims[i]) for i in range(len(dims))])
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(name)
                io_in[name] = spec
            else:
                self.outputs.append(name)
                io_out[name] = spec
        _onnx._check_io(meta, io_in, io_out, path)
        self.specs = io_out
        self.state_of = {s["output"]: s["name"] for s in meta["state"]}
        self.twin: dict[str, torch.Tensor] = {}  # state name -> the buffer the next call writes into

    def run(self, pattern, feeds):
        ctx = self.context
        for name in self.inputs:
            t = feeds[name]
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            state = self.state_of.get(name)
            buf = self.twin.get(state) if state is not None else None
            if buf is None:  # user outputs and records: new tensors the caller may keep
                dtype, shape = self.specs[name]
                buf = torch.empty(shape, dtype=_TORCH[dtype], device=self.device)
            ctx.set_tensor_address(name, buf.data_ptr())
            outs[name] = buf
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)  # inputs written on the caller's stream
        if not ctx.execute_async_v3(self.stream.cuda_stream if self.stream is not None else 0):
            raise RuntimeError("TensorRT's execute_async_v3 failed (its log says why)")
        if self.stream is not None:
            current.wait_stream(self.stream)  # outputs read on the caller's stream
        for state in self.state_of.values():
            self.twin[state] = feeds[state]  # read this call, written by the next
        return outs


__all__ = ["FormatError", "Output", "Runner", "load"]
