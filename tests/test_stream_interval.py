"""A Generate stream sends a request's first token at once, then its tokens in chunks of the
coordinator's stream_interval: fewer messages, the same tokens. A request that asks not to be
streamed gets one message, the completion, with the same tokens."""

from __future__ import annotations

import grpc

from cluster import start_cluster
from tandem.client import TandemClient
from tandem.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

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


def test_a_request_not_streamed_gets_its_completion_alone(checkpoint):
    c = start_cluster(checkpoint("llama"), num_stages=2, num_samplers=1)
    sampling = common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    try:
        with grpc.insecure_channel(c.endpoint) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)

            def messages(**stream) -> list[coordinator_pb2.GenerateResponse]:
                request = coordinator_pb2.GenerateRequest(token_ids=coordinator_pb2.TokenIds(ids=PROMPT),
                                                          sampling=sampling, **stream)
                return list(stub.Generate(request, timeout=60))

            streamed, alone = messages(), messages(stream=False)
        with TandemClient(c.endpoint, timeout_s=60) as client:
            quiet = client.generate_stream(prompt_ids=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True,
                                           temperature=0.0, stream=False)
            quiet_chunks = list(quiet)
            stop = quiet.result.text[2:5]
            stopped = client.generate(prompt_ids=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.0,
                                      stop=[stop])
    finally:
        c.stop()
    assert [m.WhichOneof("kind") for m in streamed] == ["chunk"] * MAX_TOKENS + ["complete"]
    assert [m.WhichOneof("kind") for m in alone] == ["complete"]
    tokens = [t for m in streamed[:-1] for t in m.chunk.token_ids]
    assert list(alone[0].complete.output_ids) == list(streamed[-1].complete.output_ids) == tokens
    assert alone[0].complete.text == streamed[-1].complete.text
    assert alone[0].complete.usage.completion_tokens == MAX_TOKENS and alone[0].request_id
    assert quiet_chunks == [] and quiet.result.token_ids == tokens
    # A stop string ends a request that is not streamed as well, its text cut before it.
    assert len(stop) == 3 and stopped.finish_reason == "stop" and stop not in stopped.text
    assert quiet.result.text.startswith(stopped.text) and len(stopped.token_ids) < MAX_TOKENS
