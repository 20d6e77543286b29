"""Stage worker: one pipeline stage's layers and paged KV cache, driven by step plans."""
