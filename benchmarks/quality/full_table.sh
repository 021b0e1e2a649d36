#!/bin/bash
# The full quality table (benchmarks/results/quality*.json): two single-thread jobs side by
# side (about an hour on 2 cores), merged into quality.json/png every 2 minutes. The table was
# made with a 2-page recent window (the plugin's default is 4 since).
cd "$(dirname "$0")/../.."
R=benchmarks/results
merge() { python benchmarks/quality/plot.py --merge $R/quality.json $R/quality_smollm2_ppl.json $R/quality_qwen05_retrieval.json; }
( python benchmarks/quality/run.py --task perplexity --windows 12 --window 1024 --prefill 64 --chunk 32 \
    --recent-pages 2 --out $R/quality_smollm2_ppl.json > /tmp/quality_ppl.log 2>&1; merge ) &
A=$!
( MIKV_EVAL_DEBUG=1 python benchmarks/quality/run.py --task line_retrieval --model Qwen2.5-Coder-0.5B-Instruct \
    --sizes 60 --trials 25 --recent-pages 2 --methods bf16 fp8 int4 kivi2 h2o@0.25 mikv@0.25 mikv_bal@0.25 mikv_fp8hi@0.25 \
    --out $R/quality_qwen05_retrieval.json > /tmp/quality_retrieval.log 2>&1
  MIKV_EVAL_DEBUG=1 python benchmarks/quality/run.py --task kv_retrieval --model Qwen2.5-Coder-0.5B-Instruct \
    --sizes 50 --trials 10 --recent-pages 2 --methods bf16 kivi2 h2o@0.25 mikv@0.25 --append \
    --out $R/quality_qwen05_retrieval.json >> /tmp/quality_retrieval.log 2>&1; merge ) &
B=$!
while kill -0 $A 2>/dev/null || kill -0 $B 2>/dev/null; do sleep 120; merge 2>/dev/null; done
merge
echo ALL DONE
