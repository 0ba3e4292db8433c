"""Model families, adapters and specs.

``sixbit_tune.models`` imports torch only; diffusers is imported where a model is built (:mod:`.specs`,
:mod:`.tiny`). See :mod:`.adapters` for the per-family table and the generic adapter.
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
]
