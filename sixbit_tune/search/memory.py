"""Measured peak memory of a trial: the bytes torch tensors hold at their highest, on a GPU and on the CPU.

GPU (``cuda_max_memory_allocated``): ``torch.cuda.max_memory_allocated`` over the measured generations, its peak
reset once the policy is applied, so it counts everything the allocator holds then (the weights in every encoding
the policy keeps, the Temporal Delta Cache, activations, the generated video).

CPU (``cpu_allocator_peak``): the CPU allocator has no peak counter, so one generation runs under torch's profiler
with memory profiling, which reports every allocation and release of torch's CPU allocator. The figure is the bytes
of the pipeline's parameters and buffers (each storage once) plus the highest running sum of what was allocated
and not yet released while the policy was applied and that generation ran: weights, quantized encodings, cache,
activations and output, as on the GPU. Releases of memory allocated before the measurement began are not reported
by the profiler, so the figure never undercounts.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

#: What ``memory_bytes`` / ``peak_memory_bytes`` of a trial measured, per device.
CUDA_METHOD = "cuda_max_memory_allocated"
CPU_METHOD = "cpu_allocator_peak"

#: Lines torch's profiler prints on stderr on every start and stop (and once about memory allocated before it
#: started); they are dropped, every other line written to stderr during the measurement is passed on after it.
_PROFILER_NOISE = ("SyncActivityProfilerHandler", "allocated before the profiling started", "Completed Stage:")


def method(device: str) -> str:
    return CUDA_METHOD if device == "cuda" else CPU_METHOD


def resident_bytes(pipe) -> int:
    """Bytes of the parameters and buffers of the pipeline's modules (a transformer alone works too), each storage
    counted once."""
    import torch

    modules = [pipe] if isinstance(pipe, torch.nn.Module) else [
        m for m in getattr(pipe, "components", {}).values() if isinstance(m, torch.nn.Module)
    ]
    seen: set[int] = set()
    total = 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.device.type != "cpu":
                continue
            s = t.untyped_storage()
            if s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


class AllocatorPeak:
    """Context manager: the highest net bytes torch's CPU allocator handed out while it was entered
    (``peak_bytes``, set on exit)."""

    def __init__(self):
        self.peak_bytes: int | None = None
        self._prof = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> AllocatorPeak:
        from torch.profiler import ProfilerActivity, profile

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(_filtered_stderr())
        try:
            self._prof = self._stack.enter_context(profile(activities=[ProfilerActivity.CPU], profile_memory=True))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)
        if exc[0] is not None:
            return
        events = [e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            if e.device_type().name != "CPU":
                continue
            live += int(e.nbytes())
            peak = max(peak, live)
        self.peak_bytes = peak
        self._prof = None


@contextlib.contextmanager
def _filtered_stderr():
    """Send file descriptor 2 (where torch's C++ code writes) to a temporary file meanwhile, then write back every
    line but the profiler's noise."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().splitlines(keepends=True)
                    if not any(n.encode() in line for n in _PROFILER_NOISE)]
            if kept:
                os.write(2, b"".join(kept))
