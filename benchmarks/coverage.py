"""Coverage: lazypass on every DiT-family transformer class diffusers ships, one table.

Each model is built from a tiny config with seeded random weights (``tests/zoo.py``; nothing
is downloaded) and checked through the public API:

* traced: ``torch.export`` capture + site matching works (else the reason);
* sites: sites found, by kind (``attn``/``ffn``; ``xN`` = joint sites with N streams);
* attn ops: attention ops (sdpa, or softmax between matmuls) inside a site / in the model;
* MACs: share of the model's multiply-accumulates inside sites;
* parity: threshold 1.5 (never skip) vs the original model, max abs error over 2 steps;
* reuse: threshold -0.5, step 2 skips every site (compute saved) and its output differs from a
  full step 2 (max abs difference shown);
* compile: the lazy model under ``torch.compile(backend="lazydit", fullgraph=True)`` matches
  the eager lazy model over a step that computes and a step that reuses (by default only
  for a few models: Inductor needs minutes per model here; ``--compile all``);
* onnx: ``lazypass.export_onnx`` (dynamic flavour: the decisions as ``If``) and the exported file
  in onnxruntime (``lazypass.onnx.load``) against the eager lazy model over a step that computes
  and a step that reuses every site (threshold -0.5), max abs error shown (``--onnx none`` skips
  it: an export takes 1-2 minutes per model on a small CPU).

``--markdown PATH`` writes the tables, with the command, versions, threads and the machine's
load average, between the two markers ``BEGIN`` / ``END`` of an existing page (the prose
around them stays, as in ``docs/coverage.md``), or a new page with only the tables.

Run::

    PYTHONPATH=$PWD python benchmarks/coverage.py                 # all models
    PYTHONPATH=$PWD python benchmarks/coverage.py --models flux,sana
    PYTHONPATH=$PWD python benchmarks/coverage.py --markdown docs/coverage.md   # the committed page
    PYTHONPATH=$PWD python benchmarks/coverage.py --compile all     # slow
    PYTHONPATH=$PWD python benchmarks/coverage.py --onnx none       # without the ONNX column
"""

from __future__ import annotations

import argparse
import copy
import re
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lazypass  # noqa: E402
from lazypass.ops import macs, op_kind  # noqa: E402
from lazypass.runtime import runtime  # noqa: E402
from tests.zoo import SKIPPED, ZOO, diffusers_transformers  # noqa: E402

STEPS = (900, 600)
COMPILE_DEFAULT = ("dit", "flux", "sana")
BEGIN = "<!-- benchmarks/coverage.py --markdown writes from here -->"
END = "<!-- to here -->"
HEADERS = ["model", "class", "traced", "sites", "attn ops", "MACs", "parity", "reuse", "compile", "onnx", "note"]


def _short(e: BaseException, n: int = 90) -> str:
    msg = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())  # the ONNX exporter colours its messages
    return f"{type(e).__name__}: {msg[:n]}"


def _run(model, z, t, seed, batch=2):
    args, kwargs = z.inputs(batch, t, seed)
    with torch.no_grad():
        return z.output(model(*args, **kwargs))


def _attention_ops(gm) -> int:
    kinds = [op_kind(n) for n in gm.graph.nodes]
    return kinds.count("sdpa") + kinds.count("softmax")


def _site_summary(sites) -> str:
    parts = []
    for kind in ("attn", "ffn"):
        ks = [s for s in sites if s.kind == kind]
        if not ks:
            continue
        joint = sum(len(s.tokens) > 1 for s in ks)
        parts.append(f"{len(ks)} {kind}" + (f" ({joint} joint)" if joint else ""))
    return ", ".join(parts) or "0"


def _attn_cover(prog) -> str:
    core = prog.core
    inside = sum(_attention_ops(getattr(core, f"lazy_site_{i}_decide").compute) for i in range(len(prog.sites)))
    outside = _attention_ops(core)
    return f"{inside}/{inside + outside}"


