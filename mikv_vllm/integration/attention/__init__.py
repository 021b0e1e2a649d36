"""The mikv attention backend (vLLM's `CUSTOM` slot): Backend, MetadataBuilder, Impl."""
