"""The subprocess server helper the GPU serve test and the serving benchmark share, driven with a
real (tiny) HTTP server on the CPU."""
from __future__ import annotations

import socket
import sys

import pytest

from benchmarks.harness.server import running_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_yields_once_healthy_and_stops_the_server(tmp_path):
    (tmp_path / "health").write_text("ok")
    port = _free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
           "--directory", str(tmp_path)]
    with running_server(cmd, tmp_path / "server.log", f"http://127.0.0.1:{port}", 60) as proc:
        assert proc.poll() is None
    assert proc.poll() is not None


def test_a_server_that_exits_fails_with_its_log(tmp_path):
    cmd = [sys.executable, "-c", "print('boom: no GPU'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match=r"server exited:\n.*boom: no GPU"):
        with running_server(cmd, tmp_path / "server.log", "http://127.0.0.1:9", 60):
            pass