def check(name: str, compile_check: bool = True, onnx_check: bool = True) -> dict:
    z = ZOO[name]
    row = dict.fromkeys(HEADERS, "")
    row.update(model=name, onnx="not run", note=z.note)
    row["class"] = z.cls
    model = z.build()
    ref = copy.deepcopy(model)
    lazypass.apply(model)
    try:
        args, kwargs = z.inputs(2, STEPS[0], 0)
        sites = lazypass.report(model, *args, print_table=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - the table reports why
        row.update(traced=f"no ({_short(e, 40)})", sites="-", parity="-", reuse="-", compile="-", onnx="-")
        row["attn ops"] = row["MACs"] = "-"
        return row
    prog = next(iter(runtime(model).programs.values()))
    row["traced"] = "yes"
    row["sites"] = _site_summary(sites)
    row["attn ops"] = _attn_cover(prog)
    row["MACs"] = f"{sum(s.macs for s in sites) / prog.model_macs:.0%}" if prog.model_macs else "?"
    row["_sites"] = sites

    try:
        lazypass.set_threshold(model, 1.5)
        err = 0.0
        with lazypass.trajectory(model):
            for k, t in enumerate(STEPS):
                err = max(err, float((_run(model, z, t, k) - _run(ref, z, t, k)).abs().max()))
        row["parity"] = f"{err:.1e}"
        row["_parity"] = err
    except Exception as e:  # noqa: BLE001
        row["parity"] = f"fails ({_short(e)})"

    try:
        lazypass.set_threshold(model, -0.5)
        with lazypass.trajectory(model):
            _run(model, z, STEPS[0], 0)
            second = _run(model, z, STEPS[1], 1)
            st = lazypass.stats(model)
        diff = float((second - _run(ref, z, STEPS[1], 1)).abs().max())
        skipped_all = bool(st.saved[1].all()) and not st.saved[0].any()
        row["reuse"] = f"{'yes' if skipped_all and diff > 1e-4 else 'NO'} (diff {diff:.1e})"
        row["_reuse"] = (skipped_all, diff)
    except Exception as e:  # noqa: BLE001
        row["reuse"] = f"fails ({_short(e)})"

    row["compile"] = _compile(z) if compile_check else "not run"
    if onnx_check:
        row["onnx"], row["_onnx"] = onnx_parity(z)
    return row


def onnx_parity(z) -> tuple[str, float | None]:
    """Export the lazy model (dynamic flavour) and run the file in onnxruntime against the
    eager lazy model: step 1 computes every site, step 2 reuses every site (threshold -0.5).
    Returns the table cell and the max abs error (None where it failed)."""
    try:
        import onnxruntime  # noqa: F401

        import lazypass.onnx  # noqa: F401
    except ImportError:
        return "n/a (pip install lazypass[onnx])", None
    try:
        model = z.build()
        args, kwargs = z.inputs(2, STEPS[0], 0)
        lazypass.apply(model, example_inputs=args, example_kwargs=kwargs)
        lazypass.set_threshold(model, -0.5)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.onnx")
            lazypass.export_onnx(model, path)
            runner = lazypass.onnx.load(path)
            err = 0.0
            with lazypass.trajectory(model):
                for k, t in enumerate(STEPS):
                    a, kw = z.inputs(2, t, k)
                    ref = _run(model, z, t, k)
                    out = torch.as_tensor(z.output(runner(*a, **kw)))
                    err = max(err, float((out - ref).abs().max()))
                st = lazypass.stats(model)
        same = [r["saved"].tolist() for r in runner.records] == st.saved.tolist()
        reused = bool(runner.records[1]["saved"].all()) and not runner.records[0]["saved"].any()
        ok = err <= 1e-4 and same and reused
        return (f"yes ({err:.0e})" if ok else f"NO (err {err:.1e}, same decisions {same}, reused {reused})"), err
    except Exception as e:  # noqa: BLE001 - the table reports why
        return f"fails ({_short(e, 60)})", None


def _compile(z) -> str:
    """Lazy model under ``torch.compile(backend="lazydit", fullgraph=True)`` vs the same eager.

    Threshold -0.5 over two steps: step 1 computes, step 2 reuses every site; both must
    match the eager lazy model.
    """
    try:
        import lazypass.backends.inductor  # noqa: F401
    except ImportError:
        return "n/a (backend not merged)"
    try:
        outs = []
        for compiled in (True, False):
            model = z.build()
            args, kwargs = z.inputs(2, STEPS[0], 0)
            lazypass.apply(model, example_inputs=args, example_kwargs=kwargs)
            lazypass.set_threshold(model, -0.5)
            torch._dynamo.reset()
            fn = torch.compile(model, backend="lazydit", fullgraph=True) if compiled else model
            with lazypass.trajectory(model):
                outs.append([_run(fn, z, t, k) for k, t in enumerate(STEPS)])
        err = max(float((a - b).abs().max()) for a, b in zip(*outs))
        return f"yes ({err:.0e})" if err <= 1e-4 else f"NO (err {err:.1e})"
    except Exception as e:  # noqa: BLE001
        return f"fails ({_short(e, 60)})"


def _not_covered() -> list[list[str]]:
    """Every transformer class diffusers exports that the zoo does not build, with the reason."""
    built = {z.cls for z in ZOO.values()}
    return [
        [name, SKIPPED.get(name, "NOT LISTED: add it to SKIPPED in tests/zoo.py, with the reason")]
        for name in sorted(diffusers_transformers() - built)
    ]


def _conditions(argv, threads: int, loads: tuple[float, float]) -> str:
    import diffusers

    cmd = "PYTHONPATH=$PWD python benchmarks/coverage.py " + shlex.join(argv)
    return (
        f"Written by `{cmd.strip()}` with torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{threads} torch thread(s), on {platform.machine()} with {os.cpu_count()} cores (load average "
        f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end)"
    )


