"""Settings of a search: one JSON-serializable dataclass shared by the CLI, the Python API and worker processes."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Prompts used when neither the caller nor the profile run names any (the reference model's grammar).
DEFAULT_PROMPTS = (
    "a red square moving left on a striped background",
    "a blue circle moving right on a checkered background",
    "a green triangle moving up on a plain background",
)

#: Objectives, in Optuna's order, and their directions.
OBJECTIVES = ("latency_ms", "memory_bytes", "psnr_db")
DIRECTIONS = ("minimize", "minimize", "maximize")

#: How a search stores the in-block linears' weights: ``"mixed"`` (layers with a trusted predictor NVFP4 and
#: dynamic, the others in the fit's ``untrusted_mode`` format on their fast route), ``"nvfp4"`` (every in-block
#: linear NVFP4; the layers without a trusted predictor run the robust route, W4A8).
WEIGHT_SETTINGS = ("mixed", "nvfp4")
#: Whether a search measures this GPU's route menu and gives each layer on an 8-bit route the faster of INT8 and
#: FP8 at its shape (``sixbit_tune.runtime.menu.choose_8bit_routes``): ``"auto"`` (on a GPU only), ``"measure"``,
#: ``"off"`` (the routes the policy builders name).
MENU_SETTINGS = ("auto", "measure", "off")


@dataclass(frozen=True)
class GenerationSettings:
    """How each video of a search or demo is generated (the pipeline's own arguments).

    Attributes:
        steps: ``num_inference_steps``.
        height, width, num_frames: output size in pixels and frames (None: the pipeline's default).
        guidance_scale: classifier-free guidance scale (> 1 runs both branches; None: the pipeline's default).
        max_sequence_length: text tokens (None: the pipeline's default; the tiny pipelines need 16).
    """

    steps: int = 6
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    guidance_scale: float | None = None
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "height", "width", "num_frames", "max_sequence_length"):
            v = getattr(self, name)
            if v is None and name != "steps":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GenerationSettings.{name} must be a positive integer, got {v!r}")
        g = self.guidance_scale
        if g is not None and (not math.isfinite(g) or g < 0):
            raise ValueError(f"GenerationSettings.guidance_scale must be finite and >= 0, got {g}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def call_kwargs(self) -> dict:
        kw: dict[str, Any] = {"num_inference_steps": self.steps}
        for key, value in (
            ("height", self.height),
            ("width", self.width),
            ("num_frames", self.num_frames),
            ("guidance_scale", self.guidance_scale),
            ("max_sequence_length", self.max_sequence_length),
        ):
            if value is not None:
                kw[key] = value
        return kw

    @classmethod
    def for_model(cls, spec: str, profile_settings: dict | None = None, steps: int | None = None):
        """Settings matching a profile run (its ``runs.settings``) of model ``spec``; gaps filled with the tiny
        pipelines' sizes for ``tiny:`` specs and the pipeline's defaults otherwise."""
        s = dict(profile_settings or {})
        kw: dict[str, Any] = {
            "steps": int(steps or s.get("steps") or cls.steps),
            "height": s.get("height"),
            "width": s.get("width"),
            "num_frames": s.get("frames"),
            "guidance_scale": None if s.get("guidance") is None else float(s["guidance"]),
        }
        if spec.strip().startswith("tiny:"):
            from sixbit_tune.models.tiny import TINY_TEXT_LEN, TINY_VIDEO

            family = spec.strip().split(":", 1)[1]
            video = TINY_VIDEO.get(family, {})
            kw["height"] = kw["height"] or video.get("height")
            kw["width"] = kw["width"] or video.get("width")
            kw["num_frames"] = kw["num_frames"] or video.get("num_frames")
            kw["guidance_scale"] = 5.0 if kw["guidance_scale"] is None else kw["guidance_scale"]
            kw["max_sequence_length"] = TINY_TEXT_LEN
        return cls(**kw)


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search (and each of its worker processes) needs.

    Attributes:
        store: the store folder (profile, fit; trials are mirrored here; references cached in ``references/``).
        model: model spec (``reference``, ``tiny:<family>``, a folder or repo id).
        trials: total number of trials of the study (enqueued reference trials included); a resumed study runs
            only the missing ones.
        study: study name (default ``search-<model>-<device>``).
        storage: Optuna storage: an RDB URL (``postgresql://...``, ``sqlite:///...``) or a journal file path
            (default ``<store>/optuna.journal``).
        workers: processes on this host, each running trials of the same study (one per GPU when there are GPUs).
        seed: TPE sampler seed (worker ``i`` uses ``seed + i``).
        prompts: prompts every trial generates (default: the profile run's prompts, else :data:`DEFAULT_PROMPTS`).
        seeds: generation seed per prompt (cycled).
        generation: pipeline settings (default: the profile run's steps/size/guidance).
        steps: denoising steps, overriding the profile's (when ``generation`` is not given).
        quality_floor_db: constraint: mean PSNR against the unquantized output must be at least this.
        repeats: timed generations per prompt (the latency is their median).
        warmup_runs: untimed generations before the timed ones, per trial. On the CPU the first one measures the
            peak memory (one more untimed generation runs for it when this is 0).
        memory_budget_bytes: a trial whose measured memory exceeds this fails as out-of-memory (on a GPU through
            torch's own allocator limit; on the CPU checked after the measurement).
        max_memory_gib: constraint: the measured peak memory (GiB, 2**30 bytes) must be at most this. A trial above
            it completes and is recorded as infeasible (like one below the quality floor); the trial chosen is the
            fastest one that meets both. None: memory is only an objective.
        dmpq: search the mixed precision (τ; every in-block linear quantized or dynamic). False: every linear keeps
            its weights unquantized and only the Temporal Delta Cache's knobs are searched (no reference corners).
        fit_id: predictors to use (default: the store's latest fit).
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        startup_trials: TPE random startup trials (default ``max(3, trials // 4)``).
        progress: show a tqdm bar.
        reference_corners: enqueue the corner policies (static INT8, static NVFP4, DMPQ without cache; with
            ``weights="nvfp4"`` the first is NVFP4-stored on the robust route); ignored with ``dmpq`` off (they are
            quantized policies).
        weights: :data:`WEIGHT_SETTINGS`: ``"mixed"`` (the default) or ``"nvfp4"`` (every in-block linear stores
            its weight in NVFP4).
        nvfp4_encoder: the NVFP4 weight encoder of every policy (``sixbit_tune.policy.NVFP4_WEIGHT_ENCODERS``);
            ``"gptq"`` needs the Hessians a profile with ``nvfp4_hessians=True`` records.
        menu: :data:`MENU_SETTINGS`: measure the device's route menu at the model's linear shapes once per worker
            and run every 8-bit layer on the faster of INT8 and FP8 there (the corners' static 8-bit layers too);
            every trial's policy records the measured menu in ``target.menu``.
    """

    store: str
    model: str
    trials: int = 20
    study: str | None = None
    storage: str | None = None
    workers: int = 1
    seed: int = 0
    prompts: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    generation: GenerationSettings | None = None
    steps: int | None = None
    quality_floor_db: float = 30.0
    repeats: int = 3
    warmup_runs: int = 1
    memory_budget_bytes: int | None = None
    fit_id: str | None = None
    device: str | None = None
    startup_trials: int | None = None
    progress: bool = True
    reference_corners: bool = True
    max_memory_gib: float | None = None
    dmpq: bool = True
    weights: str = "mixed"
    nvfp4_encoder: str = "standard"
    menu: str = "auto"

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.warmup_runs < 0:
            raise ValueError(f"warmup_runs must be >= 0, got {self.warmup_runs}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not math.isfinite(self.quality_floor_db):
            raise ValueError(f"quality_floor_db must be finite, got {self.quality_floor_db}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be positive, got {self.memory_budget_bytes}")
        if self.max_memory_gib is not None:
            m = self.max_memory_gib
            if isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m) or m <= 0:
                raise ValueError(f"max_memory_gib must be a positive, finite number of GiB, got {m!r}")
        if not isinstance(self.dmpq, bool):
            raise ValueError(f"dmpq must be True or False, got {self.dmpq!r}")
        if self.weights not in WEIGHT_SETTINGS:
            raise ValueError(f"weights must be one of {WEIGHT_SETTINGS}, got {self.weights!r}")
        from sixbit_tune.policy import NVFP4_WEIGHT_ENCODERS

        if self.nvfp4_encoder not in NVFP4_WEIGHT_ENCODERS:
            raise ValueError(f"nvfp4_encoder must be one of {NVFP4_WEIGHT_ENCODERS}, got {self.nvfp4_encoder!r}")
        if self.menu not in MENU_SETTINGS:
            raise ValueError(f"menu must be one of {MENU_SETTINGS}, got {self.menu!r}")
        if not self.dmpq and (self.weights != "mixed" or self.nvfp4_encoder != "standard"):
            raise ValueError("weights and nvfp4_encoder choose how policies quantize; a cache-only search (dmpq "
                             "off) quantizes nothing: leave them at their defaults")
        if self.prompts is not None:
            object.__setattr__(self, "prompts", tuple(self.prompts))
            if not self.prompts:
                raise ValueError("prompts must not be empty")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    @property
    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def measures_menu(self) -> bool:
        """Whether trials take the measured menu's faster 8-bit routes (``menu``; ``"auto"``: on a GPU; never in a
        cache-only search, which quantizes nothing)."""
        if not self.dmpq or self.menu == "off":
            return False
        return self.menu == "measure" or self.resolved_device == "cuda"

    @property
    def study_name(self) -> str:
        return self.study or default_study_name(self.model, self.resolved_device)

    @property
    def storage_url(self) -> str:
        return self.storage or str(Path(self.store).absolute() / "optuna.journal")

    @property
    def max_memory_bytes(self) -> int | None:
        """``max_memory_gib`` in bytes (None without a memory constraint)."""
        return None if self.max_memory_gib is None else int(self.max_memory_gib * 2**30)

    @property
    def corners(self) -> bool:
        """Whether the reference corners are enqueued (never for a cache-only search)."""
        return self.reference_corners and self.dmpq

    @property
    def n_startup(self) -> int:
        return self.startup_trials if self.startup_trials is not None else max(3, self.trials // 4)

    def replace(self, **kw) -> SearchConfig:
        return dataclasses.replace(self, **kw)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SearchConfig:
        d = json.loads(text)
        if d.get("generation") is not None:
            d["generation"] = GenerationSettings(**d["generation"])
        for k in ("prompts", "seeds"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def default_study_name(model: str, device: str) -> str:
    return "search-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{model}-{device}").strip("-")


@dataclass
class TrialFigures:
    """What one trial measured."""

    latency_ms: float
    memory_bytes: int
    peak_memory_bytes: int | None
    weight_bytes: int
    cache_bytes: int
    psnr_db: float
    ssim: float | None
    latent_rel_l2: float
    psnr_min_db: float
    lpips: float | None
    nvfp4_share: float | None
    skip_share: float | None
    execution: dict = field(default_factory=dict)
    latencies_ms: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
