"""Quickstart: make the reference DiT-S/2 lazy, look at its sites, sample with forced laziness.

Random weights (nothing is downloaded), so the pictures are noise; what this shows is the
mechanics: the site report, an in-graph skip at every other step, and the stats table.

    python examples/quickstart.py
"""

import torch

import lazypass
from lazypass.models import build_dit
from lazypass.sampling import ddim_sample

torch.manual_seed(0)
model = build_dit("DiT-S/2", input_size=32, num_classes=1000, init="random").eval()
noise = torch.randn(2, 4, 32, 32)
labels = torch.tensor([207, 360])

model = lazypass.apply(model, rho=1e-2)
print("== sites ==")
lazypass.report(model, noise, torch.tensor([999, 999]), labels)

# Forced laziness: every branch reuses its cache on odd steps (threshold < 0), computes on even ones.
def every_other_step(step, t, x):
    lazypass.set_threshold(model, -0.5 if step % 2 == 0 else 1.5)

lazypass.set_threshold(model, 1.5)
with lazypass.trajectory(model):
    latents = ddim_sample(model, noise, num_inference_steps=10, cond=labels, progress=True,
                          callback=every_other_step)
    print("\n== stats (rows are sites, columns are the 10 calls) ==")
    print(lazypass.stats(model))
print(f"\nlatents: {tuple(latents.shape)}, finite: {bool(torch.isfinite(latents).all())}")
