"""Main job: lazy sampling vs fewer-step DDIM at equal compute, on a DiT trained on real digits.

    PYTHONPATH=$PWD python examples/digits.py                    # 1,000 samples, CFG 1 (add --guidance 1 2 for CFG 2)
    PYTHONPATH=$PWD python examples/digits.py --samples 16 --guidance 1 --out /tmp/d   # smoke run

All methods start from the same noise and labels (100 of each digit by default):

- ``full``: DDIM at 20 and 10 steps, every branch computed (the references for PSNR);
- ``lazy``: the gates fitted by ``examples/fit_digits_gates.py`` (``lazypass.fit``,
  data-free), 50% lazy at 20 steps and 30% lazy at 10 steps;
- ``DDIM``: fewer steps at about the same MACs (10 and 7 steps, LazyDiT table 1 pairs);
- ``static``: the untrained baseline, every branch reused on a fixed pattern of steps
  (every other step for 50%, every third for 30%);
- ``best-fixed``: the best fixed (site, step) schedule at the same MACs, forecast reuse, found by
  ``examples/digits_fixed.py`` on separate noise (``examples/assets/digits_best_fixed_*.json``);
- ``... over UniPC`` (CFG 1 only): the same comparison for a user who samples with UniPC (diffusers'
  ``UniPCMultistepScheduler``, the strongest solver here at few steps): lazy over UniPC (gates fitted
  with ``scheduler=`` UniPC, ``examples/assets/digits_gates_unipc_*``) against UniPC with fewer steps.

Columns: lazy ratio (of all attention / MLP branch decisions), MACs per image (decisions
counted per sample, as the paper does), latency per image at batch 1 (median, where a lazy
sample really skips), PSNR against the full-compute run with the same number of steps as the
lazy run (same noise), Frechet distance (FD) to the 1,797 real digits in the classifier's
feature space, and the classifier's accuracy on the requested labels. "gap closed" is
``(FD_DDIM - FD_method) / (FD_DDIM - FD_full)``: the share of the FD that the fewer-step DDIM run
at about the same compute loses and the method wins back (docs/digits.md).

Writes ``grid.png`` (a row per method, CFG 1), ``heatmap.png`` (which site skipped at which
step, the share of samples) and ``table.md`` under ``--out``. Then the flow-matching model's
section (``examples/digits_flow_job.py``: lazy against fewer Euler steps, ``flow_table.md``;
``--no-flow`` leaves it out).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate
from tqdm.auto import tqdm

import lazypass
from digits_eval import (
    DIT_PATH, NULL_CLASS, gates_path, accuracy, classifier_outputs, frechet_distance, gaussian_stats,
    load_classifier, load_digit_images, load_dit, psnr, solver_sample,
)  # fmt: skip
from lazypass.checkpoint import read_gates
from lazypass.config import GATE_OPTIONS
from lazypass.runtime import runtime
from lazypass.sampling import ddim_sample


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "full" | "lazy" | "static" | "fixed" (a best fixed schedule asset)
    steps: int
    ratio: float = 0.0  # target lazy ratio (lazy / static)
    reference: str = ""  # full-compute run from the same noise, for PSNR
    ddim: str = ""  # the fewer-step run of the same sampler at the same compute, for "gap closed"
    sampler: str = "DDIM"  # or "UniPC" (digits_eval.solver_sample; CFG 1 only)


METHODS = [
    Method("full-20", "full", 20, reference="full-20"),
    Method("lazy-50%-20", "lazy", 20, 0.5, "full-20", "DDIM-10"),
    Method("static-50%-20", "static", 20, 0.5, "full-20", "DDIM-10"),
    Method("best-fixed-50%-20", "fixed", 20, 0.5, "full-20", "DDIM-10"),
    Method("DDIM-10", "full", 10, reference="full-20"),
    Method("full-10", "full", 10, reference="full-10"),
    Method("lazy-30%-10", "lazy", 10, 0.3, "full-10", "DDIM-7"),
    Method("static-30%-10", "static", 10, 0.3, "full-10", "DDIM-7"),
    Method("best-fixed-30%-10", "fixed", 10, 0.3, "full-10", "DDIM-7"),
    Method("DDIM-7", "full", 7, reference="full-10"),
    Method("UniPC-20", "full", 20, reference="UniPC-20", sampler="UniPC"),
    Method("lazy-50%-20 over UniPC", "lazy", 20, 0.5, "UniPC-20", "UniPC-10", sampler="UniPC"),
    Method("UniPC-10", "full", 10, reference="UniPC-20", sampler="UniPC"),
    Method("lazy-30%-10 over UniPC", "lazy", 10, 0.3, "UniPC-10", "UniPC-7", sampler="UniPC"),
    Method("UniPC-7", "full", 7, reference="UniPC-10", sampler="UniPC"),
]


# full compute at 10 steps is DDIM-10: run once, listed twice
FULL_ALIASES = {"full-10": ("DDIM-10",)}
UNIQUE = [m for m in METHODS if m.name not in FULL_ALIASES]


def methods_at(guidance: float, methods=METHODS) -> list[Method]:
    """The methods run at a CFG scale: the UniPC rows at CFG 1 only (``solver_sample`` has no CFG)."""
    return [m for m in methods if m.sampler == "DDIM" or guidance == 1.0]


def static_skips(steps: int, ratio: float) -> list[bool]:
    """Steps at which every branch is reused: evenly spread, never step 0 (no cache yet).

    Example:
        >>> [i for i, s in enumerate(static_skips(10, 0.3)) if s]
        [3, 6, 9]
    """
    return [math.floor((i + 1) * ratio + 1e-9) > math.floor(i * ratio + 1e-9) for i in range(steps)]


@dataclass
class Run:
    images: torch.Tensor
    skipped: np.ndarray | None = None  # (calls, sites, rows): decisions
    rows_per_image: int = 1
    extra: dict = field(default_factory=dict)


class Sampler:
    """The plain model, one lazy copy (gates swapped per method), and their MAC counts."""

    def __init__(self, model: torch.nn.Module, gates_dir: Path | None = None):
        self.plain = model
        self.gates_dir = gates_dir
        self.fixed = {}  # reuse mode -> digits_fixed.FixedRunner
        # the lazy copy takes the options the gates were fitted under (reuse, max_age, ...)
        saved = read_gates(self.gate_file(Method("", "lazy", 20, 0.5))).config
        self.lazy = lazypass.apply(copy.deepcopy(model), **{k: saved[k] for k in GATE_OPTIONS})
        self.program(1)  # trace now: the gates exist from here on

    def load(self, method: Method) -> None:
        if method.kind == "lazy":
            lazypass.load_gates(self.lazy, self.gate_file(method))

    def gate_file(self, method: Method) -> Path:
        path = gates_path(method.ratio, method.steps, method.sampler)
        return self.gates_dir / path.name if self.gates_dir else path

    def run(self, method: Method, noise, labels, guidance, bar=None, record=True) -> Run:
        guided = guidance != 1.0
        rows = 2 if guided else 1
        kwargs = dict(cond=labels, guidance_scale=guidance, null_cond=torch.tensor(NULL_CLASS),
                      learned_sigma=False)  # fmt: skip
        if method.kind == "full":
            cb = (lambda i, t, x: bar.update(1)) if bar is not None else None
            if method.sampler != "DDIM":
                return Run(solver_sample(self.plain, noise, method.steps, labels, method.sampler, callback=cb))
            return Run(ddim_sample(self.plain, noise, method.steps, callback=cb, **kwargs), None, rows)
        if method.kind == "fixed":
            return self.run_fixed(method, noise, kwargs, rows, bar, record)
        model = self.lazy
        self.load(method)
        schedule = static_skips(method.steps, method.ratio) if method.kind == "static" else None

        def set_step(i: int) -> None:
            if schedule is not None and i < len(schedule):
                lazypass.set_threshold(model, -0.5 if schedule[i] else 1.5)

        def cb(i, t, x):
            set_step(i + 1)
            if bar is not None:
                bar.update(1)

        with lazypass.trajectory(model):
            set_step(0)
            if method.sampler != "DDIM":
                images = solver_sample(model, noise, method.steps, labels, method.sampler, callback=cb)
            else:
                images = ddim_sample(model, noise, method.steps, callback=cb, **kwargs)
            skipped = lazypass.stats(model).skipped if record else None
        return Run(images, skipped, rows)

    def run_fixed(self, method: Method, noise, kwargs, rows, bar, record) -> Run:
        """A best fixed schedule asset, on its own lazy copy (its reuse mode, zero gate weights)."""
        from digits_fixed import FixedRunner, load_schedule, schedule_path

        schedule = load_schedule(schedule_path(method.ratio, method.steps))
        runner = self.fixed.get(schedule.reuse)
        if runner is None:
            runner = self.fixed[schedule.reuse] = FixedRunner(self.plain, schedule.reuse)
        cb = (lambda i, t, x: bar.update(1)) if bar is not None else None
        images, skipped = runner.sample(schedule.table, noise, kwargs.pop("cond"), callback=cb, **kwargs)
        return Run(images, skipped if record else None, rows)

    def program(self, batch_rows: int):
        x = torch.zeros(batch_rows, 1, 8, 8)
        t = torch.full((batch_rows,), 999, dtype=torch.long)
        y = torch.zeros(batch_rows, dtype=torch.long)
        return runtime(self.lazy).program_for((x, t, y), {})[0]

    def macs(self, method: Method, run: Run, batch_rows: int) -> float:
        """MACs per image: whole model per call, minus the branches each sample skipped."""
        prog = self.program(batch_rows)
        per_row = prog.model_macs / batch_rows
        calls = method.steps * run.rows_per_image
        total = calls * per_row
        if run.skipped is not None:
            site = np.array([s.macs / batch_rows for s in prog.sites])
            # skipped: (calls, sites, rows); mean over rows, summed over calls = per-row saving
            total -= float((run.skipped.mean(2) * site).sum()) * run.rows_per_image
        return total


def site_names(sampler: Sampler) -> list[str]:
    return [f"{s.path.replace('blocks.', 'block ')} ({s.kind})" for s in sampler.program(1).sites]


def latency_ms(sampler: Sampler, methods, noise, labels, guidance, images: int, repeats: int) -> dict[str, float]:
    """Median wall time per image at batch 1 (interleaved over methods and repeats)."""
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    for m in methods:  # warm-up (and the batch-1 trace of the lazy model)
        sampler.run(m, noise[:1], labels[:1], guidance, record=False)
    for _ in range(repeats):
        for k in range(images):
            for m in methods:
                start = time.perf_counter()
                sampler.run(m, noise[k : k + 1], labels[k : k + 1], guidance, record=False)
                times[m.name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(v)) for name, v in times.items()}


def _fmt_macs(n: float) -> str:
    return f"{n / 1e6:.1f}M"


def evaluate(sampler, classifier, real_stats, noise, labels, guidance, latency_images, latency_repeats, bar):
    batch_rows = noise.shape[0] * (2 if guidance != 1.0 else 1)
    runs: dict[str, Run] = {}
    results = {}
    methods = methods_at(guidance)
    for m in methods:
        same = [n for n in runs if n in FULL_ALIASES.get(m.name, ())]
        runs[m.name] = run = runs[same[0]] if same else sampler.run(m, noise, labels, guidance, bar)
        macs = sampler.macs(m, run, batch_rows)
        feats, preds = classifier_outputs(classifier, run.images)
        results[m.name] = dict(
            macs=macs, fd=frechet_distance(gaussian_stats(feats), real_stats), acc=accuracy(preds, labels),
        )  # fmt: skip
        if run.skipped is not None:
            sites = sampler.program(batch_rows).sites
            attn = [i for i, s in enumerate(sites) if s.kind == "attn"]
            ffn = [i for i, s in enumerate(sites) if s.kind == "ffn"]
            results[m.name].update(
                lazy=float(run.skipped.mean()), lazy_attn=float(run.skipped[:, attn].mean()),
                lazy_ffn=float(run.skipped[:, ffn].mean()),
            )  # fmt: skip
    for m in methods:
        r = results[m.name]
        r["psnr"] = math.inf if m.reference == m.name else psnr(runs[m.name].images, runs[m.reference].images)
        r["psnr_ref"] = m.reference
        if m.ddim:
            f_t, f_d = results[m.reference]["fd"], results[m.ddim]["fd"]
            r["gap"] = (f_d - r["fd"]) / (f_d - f_t) if f_d != f_t else float("nan")
    if latency_images:
        lat = latency_ms(sampler, methods_at(guidance, UNIQUE), noise, labels, guidance, latency_images,
                         latency_repeats)  # fmt: skip
        for m in methods:
            name = next((n for n in FULL_ALIASES.get(m.name, ()) if n in lat), m.name)
            results[m.name]["latency"] = lat[name]
    return runs, results


def table(results: dict, guidance: float, fmt: str = "simple") -> str:
    rows = []
    for m in methods_at(guidance):
        r = results[m.name]
        lazy = f"{r['lazy']:.0%} ({r['lazy_attn']:.0%} / {r['lazy_ffn']:.0%})" if "lazy" in r else "-"
        psnr_s = "ref" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f} vs {r['psnr_ref']}"
        rows.append([
            m.name, m.steps, lazy, _fmt_macs(r["macs"]),
            f"{r['latency']:.1f}" if "latency" in r else "-", psnr_s, f"{r['fd']:.2f}",
            f"{r['gap']:.0%}" if "gap" in r else "-", f"{r['acc']:.1%}",
        ])  # fmt: skip
    headers = ["method", "steps", "lazy (attn / mlp)", "MACs/image", "ms/image (b=1)", "PSNR dB",
               f"FD (cfg {guidance:g})", "gap closed", "accuracy"]  # fmt: skip
    return tabulate(rows, headers=headers, tablefmt=fmt)


def save_grid(runs: dict, path: Path, columns: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name for m in METHODS if m.name in runs]
    fig, axes = plt.subplots(len(names), 1, figsize=(columns * 0.42 + 1.6, len(names) * 0.5 + 0.3))
    for ax, name in zip(axes, names):
        imgs = runs[name].images[:columns, 0].clamp(-1, 1)
        strip = torch.cat([torch.nn.functional.pad(im, (0, 1), value=-1.0) for im in imgs], dim=1)
        ax.imshow(-strip.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.16, right=0.99, top=0.99, bottom=0.01, hspace=0.08)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_heatmap(runs: dict, names: list[str], sites: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 1.4, 3.2), squeeze=False)
    for k, (ax, name) in enumerate(zip(axes[0], names)):
        share = runs[name].skipped.mean(2).T  # (sites, calls): share of samples that skipped
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}: share of samples skipping", fontsize=9)
        ax.set_xlabel("sampling step")
        ax.set_yticks(range(len(sites)))
        ax.set_yticklabels(sites if k == 0 else [], fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000)
    # CFG 1 is the headline; CFG 2 doubles the batch, so it is opt-in (``--guidance 1 2``) to keep the
    # job under 5 minutes on 2 cores
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0], help="CFG scales (first: pictures)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-images", type=int, default=4, help="batch-1 images timed per method (0: skip)")
    p.add_argument("--latency-repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads (use 1 on a machine busy with other jobs)")
    p.add_argument("--dit", type=Path, default=DIT_PATH, help="DiT checkpoint")
    p.add_argument("--gates-dir", type=Path, default=None, help="folder of gate files (default examples/assets)")
    p.add_argument("--out", type=Path, default=Path("docs/digits"))
    p.add_argument("--flow", action=argparse.BooleanOptionalAction, default=True,
                   help="the flow-matching model's section (examples/digits_flow_job.py)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    model, classifier = load_dit(args.dit), load_classifier()
    real_x, _ = load_digit_images()
    real_stats = gaussian_stats(classifier_outputs(classifier, real_x)[0])
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.samples, 1, 8, 8, generator=g)
    labels = torch.arange(args.samples) % 10
    sampler = Sampler(model, args.gates_dir)
    for m in METHODS:
        if m.kind == "lazy" and not sampler.gate_file(m).exists():
            raise FileNotFoundError(f"{sampler.gate_file(m)} not found; fit it with `python examples/fit_digits_gates.py`")

    total = sum(m.steps for guidance in args.guidance for m in methods_at(guidance, UNIQUE))
    bar = tqdm(total=total, desc="sampling (model calls)", unit="step")
    all_results, first_runs = {}, None
    for guidance in args.guidance:
        runs, results = evaluate(sampler, classifier, real_stats, noise, labels, guidance,
                                 args.latency_images, args.latency_repeats, bar)  # fmt: skip
        all_results[guidance] = results
        first_runs = first_runs or runs
    bar.close()

    args.out.mkdir(parents=True, exist_ok=True)
    text = [f"{args.samples} samples, labels 0-9 in turn, seed {args.seed}; FD against the 1,797 real digits"]
    for guidance, results in all_results.items():
        print(f"\nCFG scale {guidance:g}")
        print(table(results, guidance))
        text += [f"\nCFG scale {guidance:g}\n", table(results, guidance, "github")]
    (args.out / "table.md").write_text("\n".join(text) + "\n")
    save_grid(first_runs, args.out / "grid.png", min(20, args.samples))
    save_heatmap(first_runs, [m.name for m in METHODS if m.kind == "lazy"], site_names(sampler),
                 args.out / "heatmap.png")  # fmt: skip
    print(f"\nwrote {args.out}/grid.png, heatmap.png, table.md in {time.perf_counter() - start:.0f} s")
    head = all_results[args.guidance[0]]
    print(
        f"headline (cfg {args.guidance[0]:g}): gap closed lazy-50%-20={head['lazy-50%-20']['gap']:.0%} "
        f"(static {head['static-50%-20']['gap']:.0%}), lazy-30%-10={head['lazy-30%-10']['gap']:.0%} "
        f"(static {head['static-30%-10']['gap']:.0%}); FD full-20={head['full-20']['fd']:.2f} "
        f"lazy-50%-20={head['lazy-50%-20']['fd']:.2f} DDIM-10={head['DDIM-10']['fd']:.2f}"
        + (f"; over UniPC: lazy-30%-10={head['lazy-30%-10 over UniPC']['fd']:.2f} UniPC-7={head['UniPC-7']['fd']:.2f}"
           if "UniPC-7" in head else "")
    )
    if args.flow:
        from digits_flow_job import run as flow_section

        flow_section(noise, labels, classifier, real_stats, args.out, args.latency_images, args.latency_repeats)
    return all_results


if __name__ == "__main__":
    main()
