"""README's "Using it" runs as written on the CPU: every command and the Python snippet, in a fresh folder.

Only the step and trial counts the README shows (``--steps``, ``--trials``, ``num_inference_steps=``) are made
smaller, and the dashboard gets a free port; everything else runs exactly as the README writes it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"--steps": "3", "--trials": "2"}


def using_it_blocks() -> list[tuple[str, str]]:
    """The fenced code blocks ``(language, text)`` of the README's "Using it" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Using it")
    end = text.find("\n## ", start + 1)
    section = text[start: end if end != -1 else len(text)]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", section, flags=re.S)]


def commands() -> list[list[str]]:
    out = []
    for lang, body in using_it_blocks():
        if lang != "bash":
            continue
        for line in body.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


def _small(argv: list[str]) -> list[str]:
    argv = list(argv)
    for flag, value in SMALL.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
    return argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_sections_parse():
    cmds = commands()
    names = [c[1] for c in cmds]
    assert all(c[0] == "sixbit-tune" for c in cmds), cmds
    for name in ("profile", "fit", "search", "dashboard", "export", "generate"):
        assert name in names
    assert [lang for lang, _ in using_it_blocks()].count("python") == 1
    # the prompts file the README names is shipped and uses only words the reference model knows
    from sixbit_tune.models.reference.data import vocabulary
    from sixbit_tune.profiling.config import load_prompts

    (profile,) = [c for c in cmds if c[1] == "profile"]
    prompts = load_prompts(ROOT / profile[profile.index("--prompts") + 1])
    assert prompts and all(set(p.split()) <= set(vocabulary()) for p in prompts)
    for c in cmds:
        if "--prompt" in c:
            assert set(c[c.index("--prompt") + 1].split()) <= set(vocabulary())


def _run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "sixbit_tune", *argv[1:]], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, f"{shlex.join(argv)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _dashboard(argv: list[str], cwd: Path, env: dict) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sixbit_tune", *argv[1:], "--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the dashboard did not answer within 120 s")
    finally:
        proc.terminate()
        proc.wait(30)


def test_using_it_runs_as_written(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {k: v for k, v in os.environ.items() if k != "SIXBIT_DEBUG"}
    env.setdefault("OMP_NUM_THREADS", "1")  # as the other CLI tests: no oversubscribed cores on a shared machine
    outputs = {}
    for argv in commands():
        argv = _small(argv)
        if argv[1] == "dashboard":
            _dashboard(argv, tmp_path, env)
            continue
        outputs[argv[1]] = _run(argv, tmp_path, env).stdout
    assert "next: sixbit-tune fit --store runs/ref" in outputs["profile"]
    assert "runs/ref" in outputs["profile"]
    assert "next: sixbit-tune search" in outputs["fit"]
    assert "sixbit-tune export --store runs/ref" in outputs["search"]
    assert (tmp_path / "policies" / "ref.json").is_file()
    assert (tmp_path / "clip.gif").is_file()

    (python,) = [body for lang, body in using_it_blocks() if lang == "python"]
    code = re.sub(r"num_inference_steps=\d+", "num_inference_steps=3", python)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipped blocks" in res.stdout, res.stdout
