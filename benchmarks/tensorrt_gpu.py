"""TensorRT engines with the skip decisions inside: parity, proof of skipping, latency (needs a GPU).

Not run yet: this script is written for an NVIDIA GPU with ``tensorrt`` installed
(``pip install "lazypass[tensorrt]"``) and has not run on one. Stages, in order, each
started only when its guessed duration fits in the time budget (``--budget``, default 450 s;
the guesses are replaced by the measured time of the first stage of each kind), each printed
as it ends:

1. parity: DiT-S/2 (random weights, seeded random gates: mixed decisions), 32x32x4
   latents (256x256 images), batch 2, a 10-step DDIM trajectory of the fp32 eager lazy
   model (on the CPU, fp32) fed to an fp32 and an fp16 engine: max abs error (goal fp32
   <= 1e-3) and the share of (call, site, sample) decisions that agree.
2. latency, per model (DiT-S/2, DiT-XL/2) and batch (1, 8), fp16 everywhere, made lazy
   with ``max_age=1`` so that one engine serves both levels: 0% lazy (threshold 1.5) and
   50% lazy (threshold -0.5: every site reuses on every other call). Variants: the engine
   at 0% and 50% over ``--steps`` DDIM steps, the engine at 0% over half the steps (DDIM
   with half the steps, same engine), the original model in torch eager, and
   ``torch.compile(lazy, backend="lazydit")`` at 0% and 50%. Mean ms per step of a
   trajectory (median over ``--repeats``), and per trajectory.
3. proof that a reusing call skips work, on the first latency engine: TensorRT's
   per-layer profile (``IProfiler``) of a computing call and a reusing call (layers
   reported, their summed time), and the engine's ms for computing and for reusing calls
   of the 50% trajectories.

    PYTHONPATH=$PWD python benchmarks/tensorrt_gpu.py [--budget 450] [--models DiT-S/2,DiT-XL/2]
        [--batches 1,8] [--steps 20] [--repeats 3] [--out /tmp/lazypass-trt] [--json results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lazypass  # noqa: E402
from lazypass.models import build_dit  # noqa: E402
from lazypass.sampling import ddim_step, ddim_timesteps  # noqa: E402

START = time.time()


def _elapsed() -> float:
    return time.time() - START


def _seeded_gates(model, seed=1, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lazy_gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _inputs(b, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 32, 32, generator=g)
    y = torch.randint(0, 1000, (b,), generator=g)
    return x.to(device), y.to(device)


def parity(a, results):
    torch.manual_seed(0)
    original = build_dit("DiT-S/2", input_size=32, init="random").eval()
    lazy = lazypass.apply(copy.deepcopy(original))
    x, y = _inputs(2)
    lazypass.trace(lazy, x, torch.full((2,), 999), y)
    _seeded_gates(lazy)
    rows = []
    for fp16 in (False, True):
        path = os.path.join(a.out, f"parity_fp{16 if fp16 else 32}.engine")
        start = time.time()
        lazypass.export_tensorrt(lazy, path, example_inputs=(x, torch.full((2,), 999), y), fp16=fp16)
        built = time.time() - start
        runner = lazypass.tensorrt.load(path)
        lazypass.reset(lazy)
        runner.reset()
        ts = ddim_timesteps(10)
        xt, err = x.clone(), 0.0
        for i, t in enumerate(ts):
            tt = torch.full((2,), t)
            with torch.no_grad():
                ref = lazy(xt, tt, y)
            out = runner(xt.cuda(), tt.cuda(), y.cuda()).float().cpu()
            err = max(err, float((ref - out).abs().max()))
            xt = ddim_step(xt, ref[:, :4], t, ts[i + 1] if i + 1 < len(ts) else -1)
        same = float((runner.skipped() == lazypass.stats(lazy).skipped).mean())
        rows.append({"engine": "fp16" if fp16 else "fp32", "max_abs_error": err, "same_decisions": same,
                     "lazy_ratio": lazypass.stats(lazy).lazy_ratio, "export_build_s": built})
        print(f"parity {rows[-1]}", flush=True)
    results["parity"] = rows


def _trajectory_ms(call, b, steps, device):
    """Per-call milliseconds over a ``steps``-step trajectory (descending timesteps)."""
    times = []
    for t in ddim_timesteps(steps):
        tt = torch.full((b,), t, device=device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        call(tt)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def latency(a, name, b, results):
    torch.manual_seed(0)
    original = build_dit(name, input_size=32, init="random").eval()
    lazy = lazypass.apply(copy.deepcopy(original), max_age=1)
    x, y = _inputs(b)
    t0 = torch.full((b,), 999)
    lazypass.trace(lazy, x, t0, y)
    path = os.path.join(a.out, f"{name.replace('/', '_')}_b{b}.engine")
    start = time.time()
    lazypass.export_tensorrt(lazy, path, example_inputs=(x, t0, y), fp16=True)
    build_s = time.time() - start
    print(f"{name} b{b}: engine exported and built in {build_s:.0f} s", flush=True)
    runner = lazypass.tensorrt.load(path)
    xc, yc = x.cuda(), y.cuda()
    x16 = xc.half()

    def engine(threshold):
        def run(steps):
            runner.reset()
            runner.set_threshold(threshold)
            ms = _trajectory_ms(lambda tt: runner(x16, tt, yc), b, steps, "cuda")
            return ms, float(runner.skipped().mean())
        return run

    eager16 = copy.deepcopy(original).half().cuda()

    def eager(steps):
        with torch.no_grad():
            return _trajectory_ms(lambda tt: eager16(x16, tt, yc), b, steps, "cuda"), 0.0

    variants = {
        ("TensorRT", "0%", a.steps): engine(1.5),
        ("TensorRT", "50%", a.steps): engine(-0.5),
        ("TensorRT, DDIM half the steps", "0%", a.steps // 2): engine(1.5),
        ("torch eager, original", "-", a.steps): eager,
    }
    if not a.no_compile and _elapsed() < a.budget:
        try:
            lazy16 = lazypass.apply(copy.deepcopy(original).half().cuda(), max_age=1)
            compiled = torch.compile(lazy16, backend="lazydit", fullgraph=True, dynamic=False)
            with torch.no_grad():
                compiled(x16, torch.full((b,), 999, device="cuda"), yc)

            def lazydit(threshold):
                def run(steps):
                    lazypass.set_threshold(lazy16, threshold)
                    with torch.no_grad(), lazypass.trajectory(lazy16):
                        ms = _trajectory_ms(lambda tt: compiled(x16, tt, yc), b, steps, "cuda")
                        return ms, lazypass.stats(lazy16).lazy_ratio
                return run

            variants[("torch.compile lazydit", "0%", a.steps)] = lazydit(1.5)
            variants[("torch.compile lazydit", "50%", a.steps)] = lazydit(-0.5)
        except Exception as e:  # noqa: BLE001 - a benchmark row, not the run, fails
            print(f"lazydit failed on {name} b{b}: {e!r}", flush=True)
    for run in variants.values():  # warm-up
        run(2)
    per_step = {k: [] for k in variants}
    ratio, reuse_ms, compute_ms = {}, [], []
    for _ in range(a.repeats):
        for key, run in variants.items():
            ms, r = run(key[2])
            per_step[key].append(sum(ms) / len(ms))
            ratio[key] = r
            if key == ("TensorRT", "50%", a.steps):  # max_age=1: computes at even calls, reuses at odd ones
                compute_ms += ms[0::2]
                reuse_ms += ms[1::2]
    base = statistics.median(per_step[("torch eager, original", "-", a.steps)]) * a.steps
    rows = []
    for key, values in per_step.items():
        med = statistics.median(values)
        rows.append({"model": name, "batch": b, "variant": key[0], "setting": key[1], "steps": key[2],
                     "lazy": ratio[key], "ms_per_step": med, "ms_per_trajectory": med * key[2],
                     "vs_torch_eager_trajectory": med * key[2] / base})
        print(f"{name} b{b} {key[0]:32s} {key[1]:4s} steps {key[2]:3d} lazy {ratio[key]:4.0%} "
              f"{med:8.2f} ms/step {med * key[2]:9.1f} ms/trajectory  x{med * key[2] / base:.2f}", flush=True)
    results.setdefault("latency", []).extend(rows)
    results.setdefault("engine_calls", []).append({
        "model": name, "batch": b, "build_s": build_s,
        "computing_call_ms": statistics.median(compute_ms), "reusing_call_ms": statistics.median(reuse_ms)})
    print(f"{name} b{b}: engine call at 50%: computing {statistics.median(compute_ms):.2f} ms, "
          f"reusing {statistics.median(reuse_ms):.2f} ms", flush=True)
    if "profile" not in results:
        results["profile"] = profile(runner, x16, yc, b)


def profile(runner, x16, yc, b):
    import tensorrt as trt

    class Layers(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.ms = {}

        def report_layer_time(self, layer_name, ms):
            self.ms[layer_name] = self.ms.get(layer_name, 0.0) + ms

    out, keep = {}, []
    runner.reset()
    for label, t, threshold in (("computing call", 900, 1.5), ("reusing call", 800, -0.5)):
        runner.set_threshold(threshold)
        layers = Layers()
        keep.append(layers)  # alive while the context may call it
        runner.engine.context.profiler = layers
        runner(x16, torch.full((b,), t, device="cuda"), yc)
        torch.cuda.synchronize()
        top = sorted(layers.ms.items(), key=lambda kv: -kv[1])[:8]
        out[label] = {"layers_reported": len(layers.ms), "summed_ms": sum(layers.ms.values()),
                      "largest": [[k, v] for k, v in top]}
        print(f"profile, {label}: {len(layers.ms)} layers reported, {sum(layers.ms.values()):.2f} ms summed; "
              f"largest {[(k[:60], round(v, 3)) for k, v in top[:4]]}", flush=True)
    out["skipped"] = runner.skipped().tolist()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=450, help="seconds; a stage starts only if its guess fits")
    p.add_argument("--models", default="DiT-S/2,DiT-XL/2")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile(backend='lazydit')")
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--out", default="/tmp/lazypass-trt", help="folder for the engines")
    p.add_argument("--json", default=None, help="write the results there")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from lazypass.backends.tensorrt import import_tensorrt

    import_tensorrt()  # the install hint, before anything is built
    import tensorrt as trt

    os.makedirs(a.out, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(), "tensorrt": trt.__version__, "torch": torch.__version__,
               "steps": a.steps, "repeats": a.repeats, "skipped_stages": []}
    print(f"{results['gpu']}, TensorRT {trt.__version__}, torch {torch.__version__}", flush=True)
    # guesses of a stage's seconds (export, build, timing), replaced by what the first stage of
    # the same kind took; a stage starts only when its guess fits in what is left of the budget
    guess = {"parity": 120.0, "DiT-S/2": 90.0, "DiT-XL/2": 300.0}
    stages = [] if a.no_parity else [("parity", "parity", lambda: parity(a, results))]
    for name in a.models.split(","):
        for b in (int(v) for v in a.batches.split(",")):
            stages.append((f"latency {name} b{b}", name, lambda name=name, b=b: latency(a, name, b, results)))
    for label, kind, stage in stages:
        need = guess.get(kind, 300.0)
        if _elapsed() + need > a.budget:
            results["skipped_stages"].append(label)
            print(f"skipped ({_elapsed():.0f} s spent, about {need:.0f} s needed, budget {a.budget:.0f} s): {label}",
                  flush=True)
            continue
        start = time.time()
        try:
            stage()
        except Exception:  # noqa: BLE001 - report and go on with the next stage
            results.setdefault("failed", {})[label] = traceback.format_exc()[-3000:]
            print(f"FAILED {label}:\n{traceback.format_exc()[-3000:]}", flush=True)
        guess[kind] = time.time() - start
        print(f"[{label}: {time.time() - start:.0f} s; {_elapsed():.0f} s in all]", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps({k: v for k, v in results.items() if k != "profile"}, indent=1))


if __name__ == "__main__":
    main()
