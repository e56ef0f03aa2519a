"""Weight and KV-cache quantization."""
