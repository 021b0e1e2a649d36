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
#         4's workloads a and b for every kv dtype; demote: demotion forced on (dummy weights);
#         greedy: demotion forced on with SmolLM2 on real text vs auto; verify: the same, short,
#         with the worker's demotion self-check on; sweep: arrival rates through `vllm serve`
#         (e2e_serve_sweep.py); tp2: forced demotion at tensor parallel size 2, with verify
#
# Carrying everything to a bare device machine (64 MiB per call, 30 s warm between calls), one
# device call per line, back to back (vLLM parts: ../shared/gpu/build_vllm_bundle.sh; SmolLM2
# pieces, tokenizer, wheels and probe_wiki.json: benchmarks/models/prepare_smollm2.py). The
# sequence of the second lease on 2026-11-23 (27 device minutes; SmolLM2 pieces ride along with
# the long calls; a wheel is ~8.5 MiB, so .bundle0 takes one wheel only):
#   1. carry .bundle0, .whl:   bash .bundle0/unpack.sh 2; cp -r .whl /tmp/stash/
#   2. carry .bundle1, gguf.part_a, tok.tar.gz, probe_wiki.json and the 4 *.whl of
#      .models/parts (8 paths): bash .bundle1/unpack.sh 2; cp gguf.part_a to /tmp/models;
#      restore .whl from /tmp/stash if it is gone; this script: setup kernels kernelbench
#      (~2 min with KERNELBENCH_ARGS="--batches 16 64 --ctxs 32768 131072")
#   3. carry gguf.part_b, gguf.part_d (+ .whl_ab for abkernels) (cp parts to /tmp/models):
#      E2E_B_KV="auto mikv" E2E_B_N=64 this script: e2e_b                      (~7.5 min)
#   4. carry gguf.part_c (cp to /tmp/models): this script: setup greedy verify serve (~9 min;
#      setup assembles the GGUF once the 4 parts are there)
#   5. E2E_B_KV=fp8 E2E_B_N=64 this script: e2e_b                               (~3.5 min)
#   2026-12-02 (H200): .bundle1 (44 MB) + gguf.part_a + the other 7 pieces is over 64 MiB:
#   leave gguf.part_a for a later call. One `sweep` call holds about two kv dtypes (a server
#   starts in ~3 min): SWEEP_ARGS="--kv auto fp8 --rates 4 16 inf --num-prompts 128
#   --gpu-util 0.35", then --kv mikv in the next call (benchmarks/results/2026-12-02-h200/).
#   Second lease of 2026-12-02 (benchmarks/results/2026-12-02-h200-staged/): wheels built for
#   sm90 only (TORCH_CUDA_ARCH_LIST=9.0: half the size and build time), one riding with
#   .bundle0 and, for an A/B, another with .bundle1.
#   Third (benchmarks/results/2026-12-02-h200-lease3/, 4 calls, 23 device minutes): .bundle0 +
#   .whl; .bundle1 + .whl_ab + tok.tar.gz + probe_wiki.json: setup kernels kernelbench
#   abkernels; gguf.part_a/b/d + the 4 wheels of .models/parts: setup sweep; gguf.part_c: setup
#   greedy (GREEDY_KV / GREEDY_TAG for a second knob set). A kernel-only A/B needs no vLLM: one
#   call carrying two wheels, the GPU kernel tests and `kernel_decode.py --no-flash` with each
#   wheel's _C.so in turn (one output folder per run: names must not prefix each other).
#   Fourth (benchmarks/results/2026-12-02-h200-lease4/, 4 calls, 23 device minutes): .bundle0
#   + .whl; .bundle1 + .whl_ab + tok.tar.gz + probe_wiki.json: setup kernels kernelbench
#   abkernels (~4.7 min); then E2E_B_KV="fp8 mikv" E2E_B_N=64 ... setup e2e_b (~7.3 min) and
#   E2E_B_KV="auto int4_per_token_head" (~8.7 min; int4 did not finish its prefill in 280 s).
#   The last 7 minutes (a fresh lease: .bundle0 + .whl, then .bundle1): E2E_B_KV=mikv
#   E2E_B_ARGS='--block-size 32 --mikv-knobs {"hi_dtype":"fp8"}' ... setup e2e_b (~4.4 min).
#   Sixth (benchmarks/results/2026-12-02-h200-lease6/): the sweep again with its own prompts per
#   rate (e2e_serve_sweep.py --seed: until then every rate replayed the same prompts and fp8's
#   large pool answered the unbounded rate from its prefix cache), then (a): .bundle0 + .whl;
#   .bundle1 + tok.tar.gz: setup sweep (--kv auto fp8); setup sweep (--kv mikv
#   int4_per_token_head); E2E_A_KV="..." E2E_A_ARGS="--gpu-util U" setup e2e_a, twice. On an
#   H200, gpu util 0.35 for (c) and 0.51 for (a) give the H100's pools at 0.62 and 0.9.
#   A second, short lease: .bundle0 + .whl, then .bundle1: E2E_A_KV=mikv E2E_A_ARGS='--gpu-util
#   0.51 --probe-prompts 0 --mikv-knobs {"hi_budget":0.25}' setup e2e_a (~2 min).
#   Eighth (benchmarks/results/2026-12-03-h200-lease8/): .bundle0 + .whl + .whl_ab (the .so's
#   stripped: two wheels then fit beside .bundle0): nfab, then profile with each .so; .bundle1 +
#   .ab (an older impl.py to A/B) + tok.tar.gz: setup kernels e2e_a (x3); profile + e2e_b at
#   gpu util 0.51 (fp8, then mikv fp8 hi block 32); e2e_b mikv. (nfab, the wheel A/B of that
#   lease, is now soab.)
#   Ninth (benchmarks/results/2026-12-03-h200-lease9/): kernel A/Bs with no vLLM at all: carry
#   .so_ab/ (six stripped _C.abi3.so, ~4.4 MB each, each linked with another build of
#   paged_decode.o): SOAB_TEST="..." KERNELBENCH_ARGS="..." soab, writing to a scratch OUT
#   tarred into the real one (~2.5 min for six builds and two test runs).
#   Tenth (benchmarks/results/2026-12-03-h200-lease10/, 5 calls, 28.6 device minutes):
#   .bundle0 + .whl; .bundle1 + tok.tar.gz: setup kernels kernelbench e2e_a (mikv; ~6 min);
#   e2e_a (fp8 auto int4_per_token_head; ~5.7 min); e2e_b (fp8 mikv; ~6.6 min); e2e_b (auto
#   mikv; ~6.4 min), all at --gpu-util 0.51. A lent machine may still hold /tmp folders of an
#   earlier lease: `rm -rf` the scratch OUT before using it, or tell files apart by their times.
#   Next lease: e2e_a / e2e_b mikv with the scheduler changes after lease 10 (b's decode tail,
#   a's preemption); the sweep with a hi budget; tp2 on nvidia-h200-x2 (not lent so far).
#   Many output files: write to a scratch OUT and tar it into the real $OUT (the device tool
#   brings back a limited number of files per call). Carried paths stayed in the working tree
#   for the later calls of the same lease, but stash what a later call needs in /tmp anyway.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 MIKV_RESULTS_DIR=$OUT
GGUF=/tmp/models/smollm2.gguf   # SmolLM2-135M-Instruct Q4_1, Q/K rows in HF order (see .models/)
TOK=/tmp/models/tok
log() { echo "== $(date +%T) $*" | tee -a "$OUT/session.log"; }

