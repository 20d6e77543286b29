"""tandem.client against an in-test fake Coordinator served by a real gRPC server on port 0.

The fake echoes deterministic tokens: token i of a prompt ending in id p is p + 1 + i, with
text "<id>". Text prompts that name a behaviour ("slow", "hang", "error:CODE:message", ...)
make it stream forever, wait, or fail on demand.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from tandem.client import (
    AsyncTandemClient,
    ClientError,
    DeadlineExceededError,
    GenerateChunk,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TandemClient,
    UnavailableError,
)
from tandem.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

pb = coordinator_pb2
WAIT_S = 5.0


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """A test double of the coordinator's public API; records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.aborted: list[tuple[str, str]] = []
        self.cancelled = threading.Event()  # a Generate call ended before the stream did

    def Generate(self, request, context):
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        call = {"finished": False}
        context.add_callback(lambda: None if call["finished"] else self.cancelled.set())
        request_id = request.request_id or "server-chosen"
        text = request.text if request.WhichOneof("input") == "text" else ""
        if text.startswith("error:"):
            _, code, message = text.split(":", 2)
            context.abort(grpc.StatusCode[code], message)
        if text == "hang":
            while context.is_active():
                time.sleep(0.01)
            return
        prompt = list(request.token_ids.ids) or [ord(c) for c in text]
        max_tokens = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 3
        want_logprobs = request.sampling.HasField("logprobs")
        output: list[int] = []
        i = 0
        while i < max_tokens or text == "slow":
            if text == "slow":
                time.sleep(0.01)
            token = prompt[-1] + 1 + i
            output.append(token)
            i += 1
            yield pb.GenerateResponse(request_id=request_id, chunk=pb.GenerateChunk(
                token_ids=[token], text=f"<{token}>", logprobs=[logprob(token)] if want_logprobs else [],
                prompt_tokens=len(prompt), completion_tokens=i,
            ))
            if text == "midway-error":
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV cache full")
        if text != "no-complete":
            yield pb.GenerateResponse(request_id=request_id, complete=pb.GenerateComplete(
                output_ids=output, text="".join(f"<{t}>" for t in output),
                finish_reason=common_pb2.FINISH_REASON_LENGTH,
                usage=common_pb2.TokenUsage(prompt_tokens=len(prompt), completion_tokens=len(output)),
                logprobs=[logprob(t) for t in output] if want_logprobs else [],
                time_to_first_token_s=0.25, e2e_latency_s=1.5,
            ))
        call["finished"] = True

    def Abort(self, request, context):
        if request.request_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "request 'missing' is not running")
        self.aborted.append((request.request_id, request.reason))
        return pb.AbortResponse()

    def Tokenize(self, request, context):
        bos = [1] if request.add_special_tokens else []
        return pb.TokenizeResponse(token_ids=bos + [ord(c) for c in request.text])

    def Detokenize(self, request, context):
        return pb.DetokenizeResponse(text="".join(chr(i) for i in request.token_ids))

    def GetServerInfo(self, request, context):
        return pb.GetServerInfoResponse(
            model="fake", version="0", vocab_size=331, max_model_len=256, block_size=16,
            stages=[pb.StageInfo(index=0, address="a:1", layer_start=0, layer_end=3),
                    pb.StageInfo(index=1, address="b:1", layer_start=3, layer_end=5)],
            samplers=[pb.SamplerInfo(address="s:1", num_sequences=2)], dtype="float32", device="cpu",
        )


def logprob(token: int) -> common_pb2.SampleLogprobs:
    return common_pb2.SampleLogprobs(
        sampled=common_pb2.TokenLogprob(token_id=token, logprob=-0.5),
        top=[common_pb2.TokenLogprob(token_id=token, logprob=-0.5)],
    )


@pytest.fixture
def fake() -> Iterator[tuple[FakeCoordinator, str]]:
    servicer = FakeCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


# --- blocking client --------------------------------------------------------------------


def test_generate_returns_the_whole_result(fake) -> None:
    servicer, endpoint = fake
    with TandemClient(endpoint, timeout_s=WAIT_S) as client:
        result = client.generate(prompt_ids=[10, 20], max_tokens=4, temperature=0.0, top_k=5,
                                 stop="\n", seed=7, logit_bias={3: -100.0}, request_id="r1")
    assert result.request_id == "r1"
    assert result.token_ids == [21, 22, 23, 24] and result.text == "<21><22><23><24>"
    assert result.finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (2, 4)
    assert result.logprobs is None
    assert (result.time_to_first_token_s, result.e2e_latency_s) == (0.25, 1.5)
    assert not servicer.cancelled.is_set()  # a stream read to its end is not cancelled
    sent = servicer.requests[0]
    assert list(sent.token_ids.ids) == [10, 20] and sent.request_id == "r1"
    assert sent.sampling.temperature == 0.0 and sent.sampling.HasField("temperature")
    assert not sent.sampling.HasField("top_p") and sent.sampling.top_k == 5
    assert list(sent.sampling.stop) == ["\n"] and dict(sent.sampling.logit_bias) == {3: -100.0}
    assert sent.HasField("stream") and not sent.stream  # the result alone: no message a token


