"""Coordinator: the public API, request lifecycle, scheduling and KV block accounting."""
