"""Per-call cost of the live-model checks against a whole lazy call (docs/live-model.md).

At every eager call a lazy model asks whether the model changed since it was traced
(``Runtime.check_model``), whether this call must run the original forward (``runs_plain``:
train mode, grad with trainable weights, hooks), and claims the run for the calling thread
(``Run.claim``). This times the three together, and the change detection alone, on tiny_dit
and DiT-S/2 (random weights), batch 2, one torch thread; best of ``--repeats``.

    python benchmarks/live_checks.py [--repeats 5]

Timings depend on the machine and its load: run it on a quiet machine.
"""

import argparse
import time

import torch

import lazypass
from lazypass.models import build_dit, tiny_dit
from lazypass.runtime import runtime


def best(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - start) / n)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [("tiny_dit", tiny_dit(), (2, 4, 8, 8), 50),
             ("DiT-S/2", build_dit("DiT-S/2", init="random").eval(), (2, 4, 32, 32), 3)]
    for name, model, shape, calls in cases:
        lazypass.apply(model)
        x, t, y = torch.randn(*shape), torch.tensor([500, 500]), torch.tensor([1, 2])
        rt = runtime(model)
        with torch.no_grad():
            model(x, t, y)  # traced here
            call = best(lambda: model(x, t, y), calls, args.repeats)
            run = rt.current_run()

            def checks():
                rt.check_model()
                rt.runs_plain()
                run.claim(lambda: False)

            cost = best(checks, 5000, args.repeats)
            watch = best(rt.watch.same, 5000, args.repeats)
        modules = sum(1 for _ in model.modules())
        print(f"{name}: {modules} modules; lazy call {call * 1e3:.2f} ms; live checks {cost * 1e6:.1f} us per call "
              f"({100 * cost / call:.2f}% of the call); change detection alone {watch * 1e6:.1f} us")


if __name__ == "__main__":
    main()
