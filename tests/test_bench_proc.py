"""The benchmarks' time limit ends an engine's child processes too (benchmarks/harness/proc.py):
a timed-out vLLM engine left running holds its GPU memory and fails every later engine."""
from __future__ import annotations

import os
import sys
import time

from benchmarks.harness.proc import run_logged

CHILD_WITH_GRANDCHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie is dead, only not reaped yet
    except FileNotFoundError:
        return False


def test_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    log = tmp_path / "run.log"
    rc = run_logged([sys.executable, "-c", CHILD_WITH_GRANDCHILD, str(pid_file)], str(log),
                    timeout=5)
    assert rc == "timeout"
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 10
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the engine's child outlived the timeout"


def test_return_code_and_log(tmp_path):
    log = tmp_path / "run.log"
    rc = run_logged([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], str(log),
                    timeout=30, env={**os.environ, "X": "1"})
    assert rc == 3 and log.read_text().strip() == "hello"
