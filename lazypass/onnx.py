"""Run a file written by ``lazypass.export_onnx`` with onnxruntime or MNN, without torch.

    runner = lazypass.onnx.load("dit.onnx")                  # or runtime="mnn"
    with_noise = runner(x, t, y)                             # numpy (or torch) in, the model's output out
    runner.reset()                                           # a new sampling run

The runner is called like the model (same positional and keyword inputs) and threads the
cache state between calls: every state input of the graph gets the matching ``*_next``
output of the previous call; ``reset()`` refills the state with the values a run starts
from (all listed in the file's metadata). The graph itself starts a new run when the
timestep rises, as the torch runtime does. ``runner.records`` holds, per call since the
last reset, what each site did (``skipped`` (sites, B), ``saved`` (sites,), ``scores``).

Nothing here imports torch: torch tensors are accepted (and torch tensors returned) only
when the caller has torch loaded already. onnxruntime needs only itself; ``runtime="mnn"``
needs ``onnx`` (to read the metadata) and ``MNN`` (its converter and Module API).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

FORMAT = "lazypass-onnx"
VERSION = 1
RUNTIMES = ("onnxruntime", "mnn")
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
}


class FormatError(ValueError):
    """The file was not written by lazypass, or its metadata does not match its graph."""


def load(path, runtime: str = "onnxruntime", providers=None, *, threads: int | None = None,
         cache_dir: str | None = None, mnn_backend: str = "cpu") -> "Runner":
    """Load an exported lazy model.

    Args:
        path: the ``.onnx`` file (for the static flavour: its first graph; the others and the
            weight file are found beside it).
        runtime: ``"onnxruntime"`` (graph optimisations on) or ``"mnn"`` (converted with MNN's
            converter into ``cache_dir``, default beside the file, and run through its
            Module API, which runs only the branch an ``If`` takes).
        providers: onnxruntime execution providers (default CPU).
        threads: intra-op threads (default: the runtime's own choice; MNN: 1).
        mnn_backend: ``"cpu"`` or ``"opencl"`` (needs an OpenCL driver; MNN falls back to
            CPU for what the driver cannot run).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if runtime == "onnxruntime":
        engine = _Ort(path, providers, threads)
    else:
        if providers is not None:
            raise ValueError("providers= is for runtime='onnxruntime'; MNN takes mnn_backend='cpu'|'opencl'")
        engine = _Mnn(path, threads, cache_dir, mnn_backend)
    return Runner(path, engine.meta, engine, runtime)


class Output(dict):
    """A model output that was not a plain tuple/list/dict (a diffusers ``...Output``):
    fields by name (``out.sample``, ``out["sample"]``) or position (``out[0]``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self):
        return tuple(self.values())


class Runner:
    """An exported lazy model; call it like the model. See :func:`load`."""

    def __init__(self, path: str, meta: dict, engine, runtime: str):
        self.path, self.meta, self.engine, self.runtime = path, meta, engine, runtime
        self.flavour = meta["flavour"]
        self.sites = meta["sites"]
        self.settings = {s["name"]: self._value(s["shape"], s["value"], s["dtype"]) for s in meta["settings"]}
        self._static = meta.get("static")
        self.reset()

    # -- state ---------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new sampling run: every state input back to the value a run starts from."""
        self.state = {s["name"]: self._value(s["shape"], s["fill"], s["dtype"]) for s in self.meta["state"]}
        self.records: list[dict] = []
        self._calls = 0
        self._last_t = None

    @property
    def threshold(self) -> float | None:
        t = self.settings.get("lazy_threshold")
        return None if t is None else float(t)

    def set_threshold(self, value: float) -> None:
        """Change the skip threshold (the dynamic flavour; a static file has its schedule baked in)."""
        if "lazy_threshold" not in self.settings:
            raise ValueError(f"this {self.flavour} file has no threshold input (its skip schedule is fixed)")
        self.settings["lazy_threshold"] = np.asarray(value, dtype=self.settings["lazy_threshold"].dtype)

    def skipped(self) -> np.ndarray:
        """(calls, sites, B) bool: which samples took a site's cache, per call since the reset."""
        return np.stack([r["skipped"] for r in self.records]) if self.records else np.zeros((0, len(self.sites), 0), bool)

    # -- calling -------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        feeds, as_torch = self._bind(args, kwargs)
        pattern = self._pattern(feeds)
        feeds.update(self.settings)
        feeds.update(self.state)
        outs = self.engine.run(pattern, feeds)
        for s in self.meta["state"]:
            self.state[s["name"]] = outs[s["output"]]
        self._record(outs, pattern)
        values = [self._result(outs[o["name"]], as_torch) for o in self.meta["outputs"]]
        return _build(self.meta["out_tree"], iter(values))

    # what a runtime with other buffers (lazypass.tensorrt: torch CUDA tensors) changes
    def _value(self, shape, value, dtype):
        """A setting or state buffer holding ``value``."""
        return _full(shape, value, dtype)

    def _feed(self, value, entry):
        """A user input as the engine takes it, and whether it was a torch tensor."""
        return _array(value, entry)

    def _result(self, value, as_torch: bool):
        """A user output as the caller gets it."""
        if as_torch:
            return sys.modules["torch"].from_numpy(np.ascontiguousarray(value))
        return value

    def _bind(self, args, kwargs):
        params = self.meta["params"]
        if len(args) > len(params):
            raise TypeError(f"the exported model takes {len(params)} positional inputs ({params}), got {len(args)}")
        bound = dict(zip(params, args))
        for k, v in kwargs.items():
            if k in bound:
                raise TypeError(f"input {k!r} given twice (positionally and by keyword)")
            bound[k] = v
        known = {e["param"] for e in self.meta["inputs"] + self.meta["constants"]}
        extra = [k for k, v in bound.items() if k not in known and v is not None]
        if extra:
            raise TypeError(f"unexpected input(s) {extra}: the model was exported with {sorted(known)}")
        as_torch = False
        feeds = {}
        for e in self.meta["inputs"]:
            if e["param"] not in bound:
                raise TypeError(f"missing input {e['param']!r}")
            v = _at(bound[e["param"]], e["path"], e["name"])
            arr, was_torch = self._feed(v, e)
            as_torch |= was_torch
            feeds[e["name"]] = arr
        for c in self.meta["constants"]:
            if c["param"] in bound:
                v = _at(bound[c["param"]], c["path"], c["name"])
                if v != c["value"] and repr(v) != c["value"]:
                    raise ValueError(f"{c['name']}={v!r}, but the model was exported with {c['name']}={c['value']!r}")
        return feeds, as_torch

    def _pattern(self, feeds) -> int:
        """Static flavour: which graph this call runs (the schedule's row for this call of the run).
        The dynamic flavour's graph counts calls and sees the timestep rise itself."""
        if self._static is None:
            return 0
        name = self.meta.get("timestep")
        if name is not None:
            t = feeds[name].astype(np.float64).reshape(-1)
            if self._last_t is not None and (t.shape != self._last_t.shape or np.any(t > self._last_t)):
                self._calls = 0  # the timestep rose: a new run
            self._last_t = t
        call = self._calls
        self._calls += 1
        schedule = self._static["schedule"]
        return schedule[call] if call < len(schedule) else 0

    def _record(self, outs, pattern):
        if self._static is None:
            self.records.append({r["name"].removeprefix("lazy_"): outs[r["name"]] for r in self.meta["records"]})
            return
        row = np.asarray(self._static["patterns"][pattern], dtype=bool)
        batch = self.meta["batch"]
        self.records.append({"skipped": np.repeat(row[:, None], batch, 1), "saved": row, "scores": None})


def _full(shape, value, dtype):
    if isinstance(value, str):
        value = float(value)  # "inf" / "-inf"
    return np.full(shape, value, dtype=np.dtype(dtype))


def _at(value, path, name):
    for k in path:
        try:
            value = value[k]
        except (KeyError, IndexError, TypeError):
            raise TypeError(f"input {name!r} not found in what was given") from None
    return value


def _array(v, entry):
    """``v`` as a numpy array of the entry's dtype and shape; whether it was a torch tensor."""
    was_torch = type(v).__module__.startswith("torch")
    if was_torch:
        v = v.detach().cpu().numpy()
    arr = np.asarray(v)
    want = np.dtype(entry["dtype"])
    if arr.dtype != want:
        if arr.dtype.kind != want.kind and not (arr.dtype.kind in "iu" and want.kind in "iu"):
            raise TypeError(f"input {entry['name']!r} has dtype {arr.dtype}, the model was exported with {want}")
        arr = arr.astype(want)
    if list(arr.shape) != list(entry["shape"]):
        raise ValueError(
            f"input {entry['name']!r} has shape {list(arr.shape)}, the file was exported for {entry['shape']} "
            "(an exported graph has the shapes it was exported with: export again for other shapes)"
        )
    return np.ascontiguousarray(arr), was_torch


def _build(tree, it):
    kind = tree["kind"]
    if kind == "leaf":
        return next(it)
    items = [_build(c, it) for c in tree["items"]]
    if kind == "tuple":
        return tuple(items)
    if kind == "list":
        return items
    if kind == "dict":
        return dict(zip(tree["keys"], items))
    return Output(zip(tree["keys"], items))


# -- metadata ------------------------------------------------------------------------

def _meta(props: dict, path: str) -> dict:
    raw = props.get("lazypass")
    if raw is None:
        raise FormatError(f"{path!r} was not written by lazypass.export_onnx (no 'lazypass' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise FormatError(f"{path!r}: its 'lazypass' metadata is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError(f"{path!r} was not written by lazypass.export_onnx (metadata format {meta.get('format')!r})"
                          if isinstance(meta, dict) else f"{path!r}: malformed 'lazypass' metadata")
    if meta.get("version", 0) > VERSION:
        raise FormatError(f"{path!r} has format version {meta['version']}; this lazypass reads up to {VERSION}")
    need = ("flavour", "params", "inputs", "constants", "settings", "state", "outputs", "out_tree", "records", "sites")
    missing = [k for k in need if k not in meta]
    if missing:
        raise FormatError(f"{path!r}: its lazypass metadata lacks {missing}")
    return meta


def _check_io(meta: dict, inputs: dict, outputs: dict, path: str) -> None:
    """The graph's inputs and outputs (name -> (dtype, shape)) must be those the metadata lists."""
    want_in = {e["name"]: e for e in meta["inputs"] + meta["settings"] + meta["state"]}
    want_out = {o["name"]: o for o in meta["outputs"] + meta["records"]}
    want_out.update({s["output"]: s for s in meta["state"]})
    problems = []
    for kind, want, have in (("input", want_in, inputs), ("output", want_out, outputs)):
        for name in sorted(set(want) - set(have)):
            problems.append(f"{kind} {name!r} is in the metadata but not in the graph")
        for name in sorted(set(have) - set(want)):
            problems.append(f"the graph has {kind} {name!r}, which the metadata does not list")
        for name in sorted(set(want) & set(have)):
            dtype, shape = have[name]
            if dtype != want[name]["dtype"] or (shape is not None and list(shape) != list(want[name]["shape"])):
                problems.append(f"{kind} {name!r} is {dtype}{list(shape or [])} in the graph, "
                                f"{want[name]['dtype']}{want[name]['shape']} in the metadata")
    if problems:
        raise FormatError(f"{path!r}: its metadata does not match its graph: " + "; ".join(problems[:6]))


def _files(path: str, meta: dict) -> list[str]:
    static = meta.get("static")
    if static is None:
        return [path]
    folder = os.path.dirname(os.path.abspath(path))
    files = [os.path.join(folder, f) for f in static["files"]]
    files[0] = path
    for f in files + [os.path.join(folder, static["data"])]:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{path!r} is a static lazypass export made of several files; {f!r} is missing")
    return files


# -- onnxruntime ---------------------------------------------------------------------

class _Ort:
    def __init__(self, path, providers, threads):
        import onnxruntime as ort

        self.ort = ort
        self.shared = {}  # static flavour: one copy of the weights for all pattern sessions
        first = self._session(path, providers, threads)
        meta = _meta(first.get_modelmeta().custom_metadata_map, path)
        self.meta = meta
        files = _files(path, meta)
        if len(files) > 1:
            self.shared = _shared_weights(files, meta)
            first = self._session(path, providers, threads)
        self.sessions = [first] + [self._session(f, providers, threads) for f in files[1:]]
        for f, s in zip(files, self.sessions):
            _check_io(meta, _ort_io(s.get_inputs()), _ort_io(s.get_outputs()), f)
            if f != path and _meta(s.get_modelmeta().custom_metadata_map, f).get("static", {}).get("files") != \
                    meta["static"]["files"]:
                raise FormatError(f"{f!r} does not belong to {path!r} (another export)")
        self.outputs = [o.name for o in first.get_outputs()]

    def _session(self, path, providers, threads):
        ort = self.ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        for name, value in self.shared.get(os.path.basename(path), {}).items():
            so.add_initializer(name, value)
        try:
            return ort.InferenceSession(path, so, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise FormatError(f"onnxruntime cannot load {path!r}: {e}") from None

    def run(self, pattern, feeds):
        session = self.sessions[pattern]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))


def _shared_weights(files, meta) -> dict:
    """The static flavour's weights as OrtValues over one memory map of the shared data file,
    handed to every pattern session (``SessionOptions.add_initializer``) so that the weights
    are in memory once. Needs the ``onnx`` package to read where each tensor lies; without
    it every session loads its own copy."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        return {}
    import onnxruntime as ort

    folder = os.path.dirname(os.path.abspath(files[0]))
    data = np.memmap(os.path.join(folder, meta["static"]["data"]), dtype=np.uint8, mode="r")
    values, arrays, shared = {}, [], {}
    for f in files:
        per_file = {}
        for t in onnx.load(f, load_external_data=False).graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            key = (int(info.get("offset", 0)), int(info["length"]), t.data_type, tuple(t.dims))
            if key not in values:
                dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
                array = np.array(data[key[0]: key[0] + key[1]].view(dtype).reshape(t.dims))  # read once
                arrays.append(array)
                values[key] = ort.OrtValue.ortvalue_from_numpy(array)
            per_file[t.name] = values[key]
        shared[os.path.basename(f)] = per_file
    shared["_arrays"] = arrays  # OrtValues borrow these buffers: keep them alive
    return shared


def _ort_io(values) -> dict:
    return {v.name: (_ORT_TYPES.get(v.type, v.type), v.shape if all(isinstance(d, int) for d in v.shape) else None)
            for v in values}


# -- MNN -----------------------------------------------------------------------------

_MNN_TYPES = {"float32": "float", "float16": "float", "float64": "double", "int64": "int", "int32": "int",
              "bool": "int", "int8": "int8", "uint8": "uint8"}


class _Mnn:
    """MNN through its Module API (``MNN.nn.load_module_from_file``), which runs control flow
    (``If``) by evaluating the condition on the host and running only the taken branch.

    MNN has no int64 or bool tensors: the converter turns them into int32; inputs are
    cast on the way in and outputs back to the metadata's dtypes on the way out. fp16
    files compute in fp32 on MNN's CPU backend unless the precision mode says otherwise.
    """

    def __init__(self, path, threads, cache_dir, backend):
        import onnx

        proto = onnx.load(path, load_external_data=False)
        meta = _meta({p.key: p.value for p in proto.metadata_props}, path)
        self.meta = meta
        files = _files(path, meta)
        if "MNN" not in sys.modules:  # its import prints the CPU features it found
            _quiet(lambda: __import__("MNN"))
        import MNN.expr as F
        import MNN.nn as nn

        self.F = F
        self.fallback = False  # True when the backend asked for was not there and MNN ran on CPU
        backends = {"cpu": F.Backend.CPU, "opencl": F.Backend.OPENCL}
        if backend not in backends:
            raise ValueError(f"mnn_backend must be 'cpu' or 'opencl', got {backend!r}")
        self.modules, self.io = [], []
        for f in files:
            p = proto if f == path else onnx.load(f, load_external_data=False)
            ins = {v.name: _onnx_type(v) for v in p.graph.input}
            outs = {v.name: _onnx_type(v) for v in p.graph.output}
            _check_io(meta, ins, outs, f)
            mnn = _convert(f, cache_dir)
            names_in, names_out = list(ins), list(outs)
            loaded = []
            log = _quiet(lambda: loaded.append(nn.load_module_from_file(
                mnn, names_in, names_out, backend=backends[backend], thread_num=threads or 1, shape_mutable=True)))
            module = loaded[0]
            if backend != "cpu" and "Can't Find" in log:  # MNN falls back to its CPU backend
                import warnings

                warnings.warn(f"this MNN build has no {backend} backend; running on CPU ({log.strip()})",
                              RuntimeWarning, stacklevel=3)
                self.fallback = True
            self.modules.append(module)
            self.io.append((names_in, names_out))
        self.dtypes = {e["name"]: e["dtype"] for e in meta["inputs"] + meta["settings"] + meta["state"]}
        self.out_dtypes = {o["name"]: o["dtype"] for o in meta["outputs"] + meta["records"]}
        self.out_dtypes.update({s["output"]: s["dtype"] for s in meta["state"]})

    def run(self, pattern, feeds):
        F = self.F
        names_in, names_out = self.io[pattern]
        args = []
        for name in names_in:
            arr = feeds[name]
            if arr.dtype == np.bool_ or arr.dtype == np.int64:
                arr = arr.astype(np.int32)
            elif arr.dtype == np.float16:
                arr = arr.astype(np.float32)
            dtype = {np.dtype(np.float32): F.float, np.dtype(np.int32): F.int, np.dtype(np.float64): F.double}[arr.dtype]
            args.append(F.const(arr.reshape(-1) if arr.ndim else arr.reshape(1), list(arr.shape), F.NCHW, dtype))
        outs = self.modules[pattern].forward(args)
        result = {}
        for name, var in zip(names_out, outs):
            value = np.array(var.read(), copy=True)
            result[name] = value.astype(np.dtype(self.out_dtypes[name]))
        return result


def _onnx_type(value):
    import onnx

    t = value.type.tensor_type
    return onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, [d.dim_value for d in t.shape.dim]


def _digest(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert(path: str, cache_dir: str | None) -> str:
    """ONNX -> MNN with MNN's converter, cached by the file's content."""
    import MNN

    folder = cache_dir or os.path.dirname(os.path.abspath(path))
    if not os.access(folder, os.W_OK):
        import tempfile

        folder = tempfile.gettempdir()
    digest = _digest(path)
    stem = os.path.basename(path)
    out = os.path.join(folder, f"{stem}.{digest[:12]}.mnn")
    if os.path.isfile(out):
        return out
    # the C++ converter itself: MNN's `mnnconvert` command wraps it with a usage logger that
    # installs packages and sends data over the network
    import _tools

    tmp = out + ".tmp"
    args = ["mnnconvert", "-f", "ONNX", "--modelFile", path, "--MNNModel", tmp, "--bizCode", "lazypass",
            "--keepInputFormat"]
    log = _quiet(lambda: _tools.mnnconvert(args))
    if not os.path.isfile(tmp):
        raise RuntimeError(f"MNN {MNN.version()} could not convert {path!r}; its converter said:\n{log[-3000:]}")
    os.replace(tmp, out)
    return out


def _quiet(fn) -> str:
    """Run ``fn`` with the process's stdout and stderr (C++ prints too) captured; returns what it printed."""
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            fn()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        f.seek(0)
        return f.read().decode(errors="replace")


__all__ = ["FormatError", "Output", "Runner", "load"]
