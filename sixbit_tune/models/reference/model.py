"""Builders of the reference model's parts (offline): tokenizer, text encoder, transformer, scheduler.

The architecture is diffusers' own ``WanTransformer3DModel`` in pixel space (3 channels, patch 1x4x4, so a default
8x32x32 clip is 8*8*8 = 512 tokens), conditioned through a tiny ``UMT5EncoderModel`` over a ``T5Tokenizer`` whose
Unigram vocabulary holds the data generator's words (built in memory from (piece, score) pairs, no files). Every in-block Linear width is a multiple of 32
(dim 256, ffn 1024), so NVFP4 (block 16) and INT8 apply to every block layer.
"""

from __future__ import annotations

import torch

from . import data

#: WanTransformer3DModel kwargs of the reference model
TRANSFORMER_CONFIG: dict = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    text_dim=128,
    freq_dim=256,
    ffn_dim=1024,
    num_layers=8,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
#: UMT5 text encoder kwargs (d_model must equal TRANSFORMER_CONFIG["text_dim"])
TEXT_ENCODER_CONFIG: dict = dict(
    d_model=128,
    d_kv=32,
    d_ff=256,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
#: FlowMatchEulerDiscreteScheduler kwargs; training samples sigmas with the same shift
SCHEDULER_CONFIG: dict = dict(num_train_timesteps=1000, shift=3.0)
#: prompts are padded/truncated to this many tokens (the longest prompt has 11 tokens with </s>)
MAX_SEQUENCE_LENGTH = 16


def build_tokenizer():
    """A ``T5Tokenizer`` over an in-memory Unigram vocabulary: pad 0, eos 1, unk 2, the word boundary, the words."""
    from ..tiny import word_tokenizer

    return word_tokenizer(data.vocabulary())


def build_text_encoder(vocab_size: int, seed: int = 0):
    """A freshly initialised tiny ``UMT5EncoderModel`` (seeded), in eval mode."""
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **TEXT_ENCODER_CONFIG))
    return model.eval()


def build_transformer(seed: int = 0):
    """A freshly initialised reference ``WanTransformer3DModel`` (seeded)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    return model.eval()


def build_scheduler():
    """The reference model's ``FlowMatchEulerDiscreteScheduler``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def shifted_sigmas(u: torch.Tensor, shift: float = SCHEDULER_CONFIG["shift"]) -> torch.Tensor:
    """Map uniform ``u`` in [0, 1] to sigmas with the scheduler's time shift: ``shift*u / (1 + (shift-1)*u)``."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def encode_tokens(text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Text-encoder states with the padding positions zeroed (as ``WanPipeline._get_t5_prompt_embeds`` does)."""
    states = text_encoder(input_ids, attention_mask).last_hidden_state
    return states * attention_mask[..., None].to(states.dtype)


def build_untrained_pipeline(seed: int = 0):
    """The reference architecture with freshly initialised weights (the 'untrained' baseline), on CPU, float32."""
    from .pipeline import ReferencePipeline

    tokenizer = build_tokenizer()
    return ReferencePipeline(
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(len(tokenizer), seed=seed),
        transformer=build_transformer(seed=seed),
        scheduler=build_scheduler(),
    )
