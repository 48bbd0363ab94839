"""lazypass inside stock diffusers pipelines (DiTPipeline, PixArtAlphaPipeline).

Everything is built in code from tiny random components, so nothing is downloaded. With
real weights the only lines that matter are the two marked (1) and (2):

    pipe = DiTPipeline.from_pretrained("facebook/DiT-XL-2-256")
    pipe.transformer = lazypass.apply(pipe.transformer)          # (1)
    lazypass.load_gates(pipe.transformer, "dit-xl-gates.safetensors")  # (2) fitted gates

The script checks the two properties a pipeline user relies on: images made for a batch
of labels/prompts with classifier-free guidance equal those made one at a time, and a
loop that calls the transformer separately for the conditional and unconditional pass
gets the same images as the batched pipeline.

Run: PYTHONPATH=$PWD python examples/diffusers_pipeline.py [--batch-compute compact]
(``compact``: a branch computes only the rows that do not skip it, so the compute saved
follows the per-sample decisions; ``lazypass.apply(..., batch_compute="compact")``.)
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, PixArtAlphaPipeline,
                       PixArtTransformer2DModel)
from transformers import T5Config, T5EncoderModel

import lazypass

STEPS, GUIDANCE = 6, 4.0


def nonzero(model: torch.nn.Module) -> torch.nn.Module:
    """adaLN-Zero layers start at zero (every branch a no-op); random weights instead."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16).eval()


def stand_in_gates(model: torch.nn.Module, seed: int = 0) -> None:
    """Stand-in for gates fitted with lazypass.fit: seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lazy_gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


OPTIONS: dict = {}  # lazypass.apply options from the command line


def dit_demo() -> float:
    torch.manual_seed(0)
    transformer = nonzero(DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
        sample_size=16, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1))
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = lazypass.apply(pipe.transformer, **OPTIONS)  # (1)

    labels, seeds = [1, 207, 360, 980], [0, 1, 2, 3]

    def generate(labels, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(class_labels=labels, generator=gens, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    output_type="np").images

    full = generate(labels, seeds)  # fresh gates score 0.5 and never skip: the original images
    stand_in_gates(pipe.transformer)  # (2)
    lazypass.reset(pipe.transformer)
    images = generate(labels, seeds)
    print("DiTPipeline, batch of 4 labels with CFG (8 rows per transformer call):")
    print(lazypass.stats(pipe.transformer))
    one_by_one = []
    for label, seed in zip(labels, seeds):
        lazypass.reset(pipe.transformer)  # optional: a new run also starts when the timestep rises
        one_by_one.append(generate([label], [seed])[0])
    batch_err = float(np.abs(np.stack(one_by_one) - images).max())

    # the same sampling with the conditional and unconditional passes as two calls per step
    lazypass.reset(pipe.transformer)
    tr, sched = pipe.transformer, pipe.scheduler
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    latents = torch.cat([torch.randn(1, 4, 16, 16, generator=g) for g in gens])
    cond, null = torch.tensor(labels), torch.full((len(labels),), 1000)
    sched.set_timesteps(STEPS)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t)
            ts = t[None].expand(len(x))
            eps_c = tr(x, timestep=ts, class_labels=cond).sample[:, :4]    # call 0: cache slot 0
            eps_u = tr(x, timestep=ts, class_labels=null).sample[:, :4]    # call 1: cache slot 1
            latents = sched.step(eps_u + GUIDANCE * (eps_c - eps_u), t, x).prev_sample
        split = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    split = (split / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    split_err = float(np.abs(split - images).max())
    print(f"lazy vs full images: max diff {np.abs(images - full).max():.3f} (the gates did skip)")
    print(f"batch vs one label at a time: max diff {batch_err:.1e}")
    print(f"split CFG (2 calls per step) vs batched CFG: max diff {split_err:.1e}\n")
    return max(batch_err, split_err)


def pixart_demo() -> float:
    torch.manual_seed(0)
    transformer = nonzero(PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
        sample_size=16, patch_size=2, cross_attention_dim=32, caption_channels=24,
        use_additional_conditions=False))
    text_encoder = T5EncoderModel(T5Config(vocab_size=64, d_model=24, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2, dropout_rate=0.0)).eval()
    # no tokenizer can be built offline: encode token ids ourselves and pass the embeddings
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=text_encoder, vae=tiny_vae(),
                               transformer=transformer, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = lazypass.apply(pipe.transformer)  # (1)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (3, 8), generator=g)
    with torch.no_grad():
        emb = text_encoder(ids, attention_mask=torch.ones_like(ids))[0]
        neg = text_encoder(torch.zeros_like(ids), attention_mask=torch.ones_like(ids))[0]
    mask = torch.ones_like(ids)
    latents = torch.randn(3, 4, 16, 16, generator=g)

    def generate(rows):
        return pipe(negative_prompt=None, prompt_embeds=emb[rows], prompt_attention_mask=mask[rows],
                    negative_prompt_embeds=neg[rows], negative_prompt_attention_mask=mask[rows],
                    latents=latents[rows], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    output_type="np", use_resolution_binning=False).images

    generate(slice(None))  # trace once so the gates exist
    stand_in_gates(pipe.transformer)  # (2)
    lazypass.reset(pipe.transformer)
    images = generate(slice(None))
    st = lazypass.stats(pipe.transformer)
    print(f"PixArtAlphaPipeline, 3 prompts with CFG: lazy ratio {st.lazy_ratio:.1%}, "
          f"compute saved {st.saved_ratio:.1%}")
    err = 0.0
    for i in range(3):
        lazypass.reset(pipe.transformer)
        err = max(err, float(np.abs(generate(slice(i, i + 1))[0] - images[i]).max()))
    print(f"batch vs one prompt at a time: max diff {err:.1e}\n")
    return err


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-compute", choices=("full", "compact"), default=None)
    if (choice := parser.parse_args().batch_compute) is not None:
        OPTIONS["batch_compute"] = choice
    worst = max(dit_demo(), pixart_demo())
    print(f"pipelines: batch_vs_single_and_split_cfg_max_diff={worst:.1e}")
