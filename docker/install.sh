#!/usr/bin/env bash
# The one install of mikv-vllm: vLLM pinned, then the plugin built against the torch vLLM
# installed, with its CUDA kernels for TORCH_CUDA_ARCH_LIST (default 8.0;9.0). The image's build
# stage and CI both run it, so every CI run proves the image's install step.
#   bash docker/install.sh               install this checkout
#   bash docker/install.sh --editable    the same, editable (CI, development)
#   bash docker/install.sh --wheel DIR   build the wheel into DIR (the image's build stage)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_() { "$PY" -m pip "$@" --no-cache-dir; }
installed_kernels() {
  (cd / && "$PY" -c "import pathlib, mikv_vllm
print(*pathlib.Path(mikv_vllm.__file__).parent.glob('_C*.so'))")
}

case "${1:-}" in
  ""|--editable) ;;
  --wheel) [ -n "${2:-}" ] || { echo "usage: bash docker/install.sh --wheel DIR" >&2; exit 2; } ;;
  *) echo "usage: bash docker/install.sh [--editable | --wheel DIR]" >&2; exit 2 ;;
esac
pip_ install -q "vllm==0.26.0" "setuptools==81.0.0" "wheel==0.48.0"
case "${1:-}" in
  --wheel)
    pip_ wheel --no-build-isolation --no-deps -w "$2" .
    built=$("$PY" -c "import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + '/mikv_vllm-*.whl')[0]
print(*[n for n in zipfile.ZipFile(whl).namelist() if n.startswith('mikv_vllm/_C')])" "$2") ;;
  --editable) pip_ install --no-build-isolation --no-deps -e . && built=$(installed_kernels) ;;
  *) pip_ install --no-build-isolation --no-deps . && built=$(installed_kernels) ;;
esac
if [ -z "$built" ]; then
  echo "mikv-vllm: the CUDA extension was not built (is nvcc on PATH, or CUDA_HOME set?)" >&2
  exit 1
fi
echo "mikv-vllm installed with kernels: $built"
