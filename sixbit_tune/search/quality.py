"""Quality of a quantized/cached generation against the unquantized one of the same prompt and seed.

The reference is the pipeline run with no policy applied, in the model's own dtype (bf16 on a GPU; the tiny CPU
models run in float32), for the same prompt, seed and generation settings. References are generated once and cached
beside the store, in ``<store>/references/<key>.pt``; the key hashes everything that determines the output (model
spec and config hash, prompt, seed, settings, device type and dtype), so a changed setting never reuses a stale one.
The weights themselves are not hashed (that would read every parameter of a 14B model): a store belongs to one set
of weights, as its profile and fit do; use a new store for retrained weights.

Metrics (torchmetrics):

* ``psnr_db`` — one PSNR over the whole video (all frames, channels and pixels at once), ``data_range=1.0``.
  Identical videos have infinite PSNR; it is reported as :data:`PSNR_CAP_DB` (100 dB, the convention of the
  video-quality scripts TeaCache/PAB/MagCache use) so that every figure stays finite.
* ``ssim`` — SSIM per frame (11×11 Gaussian, σ 1.5, per channel), averaged over frames; the window shrinks to the
  largest odd size that fits frames smaller than 11 pixels.
* ``latent_rel_l2`` — ‖z − z_ref‖₂ / ‖z_ref‖₂ of the final latents (the latents the VAE decodes), captured with
  ``callback_on_step_end``.
* ``lpips`` — only when its backbone weights are present locally (torchvision's AlexNet checkpoint in the torch hub
  cache); otherwise skipped once with a message. Nothing is downloaded.

The reference videos are cached in float16 (their PSNR floor against the float32 original is above 70 dB).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sixbit_tune.errors import NonFiniteError
from sixbit_tune.formats import relative_l2
from sixbit_tune.search.config import GenerationSettings  # noqa: F401  (defined there: imports no torch)

#: PSNR reported for videos identical to their reference (MSE 0).
PSNR_CAP_DB = 100.0

_LPIPS_STATE: dict[str, Any] = {}


@dataclass
class Generation:
    """One generated video: ``video`` float32 in [0, 1], shape (frames, channels, height, width); final latents."""

    video: torch.Tensor
    latents: torch.Tensor


def pipeline_device(pipe) -> torch.device:
    """The device the pipeline's transformer lives on."""
    return next(pipe.transformer.parameters()).device


def generate(pipe, prompt: str, seed: int, settings: GenerationSettings) -> Generation:
    """Run the pipeline once and return the video in [0, 1] and the final latents.

    The generator is a CPU ``torch.Generator`` seeded with ``seed`` so CPU and GPU runs draw the same noise.
    """
    captured: dict[str, torch.Tensor] = {}

    def on_step_end(_pipe, _i, _t, kwargs):
        captured["latents"] = kwargs["latents"].detach()
        return {}

    generator = torch.Generator("cpu").manual_seed(int(seed))
    out = pipe(
        prompt=prompt,
        generator=generator,
        output_type="pt",
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["latents"],
        **settings.call_kwargs(),
    )
    frames = out.frames
    if isinstance(frames, list | tuple):
        frames = frames[0]
    frames = torch.as_tensor(frames)
    if frames.dim() == 5:  # (batch, frames, channels, height, width)
        frames = frames[0]
    if frames.dim() != 4:
        raise ValueError(f"expected a video of shape (frames, channels, height, width), got {tuple(frames.shape)}")
    if "latents" not in captured:
        raise RuntimeError("the pipeline never called callback_on_step_end: cannot capture the final latents")
    return Generation(video=frames.float().cpu(), latents=captured["latents"].float().cpu())


