"""The hooks the runtime installs.

* On the transformer, two parts:

  - :class:`StepHook`, a stateful diffusers ``ModelHook`` that only *receives*: the ``cache_context`` through its
    ``StateManager`` and diffusers' reset at the end of every pipeline call (``_reset_stateful_cache``). It does
    not replace the forward, so losing its forward wrapper changes nothing;
  - a torch forward pre-hook and an always-called forward hook (:func:`install_call_hooks`): the step logic of
    each transformer call (new-run detection, one host sync, the decisions, the record). Torch keeps module hooks
    outside ``forward``, so they survive what rewrites ``transformer.forward``: accelerate's model CPU offload,
    which diffusers removes and re-adds at the end of every pipeline call, and other libraries' wrappers.
* :class:`BlockHook`, a diffusers ``ModelHook`` on every transformer block: skips the block from the Temporal Delta
  Cache, or sets its dynamic layers' formats, runs it, and measures Γ / Δ on the device; with ``tdc.cfg_rows =
  "per_row"`` it may run the block on some batch rows only (the others answered from the cache).

``torch.compile``: the step logic is compiler-disabled host bookkeeping, so compiling the whole transformer
(``torch.compile(transformer)``, ``transformer.compile()``) traces its forward between graph breaks at the
step hooks and at each block's bookkeeping; the block hook's bookkeeping (``Controller.block_begin`` /
``block_end``) is compiler-disabled too, so a compiled block (``block.compile()``, ``compile_repeated_blocks()``)
graph-breaks there and traces the rest, its quantized layers included (a dynamic layer as a ``torch.cond``,
:mod:`sixbit_tune.runtime.linear`).
"""

from __future__ import annotations

import sys

import torch

from sixbit_tune.compat import ModelHook, StatefulHook
from sixbit_tune.runtime.controller import RowSplit

STEP_HOOK = "sixbit_tune.step"
BLOCK_HOOK = "sixbit_tune.block"


class StepHook(StatefulHook):
    """Transformer-level diffusers hook: the cache context arrives in :attr:`state_manager`; the reset at the end of
    a pipeline call ends the controller's run."""

    def __init__(self, controller):
        super().__init__()
        self.controller = controller
        self.state_manager = controller.state_manager  # diffusers' cache_context() sets the context here

    def reset_state(self, module):
        if self.controller is not None:
            self.controller.end_run(completed=True)
        return module


def install_call_hooks(transformer: torch.nn.Module, controller) -> list:
    """Torch hooks around every call of ``transformer`` running :meth:`Controller.call_begin` / ``call_end``;
    returns their ``RemovableHandle`` s."""

    @torch.compiler.disable
    def pre(module, args, kwargs):
        controller.call_begin(args, kwargs)

    @torch.compiler.disable
    def post(module, args, kwargs, output):
        # Always called: with output None and an exception being handled when the forward (or ``pre``) raised.
        controller.call_end(output, failed=output is None and sys.exc_info()[0] is not None)

    return [
        transformer.register_forward_pre_hook(pre, with_kwargs=True),
        transformer.register_forward_hook(post, with_kwargs=True, always_call=True),
    ]


class BlockHook(ModelHook):
    """Block-level hook: TDC skip or full run with DMPQ formats and on-device measurements."""

    def __init__(self, controller, index: int):
        super().__init__()
        self.controller = controller
        self.index = index

    def new_forward(self, module, *args, **kwargs):
        skipped, payload = self.controller.block_begin(self.index, args, kwargs)
        if skipped:
            return payload
        if isinstance(payload, RowSplit):  # some rows skipped: the block runs on the others only
            output = self.fn_ref.original_forward(*payload.args, **payload.kwargs)
            return self.controller.block_end_rows(self.index, payload, output)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if payload is not None:
            self.controller.block_end(self.index, payload, output)
        return output
