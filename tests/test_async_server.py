"""The public API's asyncio server (core/aio_server.py) with a fake servicer: open streams hold no
thread, health answers while they wait, a client that leaves ends its handler, errors map to
status codes, bytes that are not a message are INVALID_ARGUMENT, drain and stop end everything."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.core.errors import InvalidArgumentError, ResourceExhaustedError
from tandem.core.wire.aio_server import AsyncServer
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc

SERVICE = "tandem.v1.Coordinator"
NUM_STREAMS = 200  # more than a thread-pool server's threads (the coordinator had 64)


class Waiting(coordinator_pb2_grpc.CoordinatorServicer):
    """Generate sends one chunk and then waits, as a stream waits for its next tokens."""

    def __init__(self) -> None:
        self.num_open = 0
        self.num_ended = 0
        self.lock = threading.Lock()

    async def Generate(self, request, context):
        with self.lock:
            self.num_open += 1
        try:
            yield pb.GenerateResponse(request_id=request.request_id, chunk=pb.GenerateChunk(token_ids=[1]))
            if request.text == "fail":
                raise ResourceExhaustedError("the queue is full (1 requests waiting); retry later")
            await asyncio.sleep(3600)
        finally:
            with self.lock:
                self.num_ended += 1

    async def Tokenize(self, request, context):
        if request.text == "bad":
            raise InvalidArgumentError("text 'bad' is refused")
        if request.text == "boom":
            raise RuntimeError("a bug")
        return pb.TokenizeResponse(token_ids=await asyncio.to_thread(lambda: [len(request.text)]))


@pytest.fixture
def served():
    servicer = Waiting()
    server = AsyncServer("127.0.0.1", 0, max_workers=2)
    server.add(coordinator_pb2_grpc.add_CoordinatorServicer_to_server, servicer, [SERVICE])
    server.start()
    server.set_ready()
    yield server, servicer
    server.stop(0)


def wait_until(condition, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return check.status


def test_open_streams_hold_no_thread_and_health_answers_while_they_wait(served):
    server, servicer = served
    threads_before = threading.active_count()

    async def run() -> tuple[int, float]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            calls = [stub.Generate(pb.GenerateRequest(request_id=f"r{i}", text="x")) for i in range(NUM_STREAMS)]
            for call in calls:  # every stream is open: its first chunk came
                assert (await call.read()).chunk.token_ids == [1]
            threads = threading.active_count()
            start = time.monotonic()
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            assert (await check).status == health_pb2.HealthCheckResponse.SERVING
            health_s = time.monotonic() - start
            for call in calls[: NUM_STREAMS // 2]:  # half the clients leave
                call.cancel()
            await asyncio.sleep(0)
            return threads, health_s

    threads_open, health_s = asyncio.run(run())
    assert servicer.num_open == NUM_STREAMS
    assert threads_open - threads_before < 5, f"{threads_open - threads_before} threads for {NUM_STREAMS} streams"
    assert health_s < 1.0
    wait_until(lambda: servicer.num_ended == NUM_STREAMS, "every handler ends once its client has left")


def test_stop_ends_the_streams_still_open(served):
    server, servicer = served

    def stream() -> None:
        with grpc.insecure_channel(server.address) as channel:
            call = coordinator_pb2_grpc.CoordinatorStub(channel).Generate(pb.GenerateRequest(text="x"))
            try:
                for _ in call:
                    pass
            except grpc.RpcError:
                pass

    client = threading.Thread(target=stream)
    client.start()
    wait_until(lambda: servicer.num_open == 1, "the stream is open")
    server.stop(0)
    wait_until(lambda: servicer.num_ended == 1, "stop ends the handler")
    client.join(10)
    assert not client.is_alive()


def test_errors_are_status_codes_with_their_message(served):
    server, _ = served
    with grpc.insecure_channel(server.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        assert list(stub.Tokenize(pb.TokenizeRequest(text="abc"), timeout=5).token_ids) == [3]
        for text, code, message in (("bad", grpc.StatusCode.INVALID_ARGUMENT, "text 'bad' is refused"),
                                    ("boom", grpc.StatusCode.INTERNAL, "a bug")):
            with pytest.raises(grpc.RpcError) as e:
                stub.Tokenize(pb.TokenizeRequest(text=text), timeout=5)
            assert (e.value.code(), e.value.details()) == (code, message)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(text="fail"), timeout=5))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.value.details()


@pytest.mark.parametrize("method", ["/tandem.v1.Coordinator/Tokenize", "/tandem.v1.Coordinator/Generate",
                                    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"])
def test_bytes_that_are_not_a_message_are_invalid_argument(served, method):
    server, _ = served
    streams = method.endswith(("Generate", "Watch"))
    with grpc.insecure_channel(server.address) as channel:
        call = (channel.unary_stream if streams else channel.unary_unary)(method)
        with pytest.raises(grpc.RpcError) as e:
            response = call(b"\xff" * 11, timeout=5)
            if streams:
                list(response)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf message" in e.value.details()
    assert health(server.address) == health_pb2.HealthCheckResponse.SERVING


def test_drain_reports_not_serving_and_runs_its_callbacks(served):
    server, _ = served
    drained: list[float] = []
    server.on_drain(drained.append)
    assert health(server.address, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    server.drain(5.0)
    assert health(server.address, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health(server.address) == health_pb2.HealthCheckResponse.SERVING  # liveness: nothing is wrong
    assert len(drained) == 1 and 0 < drained[0] <= 5.0
