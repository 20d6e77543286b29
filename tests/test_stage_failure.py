"""A stage that dies while requests stream: recomputed once it is back, or failed in bounded time."""

from __future__ import annotations

import itertools
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import start_cluster
from tandem.client import TandemClient
from tandem.client import errors as client_errors
from tandem.stage_worker import servicer as stage_worker
from tandem.stage_worker.config import StageWorkerConfig
from tandem.v1 import stage_worker_pb2 as pb
from tandem.v1 import stage_worker_pb2_grpc as pb_grpc
from test_services import assert_all_released

PROMPTS = [[5 + i, 7, 9 + 2 * i, 11, 13, 200 - i, 3] for i in range(8)]
MAX_TOKENS = 40


def generate_all(endpoint: str, results: list, started: threading.Event | None = None) -> None:
    """Each prompt greedy from its own thread; results[i] is its tokens or the error it raised.
    `started` is set once the first request has streamed a few tokens."""
    def one(i: int) -> None:
        try:
            with TandemClient(endpoint, timeout_s=120) as client:
                tokens: list[int] = []
                for chunk in client.generate_stream(prompt_ids=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0.0,
                                                    ignore_eos=True):
                    tokens += chunk.token_ids
                    if started is not None and i == 0 and len(tokens) >= 4:
                        started.set()
                results[i] = tokens
        except client_errors.ClientError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)


def start_streaming(endpoint: str) -> tuple[list, threading.Thread]:
    """Every prompt streaming from its own thread, returned once the first has a few tokens."""
    results: list = [None] * len(PROMPTS)
    started = threading.Event()
    clients = threading.Thread(target=generate_all, args=(endpoint, results, started))
    clients.start()
    assert started.wait(60)
    return results, clients


def health_answers(endpoint: str) -> bool:
    with grpc.insecure_channel(endpoint) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def undisturbed(llama):
    c = start_cluster(llama, num_stages=2, num_samplers=2)
    try:
        results: list = [None] * len(PROMPTS)
        generate_all(c.endpoint, results)
    finally:
        c.stop()
    assert all(isinstance(r, list) and len(r) == MAX_TOKENS for r in results)
    return results


def test_a_stage_killed_and_started_again_loses_no_token(llama, undisturbed):
    c = start_cluster(llama, num_stages=2, num_samplers=2, stage_down_timeout_s=60.0)
    try:
        results, clients = start_streaming(c.endpoint)
        c.kill_stage(1)
        time.sleep(0.5)
        c.start_stage(1)
        clients.join(timeout=180)
        assert results == undisturbed  # every request, every token, as if nothing had happened
        assert_all_released(c)
    finally:
        c.stop()


@pytest.mark.parametrize("recover", [True, False])
def test_a_stage_that_stays_down_fails_every_request_in_bounded_time(llama, recover):
    # With recovery off (the control), the requests fail at once; with it on, after the timeout.
    c = start_cluster(llama, num_stages=2, num_samplers=2, stage_down_timeout_s=2.0, recompute_on_stage_failure=recover)
    try:
        results, clients = start_streaming(c.endpoint)
        c.kill_stage(1)
        killed = time.monotonic()
        clients.join(timeout=60)
        assert time.monotonic() - killed < 15
        failed = [r for r in results if isinstance(r, client_errors.UnavailableError)]
        assert failed and all(isinstance(r, client_errors.UnavailableError) or len(r) == MAX_TOKENS for r in results)
        assert all("stage 1 is down" in str(r) for r in failed)
        assert health_answers(c.endpoint)
        if recover:
            with TandemClient(c.endpoint, timeout_s=30) as client, pytest.raises(client_errors.UnavailableError):
                client.generate(prompt_ids=[1, 2, 3], max_tokens=2)  # refused while the stage is gone
    finally:
        c.stop()


def test_a_plan_stream_cut_off_ends_quietly(checkpoint, monkeypatch):
    """The coordinator's Steps stream cancelled while the stage waits for its next plan (the
    coordinator restarted, or replaced the stream), and then the stage stopped with a stream open:
    the stage's plan reader ends without an unhandled exception either way, and after the
    cancellation the next stream is served."""
    raised: list = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    config = StageWorkerConfig(model=str(checkpoint("llama")), stage_index=1, num_stages=2, samplers=("127.0.0.1:1",),
                               num_blocks=8, block_size=4, profile_at_startup=False)
    server = stage_worker.serve(config)
    never = threading.Event()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.StageWorkerStub(channel)
            first = stub.Steps(itertools.chain([pb.StepPlan(step_id=1)], iter(never.wait, True)), timeout=60)
            assert next(first).step_id == 1  # a step with no sequences, answered: the reader now waits
            first.cancel()
            second = stub.Steps(itertools.chain([pb.StepPlan(step_id=2)], iter(never.wait, True)), timeout=60)
            assert next(second).step_id == 2
            server.stop(0)  # stopped with the second stream open
            time.sleep(0.5)  # the readers' waits end with the cancellation and the stop
        assert [str(args.exc_value) or type(args.exc_value).__name__ for args in raised] == []
    finally:
        never.set()
        server.stop(0)