def reference_key(model_id: dict, prompt: str, seed: int, settings: GenerationSettings, device: str, dtype: str) -> str:
    """sha256 over everything that determines an unquantized generation."""
    payload = {
        "model": model_id,
        "prompt": prompt,
        "seed": int(seed),
        "settings": settings.to_dict(),
        "device": device,
        "dtype": dtype,
        "format": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


class ReferenceCache:
    """Unquantized reference generations, computed once per (model, prompt, seed, settings) and kept on disk.

    Args:
        root: folder of the cache, normally ``<store>/references``.
        model_id: JSON-able identity of the model (spec and config hash).
    """

    def __init__(self, root: str | Path, model_id: dict):
        self.root = Path(root)
        self.model_id = dict(model_id)

    def path_for(self, pipe, prompt: str, seed: int, settings: GenerationSettings) -> Path:
        dev = pipeline_device(pipe)
        dtype = str(next(pipe.transformer.parameters()).dtype).replace("torch.", "")
        return self.root / f"{reference_key(self.model_id, prompt, seed, settings, dev.type, dtype)}.pt"

    def get(self, pipe, prompt: str, seed: int, settings: GenerationSettings) -> Generation:
        """The cached reference, generating (with whatever is applied to ``pipe`` now: apply nothing) on a miss."""
        path = self.path_for(pipe, prompt, seed, settings)
        if path.exists():
            data = torch.load(path, map_location="cpu", weights_only=True)
            return Generation(video=data["video"].float(), latents=data["latents"].float())
        gen = generate(pipe, prompt, seed, settings)
        for name, t in (("reference video", gen.video), ("reference latents", gen.latents)):
            if not torch.isfinite(t).all():
                raise NonFiniteError(f"the unquantized {name} for prompt {prompt!r} seed {seed} is not finite")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"video": gen.video.half(), "latents": gen.latents, "prompt": prompt, "seed": int(seed)}, tmp)
        tmp.replace(path)
        return Generation(video=gen.video.half().float(), latents=gen.latents)


def _ssim_per_frame(video: torch.Tensor, ref: torch.Tensor) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(video.shape[-1], video.shape[-2])
    kernel = 11 if side >= 11 else (side if side % 2 else side - 1)
    if kernel < 3:
        return float("nan")
    per_frame = structural_similarity_index_measure(
        video, ref, data_range=1.0, kernel_size=kernel, sigma=1.5 * kernel / 11, reduction="none"
    )
    return float(per_frame.mean())


def lpips_available() -> tuple[bool, str]:
    """Whether LPIPS can run offline here, and why not when it cannot."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False, "LPIPS skipped: torchvision is not installed (torchmetrics' LPIPS needs its AlexNet)"
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(ckpt.glob("alexnet-*.pth")):
        return False, f"LPIPS skipped: no AlexNet weights in {ckpt} (nothing is downloaded)"
    return True, ""


def _lpips(video: torch.Tensor, ref: torch.Tensor) -> float | None:
    if "metric" not in _LPIPS_STATE:
        ok, why = lpips_available()
        if not ok:
            print(why, file=sys.stderr)
            _LPIPS_STATE["metric"] = None
        else:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            _LPIPS_STATE["metric"] = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    metric = _LPIPS_STATE["metric"]
    if metric is None:
        return None
    return float(metric(video.clamp(0, 1), ref.clamp(0, 1)))


def compare(gen: Generation, ref: Generation, with_lpips: bool = True) -> dict[str, float | None]:
    """Quality of ``gen`` against ``ref``: psnr_db, ssim, latent_rel_l2, lpips (None when unavailable).

    Raises:
        NonFiniteError: the generated video or latents contain NaN/Inf (the metric would be meaningless).
        ValueError: shapes differ.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if gen.video.shape != ref.video.shape:
        raise ValueError(f"video shape {tuple(gen.video.shape)} differs from the reference {tuple(ref.video.shape)}")
    for name, t in (("video", gen.video), ("final latents", gen.latents)):
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"generated {name} has {bad} non-finite values (NaN quality)")
    video, target = gen.video.float(), ref.video.float()
    if torch.equal(video, target):
        psnr = PSNR_CAP_DB
    else:
        psnr = min(PSNR_CAP_DB, float(peak_signal_noise_ratio(video, target, data_range=1.0)))
    out: dict[str, float | None] = {
        "psnr_db": psnr,
        "ssim": _ssim_per_frame(video, target),
        "latent_rel_l2": float(relative_l2(gen.latents.float(), ref.latents.float())),
        "lpips": _lpips(video, target) if with_lpips else None,
    }
    for k in ("psnr_db", "latent_rel_l2"):
        if not math.isfinite(out[k]):
            raise NonFiniteError(f"{k} is {out[k]} (NaN quality)")
    return out
