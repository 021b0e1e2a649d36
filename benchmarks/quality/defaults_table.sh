#!/bin/bash
# The 25%-budget rows of the quality table at the plugin's default policy (sink 1 page, recent 4
# pages, importance from the sampled layers): two single-thread jobs side by side (~40 min on 2
# cores), merged into quality_defaults.json/png.
cd "$(dirname "$0")/../.."
R=benchmarks/results
M="bf16 fp8 kivi2 h2o@0.25 mikv@0.25 mikv_fp8hi@0.25"
( python benchmarks/quality/run.py --task perplexity --windows 12 --window 1024 --prefill 64 --chunk 32 \
    --recent-pages 4 --methods $M --out $R/quality_defaults_ppl.json > /tmp/quality_defaults_ppl.log 2>&1 ) &
( python benchmarks/quality/run.py --task line_retrieval --model Qwen2.5-Coder-0.5B-Instruct \
    --sizes 60 --trials 25 --recent-pages 4 --methods $M \
    --out $R/quality_defaults_retrieval.json > /tmp/quality_defaults_retrieval.log 2>&1 ) &
wait
python benchmarks/quality/plot.py --merge $R/quality_defaults.json $R/quality_defaults_ppl.json \
    $R/quality_defaults_retrieval.json
echo ALL DONE
