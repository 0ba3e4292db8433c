"""Evidence that the reference model learned its data: an attribute detector and held-out evaluations.

The detector reads RGB frames only (no model): foreground = saturated pixels (the backgrounds are grey);
colour = circular mean hue of the foreground, nearest of the six colour hues; shape = median over frames of the
foreground's area / bounding-box area, nearest of 1.0 (square), pi/4 (circle), 0.5 (triangle); position = the
foreground centroid per frame; direction = the dominant axis and sign of the centroid displacement between the
first and the last frame (none if the shape is missing in either frame or moved less than 10% of the canvas).
Chance levels: colour 1/6, shape 1/3, direction 1/4.

Run the whole evaluation: ``python -m sixbit_tune.models.reference.evaluate [--weights DIR] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from . import data
from .model import shifted_sigmas

CHANCE = {"colour": 1 / len(data.COLOURS), "shape": 1 / len(data.SHAPES), "direction": 1 / len(data.DIRECTIONS)}
#: minimum saturation and value of a foreground pixel
SAT_MIN, VAL_MIN = 0.5, 0.35
#: minimum foreground pixels for a frame to count as showing the shape
MIN_AREA = 6
#: minimum centroid travel (fraction of the canvas side) for a direction to be read
MIN_TRAVEL = 0.10


def _frames_bf3hw(frames) -> torch.Tensor:
    """Accept (B, F, 3, H, W) torch or (B, F, H, W, 3) numpy/torch in [0, 1]; return float32 (B, F, 3, H, W)."""
    x = torch.as_tensor(frames).float()
    if x.ndim != 5:
        raise ValueError(f"frames must be 5-D (B, F, 3, H, W) or (B, F, H, W, 3), got shape {tuple(x.shape)}")
    if x.shape[2] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 1, 4, 2, 3)
    if x.shape[2] != 3:
        raise ValueError(f"frames need 3 colour channels, got shape {tuple(x.shape)}")
    return x


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """Model-space clips (B, 3, F, H, W) in [-1, 1] -> frames (B, F, 3, H, W) in [0, 1]."""
    return ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 1, 3, 4)


def detect(frames) -> dict[str, torch.Tensor]:
    """Read colour, shape, per-frame position and motion direction from frames in [0, 1].

    Args:
        frames: (B, F, 3, H, W) or (B, F, H, W, 3) in [0, 1] (the pipeline's "pt" or "np" output).

    Returns:
        dict with int64 (B,) ``colour``, ``shape``, ``direction`` (-1 where unreadable), float32 (B, F, 2)
        ``centres`` (x, y; NaN where the frame shows no shape), (B, F) ``area``, (B, 2) ``displacement``
        (last minus first centroid), (B,) ``fill``.
    """
    x = _frames_bf3hw(frames)
    b, f, _, h, w = x.shape
    mx, _ = x.max(dim=2)
    mn, _ = x.min(dim=2)
    sat = (mx - mn) / mx.clamp_min(1e-6)
    fg = (sat > SAT_MIN) & (mx > VAL_MIN)  # (B, F, H, W)
    fgf = fg.float()
    area = fgf.sum(dim=(2, 3))

    # hue in degrees
    r, g, bl = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    hue_x = r - 0.5 * g - 0.5 * bl
    hue_y = (math.sqrt(3) / 2) * (g - bl)
    hx = (hue_x * fgf).sum(dim=(1, 2, 3))
    hy = (hue_y * fgf).sum(dim=(1, 2, 3))
    hue = torch.rad2deg(torch.atan2(hy, hx)) % 360.0
    ref = torch.tensor(data.COLOUR_HUES)
    diff = (hue[:, None] - ref[None, :] + 180.0) % 360.0 - 180.0
    colour = diff.abs().argmin(dim=1)
    colour = torch.where(area.sum(dim=1) > 0, colour, torch.full_like(colour, -1))

    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    present = area >= MIN_AREA
    safe = area.clamp_min(1.0)
    cx = (fgf * xs[None, None, None, :]).sum(dim=(2, 3)) / safe
    cy = (fgf * ys[None, None, :, None]).sum(dim=(2, 3)) / safe
    centres = torch.stack([cx, cy], dim=-1)
    centres = torch.where(present[..., None], centres, torch.full_like(centres, float("nan")))

    disp = centres[:, -1] - centres[:, 0]
    dx, dy = disp[:, 0], disp[:, 1]
    horiz = dx.abs() >= dy.abs()
    direction = torch.where(horiz, torch.where(dx < 0, 0, 1), torch.where(dy < 0, 2, 3)).long()
    travel = torch.maximum(dx.abs(), dy.abs())
    readable = present[:, 0] & present[:, -1] & (travel >= MIN_TRAVEL * min(h, w))
    direction = torch.where(readable, direction, torch.full_like(direction, -1))

    # bounding-box fill per frame
    rows = fg.any(dim=3)  # (B, F, H)
    cols = fg.any(dim=2)  # (B, F, W)
    idx_h = torch.arange(h)
    idx_w = torch.arange(w)
    top = torch.where(rows, idx_h, h).min(dim=2).values
    bottom = torch.where(rows, idx_h, -1).max(dim=2).values
    left = torch.where(cols, idx_w, w).min(dim=2).values
    right = torch.where(cols, idx_w, -1).max(dim=2).values
    box = ((bottom - top + 1).clamp_min(1) * (right - left + 1).clamp_min(1)).float()
    fill_f = torch.where(present, area / box, torch.full_like(area, float("nan")))
    fill = torch.nanmedian(fill_f, dim=1).values
    fills = torch.tensor(data.SHAPE_FILL)
    shape = (fill[:, None] - fills[None, :]).abs().argmin(dim=1)
    shape = torch.where(torch.isnan(fill), torch.full_like(shape, -1), shape)
    return {
        "colour": colour,
        "shape": shape,
        "direction": direction,
        "centres": centres,
        "area": area,
        "displacement": disp,
        "fill": fill,
    }


def agreement(det: dict[str, torch.Tensor], batch: data.ClipBatch) -> dict[str, float]:
    """Rates at which detected attributes equal the prompted ones (plus ``all``: colour, shape and direction)."""
    out = {}
    hits = {}
    for key in ("colour", "shape", "direction"):
        hits[key] = det[key].cpu() == getattr(batch, key).cpu()
        out[key] = float(hits[key].float().mean())
    out["all"] = float((hits["colour"] & hits["shape"] & hits["direction"]).float().mean())
    vec = torch.tensor(data.DIRECTION_VECTORS)[batch.direction.cpu()]
    along = (det["displacement"].cpu() * vec).sum(dim=1)
    out["travel_along_prompt_px"] = float(torch.nan_to_num(along, nan=0.0).mean())
    out["shape_present_all_frames"] = float((det["area"] >= MIN_AREA).all(dim=1).float().mean())
    return out


@torch.no_grad()
def denoising_loss(
    pipe, batch: data.ClipBatch, sigmas=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0
) -> dict[str, float]:
    """Flow-matching loss (MSE of the predicted velocity noise - x0) of ``pipe`` on ``batch`` at fixed sigmas.

    The noise is drawn from a CPU generator seeded ``seed``, so two pipelines are compared on the same inputs.
    Returns ``{"sigma=<s>": loss, ..., "mean": mean over sigmas}``.
    """
    device = pipe._execution_device
    dtype = pipe.transformer.dtype
    x0 = batch.video.to(device=device, dtype=torch.float32)
    embeds, _ = pipe.encode_prompt(batch.prompts, do_classifier_free_guidance=False, device=device)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in sigmas:
        noise = torch.randn(x0.shape, generator=g).to(device)
        xt = (1 - s) * x0 + s * noise
        t = torch.full((x0.shape[0],), s * pipe.scheduler.config.num_train_timesteps, device=device)
        with pipe.transformer.cache_context("cond"):
            v = pipe.transformer(xt.to(dtype), t, embeds.to(dtype), return_dict=False)[0]
        out[f"sigma={s:g}"] = float(((v.float() - (noise - x0)) ** 2).mean())
    out["mean"] = sum(out.values()) / len(sigmas)
    return out


@torch.no_grad()
def generate_and_detect(
    pipe, batch: data.ClipBatch, num_inference_steps: int = 30, guidance_scale: float = 4.0, seed: int = 0
) -> tuple[dict[str, float], torch.Tensor]:
    """Generate one clip per prompt of ``batch`` and score the detector's agreement with the prompts.

    Returns (rates, frames (B, F, 3, H, W) in [0, 1]).
    """
    _, _, f, h, w = batch.video.shape
    gen = torch.Generator(device=pipe._execution_device).manual_seed(seed)
    frames = pipe(
        batch.prompts,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        num_frames=f,
        height=h,
        width=w,
        generator=gen,
        output_type="pt",
    ).frames
    frames = frames.float().cpu()
    return agreement(detect(frames), batch), frames


def loss_weighted_uniform(pipe, batch, seed=0, n_sigmas=8):
    """Denoising loss averaged over sigmas spread like training's (``shifted_sigmas`` of a uniform grid)."""
    u = (torch.arange(n_sigmas, dtype=torch.float64) + 0.5) / n_sigmas
    sig = [round(float(s), 4) for s in shifted_sigmas(u)]
    return denoising_loss(pipe, batch, sigmas=sig, seed=seed)


#: (num_inference_steps, guidance_scale) pairs of the model card's generation table
EVAL_CONFIGS = ((8, 2.0), (12, 2.0), (12, 4.0), (30, 1.0), (30, 2.0), (30, 4.0), (30, 6.0), (30, 8.0), (50, 4.0))


def run_evaluation(
    pipe,
    device=None,
    n: int = 256,
    configs=EVAL_CONFIGS,
    untrained=None,
) -> dict:
    """The model card's numbers: detector on ground truth, generation agreement, losses vs an untrained model."""
    device = torch.device(device) if device is not None else pipe._execution_device
    report: dict = {"chance": CHANCE, "n": n}
    batches = {
        split: data.heldout_batch(n, split=split, seed=i, device=device)
        for i, split in enumerate(("heldout", "seen"))
    }
    report["detector_on_ground_truth"] = {
        split: agreement(detect(video_to_frames(b.video).cpu()), b) for split, b in batches.items()
    }
    gen = {}
    for steps, cfg in configs:
        for split, b in batches.items():
            t0 = time.perf_counter()
            rates, _ = generate_and_detect(pipe, b, steps, cfg, seed=1)
            rates["seconds"] = time.perf_counter() - t0
            gen[f"{split}/steps={steps}/cfg={cfg:g}"] = rates
    report["generated"] = gen
    loss_batch = data.heldout_batch(min(n, 64), split="heldout", seed=7, device=device)
    report["loss_heldout_trained"] = loss_weighted_uniform(pipe, loss_batch)
    if untrained is not None:
        report["loss_heldout_untrained"] = loss_weighted_uniform(untrained, loss_batch)
        report["loss_ratio_trained_over_untrained"] = (
            report["loss_heldout_trained"]["mean"] / report["loss_heldout_untrained"]["mean"]
        )
    return report


def save_frames_png(frames: torch.Tensor, prompts: list[str], path, scale: int = 4) -> None:
    """One row per clip (frames left to right), nearest-neighbour upscaled; frames (B, F, 3, H, W) in [0, 1].

    The prompts go to a ``.txt`` file of the same name, one per row.
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image

    path = Path(path)
    rows = [torch.cat(list(clip), dim=2) for clip in frames.float().clamp(0, 1)]  # each (3, H, F*W)
    sep = torch.ones(3, 2, rows[0].shape[2])
    grid = torch.cat([torch.cat([r, sep], dim=1) for r in rows], dim=1)
    img = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(path)
    path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")


def save_samples(pipe, out_dir, num_inference_steps: int = 30, guidance_scale: float = 2.0) -> None:
    """Write samples_{heldout,seen}.png (generated) and truth_{heldout,seen}.png (ground truth), 6 prompts each."""
    from pathlib import Path

    out_dir = Path(out_dir)
    device = pipe._execution_device
    for split, seed in (("heldout", 3), ("seen", 4)):
        b = data.heldout_batch(6, split, seed=seed, device=device)
        _, frames = generate_and_detect(pipe, b, num_inference_steps, guidance_scale, seed=0)
        save_frames_png(frames, b.prompts, out_dir / f"samples_{split}.png")
        save_frames_png(video_to_frames(b.video).cpu(), b.prompts, out_dir / f"truth_{split}.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="pipeline folder (default: the shipped weights)")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--samples", default=None, help="write sample PNGs into this folder")
    p.add_argument("--quick", action="store_true", help="one 4-step generation config (smoke tests)")
    args = p.parse_args(argv)
    from . import load_reference_pipeline
    from .model import build_untrained_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_reference_pipeline(device=device, path=args.weights)
    pipe.set_progress_bar_config(disable=True)
    untrained = build_untrained_pipeline(seed=12345).to(device)
    t0 = time.perf_counter()
    configs = ((4, 4.0),) if args.quick else EVAL_CONFIGS
    report = run_evaluation(pipe, device, n=args.n, configs=configs, untrained=untrained)
    report["eval_seconds"] = round(time.perf_counter() - t0, 1)
    report["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if args.samples:
        save_samples(pipe, args.samples, num_inference_steps=4 if args.quick else 30)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
