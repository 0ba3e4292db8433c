"""`sixbit-tune dashboard`: safe defaults, the streamlit command it runs, and clear errors for bad stores."""

from __future__ import annotations

from pathlib import Path

import pytest
from sixbit_tune.dashboard.pages import parse_args

from sixbit_tune.cli import build_parser, main
from sixbit_tune.commands.dashboard import streamlit_command


def _args(*argv: str):
    return build_parser().parse_args(["dashboard", *argv])


def test_binds_localhost_by_default(dash_store):
    args = _args("--store", str(dash_store))
    assert (args.host, args.port) == ("127.0.0.1", 8501)
    cmd = streamlit_command(args)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8501"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    app = Path(cmd[cmd.index("run") + 1])
    assert app.name == "app.py" and app.is_file()
    after = cmd[cmd.index("--") + 1:]
    settings = parse_args(after)
    assert list(settings.stores.values()) == [dash_store.absolute()]
    assert settings.policies_dir == Path("policies").absolute()


def test_several_stores_host_port_and_storage(dash_store, second_store):
    args = _args("--store", str(dash_store), "--store", str(second_store), "--host", "0.0.0.0", "--port", "9000",
                 "--optuna-storage", "postgresql://u@h/db", "--policies-dir", "out")
    cmd = streamlit_command(args)
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--server.port") + 1] == "9000"
    settings = parse_args(cmd[cmd.index("--") + 1:])
    assert list(settings.stores) == ["h200", "b200"]
    assert settings.optuna_storage == "postgresql://u@h/db"
    assert settings.policies_dir == Path("out").absolute()


def test_a_store_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        main(["dashboard"])
    assert e.value.code == 2
    assert "--store" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["missing-folder", "not-a-store"])
def test_bad_store_is_a_usage_error(bad, tmp_path, capsys):
    path = tmp_path / bad
    if bad == "not-a-store":
        path.mkdir()
    with pytest.raises(SystemExit) as e:
        main(["dashboard", "--store", str(path)])
    assert e.value.code == 2
    assert "store" in capsys.readouterr().err


def test_port_range_is_checked(dash_store, capsys):
    with pytest.raises(SystemExit):
        main(["dashboard", "--store", str(dash_store), "--port", "70000"])
    assert "--port" in capsys.readouterr().err


def test_app_argument_errors():
    with pytest.raises(ValueError, match="--store"):
        parse_args([])
    with pytest.raises(ValueError, match="twice"):
        parse_args(["--store", "a", "--store", "a"])


def test_stopping_the_command_stops_the_server(dash_store, tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sixbit_tune.cli", "dashboard", "--store", str(dash_store),
                             "--port", str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    assert r.read().strip() == b"ok"
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) is not None
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    break
            assert time.monotonic() < deadline, "the streamlit server outlived `sixbit-tune dashboard`"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
