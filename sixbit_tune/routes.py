"""The one definition of the format and route vocabulary (standard library only).

A linear layer stores its weight once, in one of :data:`WEIGHT_FORMATS`; each call quantizes its activation in one
of :data:`ACTIVATION_FORMATS`. A **route** is the pair (stored weight format, activation format), written
``"<weight>/<activation>"`` in policies (``"nvfp4/int8"``). :data:`ROUTES` lists the activation formats each stored
weight supports:

* NVFP4-stored: ``nvfp4`` (W4A4, the fast route), ``int8`` (W4A8: the GEMM's INT8 weight operand is derived at call
  time from the dequantized NVFP4 values with the INT8 weight rule, one scale per output channel), ``fp8`` (likewise
  an FP8 E4M3 weight operand derived from the dequantized NVFP4 values);
* INT8-stored: ``int8`` (W8A8); FP8-stored: ``fp8`` (W8A8 E4M3);
* ``none``: the layer keeps the model's own weight and dtype.

:func:`operand_format` names the format of the GEMM's weight operand (the stored format, or the derived one), which
is the format the kernels run. This module is imported by the policy schema (standard library only), the formats
package, the runtime, the search and the dashboard, so that none of them spells the names out.

Attention: :data:`ATTENTION_FORMATS` are the formats of the 8-bit attention's QKᵀ operands, :data:`ATTENTION_MODES`
how a block's attention runs (``"dynamic"``: chosen per step by its predictor; ``"8bit"``; ``"bf16"``: the model's
own attention).
"""

from __future__ import annotations

from typing import NamedTuple

#: Quantized formats with reference numerics in ``sixbit_tune.formats`` (the kernels accept each).
QUANT_FORMATS = ("nvfp4", "int8", "fp8")
#: How a layer may store its weight (``"none"``: unquantized, the model's dtype).
WEIGHT_FORMATS = (*QUANT_FORMATS, "none")
#: How a layer may quantize its activation at each call (``"none"``: not quantized; only over a ``"none"`` weight).
ACTIVATION_FORMATS = (*QUANT_FORMATS, "none")
#: The two routes of the original DMPQ: the fast (NVFP4 W4A4) and the robust (INT8) activation format.
FAST_FORMAT = "nvfp4"
ROBUST_FORMAT = "int8"
#: The formats of the version-1 schema and of the profiler's per-layer errors (fast, robust).
V1_FORMATS = (FAST_FORMAT, ROBUST_FORMAT)

#: Activation formats each stored weight format supports.
ROUTES: dict[str, tuple[str, ...]] = {
    "nvfp4": ("nvfp4", "int8", "fp8"),
    "int8": ("int8",),
    "fp8": ("fp8",),
    "none": ("none",),
}
#: The default (fast, robust) activation formats of each stored weight format.
DEFAULT_ROUTES: dict[str, tuple[str, str]] = {
    "nvfp4": ("nvfp4", "int8"),
    "int8": ("int8", "int8"),
    "fp8": ("fp8", "fp8"),
    "none": ("none", "none"),
}

#: How a layer runs: ``"dynamic"`` (its predictor chooses the fast or robust route per step), or always one route.
LAYER_MODES = ("dynamic", "fast", "robust")
#: The two routes of a layer, by role.
ROUTE_ROLES = ("fast", "robust")
#: Layer modes of the version-1 schema (one stored format per mode; ``"dynamic"`` kept NVFP4 and INT8 copies).
V1_LAYER_MODES = ("dynamic", "nvfp4", "int8", "none")

ATTENTION_FORMATS = ("fp8", "int8")
ATTENTION_MODES = ("dynamic", "8bit", "bf16")


