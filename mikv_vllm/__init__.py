"""mikv-vllm: importance-aware mixed-precision KV cache (hi pages + 2-bit pages) for vLLM.

Enable with `vllm serve MODEL --kv-cache-dtype mikv`; knobs go in
`--additional-config '{"mikv": {...}}'` (see `mikv_vllm.config`)."""

__version__ = "0.1.0"
