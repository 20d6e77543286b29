"""The coordinator's public API under many concurrent streams (the asyncio front): they all run
without a thread each, health answers meanwhile, and the streams whose clients leave are freed."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import start_cluster
from tandem.client import AsyncTandemClient
from test_services import assert_all_released

NUM_STREAMS = 150  # more than the 64 threads the thread-pool front had
MAX_TOKENS = 16
PROMPTS = [[5, 7, 9, 11], [100, 4, 40], [300, 17, 8, 2, 9]]
LEAVE_EVERY = 4  # every 4th client leaves after its first chunk


@pytest.fixture(scope="module")
def cluster(checkpoint):
    c = start_cluster(checkpoint("llama"), num_stages=1, num_samplers=1, num_blocks=512, max_queue=NUM_STREAMS)
    yield c
    c.stop()


async def stream(client: AsyncTandemClient, prompt: list[int], leave: bool) -> list[int]:
    tokens: list[int] = []
    async with client.generate_stream(prompt_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True,
                                      temperature=0.0) as s:
        async for chunk in s:
            tokens += chunk.token_ids
            if leave:
                break  # the client leaves after its first chunk
    return tokens


async def health_latencies(endpoint: str, done: asyncio.Event) -> list[float]:
    latencies = []
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not done.is_set():
            start = time.monotonic()
            reply = await stub.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Coordinator"), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            latencies.append(time.monotonic() - start)
            await asyncio.sleep(0.05)
    return latencies


def test_many_streams_at_once_hold_no_thread_and_those_left_are_freed(cluster):
    threads_before = threading.active_count()
    peak_threads = 0

    async def run():
        nonlocal peak_threads
        done = asyncio.Event()
        probe = asyncio.create_task(health_latencies(cluster.endpoint, done))
        async with AsyncTandemClient(cluster.endpoint, timeout_s=300) as client:
            tasks = [asyncio.create_task(stream(client, PROMPTS[i % len(PROMPTS)], leave=i % LEAVE_EVERY == 0))
                     for i in range(NUM_STREAMS)]
            while not all(t.done() for t in tasks):
                peak_threads = max(peak_threads, threading.active_count())
                await asyncio.sleep(0.05)
            results = [t.result() for t in tasks]
        done.set()
        return results, await probe

    results, latencies = asyncio.run(run())
    stayed = {i: tokens for i, tokens in enumerate(results) if i % LEAVE_EVERY}
    assert all(len(tokens) == MAX_TOKENS for tokens in stayed.values())
    for p in range(len(PROMPTS)):  # greedy: one prompt, one output, however the streams were batched
        assert len({tuple(tokens) for i, tokens in stayed.items() if i % len(PROMPTS) == p}) == 1
    assert all(results[i] for i in range(0, NUM_STREAMS, LEAVE_EVERY))  # those that left had their first chunk
    assert peak_threads - threads_before < 32, f"{peak_threads - threads_before} more threads for {NUM_STREAMS} streams"
    assert latencies and max(latencies) < 1.0
    assert_all_released(cluster)
