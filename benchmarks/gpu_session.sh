#!/usr/bin/env bash
# The GPU pass of mikv-vllm, meant for one device call (after vLLM's runtime is unpacked to
# /tmp/site, see ../shared/gpu/README.md). Logs and JSON land in $OUT.
#
#   bash benchmarks/gpu_session.sh [stage ...]
#
# setup   records the device and versions, installs the plugin (a wheel carried in .whl/, or an
#         editable build), assembles the carried SmolLM2 GGUF (.models/parts/) if present
# kernels GPU tests of the CUDA kernels against the torch reference; if they fail and
#         .whl_fallback/ holds a last-known-good wheel, later stages use that one
# kernelbench  decode kernel timings vs FlashAttention bf16/fp8 (benchmarks/kernel_decode.py)
# abkernels    kernels + kernelbench again with the extension of the wheel in .whl_ab/
# soab    kernelbench's mikv rows (no vLLM needed) with each extension carried in .so_ab/
# profile Nsight Compute on the decode kernel at issue 3's row (text in $OUT/ncu/)
# serve   `vllm serve --kv-cache-dtype mikv` with SmolLM2 answering OpenAI requests
# e2e     auto / fp8 / mikv side by side on dummy Llama-3.1-8B (E2E_ARGS); e2e_a / e2e_b: issue
#         4's workloads a and b for every kv dtype (e2e_b_tiers: b with lo_bits [4, 2]);
#         e2e_decode_heavy: issue 21's decode-heavy mix in a fixed pool; e2e_allhi: a batch
#         that fits auto's pool, nothing demoted (profile_allhi: the same, then a profiled
#         run per engine; profile_decode_heavy: 20 steps of decode-heavy's steady state per
#         engine); demote: demotion forced on (dummy weights);
#         greedy: demotion forced on with SmolLM2 on real text vs auto; verify: the same, short,
#         with the worker's demotion self-check on; sweep: arrival rates through `vllm serve`
#         (e2e_serve_sweep.py); sweep_goodput: the decode-heavy mix served at rising rates,
#         goodput inside latency objectives; tp2: forced demotion at TP 2, with verify; tp_ray:
#         the same through vLLM's Ray executor at TP_SIZE (1 on one GPU); both leave tp.json
#         rows in $OUT/tp_rows_*.json (benchmarks/tp_rows.py); tp_throughput: issue 23's
#         auto / fp8 / mikv at TP 2 on dummy Llama-3.1-70B (two GPUs)
# soak    issue 25's soak through `vllm serve` (benchmarks/soak.py); sanitizer: compute-sanitizer
#         over the kernel tests; nodebuild: the extension built on this machine, then tested
# sm80    the A100 route on this GPU (benchmarks/sm80_path.py): the extension of the 8.0+PTX
#         wheel in .whl_sm80/, vLLM pinned to FlashAttention 2; SM80_MODEL: a real HF model dir
#
# Getting the vLLM runtime, wheels and model pieces onto the offline GPU machine:
# benchmarks/results/CARRYING.md.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 MIKV_RESULTS_DIR=$OUT
GGUF=/tmp/models/smollm2.gguf   # SmolLM2-135M-Instruct Q4_1, Q/K rows in HF order (see .models/)
TOK=/tmp/models/tok
log() { echo "== $(date +%T) $*" | tee -a "$OUT/session.log"; }
gpu_name() { nvidia-smi --query-gpu=name --format=csv,noheader | head -1; }

