"""Model specs: how a user names a model, and how it is built or loaded.

A spec is one string:

- ``tiny:<family>``: a random tiny model of a supported family (tests; see :mod:`sixbit_tune.models.tiny`).
- ``shape:<name>``: a real published architecture with random weights, transformer only (speed and memory).
- ``reference``: the trained model the project ships (:mod:`sixbit_tune.models.reference`).
- a local folder or a Hugging Face repo id: loaded with ``from_pretrained``.

diffusers is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sixbit_tune.errors import NotBuiltYet, UnsupportedModelError
from sixbit_tune.models.adapters import FAMILIES, family_of, supported_classes
from sixbit_tune.models.loading import keep_in_fp32_modules, loaded_dtype, pipeline_as_loaded
from sixbit_tune.models.tiny import TINY_TRANSFORMER_KWARGS, tiny_pipeline, tiny_transformer

__all__ = [
    "REFERENCE_DIR",
    "SHAPE_CONFIGS",
    "SPEC_HELP",
    "build_shape_transformer",
    "load_pipeline",
    "load_transformer",
    "tiny_pipeline",
]

#: Where the reference-model helper stores the shipped model (its ``weights/config.json`` marks it as built).
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"

# Published transformer configs of the two smaller models; their larger siblings differ only in the keys
# given beside them in SHAPE_CONFIGS (compared key by key with the published configs).
_COGVIDEOX_2B: dict[str, Any] = dict(
    activation_fn="gelu-approximate",
    attention_bias=True,
    attention_head_dim=64,
    dropout=0.0,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=16,
    max_text_seq_length=226,
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    num_attention_heads=30,
    num_layers=30,
    out_channels=16,
    patch_size=2,
    sample_frames=49,
    sample_height=60,
    sample_width=90,
    spatial_interpolation_scale=1.875,
    temporal_compression_ratio=4,
    temporal_interpolation_scale=1.0,
    text_embed_dim=4096,
    time_embed_dim=512,
    timestep_activation_fn="silu",
    use_rotary_positional_embeddings=False,
)
_WAN_1_3B: dict[str, Any] = dict(
    added_kv_proj_dim=None,
    attention_head_dim=128,
    cross_attn_norm=True,
    eps=1e-6,
    ffn_dim=8960,
    freq_dim=256,
    image_dim=None,
    in_channels=16,
    num_attention_heads=12,
    num_layers=30,
    out_channels=16,
    patch_size=(1, 2, 2),
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
    text_dim=4096,
)

#: Published transformer configs (``transformer/config.json`` of the diffusers repos).
SHAPE_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # THUDM/CogVideoX-2b
    "cogvideox-2b": ("CogVideoXTransformer3DModel", _COGVIDEOX_2B),
    # THUDM/CogVideoX-5b
    "cogvideox-5b": (
        "CogVideoXTransformer3DModel",
        {**_COGVIDEOX_2B, "num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True},
    ),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    "wan2.1-1.3b": ("WanTransformer3DModel", _WAN_1_3B),
    # Wan-AI/Wan2.1-T2V-14B-Diffusers
    "wan2.1-14b": (
        "WanTransformer3DModel",
        {**_WAN_1_3B, "ffn_dim": 13824, "num_attention_heads": 40, "num_layers": 40},
    ),
    # hunyuanvideo-community/HunyuanVideo (20 dual-stream + 40 single-stream blocks)
    "hunyuanvideo-13b": (
        "HunyuanVideoTransformer3DModel",
        dict(
            in_channels=16,
            out_channels=16,
            num_attention_heads=24,
            attention_head_dim=128,
            num_layers=20,
            num_single_layers=40,
            num_refiner_layers=2,
            mlp_ratio=4.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=4096,
            pooled_projection_dim=768,
            rope_theta=256.0,
            rope_axes_dim=(16, 56, 56),
        ),
    ),
    # Lightricks/LTX-Video (0.9.x, 2B)
    "ltx-video-2b": (
        "LTXVideoTransformer3DModel",
        dict(
            in_channels=128,
            out_channels=128,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=32,
            attention_head_dim=64,
            cross_attention_dim=2048,
            num_layers=28,
            activation_fn="gelu-approximate",
            qk_norm="rms_norm_across_heads",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            caption_channels=4096,
            attention_bias=True,
            attention_out_bias=True,
        ),
    ),
    # genmo/mochi-1-preview
    "mochi-1-10b": (
        "MochiTransformer3DModel",
        dict(
            patch_size=2,
            num_attention_heads=24,
            attention_head_dim=128,
            num_layers=48,
            pooled_projection_dim=1536,
            in_channels=12,
            out_channels=None,
            qk_norm="rms_norm",
            text_embed_dim=4096,
            time_embed_dim=256,
            activation_fn="swiglu",
            max_sequence_length=256,
        ),
    ),
}

SPEC_HELP = (
    "model spec: "
    f"'tiny:<family>' (random tiny model; families: {', '.join(sorted(TINY_TRANSFORMER_KWARGS))}), "
    f"'shape:<name>' (published architecture, random weights, transformer only; names: "
    f"{', '.join(SHAPE_CONFIGS)}), "
    "'reference' (the trained model shipped with sixbit-tune), "
    "or a diffusers repo id / local folder (from_pretrained)"
)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------------------ public API
def load_transformer(spec: str, device=None, dtype=None) -> nn.Module:
    """The transformer named by ``spec`` (see :data:`SPEC_HELP`), in eval mode.

    Args:
        spec: a model spec.
        device: target device (None: CPU; ``"meta"`` for ``shape:`` specs builds no storage at all).
        dtype: parameter dtype (None: float32 for ``tiny:``, bfloat16 for ``shape:``, the checkpoint's own dtype
            for ``from_pretrained``).

    Raises:
        UnsupportedModelError: unknown tiny family or shape name, or a checkpoint of an unsupported class.
        NotBuiltYet: ``reference`` before the reference model has been built.
        ValueError: a spec that is none of the above.
    """
    kind, arg = _parse(spec)
    if kind == "tiny":
        return tiny_transformer(arg, device=device, dtype=dtype)
    if kind == "shape":
        return build_shape_transformer(arg, device=device, dtype=dtype)
    if kind == "reference":
        return load_pipeline(spec, device=device, dtype=dtype).transformer
    return _pretrained_transformer(arg, device=device, dtype=dtype)


def load_pipeline(spec: str, device=None, dtype=None):
    """The diffusers pipeline named by ``spec`` (``shape:`` specs have none: they are transformer only).

    Raises:
        UnsupportedModelError: unknown tiny family, a ``shape:`` spec, or a pipeline whose transformer is of an
            unsupported class.
        NotBuiltYet: ``reference`` before the reference model has been built.
        ValueError: a spec that is none of the above.
    """
    kind, arg = _parse(spec)
    if kind == "tiny":
        pipe = tiny_pipeline(arg)
    elif kind == "shape":
        raise UnsupportedModelError(
            f"{spec!r} is transformer only (random weights, no text encoder or VAE); use load_transformer, or "
            "name a full pipeline (repo id, local folder, 'reference' or 'tiny:<family>')"
        )
    elif kind == "reference":
        pipe = _reference_pipeline(device, dtype)
    else:
        from diffusers import DiffusionPipeline

        _check_pretrained_class(arg, pipeline=True)
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        pipe = DiffusionPipeline.from_pretrained(arg, **kwargs)
        family_of(pipe)  # a pipeline without a supported transformer is refused here
    if dtype is not None and kind == "tiny":
        pipeline_as_loaded(pipe, dtype)  # built in float32: give it the dtypes from_pretrained would
    # from_pretrained (folders, repo ids, the reference model) already gave every module its dtype; a cast here
    # would also turn the modules diffusers keeps in float32 into ``dtype``.
    if device is not None:
        pipe = pipe.to(device=device)
    return pipe


def build_shape_transformer(name: str, device=None, dtype=None, seed: int = 0) -> nn.Module:
    """A published architecture (:data:`SHAPE_CONFIGS`) with random weights, built directly on ``device``.

    Parameters are created on the meta device during construction and then materialised once, on ``device`` and
    in ``dtype`` (default bfloat16), and initialised there with each module's own ``reset_parameters`` (custom
    parameters: normal with std ``1/sqrt(last dim)``). Every parameter and buffer gets the dtype
    ``from_pretrained(torch_dtype=dtype)`` would give it (:mod:`sixbit_tune.models.loading`): the class's
    ``_keep_in_fp32_modules`` stay float32, persistent floating buffers take ``dtype``, non-persistent ones keep
    the constructor's dtype. ``device="meta"`` allocates nothing (shapes only).

    Raises:
        UnsupportedModelError: unknown name.
    """
    if name not in SHAPE_CONFIGS:
        raise UnsupportedModelError(f"unknown shape {name!r}; known: {', '.join(SHAPE_CONFIGS)}")
    class_name, config = SHAPE_CONFIGS[name]
    return build_from_config(class_name, config, device=device, dtype=dtype, seed=seed)


def build_from_config(class_name: str, config: dict[str, Any], device=None, dtype=None, seed: int = 0) -> nn.Module:
    """A diffusers model of class ``class_name`` built from ``config`` with random weights, as
    :func:`build_shape_transformer` describes (the same per-module dtypes as ``from_pretrained(torch_dtype=dtype)``).
    """
    import diffusers

    cls = getattr(diffusers, class_name)
    device = torch.device(device if device is not None else "cpu")
    dtype = dtype if dtype is not None else torch.bfloat16
    # On "meta" the buffers are not computed either; elsewhere they are computed once on the CPU, as the constructor
    # does, then moved.
    with _parameters_on_meta(), torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
        model = cls(**config)
    _materialize(model, device, dtype, keep_in_fp32_modules(cls), seed)
    return model.eval()


# ------------------------------------------------------------------------------------------------ internals
def _parse(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty model spec; {SPEC_HELP}")
    spec = spec.strip()
    if spec.startswith("tiny:"):
        family = spec[len("tiny:") :]
        if family not in TINY_TRANSFORMER_KWARGS:
            raise UnsupportedModelError(
                f"unknown tiny family {family!r}; families: {', '.join(sorted(TINY_TRANSFORMER_KWARGS))}"
            )
        return "tiny", family
    if spec.startswith("shape:"):
        name = spec[len("shape:") :]
        if name not in SHAPE_CONFIGS:
            raise UnsupportedModelError(f"unknown shape {name!r}; known: {', '.join(SHAPE_CONFIGS)}")
        return "shape", name
    if spec == "reference":
        return "reference", spec
    if os.path.isdir(spec):
        return "pretrained", spec
    if _REPO_ID.match(spec) and not spec.startswith((".", "/")):
        return "pretrained", spec
    raise ValueError(f"{spec!r} is not a model spec (no such folder, not a repo id); {SPEC_HELP}")


def _reference_pipeline(device, dtype):
    config = REFERENCE_DIR / "weights" / "config.json"
    if not config.is_file() and not (REFERENCE_DIR / "weights" / "model_index.json").is_file():
        raise NotBuiltYet(
            f"the reference model is not built yet ({config} is missing); use 'tiny:<family>' or a repo id meanwhile"
        )
    from sixbit_tune.models.reference import load_reference_pipeline

    params = inspect.signature(load_reference_pipeline).parameters
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if k in params and v is not None}
    return load_reference_pipeline(**kwargs)


def _read_json(source: str, filename: str) -> dict | None:
    """``filename`` of a local folder or Hub repo, or None when it does not exist there."""
    if os.path.isdir(source):
        path = Path(source) / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(source, filename)).read_text())
    except EntryNotFoundError:
        return None


def _check_pretrained_class(source: str, pipeline: bool) -> tuple[str, str | None]:
    """Transformer class name and subfolder of a checkpoint, checked against the supported classes before loading.

    Returns ``(class_name, subfolder)``: subfolder ``"transformer"`` for a pipeline folder, None for a bare
    transformer folder.
    """
    import diffusers

    index = _read_json(source, "model_index.json")
    if index is not None:
        entry = index.get("transformer")
        if not entry or not isinstance(entry, list) or entry[-1] is None:
            raise UnsupportedModelError(
                f"{source} is a {index.get('_class_name', 'pipeline')} without a transformer; supported transformer "
                f"classes: {', '.join(supported_classes())}"
            )
        class_name, subfolder = entry[-1], "transformer"
    else:
        if pipeline:
            raise UnsupportedModelError(f"{source} has no model_index.json: it is not a diffusers pipeline")
        config = _read_json(source, "config.json")
        if config is None or "_class_name" not in config:
            raise UnsupportedModelError(f"{source} has neither model_index.json nor a diffusers config.json")
        class_name, subfolder = config["_class_name"], None
    cls = getattr(diffusers, class_name, None)
    names = {c.__name__ for c in cls.__mro__} if isinstance(cls, type) else {class_name}
    if not names & {c for spec in FAMILIES.values() for c in spec.transformer_classes}:
        raise UnsupportedModelError(
            f"{source}: transformer class {class_name} is not supported; supported: {', '.join(supported_classes())}"
        )
    return class_name, subfolder


def _pretrained_transformer(source: str, device, dtype) -> nn.Module:
    import diffusers

    class_name, subfolder = _check_pretrained_class(source, pipeline=False)
    kwargs: dict[str, Any] = {}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    model = getattr(diffusers, class_name).from_pretrained(source, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()


@contextlib.contextmanager
def _parameters_on_meta():
    """Register every new parameter on the meta device (buffers are left alone), like accelerate's empty init."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@torch.no_grad()