class Route(NamedTuple):
    """A stored weight format and an activation format."""

    weight: str
    activation: str

    @property
    def key(self) -> str:
        """``"<weight>/<activation>"``, the spelling used in policies."""
        return f"{self.weight}/{self.activation}"

    @classmethod
    def parse(cls, key: str) -> Route:
        """The route named ``"<weight>/<activation>"``.

        Raises:
            ValueError: not of that form, or a pair :data:`ROUTES` does not list.
        """
        weight, sep, act = str(key).partition("/")
        route = cls(weight, act)
        if not sep or not is_route(weight, act):
            raise ValueError(f"unknown route {key!r}; routes are {list(all_route_keys())}")
        return route


def is_route(weight: str, activation: str) -> bool:
    """Whether ``activation`` runs over a weight stored in ``weight``."""
    return activation in ROUTES.get(weight, ())


def all_route_keys() -> tuple[str, ...]:
    """Every route, as ``"<weight>/<activation>"``."""
    return tuple(Route(w, a).key for w, acts in ROUTES.items() for a in acts)


def operand_format(weight: str, activation: str) -> str:
    """The format of the GEMM's weight operand on a route: the activation format (the stored one, or one derived at
    call time from a dequantized NVFP4 weight); ``"none"`` for an unquantized layer.

    Raises:
        ValueError: not a route.
    """
    if not is_route(weight, activation):
        raise ValueError(f"{activation!r} activations do not run over a {weight!r} weight; routes: "
                         f"{list(all_route_keys())}")
    return activation


def is_derived(weight: str, activation: str) -> bool:
    """Whether the route converts the stored weight to another format at call time (NVFP4 -> INT8 or FP8)."""
    return operand_format(weight, activation) != weight


#: The per-layer errors the profiler records, as the store's ``layer_steps.format`` and ``predictors.format`` name
#: them: a format name ``f`` means the route ``f/f`` (``"nvfp4"``: W4A4, ``"int8"``: W8A8 INT8, ``"fp8"``: W8A8
#: FP8 E4M3), a ``"<weight>/<activation>"`` key a route whose GEMM weight operand is derived from the stored weight
#: (``"nvfp4/int8"``: W4A8, ``"nvfp4/fp8"``). Grouped by activation format, the order the profiler computes them in
#: (one activation quantization per format, shared by the routes that read it). Every name stored by schema-3
#: profiles (``"nvfp4"``, ``"int8"``) keeps its meaning.
PROFILE_ROUTES = ("nvfp4", "int8", "nvfp4/int8", "fp8", "nvfp4/fp8")
#: The routes a profile records by default: those the search chooses among (W4A4 and W4A8, the fast and robust routes
#: of an NVFP4-stored layer, and INT8 W8A8). The FP8 routes are recorded on request (``--formats``): on the CPU they
#: take the per-layer error recording from about 1x to 1.7x its cost with the other three (FP8 products are summed
#: exactly in float64 there).
PROFILE_DEFAULT_ROUTES = ("nvfp4", "int8", "nvfp4/int8")


def profile_route(name: str) -> Route:
    """The route a :data:`PROFILE_ROUTES` name stands for (``"int8"`` -> ``int8/int8``).

    Raises:
        ValueError: not a name of :data:`PROFILE_ROUTES`.
    """
    if name not in PROFILE_ROUTES:
        raise ValueError(f"unknown profile route {name!r}; the profile records {list(PROFILE_ROUTES)}")
    weight, sep, act = name.partition("/")
    return Route(weight, act if sep else weight)


def profile_route_name(text: str) -> str:
    """The :data:`PROFILE_ROUTES` name of a format or route as a user writes it: ``"nvfp4/int8"``, ``"int8"`` or
    ``"int8/int8"`` (the same route as ``"int8"``).

    Raises:
        ValueError: neither a quantized format nor a route over a quantized weight (the message lists the names).
    """
    weight, sep, act = str(text).strip().partition("/")
    name = weight if not sep or act == weight else f"{weight}/{act}"
    if name not in PROFILE_ROUTES:
        raise ValueError(
            f"unknown format or route {text!r} to profile; choose from {list(PROFILE_ROUTES)} (a format f stands "
            "for the route f/f)"
        )
    return name