stage_setup() {
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv
    python3 -c "import sys, torch, vllm; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'vllm', vllm.__version__)"
  } 2>&1 | tee "$OUT/device.txt"
  if [ -L /tmp/site/mikv_vllm ] && ls mikv_vllm/_C*.so >/dev/null 2>&1; then
    echo "mikv-vllm already installed on this machine"
  elif ls .whl/mikv_vllm-*.whl >/dev/null 2>&1; then
    # The carried wheel gives the entry point and the compiled kernels; the code itself runs
    # from this working tree (one copy for every vLLM process).
    python3 -m pip install -q --no-deps --no-index --upgrade --target /tmp/site .whl/mikv_vllm-*.whl
    cp /tmp/site/mikv_vllm/_C*.so mikv_vllm/
    rm -rf /tmp/site/mikv_vllm && ln -s "$PWD/mikv_vllm" /tmp/site/mikv_vllm
  else
    MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e .
  fi
  python3 -c "from mikv_vllm import ops; ops.load_kernels(); print('mikv kernels loaded')" 2>&1 | tee -a "$OUT/device.txt"
  mkdir -p /tmp/models
  # vLLM 0.26 loads GGUF through the vllm-gguf-plugin package (+ gguf), carried as wheels.
  if ls .models/parts/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index --upgrade --target /tmp/site .models/parts/*.whl
  fi
  if [ -f .models/parts/tok.tar.gz ]; then tar -xzf .models/parts/tok.tar.gz -C /tmp/models; fi
  if [ ! -f "$GGUF" ] && [ "$(ls /tmp/models/gguf.part_* 2>/dev/null | wc -l)" -ge "${GGUF_PARTS:-4}" ]; then
    cat /tmp/models/gguf.part_* > "$GGUF" && sha256sum "$GGUF" | tee -a "$OUT/device.txt"
  fi
}

# Put the compiled kernels of the wheel carried in folder $1 (.whl_fallback, .whl_ab, ...) into
# mikv_vllm/, where every later import loads them from.
use_wheel_so() {
  python3 -m pip install -q --no-deps --no-index --upgrade --target "/tmp/so$1" "$1"/mikv_vllm-*.whl
  cp "/tmp/so$1"/mikv_vllm/_C*.so mikv_vllm/
}

stage_kernels() {
  python3 -m pytest -q -p no:cacheprovider tests/gpu/test_decode_kernel.py tests/gpu/test_lo_pages.py tests/gpu/test_page_mass.py tests/gpu/test_split_decode.py 2>&1 | tee "$OUT/kernels.log" | tail -15
  if [ "${PIPESTATUS[0]}" != 0 ] && ls .whl_fallback/mikv_vllm-*.whl >/dev/null 2>&1; then
    # A kernel change that fails its tests must not measure anything: back to the carried
    # last-known-good build (same op schemas) for the stages that follow.
    log "kernel tests failed: using .whl_fallback for the rest of this session"
    use_wheel_so .whl_fallback
  fi
}

stage_serve() {
  [ -f "$GGUF" ] || { log "no SmolLM2 GGUF assembled: serve stage skipped"; return; }
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MIKV_SERVE_MODEL=$GGUF MIKV_SERVE_TOKENIZER=$TOK \
    python3 -m pytest -q -p no:cacheprovider tests/gpu/test_serve.py 2>&1 | tee "$OUT/serve_tests.log" | tail -15
}

stage_kernelbench() {
  python3 benchmarks/kernel_decode.py --out-dir "$OUT" ${KERNELBENCH_ARGS:-} 2>&1 | tee "$OUT/kernel_decode.log" | tail -20
}

# A/B of a kernel-only change: the kernel tests and kernelbench again with the extension of a
# wheel carried in .whl_ab/ (same Python code, other csrc/), results in $OUT/ab/; the installed
# build is put back afterwards.
stage_abkernels() {
  ls .whl_ab/mikv_vllm-*.whl >/dev/null 2>&1 || { log "no .whl_ab: abkernels skipped"; return; }
  local so; so=$(ls mikv_vllm/_C*.so); cp "$so" /tmp/installed.so
  use_wheel_so .whl_ab
  mkdir -p "$OUT/ab"
  OUT=$OUT/ab stage_kernels
  OUT=$OUT/ab stage_kernelbench
  cp /tmp/installed.so "$so"
}

# Nsight Compute on the fused decode kernel at the issue's row (32K, batch 16, GQA 4), all lo
# pages and 10% hi (PROFILE_HI): speed of light, pipe use, warp stalls, and the SASS with its
# stall samples, as text in $OUT/ncu/ (the reports themselves stay in /tmp: too big to bring
# back). Needs no vLLM (kernel_decode.py --no-flash); without setup, export PYTHONPATH=$PWD.
stage_profile() {
  local ncu; ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
  [ -n "$ncu" ] || { log "no ncu: profile skipped"; return; }
  mkdir -p "$OUT/ncu" /tmp/ncu-bench
  for hi in ${PROFILE_HI:-0.0 0.1}; do
    "$ncu" --clock-control none --kernel-name regex:paged_decode_kernel --launch-skip 20 \
      --launch-count 1 --set full --import-source no -f -o "/tmp/ncu-bench/hi$hi" \
      python3 benchmarks/kernel_decode.py --batches 16 --ctxs 32768 --hi-fractions "$hi" \
      --gqa 4 --no-flash --no-split --no-mass --out-dir /tmp/ncu-bench > "$OUT/ncu/hi$hi.run.log" 2>&1
    local rep=/tmp/ncu-bench/hi$hi.ncu-rep
    "$ncu" -i "$rep" --page details > "$OUT/ncu/hi$hi.details.txt" 2>&1
    "$ncu" -i "$rep" --page raw --csv 2>&1 | gzip > "$OUT/ncu/hi$hi.raw.csv.gz"
    "$ncu" -i "$rep" --page source --csv --print-source sass 2>&1 | gzip > "$OUT/ncu/hi$hi.sass.csv.gz"
    grep -E "^ +(Duration|DRAM Throughput|Issue Slots Busy) " "$OUT/ncu/hi$hi.details.txt"
  done
}

# A kernel-only A/B with no vLLM: the mikv rows of kernel_decode.py (--no-flash) with each
# extension carried in .so_ab/ in turn (NAME.so: a stripped _C.abi3.so, e.g. linked with another
# build of one csrc/ file; NAME.args, if there, adds kernel_decode.py arguments), results in
# $OUT/so_NAME/; the kernel tests run first with the ones SOAB_TEST names. Without setup,
# export PYTHONPATH=$PWD.
stage_soab() {
  local f name so; so=$(ls mikv_vllm/_C*.so 2>/dev/null | head -1)
  [ -n "$so" ] && cp "$so" /tmp/installed.so
  for f in .so_ab/*.so; do
    name=$(basename "$f" .so)
    cp "$f" mikv_vllm/_C.abi3.so
    mkdir -p "$OUT/so_$name"
    if [[ " ${SOAB_TEST:-} " == *" $name "* ]]; then
      python3 -m pytest --noconftest -q -p no:cacheprovider tests/gpu/test_decode_kernel.py \
        tests/gpu/test_lo_pages.py tests/gpu/test_page_mass.py > "$OUT/so_$name/kernels.log" 2>&1
      echo "$name: $(tail -1 "$OUT/so_$name/kernels.log")"
    fi
    python3 benchmarks/kernel_decode.py --no-flash --no-split --out-dir "$OUT/so_$name" \
      ${KERNELBENCH_ARGS:-} $(cat ".so_ab/$name.args" 2>/dev/null) > "$OUT/so_$name/kernel_decode.log" 2>&1
    echo "$name: $(tail -1 "$OUT/so_$name/kernel_decode.log" | cut -c1-200)"
  done
  if [ -n "$so" ]; then cp /tmp/installed.so "$so"; else rm -f mikv_vllm/_C.abi3.so; fi
}

stage_e2e() {
  python3 benchmarks/e2e_compare.py --out-dir "$OUT" ${E2E_ARGS:-} 2>&1 | tee -a "$OUT/e2e.log" | tail -30
}

KV_ALL="auto fp8 int4_per_token_head mikv"
# mikv knobs of the forced-demotion stages (demote, greedy, verify, tp2); e.g.
# FORCED_KNOBS='{"hi_budget":0.1,"split_decode":true}'
FORCED_KNOBS=${FORCED_KNOBS:-'{"hi_budget":0.1}'}
# (a) 256 x (2048 + 256), issue 4's workload a, every kv dtype.
stage_e2e_a() {
  E2E_ARGS="--kv ${E2E_A_KV:-$KV_ALL} --tag a --timeout ${E2E_A_TIMEOUT:-280} ${E2E_A_ARGS:-}" stage_e2e
}
# (b) long prompts: N x (32K + 512); N=64 in the issue, fewer where the call's 10 minutes end.
stage_e2e_b() {
  E2E_ARGS="--kv ${E2E_B_KV:-$KV_ALL} --tag b --num-prompts ${E2E_B_N:-64} --input-len 32768 --output-len 512 --max-model-len 33344 --probe-prompts 0 --timeout ${E2E_B_TIMEOUT:-280} ${E2E_B_ARGS:-}" stage_e2e
}

# decode-heavy (issue 21): 128 x (6144 + 1536) in a fixed 24 GiB KV pool, about a fifth of the
# batch with every page hi (Llama-3.1-8B: 128 KiB a token in bf16), every dtype in that pool.
stage_e2e_decode_heavy() {
  E2E_ARGS="--kv ${E2E_DH_KV:-auto fp8 int4_per_token_head mikv} --tag decode_heavy --workload decode-heavy --num-prompts ${E2E_DH_N:-128} --input-len 6144 --output-len 1536 --max-model-len 8192 --kv-cache-memory-bytes ${E2E_DH_BYTES:-25769803776} --probe-prompts 0 --timeout ${E2E_DH_TIMEOUT:-280} ${E2E_DH_ARGS:-}" stage_e2e
}

# Nothing demoted (issue 21's "no cost while nothing is demoted"): 128 x (2048 + 256) fits
# auto's pool at the default gpu util, so mikv keeps every page hi; greedy tokens against auto.
stage_e2e_allhi() {
  E2E_ARGS="--kv ${E2E_ALLHI_KV:-auto mikv} --tag allhi --num-prompts 128 --input-len 2048 --output-len 256 --timeout ${E2E_ALLHI_TIMEOUT:-240} ${E2E_ALLHI_ARGS:-}" stage_e2e
}

# Where the time goes with nothing demoted: e2e_allhi, then per engine PROFILE_PROMPTS (32) new
# prompts under vLLM's torch profiler; each engine's table of CUDA time per kernel lands in
# $OUT/profile_<kv>_allhi_profile/profiler_out_0.txt (the traces go to /tmp/traces: too big).
stage_profile_allhi() {
  E2E_ALLHI_ARGS="--tag allhi_profile --profile-prompts ${PROFILE_PROMPTS:-32} ${PROFILE_ALLHI_ARGS:-}" stage_e2e_allhi
  stash_traces
}
# The profiled runs' traces out of $OUT (too big to bring back), their tables left in it.
stash_traces() {
  mkdir -p /tmp/traces
  find "$OUT" -path "$OUT/profile_*" -name "*.json*" -exec mv {} /tmp/traces/ \;
}

# Where the decode-heavy step's time goes: e2e_decode_heavy (fp8 and mikv), then per engine the
# whole batch again with PROFILE_DH_WINDOW (900 20) engine steps traced: 20 steps, 900 into the
# run, when mikv's batch is mostly 2-bit; tables as in profile_allhi.
stage_profile_decode_heavy() {
  E2E_DH_KV=${E2E_DH_KV:-fp8 mikv} E2E_DH_TIMEOUT=${E2E_DH_TIMEOUT:-480} \
    E2E_DH_ARGS="--tag decode_heavy_profile --profile-prompts ${E2E_DH_N:-128} --profile-window ${PROFILE_DH_WINDOW:-900 20} ${PROFILE_DH_ARGS:-}" stage_e2e_decode_heavy
  stash_traces
}

# Workload b with two lo tiers (lo_bits [4, 2]), tagged b_tiers: beside e2e_b's one-tier mikv.
stage_e2e_b_tiers() {
  E2E_B_KV=mikv E2E_B_ARGS="${E2E_B_ARGS:-} --tag b_tiers --mikv-knobs {\"lo_bits\":[4,2]}" stage_e2e_b
}
# Demotion forced on (tiny hi budget): every request completes; greedy tokens vs auto.
stage_demote() {
  E2E_ARGS="--kv auto mikv --tag forced --num-prompts 64 --input-len 2048 --output-len 128 --mikv-knobs $FORCED_KNOBS --timeout 200" stage_e2e
}
# Real model, demotion forced on: SmolLM2 greedy continuations of 16 Wikipedia prompts (1536
# tokens each, from .models/parts/probe_wiki.json) under mikv with hi_budget 0.1 vs auto.
# GREEDY_KV / GREEDY_TAG run another knob set beside an earlier one (each run's e2e_<kv>_<tag>.json
# keeps its probe tokens, for a token match between two mikv runs).
stage_greedy() {
  [ -f "$GGUF" ] || { log "no SmolLM2 GGUF assembled: greedy stage skipped"; return; }
  E2E_ARGS="--model $GGUF --tokenizer $TOK --load-format auto --dtype bfloat16 --kv ${GREEDY_KV:-auto mikv} --tag ${GREEDY_TAG:-smollm2_forced} --num-prompts 0 --probe-prompts 16 --probe-tokens 128 --probe-file .models/parts/probe_wiki.json --max-model-len 2048 --mikv-knobs $FORCED_KNOBS" stage_e2e
}

# The same with MIKV_VERIFY_DEMOTIONS=1 (mikv_vllm/verify.py): the worker checks each demoted
# page's pack slot against its source and, on later steps, that slots and table entries stayed
# put (GPU syncs every step: a debugging run, not a measurement). Look for "mikv verify" lines.
stage_verify() {
  [ -f "$GGUF" ] || { log "no SmolLM2 GGUF assembled: verify stage skipped"; return; }
  MIKV_VERIFY_DEMOTIONS=1 E2E_ARGS="--model $GGUF --tokenizer $TOK --load-format auto --dtype bfloat16 --kv auto mikv --tag smollm2_verify --num-prompts 0 --probe-prompts 4 --probe-tokens 32 --probe-file .models/parts/probe_wiki.json --max-model-len 2048 --mikv-knobs $FORCED_KNOBS" stage_e2e
  grep -h "mikv verify" "$OUT"/e2e_mikv_smollm2_verify.log | head -40 | tee "$OUT/verify.log"
}

# Tensor parallelism at TP size $1 through executor $2 (vLLM's default where empty): demotion
# forced on, every rank checking its own packs (MIKV_VERIFY_DEMOTIONS=1), greedy tokens vs auto
# at the same TP size.
forced_tp() {
  local name="tp$1${2:+_$2}"
  MIKV_VERIFY_DEMOTIONS=1 E2E_ARGS="--kv auto mikv --tag ${name}_forced --tensor-parallel-size $1 ${2:+--distributed-executor-backend $2} --num-prompts 64 --input-len 2048 --output-len 128 --mikv-knobs $FORCED_KNOBS --timeout 300" stage_e2e
  grep -h "mikv verify" "$OUT/e2e_mikv_${name}_forced.log" | head -20 | tee "$OUT/verify_$name.log"
  python3 benchmarks/tp_rows.py "$OUT" "${name}_forced" --tp "$1" --executor "${2:-mp}" \
    --device "$(gpu_name)" | tee "$OUT/tp_rows_$name.json"
}
# 2 GPUs, e.g. nvidia-h200-x2.
stage_tp2() { forced_tp 2; }
# vLLM's Ray executor (issue 23) at TP_SIZE (1 where one GPU is lent: the Ray worker path, its
# collective RPCs and the plugin's registration in Ray's processes). Needs ray in the vLLM
# runtime (build_vllm_bundle.sh with EXTRA_PKGS, results/CARRYING.md).
stage_tp_ray() { forced_tp "${TP_SIZE:-1}" ray; }

# Issue 23's throughput at TP_SIZE (2) through TP_EXECUTOR (ray): auto, fp8 and mikv on a
# model that needs two GPUs (dummy Llama-3.1-70B weights, 141 GB in bf16), a long-context mix
# like (b), 32 x (16K + 512); each engine's greedy probe (run first, nothing demoted) against
# auto's. Rows for tp.json in $OUT/tp_rows_throughput.json. Half the weights (70.5 GB) leave
# an H200 ~50 GB of KV at TP 2; 80 GB cards need TP_SIZE=4.
stage_tp_throughput() {
  local tp=${TP_SIZE:-2} ex=${TP_EXECUTOR:-ray}
  local tag="tp${tp}_${ex}_throughput"
  E2E_ARGS="--kv ${TP_KV:-auto fp8 mikv} --tag $tag --model benchmarks/configs/llama-3.1-70b --tensor-parallel-size $tp --distributed-executor-backend $ex --num-prompts 32 --input-len 16384 --output-len 512 --max-model-len 17408 --timeout ${TP_TIMEOUT:-420} ${TP_ARGS:-}" stage_e2e
  python3 benchmarks/tp_rows.py "$OUT" "$tag" --tp "$tp" --executor "$ex" \
    --device "$(gpu_name)" | tee "$OUT/tp_rows_throughput.json"
}

# (c) arrival-rate sweep through vllm serve (needs the SmolLM2 tokenizer from .models/parts).
stage_sweep() {
  python3 benchmarks/e2e_serve_sweep.py --tokenizer "$TOK" --out-dir "$OUT" ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep.log" | tail -30
}

# Goodput (issue 21): the decode-heavy mix served at rising arrival rates, every dtype in the
# same 24 GiB KV pool, requests per second inside e2e_serve_sweep.py's --slo
# (benchmarks/goodput_table.py turns $OUT/e2e_serve_summary.json into the README's table).
stage_sweep_goodput() {
  SWEEP_ARGS="--kv ${GOODPUT_KV:-auto fp8 mikv} --rates ${GOODPUT_RATES:-2 4 8} --num-prompts 128 --input-len 4096 --output-len 1024 --kv-cache-memory-bytes 25769803776 --bench-timeout 300 ${GOODPUT_ARGS:-}" stage_sweep
  python3 benchmarks/goodput_table.py "$OUT/e2e_serve_summary.json" | tee "$OUT/goodput.md"
}

stage_sm80() {
  if [ -z "${SM80_MODEL:-}" ] || ! ls .whl_sm80/mikv_vllm-*.whl >/dev/null 2>&1; then
    log "sm80 needs SM80_MODEL and a wheel in .whl_sm80/: skipped"; return
  fi
  python3 benchmarks/sm80_path.py --wheel .whl_sm80/mikv_vllm-*.whl --model "$SM80_MODEL" \
    --out "$OUT/sm80" ${SM80_ARGS:-} 2>&1 | tail -40
}

# Issue 25's soak (benchmarks/soak.py): `vllm serve --kv-cache-dtype mikv` with dummy
# Qwen2.5-Coder-1.5B weights and its tokenizer (SOAK_TOK, a tar of tok/), the KV pool under
# pressure. SOAK_RUNS: NAME:SECONDS[:verify] runs, one server each; $OUT/soak.json sums them (with
# $OUT/sanitizer.json's counts when the sanitizer stage ran first). A verify run checks every live
# demoted page on every step (GPU syncs), so it runs with SOAK_VERIFY_CLIENTS (8) clients, in a
# pool of SOAK_VERIFY_KV_BYTES (300 MB, ~10K tokens) that they still overfill.
stage_soak() {
  local model=/tmp/models/qwen15-dummy run name secs verify files=()
  mkdir -p "$model"
  [ -f "$model/tokenizer.json" ] || tar -xzf "${SOAK_TOK:-.models/qwen15/extra/tok.tar.gz}" \
    --strip-components=1 -C "$model"
  cp benchmarks/configs/qwen2.5-coder-1.5b/config.json "$model/"
  for run in ${SOAK_RUNS:-main:480 verify:300:verify}; do
    IFS=: read -r name secs verify <<< "$run"
    python3 benchmarks/soak.py --model "$model" --name "$name" --duration "$secs" \
      --out-dir "$OUT" ${verify:+--verify --concurrency ${SOAK_VERIFY_CLIENTS:-8} \
      --kv-cache-memory-bytes ${SOAK_VERIFY_KV_BYTES:-300000000}} \
      ${SOAK_ARGS:-} 2>&1 | tail -3
    files+=("$OUT/soak_$name.json")
  done
  python3 benchmarks/soak.py --merge "${files[@]}" --out "$OUT/soak.json" \
    --extra "$(cat "$OUT/sanitizer.json" 2>/dev/null || echo '{}')"
}

# compute-sanitizer over the kernel tests: memcheck on every kernel test file (torch's caching
# allocator off, so that an overrun leaves its allocation; graph capture needs that allocator, so
# the capture test is left out), racecheck and synccheck on the decode and quantize kernels
# (without the test that runs vLLM's FlashAttention 3 as a reference: cutlass's warp-specialized
# kernels trip both tools, 2026-12-06-h100-soak-and-sanitizer/). Counts in $OUT/sanitizer.json.
stage_sanitizer() {
  local cs f tool files="tests/gpu/test_decode_kernel.py tests/gpu/test_lo_pages.py tests/gpu/test_page_mass.py tests/gpu/test_split_decode.py"
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  [ -n "$cs" ] || { log "no compute-sanitizer: sanitizer stage skipped"; return; }
  mkdir -p "$OUT/sanitizer"
  for f in $files; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SAN_TIMEOUT:-600}" "$cs" --tool memcheck \
      --print-limit 20 python3 -m pytest -q -p no:cacheprovider "$f" -k "not graph_capture" \
      > "$OUT/sanitizer/memcheck_$(basename "$f" .py).log" 2>&1
  done
  for tool in racecheck synccheck; do
    for f in tests/gpu/test_decode_kernel.py tests/gpu/test_lo_pages.py; do
      timeout "${SAN_TIMEOUT:-600}" "$cs" --tool "$tool" --print-limit 20 \
        python3 -m pytest -q -p no:cacheprovider "$f" \
        -k "${SAN_K:-not long_context and not flash_attention}" \
        > "$OUT/sanitizer/${tool}_$(basename "$f" .py).log" 2>&1
    done
  done
  python3 - "$OUT" <<'PY'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
runs = {}
for log in sorted((out / "sanitizer").glob("*.log")):
    text = log.read_text(errors="replace")
    errors = re.findall(r"(?:ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: \d+ hazards? "
                        r"displayed \((\d+) error)", text)
    errors = [int(a or b) for a, b in errors]
    tests = re.findall(r"^=* ?(\d+ passed.*?)=*$", text, re.M)
    runs[log.stem] = {"errors": errors[-1] if errors else None,
                      "tests": tests[-1].strip() if tests else None}
done = [r["errors"] for r in runs.values() if r["errors"] is not None]
summary = {"sanitizer_errors": sum(done), "sanitizer_runs_finished": len(done),
           "sanitizer_runs": runs}
(out / "sanitizer.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
PY
}

# The extension built on this machine as a GPU node (or the docker image) builds it, and its
# kernels tested in fresh processes (tests/gpu/test_node_build.py).
stage_nodebuild() {
  MIKV_NODE_BUILD=1 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_node_build.py 2>&1 \
    | tee "$OUT/nodebuild.log" | tail -60
}

for s in ${*:-setup kernels serve e2e}; do
  log "stage $s"
  "stage_$s"
done
log "done"