def test_generate_stream_asks_for_tokens_unless_told_not_to(fake) -> None:
    servicer, endpoint = fake
    with TandemClient(endpoint, timeout_s=WAIT_S) as client:
        list(client.generate_stream(prompt_ids=[1], max_tokens=1))
        list(client.generate_stream(prompt_ids=[1], max_tokens=1, stream=False))
        client.generate(prompt_ids=[1], max_tokens=1, stream=True)
    assert [(r.HasField("stream"), r.stream) for r in servicer.requests] == [(False, False), (True, False), (True, True)]


def test_generate_stream_yields_chunks_then_the_result(fake) -> None:
    _, endpoint = fake
    with TandemClient(endpoint, timeout_s=WAIT_S) as client:
        stream = client.generate_stream("ab", max_tokens=3, logprobs=1)
        assert stream.result is None
        chunks = list(stream)
    assert [c.token_ids for c in chunks] == [[99], [100], [101]]
    assert chunks[0] == GenerateChunk([99], "<99>", chunks[0].logprobs, completion_tokens=1)
    assert chunks[0].logprobs is not None and chunks[0].logprobs[0].sampled.token_id == 99
    result = stream.result
    assert result is not None and result.request_id == "server-chosen"
    assert result.token_ids == [99, 100, 101] and result.text == "".join(c.text for c in chunks)
    assert result.logprobs is not None and [lp.sampled.token_id for lp in result.logprobs] == [99, 100, 101]


@pytest.mark.parametrize("leave", ["break", "named-break", "close", "garbage"])
def test_leaving_the_stream_early_cancels_the_call(fake, leave: str) -> None:
    servicer, endpoint = fake
    with TandemClient(endpoint, timeout_s=WAIT_S) as client:
        if leave == "break":
            for _ in client.generate_stream("slow"):
                break
        else:
            stream = client.generate_stream("slow")
            if leave == "named-break":
                for _ in stream:
                    break
                assert stream.result is None
            elif leave == "close":
                next(stream)
                stream.close()
            else:
                next(stream)
                del stream
                gc.collect()
        assert servicer.cancelled.wait(WAIT_S)


def test_timeout_is_deadline_exceeded(fake) -> None:
    _, endpoint = fake
    with TandemClient(endpoint, timeout_s=WAIT_S) as client:
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError) as info:
            client.generate("hang", timeout_s=0.3)
        assert time.monotonic() - start < WAIT_S
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("code, error", [
    ("INVALID_ARGUMENT", InvalidArgumentError),
    ("NOT_FOUND", NotFoundError),
    ("RESOURCE_EXHAUSTED", ResourceExhaustedError),
    ("UNAVAILABLE", UnavailableError),
])
def test_status_codes_map_to_typed_errors(fake, code: str, error: type[ClientError]) -> None:
    _, endpoint = fake
    with TandemClient(endpoint, timeout_s=WAIT_S) as client:
        with pytest.raises(error) as info:
            client.generate(f"error:{code}:prompt is too long: 300 > 256")
    assert info.value.code == grpc.StatusCode[code]
    assert info.value.message == "prompt is too long: 300 > 256"
    assert str(info.value) == f"{code}: prompt is too long: 300 > 256"


def test_error_in_the_middle_of_a_stream(fake) -> None:
    _, endpoint = fake
    with TandemClient(endpoint, timeout_s=WAIT_S) as client:
        stream = client.generate_stream("midway-error")
        assert next(stream).token_ids == [ord("r") + 1]
        with pytest.raises(ResourceExhaustedError, match="KV cache full"):
            next(stream)
        with pytest.raises(InternalError, match="without a completion"):
            client.generate("no-complete")


def test_unary_calls_and_api_key(fake) -> None:
    servicer, endpoint = fake
    with TandemClient(endpoint, timeout_s=WAIT_S, api_key="sekret") as client:
        assert client.tokenize("hi") == [1, ord("h"), ord("i")]
        assert client.tokenize("hi", add_special_tokens=False) == [ord("h"), ord("i")]
        assert client.detokenize([104, 105]) == "hi"
        client.abort("r7", reason="user left")
        with pytest.raises(NotFoundError, match="'missing' is not running"):
            client.abort("missing")
        info = client.server_info()
        client.generate("x", max_tokens=1)
    assert servicer.aborted == [("r7", "user left")]
    assert info.model == "fake" and info.block_size == 16 and info.device == "cpu"
    assert [(s.layer_start, s.layer_end) for s in info.stages] == [(0, 3), (3, 5)]
    assert info.samplers[0].num_sequences == 2
    assert servicer.metadata[0]["authorization"] == "Bearer sekret"


class AsyncFakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Tokenize and Generate of FakeCoordinator as coroutines, for the public API's asyncio server."""

    async def Tokenize(self, request, context):
        return FakeCoordinator.Tokenize(self, request, context)

    async def Generate(self, request, context):
        tokens = list(range(7, 7 + request.sampling.max_tokens))
        for i, token in enumerate(tokens):
            yield pb.GenerateResponse(request_id="r", chunk=pb.GenerateChunk(token_ids=[token], completion_tokens=i + 1))
        yield pb.GenerateResponse(request_id="r", complete=pb.GenerateComplete(
            output_ids=tokens, finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.TokenUsage(completion_tokens=len(tokens))))


