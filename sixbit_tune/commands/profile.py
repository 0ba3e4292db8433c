"""``sixbit-tune profile``."""

from __future__ import annotations

import argparse
import dataclasses


def _defaults() -> dict:
    # Defaults come from ProfileConfig itself (one source); the module is light to import (no torch at import).
    from sixbit_tune.profiling.config import ProfileConfig

    return {f.name: f.default for f in dataclasses.fields(ProfileConfig) if f.default is not dataclasses.MISSING}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sixbit_tune.profiling.config import DTYPES

    d = _defaults()
    parser.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="model spec: tiny:<family>, shape:<name> (transformer only, e.g. shape:cogvideox-2b), reference, a "
        "diffusers repo id or a local folder",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", metavar="FILE", help="prompts file: one per line (# comments) or a .json list")
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    parser.add_argument("--store", required=True, metavar="PATH", help="store folder (created if missing)")
    parser.add_argument("--steps", type=int, default=d["steps"], help="denoising steps per prompt (default %(default)s)")
    parser.add_argument("--height", type=int, default=d["height"], help="video height (default: the model's)")
    parser.add_argument("--width", type=int, default=d["width"], help="video width (default: the model's)")
    parser.add_argument("--frames", type=int, default=d["frames"], help="video frames (default: the model's)")
    parser.add_argument("--guidance", type=float, default=d["guidance"],
                        help="classifier-free guidance scale; <= 1 disables CFG (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=d["seed"], help="base seed; prompt i uses seed+i (default %(default)s)")
    parser.add_argument("--device", default=d["device"], help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default=d["dtype"], choices=DTYPES,
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--workers", type=int, default=d["workers"],
                        help="processes to shard prompts over: one per GPU with several GPUs, CPU processes "
                        "otherwise (default %(default)s)")
    parser.add_argument("--layer-every", type=int, default=d["layer_every"],
                        help="record per-layer errors every N-th step only; block statistics every step "
                        "(default %(default)s)")
    parser.add_argument("--formats", default=",".join(d["formats"]),
                        help="comma-separated routes whose per-layer errors are recorded: nvfp4 (W4A4), int8, fp8 "
                        "(W8A8), nvfp4/int8 (W4A8: INT8 weight derived from the NVFP4 one), nvfp4/fp8 (a format f "
                        "is the route f/f; default %(default)s)")
    parser.add_argument("--attention-formats", default=",".join(d["attention_formats"]) or "none",
                        help="comma-separated attention formats (fp8, int8: the Q·Kᵀ operands) whose attn_err each "
                        "block's self-attention records, or 'none' (default %(default)s)")
    parser.add_argument("--attention-every", type=int, default=d["attention_every"],
                        help="record attn_err every N-th step only (default %(default)s)")
    parser.add_argument("--nvfp4-hessians", action="store_true",
                        help="also accumulate each in-block linear's input statistics (sum of x^T x) into "
                        "<store>/calibration: the calibration a 'search --nvfp4-encoder gptq' needs")
    parser.add_argument("--run-id", default=d["run_id"], help="explicit run id (default: generated)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _attention_formats(text: str) -> tuple[str, ...]:
    if text.strip().lower() == "none":
        return ()
    return tuple(f.strip() for f in text.split(",") if f.strip())


def run(args: argparse.Namespace) -> int:
    from sixbit_tune.profiling.config import ProfileConfig, load_prompts
    from sixbit_tune.profiling.runner import profile

    prompts = load_prompts(args.prompts) if args.prompts else list(args.prompt)
    try:
        config = ProfileConfig(
            model=args.model,
            prompts=prompts,
            store=args.store,
            steps=args.steps,
            height=args.height,
            width=args.width,
            frames=args.frames,
            guidance=args.guidance,
            seed=args.seed,
            device=args.device,
            dtype=args.dtype,
            workers=args.workers,
            layer_every=args.layer_every,
            formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
            attention_formats=_attention_formats(args.attention_formats),
            attention_every=args.attention_every,
            nvfp4_hessians=args.nvfp4_hessians,
            progress=not args.no_progress,
            run_id=args.run_id,
        )
    except ValueError as e:
        args._parser.error(str(e))
    run_id = profile(config)
    print(f"profile run {run_id}: {len(prompts)} prompt(s) x {config.steps} steps of {config.model} recorded in the "
          f"store {config.store}")
    print(f"next: sixbit-tune fit --store {config.store}")
    return 0
