"""The two diffusers ``ModelHook`` s the runtime installs.

* :class:`StepHook` on the transformer (stateful): receives the ``cache_context`` through its ``StateManager``,
  counts steps per context, detects new runs, makes the step's decisions (one host sync) and is reset by
  diffusers at the end of every pipeline call (``_reset_stateful_cache``).
* :class:`BlockHook` on every transformer block: skips the block from the Temporal Delta Cache, or sets its
  dynamic layers' formats, runs it, and measures Γ / Δ on the device.

``torch.compile``: the step hook's forward is compiler-disabled (it is host bookkeeping around the whole model).
The block hook's bookkeeping (``Controller.block_begin`` / ``block_end``) is compiler-disabled too, so compiling a
block (``block.compile()`` or ``torch.compile(block)``) after ``apply_policy`` traces the block's own forward with
graph breaks at those two calls and at each *dynamic* layer (whose format changes between steps); static
quantized layers are traced inline.
"""

from __future__ import annotations

import torch

from sixbit_tune.runtime._diffusers import ModelHook

STEP_HOOK = "sixbit_tune.step"
BLOCK_HOOK = "sixbit_tune.block"


class StepHook(ModelHook):
    """Transformer-level hook: one :meth:`Controller.run_call` per transformer call."""

    _is_stateful = True

    def __init__(self, controller):
        super().__init__()
        self.controller = controller
        self.state_manager = controller.state_manager  # diffusers' cache_context() sets the context here

    def new_forward(self, module, *args, **kwargs):
        return _run_call(self.controller, self.fn_ref.original_forward, args, kwargs)

    def reset_state(self, module):
        self.controller.end_run(completed=True)
        return module


@torch.compiler.disable
def _run_call(controller, forward, args, kwargs):
    return controller.run_call(forward, args, kwargs)


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
        output = self.fn_ref.original_forward(*args, **kwargs)
        if payload is not None:
            self.controller.block_end(self.index, payload, output)
        return output
