"""Settings of a profiling run (stdlib only, so ``sixbit-tune profile --help`` stays fast)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from sixbit_tune.routes import PROFILE_DEFAULT_ROUTES, PROFILE_ROUTES, profile_route_name

__all__ = ["DTYPES", "PROFILE_ATTENTION_FORMATS", "PROFILE_FORMATS", "ProfileConfig", "load_prompts"]

#: Model dtypes a run may use.
DTYPES = ("bfloat16", "float16", "float32")
#: Routes whose per-layer errors are recorded by default (:data:`sixbit_tune.routes.PROFILE_DEFAULT_ROUTES`).
PROFILE_FORMATS = PROFILE_DEFAULT_ROUTES
#: Attention formats whose ``attn_err`` is recorded by default (a subset of
#: ``sixbit_tune.formats.attention.QK_FORMATS``, checked in ``__post_init__``).
PROFILE_ATTENTION_FORMATS = ("fp8",)


@dataclass
class ProfileConfig:
    """Settings of one profiling run. Defaults are the CLI's defaults.

    Attributes:
        model: a model spec (``sixbit_tune.models.specs.SPEC_HELP``). ``shape:<name>`` profiles the transformer
            alone: a step is one transformer forward per CFG branch on random latents of the real token count,
            followed by an Euler update with the guided prediction.
        prompts: the prompts (for ``shape:`` specs they only label and seed the random inputs).
        store: the store folder (created if missing).
        steps: denoising steps per prompt.
        height, width, frames: video size in pixels/frames (None: the pipeline's default; for ``shape:`` specs the
            architecture's published size, e.g. 480x720, 49 frames for CogVideoX-2B).
        guidance: CFG scale (None: the pipeline's default; ``shape:`` specs 6.0). ``<= 1`` disables CFG.
        seed: base seed; prompt ``i`` uses ``seed + i``.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``; None: CUDA when available.
        dtype: model dtype name (None: bfloat16 on CUDA, float32 on CPU).
        workers: processes to shard prompts over (several GPUs: one per GPU, up to the GPU count).
        layer_every: record the per-layer errors on every ``layer_every``-th step only (steps 0, k, 2k, ...; block
            statistics are recorded at every step, so every recorded out_err_t still has its Γ_{t−1}). 1 = every
            step. Larger values trade calibration pairs for a cheaper run.
        formats: routes whose per-layer errors are recorded, as :data:`sixbit_tune.routes.PROFILE_ROUTES` names (a
            format ``f`` is the route ``f/f``: ``"nvfp4"`` W4A4, ``"int8"``, ``"fp8"`` W8A8; ``"nvfp4/int8"`` W4A8,
            ``"nvfp4/fp8"``; ``"int8/int8"`` is accepted for ``"int8"``), stored in that order. Routes over an NVFP4
            weight are left out for linears whose in_features is not a multiple of 16.
        attention_formats: attention formats (Q·Kᵀ in ``"fp8"`` or ``"int8"``) whose ``attn_err`` each block's
            self-attention records; empty: no attention errors (a cheaper run).
        attention_every: record ``attn_err`` on every ``attention_every``-th step only (steps 0, k, 2k, ...), as
            ``layer_every`` does for the layer errors.
        compile_stats: fuse the statistic computations with ``torch.compile`` (None: on CUDA only).
        nvfp4_hessians: also accumulate, per in-block linear, ``sum xᵀx`` over its inputs at every recorded step
            (the calibration of the ``"gptq"`` NVFP4 weight encoder), written to
            ``<store>/calibration/<run_id>-w<worker>.nvfp4-hessians.pt`` (:mod:`sixbit_tune.profiling.calibration`).
        progress: show a tqdm bar over prompts x steps.
        run_id: explicit run id (default: generated).
    """

    model: str
    prompts: list[str]
    store: str
    steps: int = 20
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    guidance: float | None = None
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    workers: int = 1
    layer_every: int = 1
    formats: tuple[str, ...] = PROFILE_FORMATS
    attention_formats: tuple[str, ...] = PROFILE_ATTENTION_FORMATS
    attention_every: int = 1
    compile_stats: bool | None = None
    nvfp4_hessians: bool = False
    progress: bool = True
    run_id: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        self.prompts = [str(p) for p in self.prompts]
        if not self.prompts:
            raise ValueError("prompts: give at least one prompt")
        if any(not p.strip() for p in self.prompts):
            raise ValueError("prompts: empty prompt text")
        for name in ("steps", "workers", "layer_every", "attention_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("height", "width", "frames"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if self.guidance is not None and not math.isfinite(float(self.guidance)):
            raise ValueError(f"guidance must be finite, got {self.guidance!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if isinstance(self.formats, str):
            self.formats = (self.formats,)
        names = tuple(profile_route_name(f) for f in self.formats)
        if not names:
            raise ValueError(f"formats: give at least one of {list(PROFILE_ROUTES)}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"formats: {dup} given more than once (a format f and the route f/f are the same)")
        self.formats = tuple(n for n in PROFILE_ROUTES if n in names)
        from sixbit_tune.formats.attention import QK_FORMATS

        self.attention_formats = tuple(self.attention_formats)
        if any(f not in QK_FORMATS for f in self.attention_formats) or len(set(self.attention_formats)) != len(
            self.attention_formats
        ):
            raise ValueError(
                f"attention_formats must be distinct values of {QK_FORMATS} (or none), got {list(self.attention_formats)}"
            )
        if not isinstance(self.nvfp4_hessians, bool):
            raise ValueError(f"nvfp4_hessians must be True or False, got {self.nvfp4_hessians!r}")
        if not str(self.store):
            raise ValueError("store: give a folder")
        self.store = str(self.store)


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: a JSON list of strings (``.json``) or one prompt per line (blank lines and lines
    starting with ``#`` skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no prompt, or a ``.json`` file that is not a list of strings.
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"{p}: a .json prompts file must hold a list of strings")
        prompts = [x for x in data if x.strip()]
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{p} holds no prompt")
    return prompts
