"""A benchmark's engine subprocess with a time limit that also ends its children.

vLLM runs its engine core in a child process of the one a benchmark starts; killing only that
one on a timeout leaves the engine holding its GPU memory, and every later engine of the same
call then fails at startup ("Free memory on device ... less than desired GPU memory
utilization"). The command runs in its own process group, which the timeout kills whole."""
from __future__ import annotations

import os
import signal
import subprocess


def run_logged(cmd: list[str], log_path: str, timeout: float, **popen_kwargs) -> int | str:
    """Run `cmd` with stdout and stderr into `log_path`; its return code, or "timeout" once
    `timeout` seconds passed and its whole process group was killed."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, **popen_kwargs)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout"
