"""The profiling run: a real pipeline (or, for ``shape:`` specs, the bare transformer) with recording hooks, its
statistics written into a store one prompt at a time.

``profile(ProfileConfig(...)) -> run_id`` is the Python API; ``sixbit-tune profile`` takes its defaults from the
same dataclass. Prompts are sharded over worker processes (one per GPU with several GPUs, CPU processes
otherwise); every worker writes its own part files into the store, and ends when the parent process ends, however
it ends. A prompt's rows are written when the prompt has finished (``layer_steps`` and ``attn_steps`` first, then
``block_steps``), so
a killed run loses at most the prompts in flight; a run that ends normally is marked ``finished``, one that raises
``failed`` with the error.

Seeds do not depend on sharding: prompt ``i`` always runs with generator seed ``seed + i``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from sixbit_tune.errors import SixbitError
from sixbit_tune.profiling.config import DTYPES, ProfileConfig, load_prompts

__all__ = ["DTYPES", "ProfileConfig", "ProfileWorkerError", "load_prompts", "profile", "shape_step_inputs"]


class ProfileWorkerError(SixbitError, RuntimeError):
    """A profiling worker process died (killed, or exited without reporting); the message names it and how."""


# ------------------------------------------------------------------------------------------------ public API
def profile(config: ProfileConfig) -> str:
    """Run a profiling run and record it in ``config.store``; returns the run id.

    Raises:
        ValueError: inconsistent settings (e.g. more CUDA workers than GPUs).
        UnsupportedModelError: the model is not of a supported family.
        NonFiniteError: NaN statistics (non-finite activations or weights); the run is marked failed.
        ProfileWorkerError: a worker process died (the message names it, its pid and how it ended).
        RuntimeError: a worker process failed (the message carries its traceback).
    """
    import torch

    from sixbit_tune.store import Store, gpu_info, versions

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    devices = _worker_devices(device, config.workers)
    store = Store.create(config.store, exist_ok=True)
    store.close()
    run_id = config.run_id or f"profile-{uuid.uuid4().hex[:12]}"
    shards = [list(range(len(config.prompts)))[i :: len(devices)] for i in range(len(devices))]
    shards = [s for s in shards if s]
    devices = devices[: len(shards)]
    total = len(config.prompts) * config.steps
    bar = _progress_bar(total, config.progress)
    state: dict[str, Any] = {"writer": None, "timesteps": None, "begun": False}

    def begin(meta: dict) -> None:
        with Store.open(config.store) as st:
            writer = st.writer(f"{run_id}-main")
        gpu_index = (torch.device(devices[0]).index or 0) if devices[0].startswith("cuda") else None
        writer.begin_run(
            "profile",
            config.model,
            model_class=meta["model_class"],
            family=meta["family"],
            config_hash=meta["config_hash"],
            settings=_settings(config, devices, meta),
            gpu=gpu_info(gpu_index) if gpu_index is not None else None,
            versions=versions(),
            seed=config.seed,
            run_id=run_id,
        )
        state["writer"], state["begun"] = writer, True

    try:
        if len(shards) == 1:
            _run_shard(config, shards[0], run_id, devices[0], 0, begin, bar.update, state)
        else:
            _run_workers(config, shards, run_id, devices, begin, bar.update, state)
    except BaseException as e:
        bar.close()
        if state["begun"]:
            state["writer"].finish_run(run_id, "failed", error=f"{type(e).__name__}: {e}"[:2000])
        raise
    bar.close()
    state["writer"].finish_run(run_id, "finished", timesteps=state["timesteps"])
    return run_id


# ------------------------------------------------------------------------------------------------ internals
def _worker_devices(device: str, workers: int) -> list[str]:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if workers == 1:
            return [device]
        n = torch.cuda.device_count()
        if workers > n:
            raise ValueError(f"--workers {workers} on CUDA needs one GPU per worker; {n} GPU(s) visible")
        return [f"cuda:{i}" for i in range(workers)]
    if device != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    return ["cpu"] * workers


def _settings(config: ProfileConfig, devices: list[str], meta: dict) -> dict:
    s = asdict(config)
    s.pop("progress")
    s["formats"] = list(config.formats)
    s["attention_formats"] = list(config.attention_formats)
    s["attention_modules"] = meta["attention_modules"]
    s["devices"] = devices
    s["dtype"] = meta["dtype"]
    s["num_prompts"] = len(config.prompts)
    s["num_blocks"] = meta["num_blocks"]
    s["layers"] = meta["layers"]
    s["cfg_mode"] = meta["cfg_mode"]
    s["compile_stats"] = meta["compile_stats"]
    s["nvfp4_gemm"] = meta["nvfp4_gemm"]
    s["mode"] = meta["mode"]
    s["resolved"] = meta.get("resolved", {})
    return s


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="profile", unit="step", dynamic_ncols=True)


def _dtype(config: ProfileConfig, device: str):
    import torch

    name = config.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return getattr(torch, name)


def _run_shard(
    config: ProfileConfig,
    shard: Sequence[int],
    run_id: str,
    device: str,
    worker_index: int,
    on_meta: Callable[[dict], None] | None,
    on_step: Callable[[int], None],
    state: dict,
    wait_begun: Callable[[], None] | None = None,
) -> None:
    """Profile ``shard`` (prompt indices) on ``device``, writing each finished prompt into the store."""
    import torch

    from sixbit_tune.profiling.hooks import instrument
    from sixbit_tune.store import Store

    dtype = _dtype(config, device)
    if device.startswith("cuda") and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    shape_mode = config.model.strip().startswith("shape:")
    if shape_mode:
        from sixbit_tune.models.specs import load_transformer

        model = load_transformer(config.model, device=device, dtype=dtype)
    else:
        from sixbit_tune.models.specs import load_pipeline

        model = load_pipeline(config.model, device=device, dtype=dtype)
        if hasattr(model, "set_progress_bar_config"):
            model.set_progress_bar_config(disable=True)
    inst = instrument(model, formats=config.formats, compile_stats=config.compile_stats,
                      attention_formats=config.attention_formats, hessians=config.nvfp4_hessians)
    adapter = inst.adapter
    meta = {
        "model_class": type(adapter.transformer).__name__,
        "family": adapter.family.name,
        "config_hash": adapter.config_hash(),
        "dtype": str(dtype).replace("torch.", ""),
        "num_blocks": len(adapter.blocks()),
        "layers": {n: list(f) for n, f in zip(inst.layer_names, inst.layer_formats)},
        "cfg_mode": adapter.cfg_mode,
        "compile_stats": inst.compile_stats,
        "nvfp4_gemm": inst.nvfp4_gemm,
        "attention_modules": {str(i): n for i, n in inst.attention_modules.items()},
        "mode": "transformer" if shape_mode else "pipeline",
    }
    if shape_mode:
        meta["resolved"] = _shape_defaults(adapter, config)
    if on_meta is not None:
        on_meta(meta)
    if wait_begun is not None:
        wait_begun()
    with Store.open(config.store) as st:
        writer = st.writer(f"{run_id}-w{worker_index}")
    try:
        for prompt_index in shard:
            inst.reset()
            records, timesteps = (_shape_prompt if shape_mode else _pipeline_prompt)(
                model, inst, config, prompt_index, device, dtype, on_step
            )
            if state.get("timesteps") is None:
                state["timesteps"] = timesteps
            prompt = config.prompts[prompt_index]
            # layer and attention rows first: block rows present mean the prompt's rows are complete.
            if records.layers["step"]:
                writer.write_layer_steps(records.layers, run_id=run_id)
            if records.attention["step"]:
                writer.write_attn_steps(records.attention, run_id=run_id)
            writer.write_block_steps({**records.blocks, "prompt": [prompt] * len(records.blocks["step"])},
                                     run_id=run_id)
        if config.nvfp4_hessians:
            from sixbit_tune.profiling.calibration import hessians_path, save_hessians

            save_hessians(hessians_path(config.store, run_id, worker_index), run_id, *inst.nvfp4_hessians())
    finally:
        inst.remove()


def _pipeline_prompt(pipe, inst, config: ProfileConfig, prompt_index: int, device: str, dtype, on_step):
    import torch

    from sixbit_tune.profiling.hooks import StepRecords

    seed = config.seed + prompt_index
    prompt = config.prompts[prompt_index]
    spec = config.model.strip()
    if spec.startswith("tiny:"):
        from sixbit_tune.models.tiny import tiny_pipeline_call_kwargs

        guidance = 5.0 if config.guidance is None else float(config.guidance)
        kwargs = tiny_pipeline_call_kwargs(inst.adapter.family.name, prompt, steps=config.steps, guidance=guidance,
                                           seed=seed)
    else:
        kwargs = dict(prompt=[prompt], num_inference_steps=config.steps,
                      generator=torch.Generator(device="cpu").manual_seed(seed))
        if config.guidance is not None:
            kwargs["guidance_scale"] = float(config.guidance)
    for key, value in (("height", config.height), ("width", config.width), ("num_frames", config.frames)):
        if value is not None:
            kwargs[key] = value
    kwargs["output_type"] = "latent"
    records = StepRecords.empty()
    timesteps: list[float] = []

    def on_step_end(_pipe, i, t, callback_kwargs):
        ts = float(t)
        timesteps.append(ts)
        records.extend(inst.flush(i, [prompt_index], ts))
        inst.record_layers = (i + 1) % config.layer_every == 0
        inst.record_attention = (i + 1) % config.attention_every == 0
        on_step(1)
        return {}

    kwargs["callback_on_step_end"] = on_step_end
    inst.record_layers = inst.record_attention = True
    try:
        with torch.inference_mode():
            pipe(**kwargs)
    finally:
        # diffusers resets its stateful hooks only after a call that succeeded: reset them here after a failure too.
        inst.reset()
    return records, timesteps


# ------------------------------------------------------------------------------------------------ shape mode
def _shape_defaults(adapter, config: ProfileConfig) -> dict:
    cfg = adapter.transformer.config
    fam = adapter.family.name
    if fam == "cogvideox":
        if cfg.get("use_rotary_positional_embeddings"):
            from sixbit_tune.errors import UnsupportedModelError

            raise UnsupportedModelError(
                "transformer-only profiling of CogVideoX with rotary embeddings (e.g. shape:cogvideox-5b) needs the "
                "pipeline's rotary tables, which are not built here; use shape:cogvideox-2b or a full pipeline"
            )
        frames = config.frames or cfg["sample_frames"]
        height = config.height or cfg["sample_height"] * 8
        width = config.width or cfg["sample_width"] * 8
    elif fam == "wan":
        frames, height, width = config.frames or 81, config.height or 480, config.width or 832
    else:
        from sixbit_tune.errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"transformer-only (shape:) profiling builds inputs for cogvideox and wan, not {fam!r}"
        )
    guidance = 6.0 if config.guidance is None else float(config.guidance)
    return {"frames": frames, "height": height, "width": width, "guidance": guidance}


def shape_step_inputs(adapter, frames: int, height: int, width: int, batch: int, generator, device, dtype) -> dict:
    """Random transformer inputs at the real token count of a ``frames x height x width`` video.

    The VAE compresses 8x in space and 4x in time (CogVideoX and Wan). Returns the keyword arguments of one
    forward except ``timestep`` (CogVideoX: latents ``(B, F, C, H, W)`` and ``max_text_seq_length`` text tokens;
    Wan: ``(B, C, F, H, W)`` and 512 text tokens), with ``hidden_states`` and ``encoder_hidden_states`` drawn
    from ``generator`` (CPU) in float32 and moved to ``device``/``dtype``.
    """
    import torch

    cfg = adapter.transformer.config
    lat_f, lat_h, lat_w = (frames - 1) // 4 + 1, height // 8, width // 8

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    if adapter.family.name == "cogvideox":
        latents = rand(batch, lat_f, cfg["in_channels"], lat_h, lat_w)
        text = rand(batch, cfg["max_text_seq_length"], cfg["text_embed_dim"])
    else:
        latents = rand(batch, cfg["in_channels"], lat_f, lat_h, lat_w)
        text = rand(batch, 512, cfg["text_dim"])
    return {"hidden_states": latents, "encoder_hidden_states": text, "return_dict": False}


def _shape_prompt(model, inst, config: ProfileConfig, prompt_index: int, device: str, dtype, on_step):
    """Transformer-only denoising loop: CFG calls as the family's pipeline makes them, Euler updates."""
    import torch

    from sixbit_tune.profiling.hooks import StepRecords

    adapter = inst.adapter
    d = _shape_defaults(adapter, config)
    cfg_on = d["guidance"] > 1.0
    g = torch.Generator().manual_seed(config.seed + prompt_index)
    batched = adapter.cfg_mode == "batched"
    rows = 2 if (cfg_on and batched) else 1
    inputs = shape_step_inputs(adapter, d["frames"], d["height"], d["width"], rows, g, device, dtype)
    if cfg_on and not batched:
        uncond_text = torch.randn(inputs["encoder_hidden_states"].shape, generator=g).to(device=device, dtype=dtype)
    latents = inputs.pop("hidden_states")[:1] if rows == 2 else inputs.pop("hidden_states")
    text = inputs.pop("encoder_hidden_states")
    records = StepRecords.empty()
    timesteps = [1000.0 * (1 - i / config.steps) - 1e-9 for i in range(config.steps)]
    timesteps = [max(0.0, round(t)) for t in timesteps]
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            inst.record_layers = i % config.layer_every == 0
            inst.record_attention = i % config.attention_every == 0
            if batched:
                x = latents.repeat(rows, *([1] * (latents.dim() - 1)))
                tt = torch.full((rows,), t, device=device, dtype=torch.long)
                with adapter.transformer.cache_context("cond_uncond"):
                    out = adapter.transformer(hidden_states=x, encoder_hidden_states=text, timestep=tt, **inputs)[0]
                # rows are [uncond; cond], as the batched-CFG pipelines build them
                pred = out[:1] + d["guidance"] * (out[1:] - out[:1]) if rows == 2 else out
            else:
                tt = torch.full((1,), t, device=device, dtype=torch.long)
                with adapter.transformer.cache_context("cond"):
                    pred = adapter.transformer(hidden_states=latents, encoder_hidden_states=text, timestep=tt,
                                               **inputs)[0]
                if cfg_on:
                    with adapter.transformer.cache_context("uncond"):
                        un = adapter.transformer(hidden_states=latents, encoder_hidden_states=uncond_text,
                                                 timestep=tt, **inputs)[0]
                    pred = un + d["guidance"] * (pred - un)
            latents = latents - pred.to(latents.dtype) / config.steps
            records.extend(inst.flush(i, [prompt_index], float(t)))
            on_step(1)
    return records, [float(t) for t in timesteps]


