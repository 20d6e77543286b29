"""Bundled data files: `tiny/` is the small Llama model that `tandem up` serves by default."""
