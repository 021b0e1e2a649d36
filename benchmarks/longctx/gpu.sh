#!/usr/bin/env bash
# The long-context suite on the offline GPU machine: the vLLM runtime, the plugin's wheel and
# Qwen2.5-Coder-1.5B arrive in pieces (../shared/gpu/build_vllm_bundle.sh,
# benchmarks/models/prepare_qwen.py, `pip wheel` into .whl/); each command below is one device
# call, with $OUT the folder that comes back.
#
#   bash benchmarks/longctx/gpu.sh recv            stash what this call carried (vLLM parts,
#                                                  GGUF pieces, extra/, .whl/); installs once
#                                                  vLLM and the wheels are there, then starts
#                                                  the GPU kernel tests in the background
#   bash benchmarks/longctx/gpu.sh prepare         reassemble and convert the model, make the trials
#   bash benchmarks/longctx/gpu.sh start SECONDS [ARGS]  prepare, then
#                                                  run run_all.py (ARGS: its options, e.g.
#                                                  --methods ...) in the background for SECONDS
#   bash benchmarks/longctx/gpu.sh sim SECONDS [ARGS]  the harness on the GPU beside it
#   bash benchmarks/longctx/gpu.sh sm80 [ARGS]     benchmarks/sm80_path.py (the A100 route) on the
#                                                  same model and wheel, in the background
#   bash benchmarks/longctx/gpu.sh poll SECONDS    wait while the run goes on, print progress
#   bash benchmarks/longctx/gpu.sh collect         the results into $OUT
set -uo pipefail
S=/tmp/longctx
OUT=${OUT:-$S/collected}
mkdir -p "$S/models" "$S/extra" "$S/out" "$OUT"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export MIKV_WIKI_BZ2=$S/extra/enwiki.xml.bz2

pieces_expected() {
  python3 -c "import json; print(len(json.load(open('$S/manifest.json'))['pieces']))" 2>/dev/null || echo "?"
}

