"""Per-family adapters for diffusers video DiTs: blocks, linears, streams and classifier-free guidance.

One generic mechanism (:class:`ModelAdapter`) is driven by one data table (:data:`FAMILIES`); there are no
per-model code paths. A family entry says which transformer classes it covers, which child lists hold the
transformer blocks (in execution order), which streams each block updates and returns, the model's input layout,
and how the pipeline calls the transformer for classifier-free guidance (CFG).

Facts the table encodes (diffusers 0.42, read in ``diffusers/models/transformers`` and ``diffusers/pipelines``):

- Every block takes ``hidden_states`` first and ``encoder_hidden_states`` second. Blocks that return a tuple
  return exactly ``(hidden_states, encoder_hidden_states)``; Wan and LTX blocks return the hidden tensor only.
- HunyuanVideo single-stream blocks concatenate the two streams internally but take and return them separately:
  ``(hidden_states, encoder_hidden_states)``, both updated.
- HunyuanVideo's ``context_embedder.token_refiner.refiner_blocks`` are text-refiner layers that run once per
  call on the prompt embedding, before the denoising blocks. They are *not* transformer blocks here: they are not
  listed by :meth:`ModelAdapter.blocks` and their linears are not in :meth:`ModelAdapter.all_linears`.
- Mochi's last block is built with ``context_pre_only=True``: it has no ``ff_context`` / ``norm*_context`` update
  and returns ``encoder_hidden_states`` unchanged. It is still described with streams ``("hidden", "encoder")`` so
  a skipped block is rebuilt exactly (its encoder delta is exactly zero).
- Batched CFG (CogVideoX, LTX-Video, Mochi): one transformer call per step inside ``cache_context("cond_uncond")``
  with the batch ``[uncond rows; cond rows]`` (the pipelines ``torch.cat([negative_prompt_embeds, prompt_embeds])``).
  Separate CFG (Wan: ``"cond"`` and ``"uncond"``; HunyuanVideo: ``"cond"``, plus ``"uncond"`` only with
  ``true_cfg_scale > 1`` and a negative prompt): one call per branch, the context name is the branch.
  (HunyuanVideo's image-to-video pipelines call the transformer outside any ``cache_context``; there the branch of a
  call cannot be known and :meth:`ModelAdapter.row_branches` raises.)
- Attention modules per block: CogVideoX ``attn1`` and Mochi ``attn1`` attend over video and text tokens together
  ("joint"; Mochi drops padded text tokens itself, per batch row); HunyuanVideo ``attn`` (both block kinds) is joint
  with a boolean key-padding mask over the text tokens; Wan and LTX ``attn1`` is self-attention over video tokens
  and ``attn2`` cross-attention to the text (LTX passes the text mask to ``attn2`` as an additive bias).
- Only ``pipe.transformer`` is adapted; a Wan 2.2 ``transformer_2`` needs its own adapter (``get_adapter(pipe.
  transformer_2)``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from sixbit_tune.errors import UnsupportedModelError

__all__ = [
    "FAMILIES",
    "STREAM_ARGUMENTS",
    "ATTENTION_KINDS",
    "AttentionRef",
    "BlockListSpec",
    "BlockRef",
    "FamilySpec",
    "ModelAdapter",
    "config_hash_of",
    "family_of",
    "get_adapter",
    "supported_classes",
    "unwrap_transformer",
]

#: Block forward argument that carries each stream.
STREAM_ARGUMENTS: dict[str, str] = {"hidden": "hidden_states", "encoder": "encoder_hidden_states"}


@dataclass(frozen=True)
class BlockListSpec:
    """One child list of transformer blocks.

    Attributes:
        attr: attribute of the transformer holding the ``nn.ModuleList`` (e.g. ``"transformer_blocks"``).
        block_classes: class names of the blocks expected in it (checked at adapter construction).
        streams: the streams each block updates, in the order the block returns them.
        returns_tuple: True if the block returns a tuple ``(hidden, encoder)``; False if it returns the hidden
            tensor alone.
        attentions: the block's attention modules as ``(name relative to the block, kind)`` pairs, in execution
            order; kind is one of :data:`ATTENTION_KINDS`.
    """

    attr: str
    block_classes: tuple[str, ...]
    streams: tuple[str, ...]
    returns_tuple: bool
    attentions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FamilySpec:
    """Everything sixbit-tune needs to know about one model family.

    Attributes:
        name: family key in :data:`FAMILIES`.
        transformer_classes: diffusers transformer class names of the family (subclasses are accepted too).
        block_lists: the block lists in execution order.
        input_layout: layout of the transformer's ``hidden_states`` input: ``"BCFHW"``, ``"BFCHW"`` or
            ``"tokens"`` (LTX: ``(B, F*H*W, C)`` plus integer ``num_frames``, ``height``, ``width``).
        block_call: how the transformer passes block arguments: ``"keywords"`` or ``"positional"``.
        cfg_mode: ``"batched"`` (one call per step, batch ``[uncond; cond]``) or ``"separate"`` (one call per
            branch).
        cfg_contexts: ``cache_context`` names the pipeline uses around transformer calls.
        excluded: nested block-like modules deliberately not treated as transformer blocks, with the reason.
    """

    name: str
    transformer_classes: tuple[str, ...]
    block_lists: tuple[BlockListSpec, ...]
    input_layout: Literal["BCFHW", "BFCHW", "tokens"]
    block_call: Literal["keywords", "positional"]
    cfg_mode: Literal["batched", "separate"]
    cfg_contexts: tuple[str, ...]
    excluded: tuple[str, ...] = ()


_DUAL = ("hidden", "encoder")
_HIDDEN = ("hidden",)

#: Kinds of attention inside a block: ``"self"`` (video tokens attend to video tokens), ``"joint"`` (video and text
#: tokens concatenated, attending to each other) and ``"cross"`` (video queries, text keys and values).
ATTENTION_KINDS = ("self", "joint", "cross")

FAMILIES: dict[str, FamilySpec] = {
    "cogvideox": FamilySpec(
        name="cogvideox",
        transformer_classes=("CogVideoXTransformer3DModel",),
        block_lists=(BlockListSpec("transformer_blocks", ("CogVideoXBlock",), _DUAL, True, (("attn1", "joint"),)),),
        input_layout="BFCHW",
        block_call="keywords",
        cfg_mode="batched",
        cfg_contexts=("cond_uncond",),
    ),
    "wan": FamilySpec(
        name="wan",
        transformer_classes=("WanTransformer3DModel",),
        block_lists=(BlockListSpec("blocks", ("WanTransformerBlock",), _HIDDEN, False,
                                  (("attn1", "self"), ("attn2", "cross"))),),
        input_layout="BCFHW",
        block_call="positional",
        cfg_mode="separate",
        cfg_contexts=("cond", "uncond"),
    ),
    "hunyuanvideo": FamilySpec(
        name="hunyuanvideo",
        transformer_classes=("HunyuanVideoTransformer3DModel",),
        block_lists=(
            BlockListSpec(
                "transformer_blocks",
                ("HunyuanVideoTransformerBlock", "HunyuanVideoTokenReplaceTransformerBlock"),
                _DUAL,
                True,
                (("attn", "joint"),),
            ),
            BlockListSpec(
                "single_transformer_blocks",
                ("HunyuanVideoSingleTransformerBlock", "HunyuanVideoTokenReplaceSingleTransformerBlock"),
                _DUAL,
                True,
                (("attn", "joint"),),
            ),
        ),
        input_layout="BCFHW",
        block_call="positional",
        cfg_mode="separate",
        cfg_contexts=("cond", "uncond"),
        excluded=(
            "context_embedder.token_refiner.refiner_blocks: prompt-embedding refiner run once per call before "
            "the denoising blocks; not a transformer block",
        ),
    ),
    "ltx": FamilySpec(
        name="ltx",
        transformer_classes=("LTXVideoTransformer3DModel",),
        block_lists=(BlockListSpec("transformer_blocks", ("LTXVideoTransformerBlock",), _HIDDEN, False,
                                  (("attn1", "self"), ("attn2", "cross"))),),
        input_layout="tokens",
        block_call="keywords",
        cfg_mode="batched",
        cfg_contexts=("cond_uncond",),
    ),
    "mochi": FamilySpec(
        name="mochi",
        transformer_classes=("MochiTransformer3DModel",),
        block_lists=(BlockListSpec("transformer_blocks", ("MochiTransformerBlock",), _DUAL, True, (("attn1", "joint"),)),),
        input_layout="BCFHW",
        block_call="keywords",
        cfg_mode="batched",
        cfg_contexts=("cond_uncond",),
    ),
}


def supported_classes() -> list[str]:
    """Transformer class names sixbit-tune has adapters for, sorted."""
    return sorted(c for spec in FAMILIES.values() for c in spec.transformer_classes)


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{what} is not supported; supported transformer classes: {', '.join(supported_classes())} "
        f"(families: {', '.join(sorted(FAMILIES))})"
    )


def unwrap_transformer(model: Any) -> nn.Module:
    """The transformer of a diffusers pipeline, or the transformer itself (``torch.compile`` wrappers removed).

    Raises:
        UnsupportedModelError: ``model`` is neither a pipeline with a ``transformer`` nor an ``nn.Module``.
    """
    if not isinstance(model, nn.Module) and hasattr(model, "transformer"):
        if not isinstance(model.transformer, nn.Module):
            raise _unsupported(f"pipeline {type(model).__name__} without a transformer")
        model = model.transformer
    if not isinstance(model, nn.Module):
        raise _unsupported(f"object of type {type(model).__name__} (not a diffusers pipeline or transformer)")
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
        model = model._orig_mod
    return model


def family_of(model: Any) -> FamilySpec:
    """The family entry of a pipeline or transformer (its class or any base class must be listed).

    Raises:
        UnsupportedModelError: no family covers the transformer's class.
    """
    transformer = unwrap_transformer(model)
    mro_names = [c.__name__ for c in type(transformer).__mro__]
    for name in mro_names:
        for spec in FAMILIES.values():
            if name in spec.transformer_classes:
                return spec
    raise _unsupported(f"transformer class {type(transformer).__name__}")


@dataclass(frozen=True)
class BlockRef:
    """One transformer block.

    Attributes:
        index: position in execution order over all block lists of the model (0-based).
        name: module name inside the transformer, e.g. ``"transformer_blocks.3"``.
        module: the block module.
        streams: the streams the block updates, ``("hidden",)`` or ``("hidden", "encoder")``.
    """

    index: int
    name: str
    module: nn.Module
    streams: tuple[str, ...]


@dataclass(frozen=True)
class AttentionRef:
    """One attention module inside a transformer block.

    Attributes:
        block: index of the block (as :attr:`BlockRef.index`).
        name: module name inside the transformer, e.g. ``"blocks.3.attn1"``.
        rel: module name relative to the block, e.g. ``"attn1"``.
        module: the attention module (a diffusers ``Attention``, ``MochiAttention`` or ``AttentionModuleMixin``
            module: it has a ``processor``).
        kind: ``"self"``, ``"joint"`` or ``"cross"`` (:data:`ATTENTION_KINDS`).
    """

    block: int
    name: str
    rel: str
    module: nn.Module
    kind: str


@dataclass(frozen=True)
class _BlockIO:
    """Argument positions and return layout of one block, resolved once at adapter construction."""

    arg_names: tuple[str, ...]  # STREAM_ARGUMENTS of the streams, in stream order
    arg_positions: tuple[int, ...]  # positional index (self excluded) of each
    returns_tuple: bool


class ModelAdapter:
    """Generic view of a supported diffusers video transformer, driven by its :class:`FamilySpec`.

    Attributes:
        family: the family entry.
        transformer: the transformer module (pipelines are unwrapped to ``pipe.transformer``).
        cfg_mode: ``"batched"`` or ``"separate"`` (see :class:`FamilySpec`).

    Block argument positions are resolved once here (``inspect.signature`` of each block class's ``forward``), so
    :meth:`streams_in` does plain tuple/dict look-ups and stays traceable by ``torch.compile``.
    """

    def __init__(self, model: Any):
        self.transformer: nn.Module = unwrap_transformer(model)
        self.family: FamilySpec = family_of(self.transformer)
        self.cfg_mode: str = self.family.cfg_mode
        self._blocks: list[BlockRef] = []
        self._io: list[_BlockIO] = []
        self._attention_specs: list[tuple[tuple[str, str], ...]] = []
        signatures: dict[type, dict[str, int]] = {}
        for list_spec in self.family.block_lists:
            blocks = getattr(self.transformer, list_spec.attr, None)
            if blocks is None:
                raise UnsupportedModelError(
                    f"{type(self.transformer).__name__} has no block list {list_spec.attr!r} "
                    f"(family {self.family.name!r} expects {[b.attr for b in self.family.block_lists]})"
                )
            for i, block in enumerate(blocks):
                cls = type(block)
                if not any(c.__name__ in list_spec.block_classes for c in cls.__mro__):
                    raise UnsupportedModelError(
                        f"{list_spec.attr}.{i} is a {cls.__name__}; family {self.family.name!r} expects one of "
                        f"{list_spec.block_classes}"
                    )
                if cls not in signatures:
                    signatures[cls] = _positional_indices(cls)
                positions = signatures[cls]
                names = tuple(STREAM_ARGUMENTS[s] for s in list_spec.streams)
                missing = [n for n in names if n not in positions]
                if missing:
                    raise UnsupportedModelError(
                        f"{cls.__name__}.forward has no argument(s) {missing}; cannot locate the block's streams"
                    )
                self._blocks.append(
                    BlockRef(len(self._blocks), f"{list_spec.attr}.{i}", block, list_spec.streams)
                )
                self._io.append(_BlockIO(names, tuple(positions[n] for n in names), list_spec.returns_tuple))
                self._attention_specs.append(list_spec.attentions)

    # ----------------------------------------------------------------------------------------- structure
    def blocks(self) -> list[BlockRef]:
        """All transformer blocks in execution order (HunyuanVideo: dual-stream blocks, then single-stream)."""
        return list(self._blocks)

    def linears(self, block: BlockRef | int) -> dict[str, nn.Linear]:
        """The ``nn.Linear`` modules (subclasses included) inside a block, by name relative to the block.

        Names look like ``"attn1.to_q"``; the full module name is ``f"{block.name}.{rel}"``. Order is module
        registration order. After ``fuse_qkv_projections()`` the fused ``to_qkv`` appears instead of q/k/v.
        """
        ref = self._ref(block)
        return {n: m for n, m in ref.module.named_modules() if n and isinstance(m, nn.Linear)}

    def all_linears(self) -> dict[str, nn.Linear]:
        """Every in-block linear of the model, by full module name inside the transformer, in block order."""
        out: dict[str, nn.Linear] = {}
        for ref in self._blocks:
            for rel, mod in self.linears(ref).items():
                out[f"{ref.name}.{rel}"] = mod
        return out

    def attentions(self, block: BlockRef | int) -> list[AttentionRef]:
        """The attention modules of a block, in execution order, with their kind.

        Raises:
            UnsupportedModelError: a listed attention module is missing from the block or has no ``processor``.
        """
        ref = self._ref(block)
        out = []
        for rel, kind in self._attention_specs[ref.index]:
            try:
                module = ref.module.get_submodule(rel)
            except AttributeError:
                module = None
            if module is None or not hasattr(module, "processor"):
                raise UnsupportedModelError(
                    f"{ref.name} ({type(ref.module).__name__}) has no attention module {rel!r} with a processor "
                    f"(family {self.family.name!r} expects {[r for r, _ in self._attention_specs[ref.index]]})"
                )
            out.append(AttentionRef(ref.index, f"{ref.name}.{rel}", rel, module, kind))
        return out

    def all_attentions(self) -> list[AttentionRef]:
        """Every in-block attention module of the model, in block order."""
        return [a for ref in self._blocks for a in self.attentions(ref)]

    # ----------------------------------------------------------------------------------------- streams
    def streams_in(self, block: BlockRef | int, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The input streams of a block call, in ``block.streams`` order, whether passed positionally or by keyword.

        ``args`` excludes ``self`` (as seen by a forward pre-hook or a diffusers ``ModelHook.pre_forward``).

        Raises:
            ValueError: a stream argument is missing from the call.
        """
        io = self._io[self._ref(block).index]
        out = []
        for name, pos in zip(io.arg_names, io.arg_positions):
            if name in kwargs:
                out.append(kwargs[name])
            elif pos < len(args):
                out.append(args[pos])
            else:
                raise ValueError(f"block call has no {name!r} (neither keyword nor positional argument {pos})")
        return tuple(out)

    def streams_out(self, block: BlockRef | int, output: Any) -> tuple[torch.Tensor, ...]:
        """The output streams of a block's return value, in ``block.streams`` order."""
        ref = self._ref(block)
        io = self._io[ref.index]
        if io.returns_tuple:
            if not isinstance(output, (tuple, list)) or len(output) < len(io.arg_names):
                raise ValueError(f"{ref.name} should return a tuple of {len(io.arg_names)} tensors")
            return tuple(output[: len(io.arg_names)])
        if isinstance(output, (tuple, list)):
            raise ValueError(f"{ref.name} should return a tensor, got a {type(output).__name__}")
        return (output,)

    def output_from_streams(self, block: BlockRef | int, streams: tuple[torch.Tensor, ...], like_output: Any = None):
        """Build the block's native return value from ``streams`` (in ``block.streams`` order).

        ``like_output`` (a previous return value of the block, or None) supplies the type of a tuple return and any
        trailing non-stream items; the streams themselves always come from ``streams``.
        """
        ref = self._ref(block)
        io = self._io[ref.index]
        if len(streams) != len(io.arg_names):
            raise ValueError(f"{ref.name} has streams {ref.streams}, got {len(streams)} tensors")
        if not io.returns_tuple:
            return streams[0]
        if like_output is None or len(like_output) == len(streams):
            return tuple(streams)
        rest = tuple(like_output[len(streams) :])
        return type(like_output)((*streams, *rest)) if isinstance(like_output, list) else (*streams, *rest)

    # ----------------------------------------------------------------------------------------- identity, CFG
    def config_hash(self) -> str:
        """sha256 hex of the transformer class name and its config.

        The config is serialised with ``json.dumps(..., sort_keys=True, default=str)``. Keys starting with ``_``
        (``_use_default_values``, ``_name_or_path``, ``_diffusers_version``, ``_class_name``) are bookkeeping of
        how the model was loaded, not architecture, and are left out so the hash is the same for a model built
        in code, loaded from a repo id or from a local copy.
        """
        return config_hash_of(self.transformer)

    def row_branches(self, batch_size: int, num_prompts: int, context_name: str | None) -> list[str]:
        """The CFG branch (``"cond"``/``"uncond"``) of each batch row of one transformer call.

        Args:
            batch_size: rows of the transformer call.
            num_prompts: rows per branch (prompts × videos per prompt).
            context_name: the active ``cache_context`` name (None when the call is outside any context; only
                accepted for batched-CFG families).

        Raises:
            ValueError: the batch size, prompt count and context are inconsistent with the family's CFG mode.
        """
        if batch_size < 1 or num_prompts < 1:
            raise ValueError(f"batch_size ({batch_size}) and num_prompts ({num_prompts}) must be positive")
        if self.cfg_mode == "batched":
            if context_name not in (None, *self.family.cfg_contexts):
                raise ValueError(
                    f"{self.family.name} runs batched CFG inside context {self.family.cfg_contexts[0]!r}; "
                    f"got context {context_name!r}"
                )
            if batch_size == 2 * num_prompts:
                return ["uncond"] * num_prompts + ["cond"] * num_prompts
            if batch_size == num_prompts:
                return ["cond"] * num_prompts
            raise ValueError(
                f"{self.family.name}: batch of {batch_size} rows is neither {num_prompts} (no CFG) nor "
                f"{2 * num_prompts} (batched CFG) for {num_prompts} prompt rows"
            )
        if context_name not in ("cond", "uncond"):
            raise ValueError(
                f"{self.family.name} calls the transformer once per CFG branch inside context 'cond' or 'uncond'; "
                f"got context {context_name!r}"
            )
        if batch_size != num_prompts:
            raise ValueError(
                f"{self.family.name}: a {context_name!r} call must have {num_prompts} rows, got {batch_size}"
            )
        return [context_name] * batch_size

    # ----------------------------------------------------------------------------------------- helpers
    def _ref(self, block: BlockRef | int) -> BlockRef:
        index = block if isinstance(block, int) else block.index
        if not 0 <= index < len(self._blocks):
            raise IndexError(f"block index {index} out of range (model has {len(self._blocks)} blocks)")
        return self._blocks[index]

    def __repr__(self) -> str:
        return (
            f"ModelAdapter({type(self.transformer).__name__}, family={self.family.name!r}, "
            f"blocks={len(self._blocks)}, cfg_mode={self.cfg_mode!r})"
        )


def config_hash_of(transformer: nn.Module) -> str:
    """sha256 hex of ``type(transformer).__name__`` and its public config (see :meth:`ModelAdapter.config_hash`)."""
    transformer = unwrap_transformer(transformer)
    config = {k: v for k, v in dict(getattr(transformer, "config", {})).items() if not str(k).startswith("_")}
    payload = type(transformer).__name__ + "\n" + json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _positional_indices(cls: type) -> dict[str, int]:
    """Positional index (``self`` excluded) of every named parameter of ``cls.forward``."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return {
        p.name: i
        for i, p in enumerate(params)
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def get_adapter(model: Any) -> ModelAdapter:
    """The adapter of a diffusers pipeline (``pipe.transformer`` is used) or transformer.

    Raises:
        UnsupportedModelError: the transformer's class is not in :data:`FAMILIES`; the message lists the
            supported classes.
    """
    return ModelAdapter(model)
