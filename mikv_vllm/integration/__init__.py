"""The wing that touches vLLM: every mikv module that imports vLLM lives here (the entry point,
`mikv_vllm.plugin`, aside). The core beside it (config, layout, quant, reference, policy,
demotion, importance, stats, verify, ops) is plain Python and torch.

- `patches`: the only changes to vLLM's own code, applied once from the entry point: the
  `mikv` kv-cache dtype alias, the startup checks, scheduler and worker selection.
- `scheduler` / `worker`: vLLM Scheduler and GPU Worker subclasses; `protocol`: what they
  exchange every step (page moves out, page-mass reports back).
- `attention/`: the attention backend vLLM selects (Backend, MetadataBuilder, Impl; split
  decode).
- `metrics`: the Prometheus stat logger."""
