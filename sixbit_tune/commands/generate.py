"""``sixbit-tune generate``: one video with a policy applied, and the runtime statistics of that run."""

from __future__ import annotations

import argparse
from pathlib import Path

_DTYPES = ("bfloat16", "float16", "float32")
_VIDEO_SUFFIXES = (".gif", ".mp4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="SPEC",
                        help="model spec: tiny:<family>, reference, a diffusers repo id or a local folder")
    parser.add_argument("--policy", required=True, metavar="FILE", help="policy JSON (from `sixbit-tune export`)")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="output: a .gif or .mp4 file, or a folder (PNG frames; a path without suffix is a folder)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: the pipeline's; tiny models: 8)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default %(default)s)")
    parser.add_argument("--height", type=int, default=None, help="video height (default: the pipeline's)")
    parser.add_argument("--width", type=int, default=None, help="video width (default: the pipeline's)")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale; <= 1 disables CFG (default: the pipeline's)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=_DTYPES,
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--strict-gpu", action="store_true",
                        help="refuse a policy tuned on another GPU (default: warn and run)")
    parser.add_argument("--kernels", default="auto", choices=("auto", "triton", "reference"),
                        help="kernel preference for the quantized linears (default %(default)s)")
    parser.add_argument("--fps", type=float, default=8.0, help="frames per second of a GIF/MP4 (default %(default)s)")
    parser.add_argument("--stats-json", metavar="FILE", default=None, help="also write the statistics as JSON")


def _output_kind(out: str) -> str:
    suffix = Path(out).suffix.lower()
    if suffix in _VIDEO_SUFFIXES:
        return suffix[1:]
    if suffix == "" or Path(out).is_dir():
        return "frames"
    raise ValueError(f"--out {out!r}: expected a .gif or .mp4 file or a folder for PNG frames")


def _check_writer(kind: str) -> None:
    if kind == "mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ValueError(
                "--out *.mp4 needs the imageio-ffmpeg package (pip install imageio-ffmpeg); or write a .gif or a "
                "folder of PNG frames"
            ) from None


def write_video(frames, out: str, fps: float = 8.0) -> list[Path]:
    """Write ``frames`` (float array ``[F, H, W, C]`` in [0, 1]) as a GIF/MP4 or as PNG files in a folder.

    Returns:
        The written files.
    """
    import imageio.v3 as iio
    import numpy as np

    kind = _output_kind(out)
    _check_writer(kind)
    video = (np.clip(np.asarray(frames, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if video.ndim != 4:
        raise ValueError(f"expected frames [F, H, W, C], got shape {video.shape}")
    if video.shape[-1] == 1:
        video = video[..., 0]
    path = Path(out)
    if kind == "frames":
        path.mkdir(parents=True, exist_ok=True)
        files = [path / f"frame_{i:04d}.png" for i in range(len(video))]
        for f, frame in zip(files, video):
            iio.imwrite(f, frame)
        return files
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "gif":
        iio.imwrite(path, video, extension=".gif", duration=1000.0 / fps, loop=0)
    else:
        iio.imwrite(path, video, extension=".mp4", fps=fps)
    return [path]


def run(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from sixbit_tune.models.adapters import get_adapter
    from sixbit_tune.models.specs import load_pipeline
    from sixbit_tune.runtime import apply_policy, load_policy

    try:
        kind = _output_kind(args.out)
        _check_writer(kind)
        for name in ("steps", "height", "width", "frames"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name} must be a positive integer, got {v}")
    except ValueError as e:
        args._parser.error(str(e))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)

    policy = load_policy(args.policy)
    pipe = load_pipeline(args.model, device=device, dtype=dtype)
    handle = apply_policy(pipe, policy, strict_gpu=args.strict_gpu, kernel_preference=args.kernels)

    spec = args.model.strip()
    if spec.startswith("tiny:"):
        from sixbit_tune.models.tiny import tiny_pipeline_call_kwargs

        kwargs = tiny_pipeline_call_kwargs(
            get_adapter(pipe).family.name, args.prompt, steps=args.steps or 8,
            guidance=5.0 if args.guidance is None else args.guidance, seed=args.seed,
        )
    else:
        kwargs = dict(prompt=[args.prompt], generator=torch.Generator(device="cpu").manual_seed(args.seed))
        if args.steps is not None:
            kwargs["num_inference_steps"] = args.steps
        if args.guidance is not None:
            kwargs["guidance_scale"] = args.guidance
    for key, value in (("height", args.height), ("width", args.width), ("num_frames", args.frames)):
        if value is not None:
            kwargs[key] = value
    kwargs["output_type"] = "np"

    start = time.perf_counter()
    try:
        with torch.inference_mode():
            frames = pipe(**kwargs).frames[0]
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        stats = handle.stats()
    finally:
        handle.remove()
    files = write_video(frames, args.out, fps=args.fps)
    print(f"wrote {files[0] if len(files) == 1 else f'{len(files)} frames to {args.out}'} "
          f"({len(frames)} frames, {seconds:.2f} s on {device}, {dtype_name})")
    if stats is not None:
        print(stats.summary())
        if args.stats_json:
            Path(args.stats_json).write_text(
                json.dumps({"seconds": seconds, "device": device, "dtype": dtype_name, **stats.to_dict()}, indent=2)
                + "\n", encoding="utf-8",
            )
    return 0
