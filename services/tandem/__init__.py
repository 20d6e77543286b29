"""Tandem: pipeline-parallel LLM serving with CPU sampling, CPU attention and a host KV tier."""

__version__ = "0.1.0"