install() {  # once per machine: the plugin's wheel (kernels + entry points), gguf, the tokenizer
  [ -L /tmp/site/mikv_vllm ] && return
  python3 -m pip install -q --no-deps --no-index --upgrade --target /tmp/site "$S"/extra/*.whl || return
  mkdir -p "$S/kernels" && cp /tmp/site/mikv_vllm/_C*.so "$S/kernels/"
  refresh
  rm -rf /tmp/site/mikv_vllm && ln -s "$S/repo/mikv_vllm" /tmp/site/mikv_vllm
  tar -xzf "$S/extra/tok.tar.gz" -C "$S"
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import sys, torch, vllm, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"
  } > "$S/out/device.txt" 2>&1
  cat "$S/out/device.txt"
  # From a copy of their own: `prepare` and `start` replace $S/repo while they run.
  rm -rf "$S/ktests" && cp -r "$S/repo" "$S/ktests"
  (cd "$S/ktests" && setsid nohup python3 -m pytest -q -p no:cacheprovider tests/gpu/test_decode_kernel.py \
     tests/gpu/test_lo_pages.py tests/gpu/test_page_mass.py tests/gpu/test_split_decode.py \
     > "$S/out/kernels.log" 2>&1 < /dev/null &)
  echo "kernel tests started"
}

refresh() {  # the code runs from a copy of this call's tree, with the wheel's kernels
  rm -rf "$S/repo" && mkdir -p "$S/repo"
  cp -r benchmarks mikv_vllm tests pyproject.toml setup.py "$S/repo/"
  cp "$S"/kernels/_C*.so "$S/repo/mikv_vllm/"
}

recv() {
  if [ ! -f /tmp/site/vllm/__init__.py ] && ls .vllm-parts/part_* >/dev/null 2>&1; then bash .vllm-parts/unpack.sh "${VLLM_PARTS:-4}"; fi
  [ -d .models/qwen15/pieces ] && cp .models/qwen15/pieces/gguf.* "$S/models/"
  [ -d .models/qwen15/extra ] && cp .models/qwen15/extra/* .models/qwen15/manifest.json "$S/extra/" \
    && mv "$S/extra/manifest.json" "$S/"
  ls .whl/mikv_vllm-*.whl >/dev/null 2>&1 && cp .whl/mikv_vllm-*.whl "$S/extra/"
  if [ -f /tmp/site/vllm/__init__.py ] && ls "$S"/extra/mikv_vllm-*.whl >/dev/null 2>&1; then install; fi
  echo "gguf pieces: $(ls "$S/models" | wc -l)/$(pieces_expected)"
}

prepare() {  # the model reassembled, checked and converted; the trials made
  refresh
  if [ ! -f "$S/qwen15-hf/model.safetensors" ]; then
    cat "$S"/models/gguf.* > "$S/model.gguf"
    python3 - <<EOF || return 1
import hashlib, json
m = json.load(open("$S/manifest.json"))
h = hashlib.sha256(open("$S/model.gguf", "rb").read()).hexdigest()
assert h == m["sha256"], f"GGUF sha256 {h} != {m['sha256']}"
print("GGUF ok", m["size"])
EOF
    python3 benchmarks/models/gguf_to_hf.py "$S/model.gguf" "$S/tok" "$S/qwen15-hf" --workers 16 || return 1
    rm -f "$S/model.gguf"
  fi
  (cd "$S/repo" && python3 benchmarks/longctx/run_all.py --model "$S/qwen15-hf" \
     --out-dir "$S/out/run" --trials-only) || return 1
}

start() {
  local seconds=$1; shift
  prepare || return 1
  (cd "$S/repo" && setsid nohup python3 benchmarks/longctx/run_all.py --model "$S/qwen15-hf" \
     --out-dir "$S/out/run" --deadline-s "$seconds" "$@" > "$S/out/run_all.log" 2>&1 < /dev/null &)
  echo "run started for $seconds s"
}

sim() {
  local seconds=$1; shift
  (cd "$S/repo" && setsid nohup timeout "$seconds" python3 benchmarks/longctx/sim_run.py \
     --model-dir "$S/qwen15-hf" --trials "$S/out/run/trials.jsonl" --out-dir "$S/out/sim" "$@" \
     > "$S/out/sim.log" 2>&1 < /dev/null &)
  echo "sim started for $seconds s"
}

sm80() {
  (cd "$S/repo" && setsid nohup python3 benchmarks/sm80_path.py --wheel "$S"/extra/mikv_vllm-*.whl \
     --model "$S/qwen15-hf" --probe-trials "$S/out/run/trials.jsonl" --out "$S/out/sm80" "$@" \
     >> "$S/out/sm80.log" 2>&1 < /dev/null &)
  echo "sm80 path started"
}

poll() {
  local until=$((SECONDS + $1))
  while [ $SECONDS -lt $until ] && pgrep -f "longctx/(run_all|sim_run)|sm80_path" >/dev/null; do sleep 5; done
  tail -n 4 "$S/out/kernels.log" 2>/dev/null
  tail -n 20 "$S/out/run_all.log" 2>/dev/null
  grep -h "longctx:" "$S"/out/run/log_*.txt 2>/dev/null | tail -n 12
  tail -n 2 "$S/out/sim.log" 2>/dev/null
  grep -h -E "^ \"(tests_|token_match|forced_|verify_)" "$S/out/sm80/sm80_path.json" 2>/dev/null
}

collect() {
  (cd "$S/repo" && python3 benchmarks/longctx/report.py "$S/out/run" $(ls -d "$S/out/sim" 2>/dev/null) \
     > "$S/out/report.txt" 2>&1)
  cp "$S/out/run/longctx.json" "$S/out/run/longctx.png" "$S/out/report.txt" \
     "$S/out/sm80/sm80_path.json" "$OUT/" 2>/dev/null
  tar -czf "$OUT/longctx_run.tar.gz" -C "$S/out" --exclude=run/trials.jsonl --exclude=sm80/tree .
  ls -la "$OUT"
}

"$@"
