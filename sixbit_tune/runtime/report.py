"""Per-run statistics of an applied policy (``PolicyHandle.stats()``): counted on the host, no device syncs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["RunStats", "StepStats"]


def _share(num: int, den: int) -> float | None:
    return num / den if den else None


class _Shares:
    """Shares of a record with ``layer_calls`` (by format), ``block_calls`` and ``skipped_blocks``."""

    layer_calls: dict[str, int]
    block_calls: int
    skipped_blocks: int

    @property
    def nvfp4_share(self) -> float | None:
        """Layer calls with NVFP4 activations (W4A4) / all executed in-block linear calls (None when no layer
        ran)."""
        return _share(self.layer_calls.get("nvfp4", 0), sum(self.layer_calls.values()))

    @property
    def skip_share(self) -> float | None:
        """Skipped blocks / blocks reached."""
        return _share(self.skipped_blocks, self.block_calls)


@dataclass(frozen=True)
class StepStats(_Shares):
    """One transformer call: a denoising step in one cache context (one guidance branch, or both when batched).

    Attributes:
        context: the ``cache_context`` name (``"cond_uncond"``, ``"cond"``, ``"uncond"``; ``"inference"`` for a call
            outside any context).
        step: 0-based step index within the context.
        rows: batch rows of the call.
        layer_calls: executed in-block linear calls by the activation format of the route they ran
            (``sixbit_tune.routes.ACTIVATION_FORMATS``: ``"nvfp4"``, ``"int8"``, ``"fp8"``, ``"none"``).
        block_calls: transformer blocks reached (computed + skipped).
        skipped_blocks: blocks answered from the Temporal Delta Cache.
        attention_calls: computed blocks with 8-bit attention installed, by the attention mode they ran
            (``"8bit"``, ``"bf16"``); empty when the policy installs none.
    """

    context: str
    step: int
    rows: int
    layer_calls: dict[str, int]
    block_calls: int
    skipped_blocks: int
    attention_calls: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RunStats(_Shares):
    """Statistics of one run (a pipeline call, or the transformer calls since the last reset).

    Shares count executed calls: a skipped block's linears do not run, so they count in no format;
    ``"none"`` layers (left in the model dtype) are in the denominator of :attr:`nvfp4_share`.

    Attributes:
        steps: per-call records in execution order.
        layer_calls: executed in-block linear calls by activation format over the run.
        block_calls: blocks reached over the run.
        skipped_blocks: blocks skipped over the run.
        execution: execution path of each quantized format (``sixbit_tune.kernels.kernel_path``, or
            ``"reference"`` with ``kernel_preference="reference"``), e.g. ``{"int8": "triton", "nvfp4": "emulated"}``.
        weight_bytes: resident bytes of in-block linear weights by stored format (``"nvfp4"``, ``"int8"``,
            ``"fp8"``; ``"none"`` = layers kept in the model dtype). Each layer stores its weight once.
        scratch_bytes: bytes of the scratch buffers of derived weight operands (an NVFP4 weight on its INT8 or FP8
            route), by operand format: one buffer per (format, shape), shared by the layers of that shape.
        attention_installed: whether 8-bit attention the policy asks for was installed (False also when it asks
            for none).
        attention_calls: computed blocks with 8-bit attention installed over the run, by attention mode
            (:attr:`attention_8bit_share`).
        cache_bytes: peak bytes held by the Temporal Delta Cache during the run.
        num_inference_steps: steps per context the TDC window used (None if unknown).
        notes: conditions that changed behaviour (e.g. TDC off because the number of steps was unknown).
        completed: False while the run is in progress or when it ended with an exception.
    """

    steps: list[StepStats] = field(default_factory=list)
    layer_calls: dict[str, int] = field(default_factory=dict)
    block_calls: int = 0
    skipped_blocks: int = 0
    execution: dict[str, str] = field(default_factory=dict)
    weight_bytes: dict[str, int] = field(default_factory=dict)
    cache_bytes: int = 0
    scratch_bytes: dict[str, int] = field(default_factory=dict)
    attention_installed: bool = False
    attention_calls: dict[str, int] = field(default_factory=dict)
    num_inference_steps: int | None = None
    notes: list[str] = field(default_factory=list)
    completed: bool = False

    @property
    def attention_8bit_share(self) -> float | None:
        """Blocks that ran 8-bit attention / computed blocks with 8-bit attention installed (None: none installed)."""
        return _share(self.attention_calls.get("8bit", 0), sum(self.attention_calls.values()))

    def to_dict(self) -> dict:
        """JSON-ready dict, shares included (per step too)."""
        d = asdict(self)
        d["nvfp4_share"] = self.nvfp4_share
        d["skip_share"] = self.skip_share
        d["attention_8bit_share"] = self.attention_8bit_share
        for rec, s in zip(d["steps"], self.steps):
            rec["nvfp4_share"] = s.nvfp4_share
            rec["skip_share"] = s.skip_share
        return d

    def summary(self) -> str:
        """A short human-readable table."""

        def pct(v: float | None) -> str:
            return "   -  " if v is None else f"{100 * v:5.1f}%"

        def size(n: int) -> str:
            for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
                if n >= scale:
                    return f"{n / scale:.2f} {unit}"
            return f"{n} B"

        lines = [
            f"NVFP4 layer-calls {pct(self.nvfp4_share)}   skipped blocks {pct(self.skip_share)}   "
            f"({sum(self.layer_calls.values())} layer-calls, {self.block_calls} block-calls)",
            "execution: " + (", ".join(f"{k}={v}" for k, v in sorted(self.execution.items())) or "model dtype only"),
            "weights: " + (", ".join(f"{k} {size(v)}" for k, v in sorted(self.weight_bytes.items()) if v) or "-")
            + (f"   scratch {size(sum(self.scratch_bytes.values()))}" if self.scratch_bytes else "")
            + f"   TDC cache peak {size(self.cache_bytes)}",
            *([f"8-bit attention {pct(self.attention_8bit_share)} of {sum(self.attention_calls.values())} "
               f"block-calls with it installed"] if self.attention_calls else []),
            f"{'context':<12} {'step':>4} {'NVFP4':>7} {'skipped':>8}",
        ]
        for s in self.steps:
            lines.append(f"{s.context:<12} {s.step:>4} {pct(s.nvfp4_share):>7} {pct(s.skip_share):>8}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)
