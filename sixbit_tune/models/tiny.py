"""Tiny random models of the five families, built offline: transformers, forward inputs and full pipelines.

Every in-block ``nn.Linear`` of the tiny transformers has in/out widths that are multiples of 32, so NVFP4
(blocks of 16) and the kernels' tiles apply unchanged. One transformer config per family serves both
``tiny:<family>`` transformers and the tiny pipelines (the pipeline's latent channels match the transformer's).

Pipelines are built offline: a T5 tokenizer over an in-memory Unigram vocabulary ((piece, score) pairs, no files),
tiny ``T5EncoderModel`` / ``UMT5EncoderModel`` text encoders in eval mode, tiny VAEs, stock schedulers. HunyuanVideo
gets no text encoders or tokenizers; :func:`tiny_pipeline_call_kwargs` supplies ``prompt_embeds`` instead.
"""

from __future__ import annotations

from typing import Any

import torch

from sixbit_tune.errors import UnsupportedModelError

__all__ = [
    "TINY_TEXT_DIM",
    "TINY_TRANSFORMER_KWARGS",
    "TINY_VIDEO",
    "tiny_pipeline",
    "tiny_pipeline_call_kwargs",
    "tiny_transformer",
    "tiny_transformer_inputs",
]

#: Width of the tiny text encoders' output (``d_model``); every tiny transformer's text input width.
TINY_TEXT_DIM = 32
#: Text tokens of a tiny prompt (``max_sequence_length`` of the tiny pipelines).
TINY_TEXT_LEN = 16

_TRANSFORMER_CLASS = {
    "cogvideox": "CogVideoXTransformer3DModel",
    "wan": "WanTransformer3DModel",
    "hunyuanvideo": "HunyuanVideoTransformer3DModel",
    "ltx": "LTXVideoTransformer3DModel",
    "mochi": "MochiTransformer3DModel",
}

#: Constructor kwargs of each family's tiny transformer (all attention: 2 heads).
TINY_TRANSFORMER_KWARGS: dict[str, dict[str, Any]] = {
    "cogvideox": dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=TINY_TEXT_DIM,
        num_layers=2,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TINY_TEXT_LEN,
    ),
    "wan": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=256,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ),
    "hunyuanvideo": dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=TINY_TEXT_DIM,
        pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6),
    ),
    "ltx": dict(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=TINY_TEXT_DIM,
    ),
    "mochi": dict(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=48,
        num_layers=2,
        pooled_projection_dim=96,
        in_channels=12,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=TINY_TEXT_DIM,
        time_embed_dim=32,
        activation_fn="swiglu",
        max_sequence_length=TINY_TEXT_LEN,
    ),
}


def _check_family(family: str) -> None:
    if family not in TINY_TRANSFORMER_KWARGS:
        raise UnsupportedModelError(
            f"no tiny model for family {family!r}; families: {', '.join(sorted(TINY_TRANSFORMER_KWARGS))}"
        )


