"""Model families, adapters and specs.

``sixbit_tune.models`` imports torch only; diffusers is imported inside the functions that build or load a model
(:mod:`.specs`, :mod:`.tiny`). See :mod:`.adapters` for the per-family table and the generic adapter.
"""

from sixbit_tune.models.adapters import (
    FAMILIES,
    BlockListSpec,
    BlockRef,
    FamilySpec,
    ModelAdapter,
    config_hash_of,
    family_of,
    get_adapter,
    supported_classes,
)
from sixbit_tune.models.specs import SHAPE_CONFIGS, SPEC_HELP, load_pipeline, load_transformer
from sixbit_tune.models.tiny import (
    TINY_VIDEO,
    tiny_pipeline,
    tiny_pipeline_call_kwargs,
    tiny_transformer,
    tiny_transformer_inputs,
)

__all__ = [
    "FAMILIES",
    "BlockListSpec",
    "BlockRef",
    "FamilySpec",
    "ModelAdapter",
    "config_hash_of",
    "family_of",
    "get_adapter",
    "supported_classes",
    "SHAPE_CONFIGS",
    "SPEC_HELP",
    "load_pipeline",
    "load_transformer",
    "tiny_pipeline",
    "tiny_pipeline_call_kwargs",
    "tiny_transformer",
    "tiny_transformer_inputs",
    "TINY_VIDEO",
]
