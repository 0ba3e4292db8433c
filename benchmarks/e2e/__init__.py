"""End-to-end benchmark of sixbit-tune against the strongest off-the-shelf stack on one GPU.

Run from the repository root: ``python -m benchmarks.e2e --out DIR`` (GPU), ``python -m benchmarks.e2e --smoke
--out DIR`` (CPU code-path check on tiny models), ``python -m benchmarks.e2e --render a.json [b.json] --out PREFIX``
(merge result files of one GPU into a table and a figure). ``sixbit-tune bench`` takes the same options.

One process per run, one GPU. Each workload (:mod:`.workloads`) runs its contenders (:mod:`.contenders`) in
priority order: bf16 eager and compiled (the baseline), bf16 under CUDA graphs, our policies, the peer caches
(diffusers' FirstBlockCache, cache-dit's DBCache and DBCache + TaylorSeer), torchao FP8 dynamic row-wise compiled,
the peer stack (a cache at our quality + torchao FP8, compiled), our static corners. On the shape workloads (random
weights) every cache's skip pattern on the reference model is replayed. How rows are measured: :mod:`.run` and
:mod:`.measurement`; the derived columns and the tables: :mod:`.rendering`. The benchmark writes its results files
only.
"""

from . import contenders, measurement, policies, rendering, run, skipmaps, workloads
from .cli import add_arguments, build_parser, main, run_args
from .measurement import compile_blocks, compile_whole, environment, uncompile
from .policies import policy_args
from .skipmaps import fbc_skip_share, map_share, record_fbc_skips, scale_map
from .workloads import REFERENCE_PROMPTS

__all__ = ["REFERENCE_PROMPTS", "contenders", "measurement", "policies", "rendering", "run", "skipmaps", "workloads", "add_arguments", "build_parser", "compile_blocks", "compile_whole", "environment",
           "fbc_skip_share", "main", "map_share", "policy_args", "record_fbc_skips", "run_args", "scale_map",
           "uncompile"]
