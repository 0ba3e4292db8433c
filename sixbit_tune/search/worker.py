"""Entry point of one search worker process: ``python -m sixbit_tune.search.worker --config JSON --quota N``.

Spawned by :func:`sixbit_tune.search.study.run_workers` (one per GPU, ``CUDA_VISIBLE_DEVICES`` pinned); runs up
to ``quota`` trials of the study named in the config on the config's storage. With ``--parent-pid`` it ends
when that process (the parent) ends, however the parent ends.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sixbit_tune.search.worker")
    p.add_argument("--config", required=True, help="SearchConfig as JSON")
    p.add_argument("--quota", type=int, default=None, help="at most this many trials")
    p.add_argument("--worker", type=int, default=0, help="worker index (sampler seed offset)")
    p.add_argument("--parent-pid", type=int, default=None, help="end when this process (the parent) ends")
    args = p.parse_args(argv)
    from sixbit_tune.profiling.lifeline import die_with_parent, thread_lock_for_bars

    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    thread_lock_for_bars()

    from sixbit_tune.search.config import SearchConfig
    from sixbit_tune.search.study import run_worker

    config = SearchConfig.from_json(args.config)
    run_worker(config, quota=args.quota, worker=args.worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
