"""Tiny random-weight builds of the DiT-family transformers that diffusers ships.

Shared by ``benchmarks/coverage.py`` (the coverage table) and ``tests/test_coverage.py``.
Every model is built from a tiny config (1-3 layers, hidden size 16-32, a few tokens)
with seeded random weights; nothing is downloaded. Zero-initialised layers (adaLN-Zero,
zero output projections) get small random values so that every branch changes the output.

``ZOO[name]`` is a ``Tiny`` with ``build() -> model`` and ``inputs(batch, t, seed) ->
(args, kwargs)``; ``t`` is a DDPM-style timestep in [0, 1000] and each entry scales it the
way its pipeline does (flow-matching models take ``t / 1000``). ``SKIPPED`` names the
transformer classes of ``diffusers.models.transformers`` that are not built here, and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from tests.archs import nonzero


@dataclass
class Tiny:
    name: str
    cls: str  # class name in diffusers.models.transformers
    make: Callable[[], nn.Module]
    inputs: Callable[[int, float, int], tuple[tuple, dict]]
    flow: bool = False  # timestep in [0, 1] (t / 1000)
    note: str = ""  # what lazypass cannot do on this model, and why
    output: Callable = field(default=lambda out: out[0] if isinstance(out, (tuple, list)) else out)

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return nonzero(self.make(), 0)


def _cls(name: str):
    import diffusers.models.transformers as T

    return getattr(T, name)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _t(b, t, flow):
    return torch.full((b,), float(t) / 1000.0 if flow else float(t))


def _r(g, *shape):
    return torch.randn(*shape, generator=g)


# ---------------------------------------------------------------------------------- images

def _dit():
    return _cls("DiTTransformer2DModel")(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
    )


def _dit_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 8, 8), timestep=_t(b, t, False),
                    class_labels=torch.randint(0, 10, (b,), generator=g), return_dict=False)


def _pixart():
    return _cls("PixArtTransformer2DModel")(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=24,
        use_additional_conditions=False,
    )


def _pixart_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 8, 8), timestep=_t(b, t, False),
                    encoder_hidden_states=_r(g, b, 5, 24), return_dict=False)


def _sd3():
    return _cls("SD3Transformer2DModel")(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16,
    )


def _sd3_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 8, 8), timestep=_t(b, t, False),
                    encoder_hidden_states=_r(g, b, 5, 16), pooled_projections=_r(g, b, 12), return_dict=False)


def _flux(cls="FluxTransformer2DModel", **extra):
    def make():
        return _cls(cls)(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4), **extra,
        )
    return make


def _ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _flux_in(b, t, seed, pooled=12):
    g = _g(seed)
    kw = dict(hidden_states=_r(g, b, 16, 8), encoder_hidden_states=_r(g, b, 5, 16),
              timestep=_t(b, t, True), img_ids=_ids(4, 4), txt_ids=torch.zeros(5, 3), return_dict=False)
    if pooled:
        kw["pooled_projections"] = _r(g, b, pooled)
    return (), kw


def _hunyuan_dit():
    return _cls("HunyuanDiT2DModel")(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
        hidden_size=16, num_layers=4, cross_attention_dim=16, cross_attention_dim_t5=16,
        pooled_projection_dim=16, text_len=5, text_len_t5=5, use_style_cond_and_image_meta_size=False,
    )


def _hunyuan_dit_in(b, t, seed):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    g = _g(seed)
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))
    return (), dict(
        hidden_states=_r(g, b, 4, 8, 8), timestep=_t(b, t, False), encoder_hidden_states=_r(g, b, 5, 16),
        text_embedding_mask=torch.ones(b, 5), encoder_hidden_states_t5=_r(g, b, 5, 16),
        text_embedding_mask_t5=torch.ones(b, 5), image_rotary_emb=rope, return_dict=False,
    )


def _sana():
    return _cls("SanaTransformer2DModel")(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=24, sample_size=8, patch_size=2,
    )


def _sana_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 8, 8), encoder_hidden_states=_r(g, b, 5, 24),
                    timestep=_t(b, t, False), return_dict=False)


def _lumina_next():
    return _cls("LuminaNextDiT2DModel")(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_attention_heads=2,
        num_kv_heads=2, multiple_of=16, norm_eps=1e-5, learn_sigma=False, cross_attention_dim=24,
    )


def _lumina_next_in(b, t, seed):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    g = _g(seed)
    rope = get_2d_rotary_pos_embed_lumina(8, 8, 8)
    return (), dict(hidden_states=_r(g, b, 4, 8, 8), timestep=_t(b, t, True),
                    encoder_hidden_states=_r(g, b, 5, 24), encoder_mask=torch.ones(b, 5),
                    image_rotary_emb=rope, cross_attention_kwargs={}, return_dict=False)


def _lumina2():
    return _cls("Lumina2Transformer2DModel")(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(2, 2, 4),
        axes_lens=(32, 32, 32), cap_feat_dim=24,
    )


def _lumina2_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 8, 8), timestep=_t(b, t, True),
                    encoder_hidden_states=_r(g, b, 5, 24), encoder_attention_mask=torch.ones(b, 5, dtype=torch.bool),
                    return_dict=False)


def _auraflow():
    return _cls("AuraFlowTransformer2DModel")(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64,
    )


def _auraflow_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 8, 8), encoder_hidden_states=_r(g, b, 5, 16),
                    timestep=_t(b, t, True), return_dict=False)


def _hidream():
    return _cls("HiDreamImageTransformer2DModel")(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 16], text_emb_dim=12, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(2, 2, 4), max_resolution=(8, 8), llama_layers=[0, 1],
    )


def _hidream_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 8, 8), timesteps=_t(b, t, False),
                    encoder_hidden_states_t5=_r(g, b, 5, 16), encoder_hidden_states_llama3=_r(g, 2, b, 5, 16),
                    pooled_embeds=_r(g, b, 12), return_dict=False)


# ---------------------------------------------------------------------------------- videos

def _cogvideox():
    return _cls("CogVideoXTransformer3DModel")(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=5,
    )


def _cogvideox_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 2, 4, 8, 8), encoder_hidden_states=_r(g, b, 5, 16),
                    timestep=_t(b, t, False), return_dict=False)


def _latte():
    return _cls("LatteTransformer3DModel")(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=24,
        video_length=2,
    )


def _latte_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 2, 8, 8), timestep=_t(b, t, False),
                    encoder_hidden_states=_r(g, b, 5, 24), enable_temporal_attentions=True, return_dict=False)


def _allegro():
    return _cls("AllegroTransformer3DModel")(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=4, num_layers=2, cross_attention_dim=16, sample_height=8, sample_width=8,
        sample_frames=8, caption_channels=24,
    )


def _allegro_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 2, 8, 8), encoder_hidden_states=_r(g, b, 5, 24),
                    timestep=_t(b, t, False), return_dict=False)


def _mochi():
    return _cls("MochiTransformer3DModel")(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=16,
    )


def _mochi_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 2, 8, 8), encoder_hidden_states=_r(g, b, 5, 16),
                    timestep=_t(b, t, False), encoder_attention_mask=torch.ones(b, 5, dtype=torch.bool),
                    return_dict=False)


def _ltx():
    return _cls("LTXVideoTransformer3DModel")(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=24,
    )


def _ltx_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 2 * 4 * 4, 8), encoder_hidden_states=_r(g, b, 5, 24),
                    timestep=_t(b, t, False), encoder_attention_mask=torch.ones(b, 5),
                    num_frames=2, height=4, width=4, return_dict=False)


def _wan(cls="WanTransformer3DModel", **extra):
    def make():
        return _cls(cls)(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, **extra,
        )
    return make


def _wan_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 2, 8, 8), timestep=_t(b, t, False),
                    encoder_hidden_states=_r(g, b, 5, 16), return_dict=False)


ZOO: dict[str, Tiny] = {
    z.name: z
    for z in [
        Tiny("dit", "DiTTransformer2DModel", _dit, _dit_in),
        Tiny("pixart", "PixArtTransformer2DModel", _pixart, _pixart_in),
        Tiny("sd3", "SD3Transformer2DModel", _sd3, _sd3_in),
        Tiny("flux", "FluxTransformer2DModel", _flux(pooled_projection_dim=12), _flux_in, flow=True),
        Tiny("hunyuan_dit", "HunyuanDiT2DModel", _hunyuan_dit, _hunyuan_dit_in),
        Tiny("sana", "SanaTransformer2DModel", _sana, _sana_in),
        Tiny("lumina_next", "LuminaNextDiT2DModel", _lumina_next, _lumina_next_in, flow=True),
        Tiny("lumina2", "Lumina2Transformer2DModel", _lumina2, _lumina2_in, flow=True,
             note="forward reads caption lengths from the mask on the host (`len(set(seq_lengths))`): not capturable by torch.export"),
        Tiny("auraflow", "AuraFlowTransformer2DModel", _auraflow, _auraflow_in, flow=True),
        Tiny("hidream", "HiDreamImageTransformer2DModel", _hidream, _hidream_in,
             note="MoE routing counts tokens per expert on the host (`.cpu().numpy()`): not capturable by torch.export"),
        Tiny("cogvideox", "CogVideoXTransformer3DModel", _cogvideox, _cogvideox_in),
        Tiny("latte", "LatteTransformer3DModel", _latte, _latte_in),
        Tiny("allegro", "AllegroTransformer3DModel", _allegro, _allegro_in),
        Tiny("mochi", "MochiTransformer3DModel", _mochi, _mochi_in),
        Tiny("ltx", "LTXVideoTransformer3DModel", _ltx, _ltx_in),
        Tiny("wan", "WanTransformer3DModel", _wan(), _wan_in),
    ]
}


# ------------------------------------------------------------------------- more of the zoo

def _chroma():
    return _cls("ChromaTransformer2DModel")(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
        approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1,
    )


def _cogview3():
    return _cls("CogView3PlusTransformer2DModel")(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        out_channels=4, text_embed_dim=16, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8,
        sample_size=8,
    )


def _cogview4():
    return _cls("CogView4Transformer2DModel")(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8,
        rope_axes_dim=(4, 4),
    )


def _cogview_in(b, t, seed):
    g = _g(seed)
    size = torch.tensor([[64.0, 64.0]]).repeat(b, 1)
    return (), dict(hidden_states=_r(g, b, 4, 8, 8), encoder_hidden_states=_r(g, b, 5, 16),
                    timestep=_t(b, t, False), original_size=size, target_size=size,
                    crop_coords=torch.zeros(b, 2), return_dict=False)


def _hunyuan_video():
    return _cls("HunyuanVideoTransformer3DModel")(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=16, pooled_projection_dim=12, rope_axes_dim=(2, 2, 4),
    )


def _hunyuan_video_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 2, 8, 8), timestep=_t(b, t, False),
                    encoder_hidden_states=_r(g, b, 5, 16), encoder_attention_mask=torch.ones(b, 5),
                    pooled_projections=_r(g, b, 12), return_dict=False)


def _qwen_image():
    return _cls("QwenImageTransformer2DModel")(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    )


def _qwen_image_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 16, 16), encoder_hidden_states=_r(g, b, 5, 16),
                    encoder_hidden_states_mask=torch.ones(b, 5), timestep=_t(b, t, True),
                    img_shapes=[(1, 4, 4)] * b, return_dict=False)


def _flux2():
    return _cls("Flux2Transformer2DModel")(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=8,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False,
    )


def _flux2_in(b, t, seed):
    g = _g(seed)
    img = torch.cat([torch.zeros(16, 1), _ids(4, 4)], 1)
    txt = torch.zeros(5, 4)
    txt[:, 3] = torch.arange(5)
    return (), dict(hidden_states=_r(g, b, 16, 8), encoder_hidden_states=_r(g, b, 5, 16),
                    timestep=_t(b, t, True), img_ids=img, txt_ids=txt, return_dict=False)


def _stable_audio():
    return _cls("StableAudioDiTModel")(
        sample_size=16, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
        global_states_input_dim=12, cross_attention_input_dim=16,
    )


def _stable_audio_in(b, t, seed):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    g = _g(seed)
    rope = get_1d_rotary_pos_embed(4, 17, use_real=True, repeat_interleave_real=False)
    return (), dict(hidden_states=_r(g, b, 4, 16), timestep=_t(b, t, False),
                    encoder_hidden_states=_r(g, b, 5, 16), global_hidden_states=_r(g, b, 1, 12),
                    rotary_embedding=rope, return_dict=False)


def _transformer2d():
    return _cls("Transformer2DModel")(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=10, norm_num_groups=1,
    )


def _cosmos():
    return _cls("CosmosTransformer3DModel")(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 16, 16), patch_size=(1, 2, 2),
        concat_padding_mask=False, extra_pos_embed_type=None,
    )


def _cosmos_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 2, 8, 8), timestep=_t(b, t, True),
                    encoder_hidden_states=_r(g, b, 5, 16), return_dict=False)


def _easyanimate():
    return _cls("EasyAnimateTransformer3DModel")(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2,
        sample_width=8, sample_height=8, num_layers=2, mmdit_layers=2, time_embed_dim=8, text_embed_dim=16,
    )


def _easyanimate_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 2, 8, 8), timestep=_t(b, t, False),
                    encoder_hidden_states=_r(g, b, 5, 16), return_dict=False)


def _bria():
    return _cls("BriaTransformer2DModel")(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[2, 2, 4],
    )


ZOO.update({
    z.name: z
    for z in [
        Tiny("chroma", "ChromaTransformer2DModel", _chroma, lambda b, t, s: _flux_in(b, t, s, pooled=0), flow=True),
        Tiny("cogview3plus", "CogView3PlusTransformer2DModel", _cogview3, _cogview_in),
        Tiny("cogview4", "CogView4Transformer2DModel", _cogview4, _cogview_in),
        Tiny("hunyuan_video", "HunyuanVideoTransformer3DModel", _hunyuan_video, _hunyuan_video_in),
        Tiny("skyreels_v2", "SkyReelsV2Transformer3DModel", _wan("SkyReelsV2Transformer3DModel"), _wan_in),
        Tiny("qwen_image", "QwenImageTransformer2DModel", _qwen_image, _qwen_image_in, flow=True),
        Tiny("flux2", "Flux2Transformer2DModel", _flux2, _flux2_in, flow=True),
        Tiny("stable_audio", "StableAudioDiTModel", _stable_audio, _stable_audio_in),
        Tiny("transformer2d", "Transformer2DModel", _transformer2d, _dit_in),
        Tiny("cosmos", "CosmosTransformer3DModel", _cosmos, _cosmos_in, flow=True),
        Tiny("easyanimate", "EasyAnimateTransformer3DModel", _easyanimate, _easyanimate_in),
        Tiny("bria", "BriaTransformer2DModel", _bria, lambda b, t, s: _flux_in(b, t, s, pooled=0), flow=True),
    ]
})


def _consisid():
    return _cls("ConsisIDTransformer3DModel")(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        max_text_seq_length=5, is_train_face=False,
    )


def _hunyuan_image():
    return _cls("HunyuanImageTransformer2DModel")(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=(2, 2), text_embed_dim=16, rope_axes_dim=(4, 4),
    )


def _hunyuan_image_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 8, 8), timestep=_t(b, t, False),
                    encoder_hidden_states=_r(g, b, 5, 16), encoder_attention_mask=torch.ones(b, 5), return_dict=False)


def _sana_video():
    return _cls("SanaVideoTransformer3DModel")(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=24,
        sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32,
    )


def _sana_video_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 2, 8, 8), encoder_hidden_states=_r(g, b, 5, 24),
                    timestep=_t(b, t, False), return_dict=False)


def _chronoedit():
    return _wan("ChronoEditTransformer3DModel")()


def _longcat():
    return _cls("LongCatImageTransformer2DModel")(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[2, 2, 4],
    )


def _ovis():
    return _cls("OvisImageTransformer2DModel")(
        patch_size=1, in_channels=8, out_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    )


def _prx():
    return _cls("PRXTransformer2DModel")(
        in_channels=4, patch_size=2, context_in_dim=16, hidden_size=16, mlp_ratio=2.0, num_heads=2, depth=2,
        axes_dim=[4, 4],
    )


def _prx_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 8, 8), timestep=_t(b, t, True),
                    encoder_hidden_states=_r(g, b, 5, 16), return_dict=False)


ZOO.update({
    z.name: z
    for z in [
        Tiny("consisid", "ConsisIDTransformer3DModel", _consisid, _cogvideox_in),
        Tiny("hunyuan_image", "HunyuanImageTransformer2DModel", _hunyuan_image, _hunyuan_image_in),
        Tiny("sana_video", "SanaVideoTransformer3DModel", _sana_video, _sana_video_in,
             note="the MLP holds its own residual (x + conv_temp(x)); nested residuals: only the inner one is gated"),
        Tiny("chronoedit", "ChronoEditTransformer3DModel", _chronoedit, _wan_in),
        Tiny("longcat_image", "LongCatImageTransformer2DModel", _longcat, lambda b, t, s: _flux_in(b, t, s, pooled=0), flow=True),
        Tiny("ovis_image", "OvisImageTransformer2DModel", _ovis, lambda b, t, s: _flux_in(b, t, s, pooled=0), flow=True),
        Tiny("prx", "PRXTransformer2DModel", _prx, _prx_in, flow=True),
    ]
})


def _wan_vace():
    return _wan("WanVACETransformer3DModel", vace_layers=[0], vace_in_channels=4)()


def _wan_vace_in(b, t, seed):
    args, kw = _wan_in(b, t, seed)
    kw["control_hidden_states"] = _r(_g(seed + 100), b, 4, 2, 8, 8)
    return args, kw


def _flux3():
    return _cls("Flux3Transformer2DModel")(
        in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, timestep_channels=8, axes_dims_rope=(2, 2, 2, 2),
    )


def _ernie():
    return _cls("ErnieImageTransformer2DModel")(
        hidden_size=16, num_attention_heads=2, num_layers=2, ffn_hidden_size=32, in_channels=4, out_channels=4,
        patch_size=2, text_in_dim=16, rope_axes_dim=(2, 2, 4),
    )


def _ernie_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 4, 8, 8), timestep=_t(b, t, True), text_bth=_r(g, b, 5, 16),
                    text_lens=torch.full((b,), 5), return_dict=False)


def _kandinsky5():
    return _cls("Kandinsky5Transformer3DModel")(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=12, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(2, 2, 4),
    )


def _kandinsky5_in(b, t, seed):
    g = _g(seed)
    return (), dict(hidden_states=_r(g, b, 2, 8, 8, 4), encoder_hidden_states=_r(g, b, 5, 16),
                    timestep=_t(b, t, False), pooled_projections=_r(g, b, 12), visual_rope_pos=(2, 4, 4),
                    text_rope_pos=torch.arange(5), return_dict=False)


def _zimage():
    return _cls("ZImageTransformer2DModel")(
        in_channels=4, dim=16, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
        axes_dims=[2, 2, 4], axes_lens=[64, 64, 64],
    )


def _zimage_in(b, t, seed):
    g = _g(seed)
    return (), dict(x=[_r(g, 4, 1, 8, 8) for _ in range(b)], t=_t(b, t, True),
                    cap_feats=[_r(g, 5, 16) for _ in range(b)], return_dict=False)


ZOO.update({
    z.name: z
    for z in [
        Tiny("wan_vace", "WanVACETransformer3DModel", _wan_vace, _wan_vace_in),
        Tiny("flux3", "Flux3Transformer2DModel", _flux3, _flux2_in, flow=True),
        Tiny("ernie_image", "ErnieImageTransformer2DModel", _ernie, _ernie_in, flow=True,
             note="blocks run sequence-first (tokens, batch, dim); gates and caches need batch-major rows"),
        Tiny("z_image", "ZImageTransformer2DModel", _zimage, _zimage_in, flow=True,
             note="takes lists of per-sample tensors; its rotary runs in an autocast region that export wraps "
                  "in a sub-graph call the matcher cannot move into a branch yet",
             output=lambda out: torch.stack(list(out[0]))),
    ]
})


def diffusers_transformers() -> set[str]:
    """Names of every ``nn.Module`` class ``diffusers.models.transformers`` exports.

    That module is where diffusers keeps its transformer denoisers; every name must be built
    in ``ZOO`` or listed in ``SKIPPED`` with a reason (``tests/test_coverage.py``).
    """
    import inspect

    import diffusers.models.transformers as transformers

    return {
        n for n in dir(transformers)
        if inspect.isclass(getattr(transformers, n)) and issubclass(getattr(transformers, n), nn.Module)
    }


# Every class of diffusers.models.transformers that ZOO does not build, with the reason. A class
# a new diffusers release adds fails tests/test_coverage.py until it is built or listed here.
_OUT_OF_SCOPE = "not a DiT-family denoiser: "
_TODO = "DiT-family; no tiny builder yet"
SKIPPED: dict[str, str] = {
    "PriorTransformer": _OUT_OF_SCOPE + "unCLIP prior over CLIP embeddings",
    "T5FilmDecoder": _OUT_OF_SCOPE + "T5 decoder of spectrogram diffusion (music)",
    "DualTransformer2DModel": _OUT_OF_SCOPE + "pair of Transformer2DModel inside Versatile Diffusion's UNet",
    "TransformerTemporalModel": _OUT_OF_SCOPE + "temporal layers inside a video UNet",
    "MiniMaxMusic3RVQDepthDecoder": _OUT_OF_SCOPE + "autoregressive audio-token decoder",
    "RFD4ProteinaTransformer": _OUT_OF_SCOPE + "protein structure model",
    "Kandinsky5Transformer3DModel": _TODO + " (the tiny config tried fails inside its rotary embedding)",
    "AceStepTransformer1DModel": _TODO,
    "AnyFlowFARTransformer3DModel": _TODO,
    "AnyFlowTransformer3DModel": _TODO,
    "BriaFibo2Transformer2DModel": _TODO,
    "BriaFiboTransformer2DModel": _TODO,
    "Cosmos3OmniTransformer": _TODO,
    "DreamLiteTransformer2DModel": _TODO,
    "GlmImageTransformer2DModel": _TODO,
    "HeliosTransformer3DModel": _TODO,
    "HunyuanVideo15Transformer3DModel": _TODO,
    "HunyuanVideoFramepackTransformer3DModel": _TODO,
    "Ideogram4Transformer2DModel": _TODO,
    "JoyImageEditPlusTransformer3DModel": _TODO,
    "JoyImageEditTransformer3DModel": _TODO,
    "Kandinsky6SRTransformer3DModel": _TODO,
    "Kandinsky6Transformer3DModel": _TODO,
    "Krea2Transformer2DModel": _TODO,
    "LTX2VideoTransformer3DModel": _TODO,
    "LongCatAudioDiTTransformer": _TODO,
    "MiniMaxH3Transformer3DModel": _TODO,
    "MiniMaxMusic3Transformer1DModel": _TODO,
    "MotifVideoTransformer3DModel": _TODO,
    "NucleusMoEImageTransformer2DModel": _TODO,
    "OmniGenTransformer2DModel": _TODO,
    "QwenImage21Transformer2DModel": _TODO,
    "SanaWMLTX2RefinerTransformer3DModel": _TODO,
    "SanaWMTransformer3DModel": _TODO,
    "StableAudio3DiTModel": _TODO,
    "WanAnimate2Transformer3DModel": _TODO,
    "WanAnimateTransformer3DModel": _TODO,
}
