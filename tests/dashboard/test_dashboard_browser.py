"""The real thing: `sixbit-tune dashboard` served on localhost, every page opened in headless Chromium.

Fails on any Streamlit exception in a page's DOM; checks the app container, the finished script and connection,
and the Plotly charts; keeps one screenshot per page under ``$SIXBIT_ARTIFACTS/screenshots/`` (CI artifacts).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dashboard_helpers import H100, H200, PAGES

CHROMIUM = "/usr/bin/chromium"
PAGE_DEADLINE_S = 120
#: pages -> Plotly charts expected at least
CHARTS = {"runs": 0, "sensitivity": 2, "predictor": 2, "temporal": 2, "search": 3, "policy": 2, "gpus": 1}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("sixbit-tune")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "sixbit_tune.cli"]


def _chromium(url: str, profile: Path, screenshot: Path | None, budget_ms: int = 8000) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1400,900", f"--virtual-time-budget={budget_ms}",
           "--dump-dom"]
    if screenshot is not None:
        cmd.append(f"--screenshot={screenshot}")
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=90, cwd=profile)
    return out.stdout


def _settled(dom: str) -> bool:
    return 'data-test-script-state="notRunning"' in dom and "stSkeleton" not in dom and "stAppViewContainer" in dom


@pytest.fixture(scope="module")
def server(gpu_stores, tmp_path_factory):
    """One dashboard server for the module: `sixbit-tune dashboard` on two stores recorded as two GPUs' searches
    (and the policies folder they exported into), a free localhost port."""
    tmp_path = tmp_path_factory.mktemp("server")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [*_cli(), "dashboard", "--store", str(gpu_stores["h200"]), "--store", str(gpu_stores["h100"]), "--port",
         str(port), "--policies-dir", str(gpu_stores["policies"])],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"dashboard did not start: {(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group this test started (streamlit's own children)
        except ProcessLookupError:
            pass
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def test_every_page_in_a_real_browser(server, tmp_path):
    base, proc = server
    shots = Path(os.environ.get("SIXBIT_ARTIFACTS", "artifacts")).absolute() / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    _chromium(f"{base}/", profile, None, 12000)  # warm-up: the server's first script run imports the stack
    problems = []
    for page in PAGES:
        url = f"{base}/" if page == "runs" else f"{base}/{page}"
        shot = shots / f"{page}.png"
        # Virtual time runs ahead of the server's real work (an open websocket counts as idle), so on a busy machine
        # a page's first run (imports, queries) can outlast the budget. Imports stay loaded and finished queries
        # stay cached server-side, so visiting again makes progress: retry until settled, within a real deadline.
        deadline = time.monotonic() + PAGE_DEADLINE_S
        while True:
            dom = _chromium(url, profile, shot)
            if (_settled(dom) and 'data-test-connection-state="CONNECTED"' in dom) or time.monotonic() > deadline:
                break
        if "stAppViewContainer" not in dom:
            problems.append(f"{page}: no stAppViewContainer")
        if "stException" in dom:
            problems.append(f"{page}: stException in the DOM")
        if not _settled(dom):
            problems.append(f"{page}: script still running after the time budget")
        if 'data-test-connection-state="CONNECTED"' not in dom:
            problems.append(f"{page}: not connected")
        charts = dom.count('data-testid="stPlotlyChart"')
        if charts < CHARTS[page]:
            problems.append(f"{page}: {charts} Plotly charts, want at least {CHARTS[page]}")
        if page == "gpus" and not all(g in dom for g in (H200["name"], H100["name"], "What differs")):
            problems.append(f"{page}: the two GPUs and what differs between them are not shown")
        if not shot.is_file() or shot.stat().st_size < 5000:
            problems.append(f"{page}: no screenshot")
    assert proc.poll() is None, "the dashboard server died"
    assert not problems, problems


def test_the_server_listens_on_localhost_only(server):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    addrs = {ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    addrs |= {a for a in _local_ipv4() if not a.startswith("127.")}
    if not addrs:
        pytest.skip("this machine has no non-loopback IPv4 address to probe")
    for addr in addrs:
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex((addr, port)) != 0, f"dashboard reachable on {addr}:{port}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) == 0


def _local_ipv4() -> set[str]:
    if shutil.which("hostname") is None:
        return set()
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout
    return {a for a in out.split() if "." in a}
