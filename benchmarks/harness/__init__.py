"""Quality harness: the real model on CPU (transformers) with its KV cache held the way a method
stores it (mikv hi/2-bit pages, eviction, fp8, int4, ...), driven by the plugin's own page format
(`mikv_vllm.quant`) and demotion policy (`mikv_vllm.policy`).

Modules: `models` (offline real models), `methods` (what each method stores and its bytes),
`kvsim` (the attention function and the per-step demotion loop), `tasks` (perplexity, line and
key-value retrieval), `stats` (confidence intervals); and two helpers of the tests and
benchmarks: `server` (a `vllm serve` subprocess) and `vllm_cpu` (vLLM's CPU platform pinned
for CPU-only runs). Not part of the installed plugin: import it from a checkout
(`benchmarks.harness`, the checkout's root on sys.path)."""
