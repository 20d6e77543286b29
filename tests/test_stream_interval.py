"""A Generate stream sends a request's first token at once, then its tokens in chunks of the
coordinator's stream_interval: fewer messages, the same tokens."""

from __future__ import annotations

from cluster import start_cluster
from tandem.client import TandemClient

PROMPT = [5, 7, 9, 11]
MAX_TOKENS = 11


def test_a_stream_sends_its_first_token_then_chunks_of_stream_interval(checkpoint):
    c = start_cluster(checkpoint("llama"), num_stages=1, num_samplers=1, stream_interval=4)
    try:
        with TandemClient(c.endpoint, timeout_s=60) as client:
            stream = client.generate_stream(prompt_ids=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True,
                                            temperature=0.0)
            chunks = [chunk.token_ids for chunk in stream]
            result = stream.result
            whole = client.generate(prompt_ids=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.0)
    finally:
        c.stop()
    sizes = [len(ids) for ids in chunks]
    assert sizes[0] == 1, sizes  # the first token is not held back
    assert all(n >= 4 for n in sizes[1:-1]) and 1 <= sizes[-1], sizes  # then chunks of at least 4, the end shorter
    assert len(chunks) <= 1 + -(-(MAX_TOKENS - 1) // 4), sizes
    assert [t for ids in chunks for t in ids] == result.token_ids == whole.token_ids
    assert len(whole.token_ids) == MAX_TOKENS
