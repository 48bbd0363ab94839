"""Tiny diffusers pipelines built in code (nothing downloaded) and split-CFG sampling loops.

``dit_pipeline()`` / ``pixart_pipeline()`` / ``sd3_pipeline()`` / ``flux_pipeline()`` build a
``DiTPipeline`` / ``PixArtAlphaPipeline`` / ``StableDiffusion3Pipeline`` / ``FluxPipeline``
from seeded random components; text pipelines get a word-level tokenizer over ``WORDS``.  ``dit_split_cfg`` / ``pixart_split_cfg`` run the same
sampling as the stock pipelines but call the transformer twice per step, once for the
conditional and once for the unconditional pass, as many other pipelines do.
"""

from __future__ import annotations

import torch

from tests.archs import diffusers_dit, nonzero, pixart


WORDS = ("a photo of the cat dog bird car tree house red green blue small big on in under sky water "
         "night day river mountain city road").split()


def tiny_vae(seed: int = 0, latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=8, **extra,
    ).eval()


def tiny_tokenizer(max_length: int = 8):
    """A word-level tokenizer over ``WORDS`` (ids 4...), pad 0, unknown 1: what CLIP/T5 tokenizers give the pipelines."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=max_length)


def tiny_clip(hidden: int, projection: int | None = None):
    """A one-layer CLIP text encoder (with a projection head when ``projection`` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=projection or hidden,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def tiny_t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2, dropout_rate=0.0)).eval()


def dit_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """A DiTPipeline with a 2-block DiTTransformer2DModel on 8x8x4 latents (1000 classes + null)."""
    from diffusers import DDIMScheduler, DiTPipeline, EulerDiscreteScheduler

    transformer = diffusers_dit(seed, classes=1000)
    sched = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]()  # long / float timesteps
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(seed), scheduler=sched,
                       id2label={i: f"class {i}" for i in range(1000)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_pipeline(seed: int = 0, tokenizer: bool = False):
    """A PixArtAlphaPipeline with a tiny transformer and T5 encoder (DPM-Solver); no tokenizer unless asked (pass embeddings)."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline
    from transformers import T5Config, T5EncoderModel

    transformer = pixart(seed)  # seeds the global RNG, which the text encoder's weights come from
    text_encoder = T5EncoderModel(T5Config(vocab_size=64, d_model=24, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2, dropout_rate=0.0)).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tiny_tokenizer() if tokenizer else None, text_encoder=text_encoder,
                               vae=tiny_vae(seed), transformer=transformer, scheduler=DDIMScheduler())
    if tokenizer:  # as PixArt-alpha ships: DPM-Solver
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline: the tiny SD3 transformer, two tiny CLIPs, no T5, flow-match Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16,
    )
    clip_1, clip_2 = tiny_clip(8, projection=6), tiny_clip(8, projection=6)  # hidden 8 + 8, pooled 6 + 6
    pipe = StableDiffusion3Pipeline(
        transformer=nonzero(transformer, seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed, shift_factor=0.0), text_encoder=clip_1, tokenizer=tiny_tokenizer(),
        text_encoder_2=clip_2, tokenizer_2=tiny_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline(seed: int = 0):
    """A FluxPipeline: a tiny Flux transformer (2 latent channels, packed 2x2), tiny CLIP and T5, flow-match Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=12, axes_dims_rope=(2, 2, 4),
    )
    pipe = FluxPipeline(
        transformer=nonzero(transformer, seed), scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=tiny_vae(seed, latent_channels=2, shift_factor=0.0), text_encoder=tiny_clip(12),
        tokenizer=tiny_tokenizer(), text_encoder_2=tiny_t5(16), tokenizer_2=tiny_tokenizer(),
    )
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
