"""Tiny diffusers pipelines built in code (nothing downloaded) and split-CFG sampling loops.

``dit_pipeline()`` / ``pixart_pipeline()`` build a ``DiTPipeline`` / ``PixArtAlphaPipeline``
from seeded random components.  ``dit_split_cfg`` / ``pixart_split_cfg`` run the same
sampling as the stock pipelines but call the transformer twice per step, once for the
conditional and once for the unconditional pass, as many other pipelines do.
"""

from __future__ import annotations

import torch

from tests.archs import diffusers_dit, pixart


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=8,
    ).eval()


def dit_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """A DiTPipeline with a 2-block DiTTransformer2DModel on 8x8x4 latents (1000 classes + null)."""
    from diffusers import DDIMScheduler, DiTPipeline, EulerDiscreteScheduler

    transformer = diffusers_dit(seed, classes=1000)
    sched = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]()  # long / float timesteps
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(seed), scheduler=sched,
                       id2label={i: f"class {i}" for i in range(1000)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_pipeline(seed: int = 0):
    """A PixArtAlphaPipeline with a tiny transformer and T5 encoder; no tokenizer (pass embeddings)."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline
    from transformers import T5Config, T5EncoderModel

    transformer = pixart(seed)  # seeds the global RNG, which the text encoder's weights come from
    text_encoder = T5EncoderModel(T5Config(vocab_size=64, d_model=24, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2, dropout_rate=0.0)).eval()
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=text_encoder, vae=tiny_vae(seed),
                               transformer=transformer, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(pipe, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings and mask from token ids (what the tokenizer would have produced)."""
    mask = torch.ones_like(token_ids)
    with torch.no_grad():
        return pipe.text_encoder(token_ids, attention_mask=mask)[0], mask


def _guide(uncond, cond, channels, guidance_scale):
    return uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])


def _decode(pipe, latents):
    return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample


def dit_split_cfg(pipe, class_labels, generator, num_inference_steps, guidance_scale):
    """DiTPipeline's sampling with the conditional and unconditional passes as two calls per step."""
    tr, sched = pipe.transformer, pipe.scheduler
    channels = tr.config.in_channels
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor((len(class_labels), channels, tr.config.sample_size, tr.config.sample_size),
                           generator=generator, dtype=tr.dtype)
    labels = torch.tensor(class_labels).reshape(-1)
    null = torch.full_like(labels, 1000)
    sched.set_timesteps(num_inference_steps)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t)
            ts = t[None].expand(len(x))
            cond = tr(x, timestep=ts, class_labels=labels).sample
            uncond = tr(x, timestep=ts, class_labels=null).sample
            # DiTPipeline steps from the *scaled* input (the same for DDIM, not for Euler); so do we
            latents = sched.step(_guide(uncond, cond, channels, guidance_scale), t, x).prev_sample
        return _decode(pipe, latents)


def pixart_split_cfg(pipe, prompt_embeds, mask, neg_embeds, neg_mask, latents, num_inference_steps,
                     guidance_scale):
    """PixArtAlphaPipeline's sampling with separate conditional and unconditional calls."""
    tr, sched = pipe.transformer, pipe.scheduler
    channels = tr.config.in_channels
    sched.set_timesteps(num_inference_steps)
    extra = {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t)
            ts = t[None].expand(len(x))
            uncond = tr(x, encoder_hidden_states=neg_embeds, encoder_attention_mask=neg_mask, timestep=ts,
                        added_cond_kwargs=extra, return_dict=False)[0]
            cond = tr(x, encoder_hidden_states=prompt_embeds, encoder_attention_mask=mask, timestep=ts,
                      added_cond_kwargs=extra, return_dict=False)[0]
            latents = sched.step(_guide(uncond, cond, channels, guidance_scale), t, latents).prev_sample
        return _decode(pipe, latents)