def tiny_transformer(family: str, seed: int = 0, device=None, dtype=None) -> torch.nn.Module:
    """A random tiny transformer of ``family`` in eval mode (weights depend only on ``seed``).

    With a ``dtype``, every parameter and buffer gets the dtype ``from_pretrained(torch_dtype=dtype)`` would give
    it (the class's ``_keep_in_fp32_modules`` stay float32: :func:`sixbit_tune.models.loading.cast_as_loaded`).
    """
    _check_family(family)
    import diffusers

    cls = getattr(diffusers, _TRANSFORMER_CLASS[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**TINY_TRANSFORMER_KWARGS[family])
    model.eval()
    if dtype is not None:
        from sixbit_tune.models.loading import cast_as_loaded

        cast_as_loaded(model, dtype)
    if device is not None:
        model.to(device=device)
    return model


def tiny_transformer_inputs(family: str, batch: int = 1, seed: int = 0, device=None, dtype=torch.float32) -> dict:
    """Keyword arguments for one forward of :func:`tiny_transformer` (random latents and text, ``return_dict=False``).

    Shapes follow each family's input layout: CogVideoX ``(B, F, C, H, W)``; Wan, HunyuanVideo, Mochi
    ``(B, C, F, H, W)``; LTX tokens ``(B, F*H*W, C)`` plus ``num_frames``, ``height``, ``width``.
    """
    _check_family(family)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    text = rand(batch, TINY_TEXT_LEN, TINY_TEXT_DIM)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    if family == "cogvideox":
        return dict(hidden_states=rand(batch, 2, 4, 8, 8), encoder_hidden_states=text, timestep=t, return_dict=False)
    if family == "wan":
        return dict(hidden_states=rand(batch, 16, 2, 8, 8), encoder_hidden_states=text, timestep=t, return_dict=False)
    if family == "hunyuanvideo":
        mask = torch.ones(batch, TINY_TEXT_LEN, dtype=torch.bool, device=device)
        mask[:, TINY_TEXT_LEN - 4 :] = False
        return dict(
            hidden_states=rand(batch, 4, 2, 8, 8),
            timestep=t,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            pooled_projections=rand(batch, 32),
            guidance=torch.full((batch,), 4000.0, device=device, dtype=dtype),
            return_dict=False,
        )
    if family == "ltx":
        frames, height, width = 2, 8, 8
        mask = torch.ones(batch, TINY_TEXT_LEN, dtype=torch.bool, device=device)
        return dict(
            hidden_states=rand(batch, frames * height * width, 8),
            encoder_hidden_states=text,
            timestep=t,
            encoder_attention_mask=mask,
            num_frames=frames,
            height=height,
            width=width,
            return_dict=False,
        )
    mask = torch.ones(batch, TINY_TEXT_LEN, dtype=torch.bool, device=device)
    return dict(
        hidden_states=rand(batch, 12, 2, 8, 8),
        encoder_hidden_states=text,
        timestep=t,
        encoder_attention_mask=mask,
        return_dict=False,
    )


# --------------------------------------------------------------------------------------------------- pipelines
#: Words of the tiny tokenizer's vocabulary (anything else maps to ``<unk>``).
_TINY_WORDS = ("a", "cat", "dog", "runs", "jumps", "on", "the", "beach", "in", "snow", "red", "blue", "car", "bad")

#: Video size of the tiny pipelines' calls (``height``, ``width``, ``num_frames``), chosen per VAE.
TINY_VIDEO = {
    "cogvideox": dict(height=16, width=16, num_frames=8),
    "wan": dict(height=16, width=16, num_frames=9),
    "hunyuanvideo": dict(height=16, width=16, num_frames=9),
    "ltx": dict(height=32, width=32, num_frames=9),
    "mochi": dict(height=16, width=16, num_frames=7),
}


def word_tokenizer(words, score_step: float = 0.0):
    """A ``T5Tokenizer`` over an in-memory Unigram vocabulary of whole ``words`` (no files, no network).

    Ids: pad 0, eos 1, unk 2, the word boundary 3, then one piece per word with score ``-1 - i * score_step``.
    """
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -1.0 - i * score_step) for i, w in enumerate(words)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tiny_text_encoder(family: str, vocab_size: int):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config = (UMT5Config if family == "wan" else T5Config)(
        vocab_size=vocab_size,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    cls = UMT5EncoderModel if family == "wan" else T5EncoderModel
    return cls(config).eval()


def _tiny_vae(family: str):
    import diffusers

    if family == "cogvideox":
        return diffusers.AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        )
    if family == "wan":
        return diffusers.AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
    if family == "hunyuanvideo":
        return diffusers.AutoencoderKLHunyuanVideo(
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        )
    if family == "ltx":
        vae = diffusers.AutoencoderKLLTXVideo(
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False, False, False, False, False),
            patch_size=1,
            patch_size_t=1,
            timestep_conditioning=False,
            encoder_causal=True,
            decoder_causal=False,
        )
        vae.use_framewise_encoding = False
        vae.use_framewise_decoding = False
        return vae
    return diffusers.AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    )


def _tiny_scheduler(family: str):
    import diffusers

    if family == "cogvideox":
        return diffusers.DDIMScheduler()
    if family in ("wan", "hunyuanvideo"):
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    return diffusers.FlowMatchEulerDiscreteScheduler()


_PIPELINE_CLASS = {
    "cogvideox": "CogVideoXPipeline",
    "wan": "WanPipeline",
    "hunyuanvideo": "HunyuanVideoPipeline",
    "ltx": "LTXPipeline",
    "mochi": "MochiPipeline",
}


