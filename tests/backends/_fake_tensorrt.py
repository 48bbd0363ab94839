"""A stand-in for the few ``tensorrt`` calls the engine runner makes, on the CPU.

Its "engine" file is an ONNX file; ``execute_async_v3`` reads every input from the memory
address bound to it (``set_tensor_address``), runs onnxruntime, and writes every output
to the address bound to that output. So the runner's binding (names, dtypes, shapes,
addresses), the twin state buffers swapped between calls, reset and the threshold are
exercised for real, only the kernels are onnxruntime's. It is no TensorRT: what TensorRT
itself does with the graph is checked only on a GPU (``tests/backends/test_tensorrt.py``).
"""

from __future__ import annotations

import ctypes
import enum

import numpy as np

__version__ = "stand-in"

_NAMES = {"tensor(float)": ("FLOAT", np.float32), "tensor(float16)": ("HALF", np.float16),
          "tensor(int64)": ("INT64", np.int64), "tensor(int32)": ("INT32", np.int32),
          "tensor(bool)": ("BOOL", np.bool_)}


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class _DataType:
    def __init__(self, name):
        self.name = name


class Logger:
    WARNING = 2

    def __init__(self, severity=None):
        self.severity = severity


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, blob: bytes):
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - as TensorRT, None for a blob it cannot read
            return None
        return _Engine(session)


class _Engine:
    def __init__(self, session):
        self.session = session
        self.io = [(v, TensorIOMode.INPUT) for v in session.get_inputs()]
        self.io += [(v, TensorIOMode.OUTPUT) for v in session.get_outputs()]
        self.by_name = {v.name: (v, mode) for v, mode in self.io}
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, k):
        return self.io[k][0].name

    def get_tensor_mode(self, name):
        return self.by_name[name][1]

    def get_tensor_dtype(self, name):
        return _DataType(_NAMES[self.by_name[name][0].type][0])

    def get_tensor_shape(self, name):
        return list(self.by_name[name][0].shape)

    def create_execution_context(self):
        return _Context(self)


def _view(address: int, dtype, shape) -> np.ndarray:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * size).from_address(address), dtype=dtype).reshape(shape)


class _Context:
    def __init__(self, engine):
        self.engine = engine
        self.addresses, self.shapes = {}, {}
        self.profiler = None
        self.calls = 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream_handle):
        feeds = {}
        for v, mode in self.engine.io:
            if mode is TensorIOMode.INPUT:
                dtype = _NAMES[v.type][1]
                feeds[v.name] = _view(self.addresses[v.name], dtype, self.shapes[v.name]).copy()
        names = [v.name for v, mode in self.engine.io if mode is TensorIOMode.OUTPUT]
        for name, value in zip(names, self.engine.session.run(names, feeds)):
            out = _view(self.addresses[name], value.dtype, value.shape)
            out[...] = value
        self.calls += 1
        return True