def write_markdown(path: str, text: str) -> None:
    """Put ``text`` between ``BEGIN`` and ``END`` of the page at ``path``, or write a new page."""
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    old = open(path).read() if os.path.exists(path) else ""
    if BEGIN in old and END in old.split(BEGIN, 1)[1]:
        head, rest = old.split(BEGIN, 1)
        page = head + block + rest.split(END, 1)[1]
    else:
        page = "# Coverage: the DiT-family transformers of diffusers\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(page)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", help="comma-separated names (default: all): " + ",".join(ZOO))
    p.add_argument("--markdown", help="also write the table as markdown to this file")
    p.add_argument("--compile", default=",".join(COMPILE_DEFAULT),
                   help="models to check under torch.compile (Inductor takes minutes per model on a small "
                        "CPU): comma-separated names, 'all' or 'none' (default: %(default)s)")
    p.add_argument("--onnx", default="all",
                   help="models to export to ONNX and check in onnxruntime (1-2 minutes per model on a small CPU): "
                        "comma-separated names, 'all' or 'none' (default: %(default)s)")
    p.add_argument("--sites", action="store_true", help="print each model's site table too")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    names = a.models.split(",") if a.models else list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {', '.join(ZOO)}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows, start, load_start = [], time.time(), os.getloadavg()[0]
    for name in names:
        t0 = time.time()
        try:
            row = check(name, compile_check=a.compile == "all" or name in a.compile.split(","),
                        onnx_check=a.onnx == "all" or name in a.onnx.split(","))
        except Exception as e:  # noqa: BLE001 - building the model itself failed
            row = dict.fromkeys(HEADERS, "-")
            row.update(model=name, traced=f"no (build: {_short(e)})")
            row["class"] = ZOO[name].cls
        rows.append(row)
        print(f"{name}: {time.time() - t0:.1f}s  traced={row['traced']}  onnx={row['onnx']}", file=sys.stderr, flush=True)
        if a.sites and "_sites" in row:
            from lazypass.report import site_table

            print(site_table(row["_sites"], 0).rsplit("\n", 1)[0], file=sys.stderr)

    from tabulate import tabulate

    table = [[r[h] for h in HEADERS] for r in rows]
    print(tabulate(table, headers=HEADERS))
    missing = _not_covered()
    if not a.models:
        print()
        print(tabulate(missing, headers=["not covered", "why"]))
    traced = [r for r in rows if r["traced"] == "yes"]
    parity_ok = [r for r in traced if r.get("_parity", 1.0) <= 1e-4]
    reuse_ok = [r for r in traced if str(r["reuse"]).startswith("yes")]
    onnx_ok = [r for r in traced if str(r["onnx"]).startswith("yes")]
    summary = (
        f"coverage: models={len(rows)} traced={len(traced)} parity_ok={len(parity_ok)} "
        f"reuse_ok={len(reuse_ok)} onnx_ok={len(onnx_ok)} not_built={len(missing)} seconds={time.time() - start:.0f}"
    )
    if a.markdown:
        text = _conditions(argv, torch.get_num_threads(), (load_start, os.getloadavg()[0]))
        text += f"; it ended with `{summary}`:\n\n" + tabulate(table, headers=HEADERS, tablefmt="github") + "\n"
        if not a.models:
            text += "\n" + tabulate(missing, headers=["not covered", "why"], tablefmt="github") + "\n"
        write_markdown(a.markdown, text)
    print(summary)
    return rows


if __name__ == "__main__":
    main()
