"""Triton kernels and their dispatch, imported as ``sixbit_tune.kernels``.

Importing this package never needs Triton: the kernel modules are imported lazily by :mod:`.dispatch`, and
without Triton every operation uses the reference numerics of :mod:`sixbit_tune.formats` (FP8 on the GPU still
uses ``torch._scaled_mm``). The entry points are torch custom operators (:mod:`.ops`, :mod:`.triton_ops`), so
``torch.compile(fullgraph=True)`` traces code that calls them without graph breaks.

This folder sits at the top of the repository, so a process started there (``python -m pytest``, ``python -c``)
finds it as a top-level package named ``kernels`` before the installed distribution of that name, which
transformers imports. Imported under that name, it hands the import over to the installed distribution (see
:func:`_hand_over`) and defines nothing of its own.
"""

import sys


def _hand_over() -> None:
    """Replace this module in ``sys.modules`` by the installed top-level ``kernels``.

    Without one, this module becomes what Python makes of a folder that merely shares a package's name: an empty
    namespace (no ``__file__``, no ``__version__``, nothing importable below it). transformers, which imports
    ``kernels`` whenever ``importlib.util.find_spec`` finds one, reads exactly that as "not installed".
    """
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        this = sys.modules["kernels"]
        for name in [n for n in vars(this) if n not in ("__name__", "__spec__", "__loader__", "__builtins__")]:
            delattr(this, name)
        this.__file__ = None
        this.__path__ = []
        this.__doc__ = "An empty namespace: no distribution named 'kernels' is installed."
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement returns what sys.modules holds once this file ran
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over()
else:
    from ._triton_support import HAS_TRITON
    from .dispatch import (
        PATHS,
        KernelPreference,
        get_kernel_preference,
        kernel_path,
        quantize_activation,
        quantize_weight,
        quantized_linear,
        set_kernel_preference,
    )

    __all__ = [
        "HAS_TRITON",
        "PATHS",
        "KernelPreference",
        "get_kernel_preference",
        "kernel_path",
        "quantize_activation",
        "quantize_weight",
        "quantized_linear",
        "set_kernel_preference",
    ]