def test_a_server_with_an_api_key_refuses_calls_without_it() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tandem.client.errors import UnauthenticatedError
    from tandem.core.wire.aio_server import AsyncServer

    server = AsyncServer("127.0.0.1", 0, api_key="sekret")
    server.add(coordinator_pb2_grpc.add_CoordinatorServicer_to_server, AsyncFakeCoordinator(), ["tandem.v1.Coordinator"])
    server.start()
    server.set_ready()
    try:
        with TandemClient(server.address, timeout_s=WAIT_S, api_key="sekret") as client:
            assert client.tokenize("hi") == [1, ord("h"), ord("i")]
            assert len([c.token_ids for c in client.generate_stream("x", max_tokens=2)]) == 2
        for key in (None, "wrong"):
            with TandemClient(server.address, timeout_s=WAIT_S, api_key=key) as client:
                with pytest.raises(UnauthenticatedError, match="API key"):
                    client.tokenize("hi")
                with pytest.raises(UnauthenticatedError, match="API key"):
                    list(client.generate_stream("x", max_tokens=2))
        with grpc.insecure_channel(server.address) as channel:  # probes carry no key
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            # Two authorization headers never pass, whichever order the right one comes in.
            tokenize = channel.unary_unary("/tandem.v1.Coordinator/Tokenize",
                                           request_serializer=coordinator_pb2.TokenizeRequest.SerializeToString,
                                           response_deserializer=coordinator_pb2.TokenizeResponse.FromString)
            for headers in ((("authorization", "Bearer wrong"), ("authorization", "Bearer sekret")),
                            (("authorization", "Bearer sekret"), ("authorization", "Bearer wrong"))):
                with pytest.raises(grpc.RpcError) as refused:
                    tokenize(coordinator_pb2.TokenizeRequest(text="hi"), metadata=headers, timeout=WAIT_S)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = tokenize(coordinator_pb2.TokenizeRequest(text="hi"), metadata=(("authorization", "Bearer sekret"),),
                              timeout=WAIT_S)
            assert list(answer.token_ids)[-2:] == [ord("h"), ord("i")]  # one right header passes
    finally:
        server.stop(0)


def test_arguments_are_checked_before_sending(fake) -> None:
    servicer, endpoint = fake
    with TandemClient(endpoint) as client:
        with pytest.raises(ValueError, match="exactly one"):
            client.generate()
        with pytest.raises(ValueError, match="exactly one"):
            client.generate("a", prompt_ids=[1])
        with pytest.raises(TypeError, match="max_token"):
            client.generate("a", max_token=3)  # type: ignore[call-arg]
    assert servicer.requests == []


def test_nothing_listening_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with TandemClient(f"127.0.0.1:{port}", timeout_s=WAIT_S) as client:
        with pytest.raises(UnavailableError):
            client.tokenize("a")


# --- asyncio client ----------------------------------------------------------------------


def test_async_client(fake) -> None:
    servicer, endpoint = fake

    async def main() -> None:
        async with AsyncTandemClient(endpoint, timeout_s=WAIT_S, api_key="k") as client:
            result = await client.generate(prompt_ids=[5], max_tokens=2)
            assert result.token_ids == [6, 7] and result.finish_reason == "length"
            assert servicer.requests[-1].HasField("stream") and not servicer.requests[-1].stream

            stream = client.generate_stream("ab", max_tokens=3)
            chunks = [chunk async for chunk in stream]
            assert [c.token_ids for c in chunks] == [[99], [100], [101]]
            assert stream.result is not None and stream.result.text == "<99><100><101>"

            with pytest.raises(DeadlineExceededError):
                await client.generate("hang", timeout_s=0.3)
            for code, error in [("INVALID_ARGUMENT", InvalidArgumentError), ("NOT_FOUND", NotFoundError),
                                ("RESOURCE_EXHAUSTED", ResourceExhaustedError)]:
                with pytest.raises(error) as info:
                    await client.generate(f"error:{code}:bad {code}")
                assert info.value.message == f"bad {code}"

            assert await client.tokenize("hi") == [1, 104, 105]
            assert await client.detokenize([104, 105]) == "hi"
            await client.abort("r9", "bye")
            with pytest.raises(NotFoundError):
                await client.abort("missing")
            assert (await client.server_info()).vocab_size == 331

            servicer.cancelled.clear()
            async for _ in client.generate_stream("slow"):
                break
            assert await asyncio.to_thread(servicer.cancelled.wait, WAIT_S)

            servicer.cancelled.clear()
            stream = client.generate_stream("slow")
            await anext(stream)
            stream.close()
            assert await asyncio.to_thread(servicer.cancelled.wait, WAIT_S)

    asyncio.run(main())
    assert servicer.aborted == [("r9", "bye")]
    assert all(md["authorization"] == "Bearer k" for md in servicer.metadata)
