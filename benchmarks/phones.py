"""Phones: ONNX file sizes and per-step latency in onnxruntime and MNN against torch eager.

DiT-S/2 (random weights), 32x32x4 latents, batch 2 (as ``benchmarks/overhead.py``), made lazy
with ``max_age=1`` so that one file serves both laziness levels:

  0% lazy    threshold 1.5: gates, conditionals and state run, nothing is skipped
  50% lazy   threshold -0.5: every site reuses its cache whenever it may; with max_age=1
             that is every other call (computes at calls 0, 2, 4, ..., reuses at 1, 3, 5, ...)

Per variant: the mean per-step latency of a 10-step trajectory (timesteps 900, 800, ..., 0;
a lazy trajectory alternates computing and reusing steps, so a median would pick one kind),
the median of that over ``--repeats`` trajectories. Variants: the original model in torch eager, the lazy model in torch eager,
the dynamic ONNX file (fp32 and fp16) in onnxruntime (CPU provider, graph optimisations on)
and in MNN (Module API, CPU backend), and the static file (the 50% schedule baked in) in
onnxruntime. All with ``--threads`` threads. File sizes: the original model through
``torch.onnx.export`` (dynamo) against the lazy exports.

    PYTHONPATH=$PWD python benchmarks/phones.py [--model DiT-S/2] [--threads 1] [--repeats 3] [--out /tmp/phones]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lazypass  # noqa: E402
from lazypass.models import build_dit  # noqa: E402
from lazypass.sampling import ddim_timesteps  # noqa: E402


def _size(files) -> int:
    return sum(os.path.getsize(f) for f in files)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="/tmp/lazypass-phones", help="folder for the exported files (kept; reused)")
    p.add_argument("--no-mnn", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    os.makedirs(a.out, exist_ok=True)

    torch.manual_seed(0)
    original = build_dit(a.model, input_size=32, init="random").eval()
    lazy = lazypass.apply(copy.deepcopy(original), max_age=1)
    b = a.batch
    x = torch.randn(b, 4, 32, 32)
    y = torch.randint(0, 1000, (b,))
    example = (x, torch.full((b,), 999), y)
    lazypass.trace(lazy, *example)
    ts = ddim_timesteps(a.steps)

    # the 50% run's schedule, for the static flavour
    lazypass.set_threshold(lazy, -0.5)
    with lazypass.trajectory(lazy), torch.no_grad():
        for t in ts:
            lazy(x, torch.full((b,), t), y)
        half = lazypass.stats(lazy)

    files: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}

    def export(name, fn):
        path = os.path.join(a.out, f"{name}.onnx")
        done = os.path.join(a.out, f"{name}.files")
        if os.path.exists(done):
            files[name] = open(done).read().split("\n")
            return
        start = time.time()
        files[name] = fn(path)
        seconds[name] = time.time() - start
        with open(done, "w") as f:
            f.write("\n".join(files[name]))
        print(f"exported {name}: {seconds[name]:.0f} s", file=sys.stderr)

    def plain(path):
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(original, example, path, dynamo=True, external_data=False)
        return [path]

    export("plain", plain)
    lazypass.set_threshold(lazy, 0.5)
    export("dynamic", lambda path: lazypass.export_onnx(lazy, path, example_inputs=example))
    export("dynamic_fp16", lambda path: lazypass.export_onnx(lazy, path, example_inputs=example,
                                                             dtype=torch.float16))
    export("static", lambda path: lazypass.export_onnx(lazy, path, example_inputs=example, flavour="static",
                                                       schedule=half))

    runners = {
        "onnxruntime": lazypass.onnx.load(files["dynamic"][0], threads=a.threads),
        "onnxruntime fp16": lazypass.onnx.load(files["dynamic_fp16"][0], threads=a.threads),
        "onnxruntime static": lazypass.onnx.load(files["static"][0], threads=a.threads),
    }
    if not a.no_mnn:
        runners["MNN"] = lazypass.onnx.load(files["dynamic"][0], runtime="mnn", threads=a.threads)
        runners["MNN fp16"] = lazypass.onnx.load(files["dynamic_fp16"][0], runtime="mnn", threads=a.threads)

    def trajectory(call):
        times = []
        for t in ts:
            tt = torch.full((b,), t)
            start = time.perf_counter()
            call(x, tt, y)
            times.append(time.perf_counter() - start)
        return times

    lazy_ratio = {}

    def torch_run(model, threshold):
        def run():
            if threshold is None:
                with torch.no_grad():
                    return trajectory(model)
            lazypass.set_threshold(model, threshold)
            with lazypass.trajectory(model), torch.no_grad():
                times = trajectory(model)
                lazy_ratio[threshold] = lazypass.stats(model).lazy_ratio
            return times
        return run

    def onnx_run(runner, threshold):
        xs, ys = x.numpy(), y.numpy()

        def run():
            runner.reset()
            if threshold is not None:
                runner.set_threshold(threshold)
            return trajectory(lambda _x, t, _y: runner(xs, t.numpy(), ys))
        return run

    variants = {("torch eager, original", "-"): torch_run(original, None)}
    for label, thr in (("0%", 1.5), ("50%", -0.5)):
        variants[("torch eager, lazy", label)] = torch_run(lazy, thr)
        for name, runner in runners.items():
            if name.endswith("static"):
                if label == "50%":
                    variants[(name, label)] = onnx_run(runner, None)
                continue
            variants[(name, label)] = onnx_run(runner, thr)

    load0 = f"{os.getloadavg()[0]:.1f}"
    results = {k: [] for k in variants}  # per repeat: mean seconds per step
    ratios = {}
    for _ in range(a.repeats):
        for key, run in variants.items():  # the variants take turns in every repeat
            times = run()
            results[key].append(sum(times) / len(times))
            if key[0].startswith("onnx") or key[0].startswith("MNN"):
                name = key[0]
                ratios[key] = float(runners[name].skipped().mean())
            elif key[0] == "torch eager, lazy":
                ratios[key] = lazy_ratio[1.5 if key[1] == "0%" else -0.5]
    base = statistics.median(results[("torch eager, original", "-")])
    rows = []
    for key, times in results.items():
        med = statistics.median(times)
        rows.append([key[0], key[1], f"{ratios.get(key, 0.0):.0%}", f"{med * 1e3:.1f}", f"{med / base:.2f}"])
    print(f"{a.model}, 32x32x4 latents, batch {b}, {a.steps} steps x {a.repeats} repeats, {a.threads} thread(s); "
          f"{platform.machine()}, torch {torch.__version__}, load average {load0} at start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(tabulate(rows, headers=["runtime", "setting", "lazy", "ms/step (mean)", "vs torch original"]))
    sizes = [[k, len(v), _mb(_size(v))] for k, v in files.items()]
    print()
    print(tabulate(sizes, headers=["file", "files", "size"]))
    if seconds:
        print("export seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
