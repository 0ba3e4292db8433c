"""benchmarks/nvfp4_encoder_quality.py from the repository root: a tiny run writes its table and JSON, and the
weights of the pipeline come back unchanged between encoders (the standard encoder measures the same PSNR whether it
runs first or after another encoder)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run([sys.executable, "benchmarks/nvfp4_encoder_quality.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_tiny_run_writes_json_and_table(tmp_path):
    out = tmp_path / "enc"
    res = _run("--steps", "2", "--prompts", "1", "--calib-prompts", "1",
               "--encoders", "standard,gptq,standard", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["encoder"] for r in data["rows"]] == ["standard", "gptq", "standard"]
    assert data["steps"] == 2 and len(data["prompts"]) == 1 and len(data["calibration_prompts"]) == 1
    assert not set(data["calibration_prompts"]) & set(data["prompts"])
    for r in data["rows"]:
        assert all(math.isfinite(x) and x < 100 for x in r["psnr_db"])
    first, _, again = data["rows"]
    assert first["psnr_db"] == again["psnr_db"]  # the originals were put back after gptq
    assert data["recommended"] in {"standard", "gptq"}
    table = out.with_suffix(".md").read_text()
    assert "| gptq |" in table and data["command"] in table


def test_unknown_encoder_is_refused_before_loading():
    res = _run("--encoders", "standard,round", "--out", "")
    assert res.returncode == 2 and "unknown NVFP4 weight encoder 'round'" in res.stderr, res.stderr[-2000:]
