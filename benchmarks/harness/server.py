"""A `vllm serve` (or any HTTP server) subprocess for GPU tests and benchmarks: started, waited
for until `/health` answers, and always stopped, with its output in a log file."""
from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from pathlib import Path


@contextlib.contextmanager
def running_server(cmd: list[str], log_path: str | Path, url: str, timeout: float = 300,
                   env: dict | None = None):
    """Run `cmd` with stdout/stderr in `log_path`; yield once `url + "/health"` answers.

    Raises RuntimeError with the log's tail if the server exits or stays unhealthy."""
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_healthy(proc, url, timeout, log_path)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log_path: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + log_path.read_text()[-4000:])
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(2)
    raise RuntimeError("server did not become healthy:\n" + log_path.read_text()[-4000:])
