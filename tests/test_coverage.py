"""The coverage table of ``benchmarks/coverage.py`` must not regress.

A fast subset of the diffusers zoo (``tests/zoo.py``) runs by default; the rest of the
models with a known table row run with ``-m slow``.  Per model: the sites found by kind
(and how many are joint, several-stream sites), parity with the original model at
threshold 1.5, and reuse at threshold -0.5 (step 2 skips every site and its output
differs from a full step 2).  And every transformer class diffusers exports is either built
in the zoo or listed in ``tests.zoo.SKIPPED`` with a reason: a class added by a new diffusers
release fails the test until someone decides.
"""

import copy

import pytest
import torch

import lazypass
from lazypass.runtime import runtime
from tests.zoo import SKIPPED, ZOO, diffusers_transformers

# name: (attn sites, ffn sites, joint sites); what the table in docs/coverage.md shows
EXPECTED = {
    "dit": (2, 2, 0),
    "pixart": (4, 2, 0),
    "sd3": (2, 3, 1),
    "flux": (2, 2, 1),  # the single-stream block (parallel attention + MLP) is one attn site
    "sana": (4, 2, 0),  # linear attention counts as attention
    "wan": (4, 2, 0),
    "auraflow": (2, 3, 1),
    "latte": (3, 2, 0),
}
SLOW = {
    "hunyuan_dit": (8, 4, 0),
    "lumina_next": (2, 2, 0),
    "cogvideox": (2, 2, 3),
    "allegro": (4, 2, 0),
    "mochi": (2, 3, 1),
    "ltx": (4, 2, 0),
    "cogview4": (2, 3, 2),
    "cosmos": (4, 2, 0),
    "stable_audio": (4, 4, 0),
    "qwen_image": (2, 3, 2),
    "hunyuan_video": (3, 3, 1),
}
STEPS = (900, 600)


def _run(model, z, t, seed):
    args, kwargs = z.inputs(2, t, seed)
    with torch.no_grad():
        return z.output(model(*args, **kwargs))


def _check(name, expected):
    z = ZOO[name]
    model = z.build()
    ref = copy.deepcopy(model)
    lazypass.apply(model)
    args, kwargs = z.inputs(2, STEPS[0], 0)
    sites = lazypass.report(model, *args, print_table=False, **kwargs)
    found = (
        sum(s.kind == "attn" for s in sites),
        sum(s.kind == "ffn" for s in sites),
        sum(len(s.tokens) > 1 for s in sites),
    )
    assert found == expected
    prog = next(iter(runtime(model).programs.values()))
    assert sum(s.macs for s in sites) / prog.model_macs > 0.75

    lazypass.set_threshold(model, 1.5)
    with lazypass.trajectory(model):
        for k, t in enumerate(STEPS):
            assert (_run(model, z, t, k) - _run(ref, z, t, k)).abs().max() <= 1e-5

    lazypass.set_threshold(model, -0.5)
    with lazypass.trajectory(model):
        _run(model, z, STEPS[0], 0)
        second = _run(model, z, STEPS[1], 1)
        st = lazypass.stats(model)
    assert st.saved[1].all() and not st.saved[0].any()
    assert (second - _run(ref, z, STEPS[1], 1)).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_coverage(name):
    _check(name, EXPECTED[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_coverage_slow(name):
    _check(name, SLOW[name])


def test_every_diffusers_transformer_is_built_or_explained():
    classes = diffusers_transformers()
    built = {z.cls for z in ZOO.values()}
    assert built <= classes, f"ZOO builds classes diffusers does not export: {sorted(built - classes)}"
    assert not built & set(SKIPPED), f"built and listed as skipped: {sorted(built & set(SKIPPED))}"
    unlisted = classes - built - set(SKIPPED)
    assert not unlisted, f"diffusers exports transformers neither built nor listed in tests/zoo.py SKIPPED: {sorted(unlisted)}"
    stale = set(SKIPPED) - classes
    assert not stale, f"SKIPPED lists classes diffusers no longer exports: {sorted(stale)}"
    assert all(SKIPPED.values())  # every entry says why
    named = {"DiT", "PixArt", "SD3", "Flux", "HunyuanDiT", "Sana", "Lumina", "AuraFlow", "CogVideoX", "Latte",
             "Allegro", "Mochi", "LTXVideo", "Wan", "HiDream"}
    assert all(any(c.startswith(n) for c in built) for n in named)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_coverage_onnx(name):
    """The table's onnx column for the fast subset: export (dynamic flavour) and onnxruntime
    parity with the eager lazy model over a computing and a reusing step (1-2 min per model)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from benchmarks.coverage import onnx_parity

    cell, err = onnx_parity(ZOO[name])
    assert cell.startswith("yes"), cell
