"""Build mikv-vllm: the pure-Python plugin plus, where CUDA torch and nvcc are present, the
kernels in csrc/ (sm80 and sm90 unless TORCH_CUDA_ARCH_LIST says otherwise).

Without them (or with MIKV_SKIP_CUDA_BUILD=1) only the Python parts are installed and
`mikv_vllm.ops` explains what is missing when a kernel is first needed."""
import importlib.util
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["csrc/torch_bindings.cpp", "csrc/paged_decode.cu", "csrc/page_mass.cu",
           "csrc/quantize.cu", "csrc/split_tables.cu",
           "csrc/graph_gate.cu"]


def wheel_cuda_includes():
    """CUDA library headers (cusparse.h, ...) that torch's CUDA wheels carry but a bare
    toolkit may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        for sub in ("cu13/include", "cu12/include"):
            path = os.path.join(root, sub)
            if os.path.isdir(path):
                found.append(path)
    return found


def cuda_extension():
    if os.environ.get("MIKV_SKIP_CUDA_BUILD") == "1":
        return [], {}
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # before cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("mikv-vllm: torch is not importable in the build environment; building without "
              "CUDA kernels (use `pip install --no-build-isolation .`)", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("mikv-vllm: no CUDA torch or no CUDA toolkit (CUDA_HOME); building without "
              "CUDA kernels", file=sys.stderr)
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # The wheels' headers go after the toolkit's (-isystem): they fill in what a bare toolkit
    # lacks (cusparse.h) without shadowing nvcc's own crt/ headers.
    wheel_includes = [f for d in wheel_cuda_includes() for f in ("-isystem", d)]
    ext = CUDAExtension(
        name="mikv_vllm._C",
        sources=SOURCES,
        # One binary for every Python >= 3.9 (the ops live in TORCH_LIBRARY, not in Python).
        py_limited_api=True,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17", *wheel_includes],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                     "--expt-relaxed-constexpr", "-Xptxas=-warn-spills", *wheel_includes],
        },
        # The shared C++ runtime, named ahead of the -lstdc++ g++ appends: where that resolves
        # to libstdc++.a (no libstdc++.so link, or -static-libstdc++), nothing is taken from it.
        extra_link_args=["-l:libstdc++.so.6"],
    )
    build_ext = refusing_static_runtime(BuildExtension.with_options(use_ninja=True))
    return [ext], {"build_ext": build_ext}


def refusing_static_runtime(build_ext):
    """`build_ext` that fails a build carrying its own C++ runtime (mikv_vllm/cxx_runtime.py)
    instead of leaving it to crash at its first error message."""
    spec = importlib.util.spec_from_file_location(
        "mikv_cxx_runtime", os.path.join(HERE, "mikv_vllm", "cxx_runtime.py"))
    cxx_runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cxx_runtime)

    class CheckedBuildExt(build_ext):
        def build_extension(self, ext):
            super().build_extension(ext)
            problem = cxx_runtime.static_runtime_problem(self.get_ext_fullpath(ext.name))
            if problem:
                raise SystemExit(f"mikv-vllm: {problem}")

    return CheckedBuildExt


ext_modules, cmdclass = cuda_extension()

setup(
    name="mikv-vllm",
    version="0.1.0",
    description="Importance-aware mixed-precision (hi + 2-bit) KV cache for vLLM (MiKV)",
    packages=find_packages(include=["mikv_vllm", "mikv_vllm.*"]),
    python_requires=">=3.10",
    install_requires=["vllm==0.26.0", "torch==2.11.0"],
    extras_require={"test": ["pytest>=8"]},
    entry_points={"vllm.general_plugins": ["mikv = mikv_vllm.plugin:register"],
                  "vllm.stat_logger_plugins": ["mikv = mikv_vllm.integration.metrics:MikvStatLogger"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