# ------------------------------------------------------------------------------------------------ workers
def _worker_main(config: ProfileConfig, shard, run_id, device, worker_index, q, begun, parent_pid) -> None:
    import torch

    from sixbit_tune.profiling.lifeline import die_with_parent, thread_lock_for_bars

    die_with_parent(parent_pid)  # a killed parent leaves no worker running and writing
    thread_lock_for_bars()
    try:
        if device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, config.workers)))
        state: dict[str, Any] = {}

        def wait():
            if not begun.wait(timeout=3600):
                raise RuntimeError("the run was never begun by the parent process")

        _run_shard(
            config, shard, run_id, device, worker_index,
            (lambda meta: q.put(("meta", worker_index, meta))) if worker_index == 0 else None,
            lambda n: q.put(("step", worker_index, n)),
            state,
            wait,
        )
        q.put(("done", worker_index, state.get("timesteps")))
    except BaseException:
        q.put(("error", worker_index, traceback.format_exc()))


def _run_workers(config, shards, run_id, devices, begin, on_step, state) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    begun = ctx.Event()
    procs = [
        ctx.Process(target=_worker_main, args=(config, shard, run_id, dev, i, q, begun, os.getpid()), daemon=True)
        for i, (shard, dev) in enumerate(zip(shards, devices))
    ]
    for p in procs:
        p.start()
    done: set[int] = set()
    checked = time.monotonic()
    try:
        while len(done) < len(procs):
            try:
                msg = q.get(timeout=1.0)
            except queue_mod.Empty:
                msg = None
            if msg is None or time.monotonic() - checked >= 1.0:  # also while the other workers keep reporting
                checked = time.monotonic()
                dead = [i for i, p in enumerate(procs) if i not in done and not p.is_alive() and p.exitcode != 0]
                if dead:
                    raise ProfileWorkerError(_dead_workers_message(procs, dead)) from None
            if msg is None:
                continue
            kind, idx, payload = msg
            if kind == "meta":
                begin(payload)
                begun.set()
            elif kind == "step":
                on_step(payload)
            elif kind == "done":
                done.add(idx)
                if idx == 0 or state.get("timesteps") is None:
                    state["timesteps"] = payload
            else:
                raise RuntimeError(f"profile worker {idx} failed:\n{payload}")
    finally:
        for p in procs:
            if p.is_alive() and len(done) < len(procs):
                p.terminate()
            p.join(timeout=30)


def _dead_workers_message(procs, dead: list[int]) -> str:
    from sixbit_tune.profiling.lifeline import how_it_ended

    which = "; ".join(f"profile worker {i} (pid {procs[i].pid}) {how_it_ended(procs[i].exitcode)}" for i in dead)
    return f"{which}; the prompts finished so far stay in the store"
