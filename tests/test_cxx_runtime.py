"""A kernel build with its own C++ runtime is refused, and setup.py's link keeps the shared one.

Issue 25's segfault: the extension built on the GPU machine carried a static libstdc++ (it
defined `__cxa_throw` and `std::ostream::_M_insert<long>`), and the first TORCH_CHECK message
with a number crashed in `decode_ctas_per_sm`. Here a one-op torch library is linked the way
that build was, and the way setup.py links now, with this machine's g++ and torch headers."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mikv_vllm import ops
from mikv_vllm.cxx_runtime import defined_dynamic_symbols, static_runtime_problem

ROOT = Path(__file__).resolve().parents[1]
TORCH_DIR = Path(torch.__file__).parent
SOURCE = """
#include <torch/library.h>
#include <c10/util/Exception.h>
int64_t only_zero(int64_t x) { TORCH_CHECK(x == 0, "x must be 0, got ", x, " instead"); return x; }
TORCH_LIBRARY(mikv_cxx_probe, m) { m.def("only_zero(int x) -> int", &only_zero); }
"""
CALL = """
import torch, sys
torch.ops.load_library(sys.argv[1])
try:
    torch.ops.mikv_cxx_probe.only_zero(5)
except RuntimeError as e:
    print(str(e).splitlines()[0])
"""
LINKS = {
    # What the GPU machine's build amounted to (a static libstdc++ behind -lstdc++).
    "static": ["-static-libstdc++"],
    # The same toolchain with setup.py's link argument.
    "setup_py": ["-static-libstdc++", "-l:libstdc++.so.6"],
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine")
    work = tmp_path_factory.mktemp("cxx-runtime")
    (work / "probe.cpp").write_text(SOURCE)
    out = {}
    for name, link in LINKS.items():
        so = work / f"probe_{name}.so"
        done = subprocess.run(
            ["g++", "-O1", "-std=c++17", "-fPIC", "-shared", str(work / "probe.cpp"),
             f"-I{TORCH_DIR / 'include'}", f"-L{TORCH_DIR / 'lib'}", "-lc10", "-ltorch_cpu",
             f"-Wl,-rpath,{TORCH_DIR / 'lib'}", "-o", str(so), *link],
            capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"g++ cannot link {link}: {done.stderr.strip().splitlines()[-1:]}")
        out[name] = so
    return out


def call_only_zero(so: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CALL, str(so)], capture_output=True, text=True,
                          timeout=300)


def test_a_static_runtime_breaks_the_first_error_message_with_a_number(builds):
    done = call_only_zero(builds["static"])
    # gcc 13 beside torch's runtime: a segfault; gcc 12: the number and the rest are lost.
    assert done.returncode != 0 or "got 5 instead" not in done.stdout, done.stdout


def test_a_static_runtime_is_named_and_refused_by_load_kernels(builds, monkeypatch):
    problem = static_runtime_problem(str(builds["static"]))
    assert problem and "__cxa_throw" in problem and "\n" not in problem
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "mikv_vllm._C":
            return importlib.machinery.ModuleSpec(name, None, origin=str(builds["static"]))
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    ops.load_kernels.cache_clear()
    try:
        with pytest.raises(ops.KernelsUnavailableError, match="static libstdc"):
            ops.load_kernels()
    finally:
        ops.load_kernels.cache_clear()


def test_setup_py_link_keeps_the_shared_runtime(builds):
    assert static_runtime_problem(str(builds["setup_py"])) is None
    assert "-l:libstdc++.so.6" in (ROOT / "setup.py").read_text()
    done = call_only_zero(builds["setup_py"])
    assert done.returncode == 0 and "x must be 0, got 5 instead" in done.stdout, done


def test_symbol_reader_agrees_with_nm(builds):
    if shutil.which("nm") is None:
        pytest.skip("no nm on this machine")
    for so in builds.values():
        listed = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True,
                                text=True, check=True).stdout.split("\n")
        names = {line.split()[-1].split("@")[0] for line in listed if line.strip()}
        assert defined_dynamic_symbols(str(so)) == names


def test_the_installed_kernels_share_the_runtime():
    built = sorted((ROOT / "mikv_vllm").glob("_C*.so"))
    if not built:
        pytest.skip("the CUDA extension is not built in this checkout")
    for so in built:
        assert static_runtime_problem(str(so)) is None
