"""A tiny seeded DiT whose branches matter, and batches for ``lazypass.fit``; shared by the fit tests."""

from __future__ import annotations

import torch

from lazypass.models import tiny_dit


def lively_dit(seed: int = 0, **overrides):
    """``tiny_dit`` with its adaLN modulation scaled up.

    Random adaLN weights are small, so the adaLN gates ``g`` of every branch are near zero
    and reusing a branch costs almost nothing; scaled up, the branches move the output and
    the gates have something to trade off.
    """
    model = tiny_dit(seed, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name:
                p.mul_(25)
    return model


def class_batches(batch: int = 8, fixed: bool = False, rows: slice | None = None):
    """``sample_fn`` for a class-conditional DiT: noise (B, 4, 8, 8) and labels, seeded by the index.

    ``fixed``: the same batch every time; ``rows``: this process's shard of the global batch.
    """

    def sample(i: int) -> dict:
        g = torch.Generator().manual_seed(0 if fixed else 1000 + i)
        noise = torch.randn(batch, 4, 8, 8, generator=g)
        labels = torch.randint(0, 10, (batch,), generator=g)
        if rows is not None:
            noise, labels = noise[rows], labels[rows]
        return {"noise": noise, "cond": labels}

    return sample
