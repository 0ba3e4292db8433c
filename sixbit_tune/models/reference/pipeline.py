"""``ReferencePipeline``: text-to-video in pixel space with the reference ``WanTransformer3DModel``.

It follows ``diffusers.WanPipeline`` step for step (prompt encoding with zeroed padding, flow-matching Euler
scheduler, one transformer call per guidance branch inside ``transformer.cache_context("cond")`` /
``("uncond")`` with step_index, sigma and num_inference_steps, ``callback_on_step_end``, ``maybe_free_model_hooks``)
but has no VAE: the transformer denoises RGB pixels in [-1, 1] directly. Profiling, the runtime and search therefore
treat it like any Wan pipeline (adapter cfg_mode "separate").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import T5Tokenizer, UMT5EncoderModel

from . import data
from .model import MAX_SEQUENCE_LENGTH


class UnknownWordsWarning(UserWarning):
    """A prompt of the reference pipeline holds words its tokenizer does not know (they reach the model as
    ``<unk>``), or more words than ``max_sequence_length`` keeps."""


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """The words of ``prompt`` (lower-cased, split on whitespace, each once, in order) that ``tokenizer`` turns
    into at least one unknown token: words outside the vocabulary, or with characters it lacks (``"left."``)."""
    unk = tokenizer.unk_token_id
    words = dict.fromkeys(prompt.lower().split())
    return [w for w in words if unk in tokenizer(w, add_special_tokens=False).input_ids]


@dataclass
class ReferencePipelineOutput(BaseOutput):
    """Output of :class:`ReferencePipeline`.

    Attributes:
        frames: ``output_type="np"``: float32 array (B, F, H, W, 3) in [0, 1]; ``"pt"``: tensor (B, F, 3, H, W) in
            [0, 1]; ``"latent"``: the final pixel-space sample (B, 3, F, H, W) in the model's [-1, 1] range.
    """

    frames: np.ndarray | torch.Tensor


class ReferencePipeline(DiffusionPipeline):
    """Pixel-space text-to-video pipeline of the reference model (diffusers conventions, Wan-style CFG).

    Registered modules: ``tokenizer`` (T5Tokenizer), ``text_encoder`` (UMT5EncoderModel), ``transformer``
    (WanTransformer3DModel, in_channels 3), ``scheduler`` (FlowMatchEulerDiscreteScheduler).
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: T5Tokenizer,
        text_encoder: UMT5EncoderModel,
        transformer: WanTransformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler
        )
        self.video_processor = VideoProcessor(vae_scale_factor=1)

    def _get_t5_prompt_embeds(
        self,
        prompt: str | list[str],
        num_videos_per_prompt: int = 1,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype
        prompt = [prompt] if isinstance(prompt, str) else prompt
        prompt = [" ".join(p.lower().split()) for p in prompt]
        for p in prompt:
            self._warn_unknown(p, max_sequence_length)
        batch_size = len(prompt)
        text_inputs = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = text_inputs.input_ids.to(device), text_inputs.attention_mask.to(device)
        prompt_embeds = self.text_encoder(ids, mask).last_hidden_state
        prompt_embeds = (prompt_embeds * mask[..., None].to(prompt_embeds.dtype)).to(dtype=dtype, device=device)
        _, seq_len, _ = prompt_embeds.shape
        prompt_embeds = prompt_embeds.repeat(1, num_videos_per_prompt, 1)
        return prompt_embeds.view(batch_size * num_videos_per_prompt, seq_len, -1)

    def _warn_unknown(self, prompt: str, max_sequence_length: int) -> None:
        """Warn (:class:`UnknownWordsWarning`) when the model would not see all of ``prompt``: the model was trained
        on one small vocabulary, and generation goes on either way (as diffusers' pipelines do on truncation)."""
        unknown = unknown_words(self.tokenizer, prompt)
        if unknown:
            warnings.warn(
                f"prompt {prompt!r}: the reference model does not know the word(s) {unknown}; they are encoded as "
                f"<unk>, which it never saw in training. Known words: {', '.join(data.vocabulary())}",
                UnknownWordsWarning,
                stacklevel=4,
            )
        n = len(self.tokenizer(prompt, add_special_tokens=True).input_ids)
        if n > max_sequence_length:
            kept = self.tokenizer.decode(
                self.tokenizer(prompt, max_length=max_sequence_length, truncation=True).input_ids,
                skip_special_tokens=True,
            )
            warnings.warn(
                f"prompt {prompt!r} is {n} tokens long; the reference model reads only {max_sequence_length} "
                f"(end of sequence included): it sees {kept!r}",
                UnknownWordsWarning,
                stacklevel=4,
            )

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode prompts (and, with guidance, negative prompts; default the empty prompt, as in training)."""
        device = device or self._execution_device
        prompt = [prompt] if isinstance(prompt, str) else prompt
        batch_size = len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if prompt_embeds is None:
            prompt_embeds = self._get_t5_prompt_embeds(
                prompt, num_videos_per_prompt, max_sequence_length, device, dtype
            )
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt = batch_size * [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if len(negative_prompt) != batch_size:
                raise ValueError(
                    f"`negative_prompt` has batch size {len(negative_prompt)}, but `prompt` has {batch_size}"
                )
            negative_prompt_embeds = self._get_t5_prompt_embeds(
                negative_prompt, num_videos_per_prompt, max_sequence_length, device, dtype
            )
        return prompt_embeds, negative_prompt_embeds

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        num_frames,
        height,
        width,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        callback_on_step_end_tensor_inputs=None,
        output_type="np",
    ):
        _, ph, pw = self.transformer.config.patch_size
        if height % ph != 0 or width % pw != 0 or height <= 0 or width <= 0:
            raise ValueError(f"`height` and `width` have to be positive multiples of {ph}, {pw}; got {height}, {width}")
        if num_frames < 1:
            raise ValueError(f"`num_frames` must be >= 1, got {num_frames}")
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'np', 'pt' or 'latent', got {output_type!r}")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found "
                f"{[k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]}"
            )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Cannot forward both `prompt` and `prompt_embeds`.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Cannot forward both `negative_prompt` and `negative_prompt_embeds`.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise ValueError(f"`negative_prompt` has to be of type `str` or `list` but is {type(negative_prompt)}")

    def prepare_latents(
        self,
        batch_size: int,
        num_channels: int,
        num_frames: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for an effective batch size of {batch_size}")
        shape = (batch_size, num_channels, num_frames, height, width)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self):
        return self._interrupt

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 2.0,
        num_frames: int = data.DEFAULT_FRAMES,
        height: int = data.DEFAULT_HEIGHT,
        width: int = data.DEFAULT_WIDTH,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ) -> ReferencePipelineOutput | tuple:
        """Generate clips.

        Args:
            prompt: prompt(s) in the generator's grammar, e.g. "a red square moving left on a striped background"
                (unknown words become <unk>; an :class:`UnknownWordsWarning` names them).
            negative_prompt: used for the unconditional branch when ``guidance_scale > 1`` (default: "").
            num_inference_steps: Euler steps of the flow-matching scheduler.
            guidance_scale: classifier-free guidance weight; <= 1 disables the unconditional branch. The default
                2.0 gave the best shape fidelity in the model card's evaluation (higher values keep colour and
                motion but distort shapes).
            num_frames, height, width: clip size in pixels (height, width multiples of 4; trained at 8x32x32).
            generator: torch generator(s) for the initial noise.
            output_type: "np" (B, F, H, W, 3) in [0, 1], "pt" (B, F, 3, H, W) in [0, 1], or "latent" (the raw
                (B, 3, F, H, W) sample in [-1, 1]).
            return_dict: return a :class:`ReferencePipelineOutput` instead of a tuple.
            callback_on_step_end: called as ``callback(pipe, i, t, callback_kwargs)`` after each step; it may
                return replacements for the tensors named in ``callback_on_step_end_tensor_inputs``.

        Returns:
            :class:`ReferencePipelineOutput` or ``(frames,)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs
        self.check_inputs(
            prompt,
            negative_prompt,
            num_frames,
            height,
            width,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs,
            output_type,
        )
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        # 2. Batch size
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        # 3. Encode input prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        transformer_dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(transformer_dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(transformer_dtype)

        # 4. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 5. Initial noise (float32, like WanPipeline)
        latents = self.prepare_latents(
            batch_size * num_videos_per_prompt,
            self.transformer.config.in_channels,
            num_frames,
            height,
            width,
            torch.float32,
            device,
            generator,
            latents,
        )

        # 6. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                latent_model_input = latents.to(transformer_dtype)
                timestep = t.expand(latents.shape[0])
                cache_context_kwargs = {
                    "step_index": i,
                    "sigma": float(self.scheduler.sigmas[i]),
                    "num_inference_steps": self._num_timesteps,
                }
                with self.transformer.cache_context("cond", **cache_context_kwargs):
                    noise_pred = self.transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=prompt_embeds,
                        attention_kwargs=attention_kwargs,
                        return_dict=False,
                    )[0]
                if self.do_classifier_free_guidance:
                    with self.transformer.cache_context("uncond", **cache_context_kwargs):
                        noise_uncond = self.transformer(
                            hidden_states=latent_model_input,
                            timestep=timestep,
                            encoder_hidden_states=negative_prompt_embeds,
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                        )[0]
                    noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)

                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        self._current_timestep = None

        if output_type == "latent":
            video = latents
        else:
            video = self.video_processor.postprocess_video(latents.float().clamp(-1, 1), output_type=output_type)

        # Offload all models (and reset stateful cache hooks)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video,)
        return ReferencePipelineOutput(frames=video)
