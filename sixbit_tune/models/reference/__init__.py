"""The trained reference video DiT shipped with sixbit-tune (model spec ``"reference"``).

A 9.1M-parameter diffusers ``WanTransformer3DModel`` (8 blocks, dim 256, pixel space, patch 1x4x4) with a tiny
jointly trained ``UMT5EncoderModel``, trained on procedural clips of coloured shapes moving over textured
backgrounds (:mod:`.data`). Weights, configs and the model card live in ``weights/`` (a diffusers pipeline folder).

Importing this package is light; diffusers is imported by :func:`load_reference_pipeline`.
"""

from __future__ import annotations

from pathlib import Path

#: the shipped diffusers pipeline folder (model_index.json, tokenizer/, text_encoder/, transformer/, scheduler/)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = ["WEIGHTS_DIR", "load_reference_pipeline", "ReferencePipeline"]


def load_reference_pipeline(device=None, dtype=None, path=None):
    """Load the shipped reference pipeline offline through diffusers' ``from_pretrained``.

    Args:
        device: where to put it (``None``: stay on CPU).
        dtype: torch dtype of the text encoder and transformer (``None``: float32; the files hold bfloat16).
        path: another pipeline folder of the same layout (default :data:`WEIGHTS_DIR`).

    Returns:
        :class:`~sixbit_tune.models.reference.pipeline.ReferencePipeline` in eval mode.

    Raises:
        FileNotFoundError: the folder has no ``model_index.json`` (weights not shipped/trained).
    """
    import torch

    from .pipeline import ReferencePipeline

    folder = Path(path) if path is not None else WEIGHTS_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no reference pipeline at {folder} (model_index.json missing); train one with "
            "`python -m sixbit_tune.models.reference.train --out DIR`"
        )
    pipe = ReferencePipeline.from_pretrained(
        str(folder), torch_dtype=dtype if dtype is not None else torch.float32, local_files_only=True
    )
    pipe.text_encoder.eval()
    pipe.transformer.eval()
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def __getattr__(name):
    if name == "ReferencePipeline":
        from .pipeline import ReferencePipeline

        return ReferencePipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