def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype, keep_fp32: tuple, seed: int) -> None:
    """Give every meta parameter storage on ``device`` and random values; move buffers to ``device``. Dtypes are
    those of ``from_pretrained(torch_dtype=dtype)`` (:func:`sixbit_tune.models.loading.loaded_dtype` for parameters
    and persistent floating buffers; non-persistent buffers keep the constructor's dtype)."""
    persistent = set(model.state_dict(keep_vars=True))
    for mod_name, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            target = loaded_dtype(full, dtype, keep_fp32) if torch.is_floating_point(param) else param.dtype
            module._parameters[pname] = nn.Parameter(
                torch.empty(param.shape, device=device, dtype=target), requires_grad=param.requires_grad
            )
        for bname, buf in list(module._buffers.items()):
            if buf is None:
                continue
            full = f"{mod_name}.{bname}" if mod_name else bname
            if full in persistent and torch.is_floating_point(buf):
                buf = buf.to(loaded_dtype(full, dtype, keep_fp32))
            module._buffers[bname] = buf.to(device)
    if device.type == "meta":
        return
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices, device_type=device.type if rng_devices else "cuda"):
        torch.manual_seed(seed)
        initialised: set[int] = set()
        for module in model.modules():
            own = [p for p in module._parameters.values() if p is not None]
            if own and callable(getattr(module, "reset_parameters", None)):
                try:
                    module.reset_parameters()
                except (NotImplementedError, RuntimeError, TypeError):
                    continue
                initialised.update(id(p) for p in own)
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and id(param) not in initialised and torch.is_floating_point(param):
                    std = 1.0 / math.sqrt(max(1, param.shape[-1])) if param.dim() else 0.02
                    param.normal_(0.0, std)
