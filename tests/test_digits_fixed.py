"""Fixed skip schedules of the digits demo: the committed best-schedule assets and the runner."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import lazypass  # noqa: E402
from digits_eval import load_dit  # noqa: E402
from digits_fixed import (  # noqa: E402
    FixedRunner, alternating_table, load_schedule, schedule_path, spread_table, table_ratio,
)  # fmt: skip


@pytest.fixture(scope="module")
def runner():
    torch.set_num_threads(1)
    return FixedRunner(load_dit(), "forecast")


@pytest.mark.parametrize("ratio, steps", [(0.5, 20), (0.3, 10)])
def test_best_fixed_assets_load_with_their_ratio(runner, ratio, steps):
    s = load_schedule(schedule_path(ratio, steps))
    assert s.table.shape == (steps, len(runner.sites)) and s.steps == steps
    assert s.sites == runner.sites  # saved for this model's sites, in this order
    assert not s.table[0].any()
    got = table_ratio(s.table, runner.site_macs)  # share of branch MACs skipped
    assert got == pytest.approx(s.lazy_ratio, abs=1e-6)
    assert abs(got - ratio) <= 0.01, got
    assert s.target == ratio and s.reuse in ("copy", "forecast")
    assert "command" in s.meta and s.meta["search"]["noise_seed"] not in (0, 1, 2)  # not the evaluation noise


def test_patterns():
    assert [i for i, r in enumerate(spread_table(20, 0.5, 8)) if r.all()] == list(range(1, 20, 2))
    alt = alternating_table(20, 0.5, 2, 8)
    assert not alt[0].any()
    assert alt[1].tolist() == [True, True, False, False, True, True, False, False]  # even blocks
    assert alt[2].tolist() == [False, False, True, True, False, False, True, True]  # odd blocks, a step early
    assert alt.sum() == 8 * 19 // 2  # 19 skipping steps of half the sites


def test_runner_follows_the_table(runner):
    rng = np.random.default_rng(0)
    table = rng.random((5, len(runner.sites))) < 0.5
    table[0] = False
    noise, labels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2, 3])
    images, skipped = runner.sample(table, noise, labels)
    assert skipped.shape == (5, len(runner.sites), 3)
    np.testing.assert_array_equal(skipped, np.repeat(table[:, :, None], 3, axis=2))
    none, nothing = runner.sample(np.zeros_like(table), noise, labels)
    assert not nothing.any()
    from lazypass.sampling import ddim_sample

    full = ddim_sample(load_dit(), noise, 5, cond=labels, learned_sigma=False)
    torch.testing.assert_close(none, full, atol=1e-5, rtol=1e-5)  # nothing skipped: the plain model
    assert not torch.allclose(images, full, atol=1e-4)


def test_bad_asset_is_refused(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"steps": 2, "sites": ["a", "b"], "table": ["x.", ".."], "reuse": "copy", '
                 '"target_ratio": 0.25, "lazy_ratio": 0.25}')
    with pytest.raises(ValueError, match="step 0"):
        load_schedule(p)
    p.write_text('{"steps": 2, "sites": ["a", "b"], "table": ["..", "xo"], "reuse": "copy", '
                 '"target_ratio": 0.25, "lazy_ratio": 0.25}')
    with pytest.raises(ValueError, match="characters"):
        load_schedule(p)
