"""The CPU decode-attention kernel (core/modeling/cpu_attention.py) against the portable gather path
and, through a split model, against transformers."""

from __future__ import annotations

import pytest
import torch

from tandem.core.modeling import attention, cpu_attention
from tandem.core.modeling.attention import AttentionMetadata, SequenceSlice
from tandem.core.modeling.model_config import RopeConfig
from tandem.core.modeling.rope import RotaryEmbedding
from test_model_equivalence import MAX_NEW_TOKENS, two_stages_match_transformers


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block_size,window", [(4, None), (16, None), (4, 9), (16, 40)])
def test_kernel_equals_rotary_write_and_the_gather_path(threads, block_size, window, monkeypatch):
    """attention.attend on a float32 decode step (rotary, cache write and attention in one kernel
    pass) writes exactly the keys and values the portable path's separate operations write, and
    attends as its gather-and-matmul does: ragged contexts from 1 to 70 tokens over blocks
    scattered through the cache, with and without a sliding window, serially and on two threads."""
    torch.manual_seed(1)
    kv_heads, heads, head_dim = 2, 8, 32
    lens = [1, 2, block_size, block_size + 1, 37, 70, 5]
    needed = sum(-(-n // block_size) for n in lens)
    order = torch.randperm(needed + 3).tolist()
    seqs, used = [], 0
    for n in lens:
        blocks = -(-n // block_size)
        seqs.append(SequenceSlice(n - 1, 1, order[used:used + blocks]))
        used += blocks
    meta = AttentionMetadata.build(seqs, block_size, sliding_window=window)
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), head_dim, torch.device("cpu"))
    cos_sin = rotary.cos_sin(meta.positions, torch.float32)
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * head_dim)
    cache = torch.randn(2, kv_heads, (needed + 3) * block_size, head_dim)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            fused_cache = cache.clone()
            got = attention.attend(qkv, cos_sin, *fused_cache, meta, heads, 0.17)
            monkeypatch.setattr(attention, "CPU_KERNEL", False)
            want = attention.attend(qkv, cos_sin, *cache, meta, heads, 0.17)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(fused_cache, cache)  # the same bits in every key and value, new ones included
    assert not torch.equal(cache[0, :, meta.slot_mapping], torch.zeros_like(cache[0, :, meta.slot_mapping]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kernel_declines_what_it_does_not_serve():
    q = torch.zeros(2, 8, 32)
    assert cpu_attention.supports(q, torch.zeros(2, 16, 32))
    assert not cpu_attention.supports(q.bfloat16(), torch.zeros(2, 16, 32, dtype=torch.bfloat16))
    assert not cpu_attention.supports(q.half(), torch.zeros(2, 16, 32, dtype=torch.float16))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_split_model_through_the_kernel_matches_transformers(arch, checkpoint, reference_model, monkeypatch):
    """Every decode step of a 2-stage split goes through the one-pass kernel (counted), and tokens
    and logits still equal transformers', across Mistral's sliding window too."""
    calls = []
    kernel = cpu_attention.decode_step

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(cpu_attention, "decode_step", counted)
    path = checkpoint(arch)
    two_stages_match_transformers(path, reference_model)
    layers = reference_model(path).config.num_hidden_layers
    assert len(calls) >= (MAX_NEW_TOKENS - 1) * layers  # every layer of every decode step
