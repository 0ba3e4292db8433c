"""A writer process for the store's concurrency tests (run as a script, not collected by pytest).

usage: python _store_worker.py STORE WORKER_ID MODE PARTS ROWS SLEEP_S
  MODE block   begin a profile run, write PARTS block_steps parts of ROWS rows (prompt_index = part), finish it
  MODE trials  write trials number = WORKER_NUM + k * 2 (k < PARTS) of study "shared", RUNNING then COMPLETE
  MODE forever like block, but never stops (PARTS ignored); for the kill test
Prints "wrote <k>" after each part is in place (flushed), and "done" at the end.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from sixbit_tune.store import Store


def block_rows(prompt_index: int, rows: int) -> dict:
    steps = np.arange(rows, dtype=np.int32)
    return {
        "prompt_index": np.full(rows, prompt_index, dtype=np.int32),
        "prompt": [f"prompt {prompt_index}"] * rows,
        "branch": ["cond"] * rows,
        "step": steps // 4,
        "block_index": steps % 4,
        "gamma": np.linspace(0.0, 1.0, rows),
        "delta_norm": np.ones(rows),
    }


def main() -> None:
    path, worker_id, mode, parts, rows, sleep_s = sys.argv[1:7]
    parts, rows, sleep_s = int(parts), int(rows), float(sleep_s)
    w = Store.open(path).writer(worker_id)
    if mode in ("block", "forever"):
        run_id = w.begin_run("profile", "tiny:wan", settings={"worker": worker_id}, run_id=f"run-{worker_id}")
        k = 0
        while mode == "forever" or k < parts:
            w.write_block_steps(block_rows(k, rows), run_id=run_id)
            print(f"wrote {k}", flush=True)
            k += 1
            time.sleep(sleep_s)
        w.finish_run(run_id)
    elif mode == "trials":
        first = int(worker_id.rsplit("-", 1)[1])
        for k in range(parts):
            n = first + 2 * k
            w.write_trial("shared", n, state="RUNNING", params={"k": k})
            w.write_trial("shared", n, state="COMPLETE", params={"k": k}, latency_ms=float(n))
            print(f"wrote {k}", flush=True)
            time.sleep(sleep_s)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("done", flush=True)


if __name__ == "__main__":
    main()
