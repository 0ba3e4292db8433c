"""Train the reference model: ``python -m sixbit_tune.models.reference.train --out DIR --minutes M --seed S``.

Objective: rectified flow / flow matching, consistent with ``FlowMatchEulerDiscreteScheduler``: for a clean clip
x0 and noise e, x_t = (1 - sigma) x0 + sigma e, the transformer gets timestep ``sigma * 1000`` and predicts the
velocity e - x0 (MSE). Sigmas are ``shifted_sigmas(u)``, u ~ U(0, 1), with the scheduler's shift (3.0), so training
spends most steps at the high noise levels where layout and motion are decided. Classifier-free guidance is trained
by replacing 10% of the prompts with the empty prompt. AdamW, linear warm-up then cosine decay to 10% over
``--steps``, gradient clipping at 1.0, bf16 autocast on CUDA, EMA of the weights (shipped).

Determinism: ``torch.manual_seed(seed)`` for the initial weights, one ``torch.Generator(device)`` seeded ``seed``
for all data, noise, sigmas and prompt dropout; cuDNN benchmark off and deterministic; TF32 off (matmuls run in
bf16 under autocast anyway). With ``--deterministic`` PyTorch's deterministic algorithms are requested too
(warn-only). The step count, not the clock, defines the run: ``--minutes`` is only a safety cap, and the summary
records whether it cut the run short. Bitwise equality across GPUs/driver versions is not promised (SDPA kernels).

Outputs in ``--out``: ``train_log.jsonl`` (one JSON object per log interval and probe, then the summary),
``summary.json``, ``weights/`` (the diffusers pipeline folder with bf16 safetensors; with ``--eval-n`` > 0 also the
evaluation in ``summary.json`` and sample PNGs). The shipped folder's MODEL_CARD.md is written from these files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from . import data
from .model import (
    MAX_SEQUENCE_LENGTH,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_transformer,
    encode_tokens,
    shifted_sigmas,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the sixbit-tune reference video DiT.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--steps",
        default="12000",
        help="optimizer steps (defines the LR schedule); 'auto': time steps 20-60 and fill --minutes (the summary "
        "records the resolved count; pass it as --steps N to reproduce the run)",
    )
    p.add_argument(
        "--stop-at", type=int, default=None, help="stop after this many steps (the LR schedule still spans --steps)"
    )
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock safety cap for the training loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--cfg-drop", type=float, default=0.1, help="probability of the empty prompt")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (0 disables; shipped weights are the EMA)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer for training")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(warn_only)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--probe-every", type=int, default=0, help="motion/colour probe on held-out prompts (0: off)")
    p.add_argument("--eval-n", type=int, default=256, help="clips per split in the final evaluation (0: skip)")
    p.add_argument("--eval-quick", action="store_true", help="one 4-step generation config only (smoke tests)")
    p.add_argument("--frames", type=int, default=data.DEFAULT_FRAMES)
    p.add_argument("--size", type=int, default=data.DEFAULT_HEIGHT)
    return p.parse_args(argv)


def _lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def train(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _set_determinism(args.seed, args.deterministic)

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), seed=args.seed).to(device).train()
    transformer = build_transformer(seed=args.seed).to(device).train()
    n_params = {
        "transformer": sum(p.numel() for p in transformer.parameters()),
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
    }

    # every prompt of the grammar, plus the empty prompt (CFG) as the last row
    prompts = data.all_prompts() + [""]
    tok = tokenizer(
        prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
    )
    table_ids, table_mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    empty_id = len(prompts) - 1

    params = list(transformer.parameters()) + list(text_encoder.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        eps=1e-8,
        fused=device.type == "cuda",
    )
    ema = [p.detach().clone().float() for p in params] if args.ema > 0 else None

    t_start = time.perf_counter()  # the --minutes cap covers compilation too
    forward = transformer
    compiled = False
    if args.compile:
        # compile and check forward + backward once on a throw-away input (data generator untouched)
        forward = torch.compile(transformer)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                xs = torch.randn(args.batch_size, 3, args.frames, args.size, args.size, device=device)
                es = torch.randn(args.batch_size, MAX_SEQUENCE_LENGTH, text_encoder.config.d_model, device=device)
                ts = torch.full((args.batch_size,), 500.0, device=device)
                forward(xs, ts, es, return_dict=False)[0].float().square().mean().backward()
            compiled = True
        except Exception as exc:  # report and train eagerly rather than not at all
            print(f"torch.compile failed ({type(exc).__name__}: {exc}); training eagerly", flush=True)
            forward = transformer
        transformer.zero_grad(set_to_none=True)
    compile_seconds = time.perf_counter() - t_start
    auto_steps = str(args.steps) == "auto"
    args.steps = 10**9 if auto_steps else int(args.steps)
    t_mark = None

    gen = torch.Generator(device=device).manual_seed(args.seed)
    use_amp = device.type == "cuda"
    log_path = out / "train_log.jsonl"
    log = log_path.open("w")
    cap = args.minutes * 60.0
    acc_dev = torch.zeros(6, device=device)  # loss, hi-sigma loss sum, count, lo-sigma loss sum, count, grad norm
    acc_n = 0
    recent: list[float] = []
    step = 0
    stopped_by_cap = False
    probes = []
    pipe_for_probe = None
    steps_done = 0
    for step in range(args.steps):
        if args.stop_at is not None and step >= args.stop_at:
            break
        if time.perf_counter() - t_start > cap:
            stopped_by_cap = True
            break
        lr = _lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = data.sample_batch(
            args.batch_size, gen, "train", args.frames, args.size, args.size, device=device, with_prompts=False
        )
        x0 = batch.video
        pid = batch.prompt_ids
        drop = torch.rand(pid.shape, generator=gen, device=device) < args.cfg_drop
        pid = torch.where(drop, torch.full_like(pid, empty_id), pid)
        u = torch.rand(x0.shape[0], generator=gen, device=device)
        sigma = shifted_sigmas(u)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        s = sigma[:, None, None, None, None]
        xt = (1 - s) * x0 + s * noise
        target = noise - x0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            emb = encode_tokens(text_encoder, table_ids[pid], table_mask[pid])
            pred = forward(xt, sigma * 1000.0, emb, return_dict=False)[0]
        per = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3, 4))
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        steps_done = step + 1
        if ema is not None:
            d = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - d)

        hi = sigma > 0.7
        if auto_steps and step in (20, 60):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            if step == 20:
                t_mark = now
            else:
                per_step = (now - t_mark) / 40
                remaining = cap * 0.96 - (now - t_start)
                args.steps = max(args.warmup + 1, 61 + int(remaining / per_step))
                print(json.dumps({"auto_steps": args.steps, "seconds_per_step": per_step}), flush=True)
        # accumulate on device, read once per interval
        acc_dev += torch.stack(
            [
                loss.detach(),
                (per * hi).sum().detach(),
                hi.sum().float(),
                (per * ~hi).sum().detach(),
                (~hi).sum().float(),
                gn.detach().float(),
            ]
        )
        acc_n += 1
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            v = acc_dev.tolist()
            n = acc_n
            rec = {
                "step": step + 1,
                "loss": v[0] / n,
                "loss_sigma_gt_0.7": v[1] / max(v[2], 1),
                "loss_sigma_le_0.7": v[3] / max(v[4], 1),
                "grad_norm": v[5] / n,
                "lr": lr,
                "elapsed_s": round(time.perf_counter() - t_start, 2),
            }
            recent.append(rec["loss"])
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
            acc_dev.zero_()
            acc_n = 0
        if args.probe_every and (step + 1) % args.probe_every == 0:
            from .evaluate import generate_and_detect
            from .pipeline import ReferencePipeline

            if pipe_for_probe is None:
                pipe_for_probe = ReferencePipeline(tokenizer, text_encoder, transformer, build_scheduler())
                pipe_for_probe.set_progress_bar_config(disable=True)
            pb = data.heldout_batch(64, "heldout", seed=99, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                rates, _ = generate_and_detect(pipe_for_probe, pb, 20, 4.0, seed=0)
            transformer.train()
            text_encoder.train()
            rec = {"probe_step": step + 1, "weights": "raw", "steps": 20, "cfg": 4.0, **rates}
            probes.append(rec)
            log.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
    train_seconds = time.perf_counter() - t_start

    # ship the EMA weights
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e.to(p.dtype))
    from .pipeline import ReferencePipeline

    transformer.eval()
    text_encoder.eval()
    pipe = ReferencePipeline(tokenizer, text_encoder, transformer, build_scheduler())
    wdir = out / "weights"
    pipe.to(torch.bfloat16).save_pretrained(str(wdir), safe_serialization=True)
    pipe.to(torch.float32)
    weight_bytes = sum(f.stat().st_size for f in wdir.rglob("*") if f.is_file())

    summary = {
        "command": "python -m sixbit_tune.models.reference.train " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "args": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "compiled": compiled,
        "compile_seconds": round(compile_seconds, 1),
        "steps_auto": auto_steps,
        "reproduce_with": f"--steps {args.steps}"
        + (f" --stop-at {steps_done}" if steps_done < args.steps else ""),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "steps_done": steps_done,
        "stopped_by_time_cap": stopped_by_cap,
        "train_seconds": round(train_seconds, 1),
        "clips_seen": steps_done * args.batch_size,
        "final_loss_last_5_logs": sum(recent[-5:]) / max(1, len(recent[-5:])),
        "params": n_params,
        "weights_bytes_bf16": weight_bytes,
        "probes": probes,
    }
    if args.eval_n > 0:
        from . import load_reference_pipeline
        from .evaluate import EVAL_CONFIGS, run_evaluation, save_samples
        from .model import build_untrained_pipeline

        shipped = load_reference_pipeline(device=device, path=wdir)
        shipped.set_progress_bar_config(disable=True)
        untrained = build_untrained_pipeline(seed=12345).to(device)
        untrained.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        configs = ((4, 4.0),) if args.eval_quick else EVAL_CONFIGS
        summary["eval"] = run_evaluation(shipped, device, n=args.eval_n, configs=configs, untrained=untrained)
        summary["eval_seconds"] = round(time.perf_counter() - t0, 1)
        save_samples(shipped, wdir, num_inference_steps=4 if args.eval_quick else 30)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.write(json.dumps({"summary": summary}) + "\n")
    log.close()
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = train(args)
    short = {k: summary[k] for k in ("steps_done", "train_seconds", "final_loss_last_5_logs", "weights_bytes_bf16")}
    print(json.dumps(short))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
