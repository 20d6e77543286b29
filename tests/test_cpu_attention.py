"""The CPU decode-attention kernel (core/modeling/cpu_attention.py) against the portable gather path
and, through a split model, against transformers."""

from __future__ import annotations

import pytest
import torch

from tandem.core.modeling import attention, cpu_attention
from tandem.core.modeling.attention import AttentionMetadata, SequenceSlice
from test_model_equivalence import MAX_NEW_TOKENS, two_stages_match_transformers


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block_size,window", [(4, None), (16, None), (4, 9), (16, 40)])
def test_kernel_equals_the_gather_path(threads, block_size, window, monkeypatch):
    """Ragged contexts from 1 to 70 tokens over blocks scattered through the cache, with and
    without a sliding window, serially and on two threads: the same output as gather-and-matmul."""
    torch.manual_seed(0)
    kv_heads, heads, head_dim = 2, 8, 32
    lens = [1, 2, block_size, block_size + 1, 37, 70, 5]
    needed = sum(-(-n // block_size) for n in lens)
    order = torch.randperm(needed + 5).tolist()
    seqs, used = [], 0
    for n in lens:
        blocks = -(-n // block_size)
        seqs.append(SequenceSlice(n - 1, 1, order[used:used + blocks]))
        used += blocks
    keys = torch.randn(kv_heads, (needed + 5) * block_size, head_dim)
    values = torch.randn(kv_heads, (needed + 5) * block_size, head_dim)
    q = torch.randn(len(lens), heads, head_dim)
    meta = AttentionMetadata.build(seqs, block_size, sliding_window=window)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():  # as the stages run (the gather path's buffers are inference tensors)
            got = attention.decode_attention(q, keys, values, meta, 0.17)
            monkeypatch.setattr(attention, "CPU_KERNEL", False)
            want = attention.decode_attention(q, keys, values, meta, 0.17)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kernel_declines_what_it_does_not_serve():
    q = torch.zeros(2, 8, 32)
    assert cpu_attention.supports(q, torch.zeros(2, 16, 32))
    assert not cpu_attention.supports(q.bfloat16(), torch.zeros(2, 16, 32, dtype=torch.bfloat16))
    assert not cpu_attention.supports(q.half(), torch.zeros(2, 16, 32, dtype=torch.float16))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_split_model_through_the_kernel_matches_transformers(arch, checkpoint, reference_model, monkeypatch):
    """Every decode step of a 2-stage split goes through the kernel (counted), and tokens and
    logits still equal transformers', across Mistral's sliding window too."""
    calls = []
    kernel = cpu_attention.decode_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(cpu_attention, "decode_attention", counted)
    path = checkpoint(arch)
    two_stages_match_transformers(path, reference_model)
    layers = reference_model(path).config.num_hidden_layers
    assert len(calls) >= (MAX_NEW_TOKENS - 1) * layers  # every layer of every decode step
