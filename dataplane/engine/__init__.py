"""One worker's engine: KV cache, iteration loop, chunked prefill, sampling."""