def tiny_pipeline(family: str, seed: int = 0):
    """A full random tiny text-to-video pipeline of ``family``, built offline on the CPU in float32.

    Components: :func:`tiny_transformer`, a tiny VAE, the family's usual scheduler and (except HunyuanVideo) a T5
    tokenizer over an in-memory vocabulary with a tiny T5 (Wan: UMT5) encoder in eval mode. HunyuanVideo has
    ``text_encoder``/``tokenizer``/``text_encoder_2``/``tokenizer_2`` set to None: call it with the embeddings from
    :func:`tiny_pipeline_call_kwargs`. All weights depend only on ``seed``.
    """
    _check_family(family)
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = tiny_transformer(family, seed=seed)
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(family).eval()
        components: dict[str, Any] = dict(transformer=transformer, vae=vae, scheduler=_tiny_scheduler(family))
        if family == "hunyuanvideo":
            components.update(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        else:
            tokenizer = word_tokenizer(_TINY_WORDS, score_step=0.01)
            torch.manual_seed(seed + 2)
            components.update(tokenizer=tokenizer, text_encoder=_tiny_text_encoder(family, len(tokenizer)))
        if family == "wan":
            components["transformer_2"] = None
    pipe = getattr(diffusers, _PIPELINE_CLASS[family])(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline_call_kwargs(
    family: str,
    prompts: str | list[str],
    steps: int = 2,
    guidance: float = 5.0,
    seed: int = 0,
    negative_prompt: str | list[str] | None = None,
) -> dict:
    """Keyword arguments for calling :func:`tiny_pipeline` (``pipe(**kwargs).frames``), with CFG when guidance > 1.

    Sets the tiny video size, ``num_inference_steps=steps``, ``max_sequence_length``, ``output_type="pt"`` and a
    CPU generator seeded with ``seed``. For HunyuanVideo, which has no text encoder here, it passes random
    ``prompt_embeds``/``pooled_prompt_embeds``/``prompt_attention_mask`` derived from each prompt's text (the same
    prompt gives the same embedding); its CFG is true CFG (``true_cfg_scale=guidance`` with negative embeddings,
    two transformer calls per step), since its ``guidance_scale`` is an embedded distillation input, not CFG.
    """
    _check_family(family)
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("prompts must not be empty")
    kwargs: dict[str, Any] = dict(
        num_inference_steps=steps,
        output_type="pt",
        generator=torch.Generator().manual_seed(seed),
        max_sequence_length=TINY_TEXT_LEN,
        **TINY_VIDEO[family],
    )
    cfg = guidance > 1.0
    if family != "hunyuanvideo":
        kwargs.update(prompt=prompt_list, guidance_scale=guidance)
        if cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            kwargs["negative_prompt"] = [neg] * len(prompt_list) if isinstance(neg, str) else list(neg)
        return kwargs

    def embed(texts: list[str]):
        embeds, pooled, masks = [], [], []
        for text in texts:
            g = torch.Generator().manual_seed(_text_seed(text))
            embeds.append(torch.randn(TINY_TEXT_LEN, TINY_TEXT_DIM, generator=g))
            pooled.append(torch.randn(32, generator=g))
            mask = torch.zeros(TINY_TEXT_LEN, dtype=torch.long)
            mask[: max(1, min(TINY_TEXT_LEN, len(text.split()) + 1))] = 1
            masks.append(mask)
        return torch.stack(embeds), torch.stack(pooled), torch.stack(masks)

    pe, pp, pm = embed(prompt_list)
    kwargs.update(prompt_embeds=pe, pooled_prompt_embeds=pp, prompt_attention_mask=pm, guidance_scale=6.0)
    if cfg:
        neg = negative_prompt if negative_prompt is not None else ""
        neg_list = [neg] * len(prompt_list) if isinstance(neg, str) else list(neg)
        ne, np_, nm = embed(neg_list)
        kwargs.update(
            negative_prompt_embeds=ne,
            negative_pooled_prompt_embeds=np_,
            negative_prompt_attention_mask=nm,
            true_cfg_scale=guidance,
        )
    return kwargs


def _text_seed(text: str) -> int:
    """A process-independent seed from a string (``hash()`` is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