stage_setup() {
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv
    python3 -c "import sys, torch, vllm; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'vllm', vllm.__version__)"
  } 2>&1 | tee "$OUT/device.txt"
  if [ -L /tmp/site/mikv_vllm ] && ls mikv_vllm/_C*.so >/dev/null 2>&1; then
    echo "mikv-vllm already installed in this lease"
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

# Tensor parallelism (2 GPUs, e.g. nvidia-h200-x2): demotion forced on, every rank checking its
# own packs (MIKV_VERIFY_DEMOTIONS=1), greedy tokens vs auto at the same TP size.
stage_tp2() {
  MIKV_VERIFY_DEMOTIONS=1 E2E_ARGS="--kv auto mikv --tag tp2_forced --tensor-parallel-size 2 --num-prompts 64 --input-len 2048 --output-len 128 --mikv-knobs $FORCED_KNOBS --timeout 300" stage_e2e
  grep -h "mikv verify" "$OUT"/e2e_mikv_tp2_forced.log | head -20 | tee "$OUT/verify_tp2.log"
}

# (c) arrival-rate sweep through vllm serve (needs the SmolLM2 tokenizer from .models/parts).
stage_sweep() {
  python3 benchmarks/e2e_serve_sweep.py --tokenizer "$TOK" --out-dir "$OUT" ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep.log" | tail -30
}

for s in ${*:-setup kernels serve e2e}; do
  log "stage $s"
  "stage_$s"
done
log "done"
