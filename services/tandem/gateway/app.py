"""The OpenAI-compatible HTTP API: a Starlette app that calls the coordinator through AsyncTandemClient.

Each choice of a request is one Generate call; a client that disconnects closes the calls, and the
coordinator aborts the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tandem.client import (
    AsyncGenerateStream,
    AsyncTandemClient,
    ClientError,
    DeadlineExceededError,
    GenerateChunk,
    GenerateResult,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from tandem.core.metrics import Metrics
from tandem.gateway.chat import ChatTemplate, ChatTemplateError
from tandem.gateway.config import GatewayConfig
from tandem.gateway.protocol import (
    Job,
    OpenAIError,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    parse_chat,
    parse_completion,
    token_ids_of,
    usage_body,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
Event = tuple[int, GenerateChunk | GenerateResult]
HTTP_STATUS: list[tuple[type[ClientError], int]] = [
    (InvalidArgumentError, 400), (NotFoundError, 404), (ResourceExhaustedError, 429),
    (UnavailableError, 503), (DeadlineExceededError, 504),
]
CLIENT_CLOSED_REQUEST = 499  # what nginx logs for a client that left; nobody reads the answer


def _error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _openai_error(e: ClientError) -> OpenAIError:
    status = next((s for cls, s in HTTP_STATUS if isinstance(e, cls)), 500)
    return OpenAIError(status, e.message, code=e.code.name.lower())


async def _merged(streams: list[AsyncGenerateStream]) -> AsyncIterator[Event]:
    """(choice index, chunk or result) of every stream as they arrive; the first error ends it all.
    However it ends, every stream is closed (and its request aborted unless it finished)."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncGenerateStream) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((i, chunk))
            queue.put_nowait((i, stream.result))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while True:
                i, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield i, item
                if isinstance(item, GenerateResult):
                    break
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


async def _chained(first: Event, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    yield first
    async for e in events:
        yield e


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when the client disconnects first (`work` is then cancelled)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()  # no-op once done
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task})
    return None if task.cancelled() else task.result()


class Gateway:
    """The routes, the coordinator client they share, and the token texts logprobs need."""

    def __init__(self, config: GatewayConfig, api_key: str = ""):
        self.config = config
        self.api_key = api_key
        self.template = ChatTemplate.load(config.model, config.chat_template)
        self.model_name = config.served_model_name or (Path(config.model).name if config.model else "tandem")
        self.created = int(time.time())
        self.client: AsyncTandemClient | None = None  # made in the server's event loop
        self._token_texts: dict[int, str] = {}
        self.metrics = Metrics()
        self._requests = self.metrics.counter(
            "gateway_requests", "HTTP requests answered, by route and status code", ["route", "status"])
        self._seconds = self.metrics.histogram(
            "gateway_request_seconds", "Time to answer (to the end of a stream), by route", ["route"])

    def app(self) -> Starlette:
        return Starlette(lifespan=self._lifespan, routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self._endpoint(self.models), methods=["GET"]),
            Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._endpoint(self.chat_completions), methods=["POST"]),
            Route("/metrics", self.scrape, methods=["GET"]),
        ])

    async def scrape(self, request: Request) -> Response:
        """The gateway's own metrics, in Prometheus' text format (the services serve theirs)."""
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        ca_file = self.config.coordinator_tls_ca_file
        self.client = AsyncTandemClient(self.config.coordinator, api_key=self.api_key or None,
                                        root_certificates=Path(ca_file).read_bytes() if ca_file else None)
        try:
            yield
        finally:
            await self.client.close()

    def _endpoint(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def answer(request: Request) -> Response:
            try:
                self._authorize(request)
                return await handler(request)
            except OpenAIError as e:
                return _error_response(e)
            except ClientError as e:
                return _error_response(_openai_error(e))
            except Exception as e:  # noqa: BLE001 - a bug here still answers in OpenAI's shape
                log.exception("%s %s failed", request.method, request.url.path)
                return _error_response(OpenAIError(500, f"internal error: {type(e).__name__}: {e}"))

        async def run(request: Request) -> Response:
            start, route = time.monotonic(), request.url.path
            response = await answer(request)
            self._requests.labels(route, str(response.status_code)).inc()
            if isinstance(response, StreamingResponse):  # timed to the stream's end
                body = response.body_iterator

                async def timed() -> AsyncIterator:
                    try:
                        async for part in body:
                            yield part
                    finally:
                        self._seconds.labels(route).observe(time.monotonic() - start)

                response.body_iterator = timed()
            else:
                self._seconds.labels(route).observe(time.monotonic() - start)
            return response
        return run

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, f"Bearer {self.api_key}".encode()):
            raise OpenAIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                              code="invalid_api_key")

    async def _json(self, request: Request) -> Any:
        limit = self.config.max_request_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise OpenAIError(413, f"the request body is larger than {limit} bytes")
        body = await request.body()
        if len(body) > limit:
            raise OpenAIError(413, f"the request body is larger than {limit} bytes")
        try:
            return json.loads(body)
        except ValueError:
            raise OpenAIError(400, "the request body is not valid JSON") from None

    async def health(self, request: Request) -> Response:
        """200 while the coordinator answers, else 503."""
        assert self.client is not None
        try:
            await asyncio.wait_for(self.client.server_info(), timeout=5.0)
        except (ClientError, asyncio.TimeoutError) as e:
            return _error_response(OpenAIError(503, f"the coordinator does not answer: {e}"))
        return Response(status_code=200)

    async def models(self, request: Request) -> Response:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tandem"}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: Request) -> Response:
        job = parse_completion(await self._json(request), self.model_name, self.config.max_n)
        return await self._serve(request, job, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        job = parse_chat(await self._json(request), self.model_name, self.config.max_n)
        if self.template is None:
            raise OpenAIError(400, "the model has no chat template: give the gateway one (config field "
                                   "chat_template), or use /v1/completions", param="messages")
        try:
            job.prompts = [self.template.render(job.messages, job.add_generation_prompt)]
        except ChatTemplateError as e:
            raise OpenAIError(400, str(e), param="messages") from None
        job.options["add_special_tokens"] = False  # the template writes them, as in Hugging Face
        return await self._serve(request, job, chat=True)

    async def _serve(self, request: Request, job: Job, chat: bool) -> Response:
        assert self.client is not None
        timeout_s = self.config.request_timeout_s or None
        traceparent = request.headers.get("traceparent")  # the coordinator continues the client's trace
        streams: list[AsyncGenerateStream] = []
        try:
            for prompt, options in job.calls():
                text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
                streams.append(self.client.generate_stream(text, prompt_ids=ids, timeout_s=timeout_s,
                                                           traceparent=traceparent, **options))
        except (TypeError, ValueError) as e:  # a value the request message cannot hold, such as a huge token id
            for stream in streams:
                stream.close()
            raise OpenAIError(400, str(e)) from None
        events = _merged(streams)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_name}
        if not job.stream:
            results = await _unless_disconnected(request, self._results(events, len(streams)))
            if results is None:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            return JSONResponse(await self._whole(head, job, results, chat))
        first = await _unless_disconnected(request, anext(events))  # errors before any token keep their status
        if first is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return StreamingResponse(self._sse(head, job, chat, first, events), media_type="text/event-stream")

    @staticmethod
    async def _results(events: AsyncIterator[Event], n: int) -> list[GenerateResult]:
        results: list[Any] = [None] * n
        async for i, item in events:
            if isinstance(item, GenerateResult):
                results[i] = item
        return results

    async def _texts(self, ids: set[int]) -> dict[int, str]:
        """Text of each token id (for logprobs), asked of the coordinator once per id."""
        assert self.client is not None
        missing = sorted(ids - self._token_texts.keys())
        texts = await asyncio.gather(*(self.client.detokenize([t], skip_special_tokens=False) for t in missing))
        self._token_texts.update(zip(missing, texts))
        return self._token_texts

    async def _whole(self, head: dict[str, Any], job: Job, results: list[GenerateResult], chat: bool) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(results):
            logprobs = None
            if job.logprobs and r.logprobs is not None:
                text_of = await self._texts(token_ids_of(r.logprobs))
                logprobs = chat_logprobs(r.logprobs, text_of) if chat else completion_logprobs(r.logprobs, text_of, 0)
            body = {"message": {"role": "assistant", "content": r.text}} if chat else {"text": r.text}
            choices.append({"index": i, **body, "logprobs": logprobs, "finish_reason": finish_reason(r.finish_reason)})
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage_body([r.usage for r in results], job.n)}

    async def _sse(self, head: dict[str, Any], job: Job, chat: bool, first: Event,
                   events: AsyncIterator[Event]) -> AsyncIterator[str]:
        """Server-sent events: a chunk per new text, one with each choice's finish reason, the usage
        when asked for, then [DONE]. An error after the first event arrives as an error event."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        num_calls = len(job.prompts) * job.n

        def event(choices: list[dict[str, Any]], **more: Any) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **more})}\n\n"

        offsets = [0] * num_calls
        usages: list[Any] = [None] * num_calls
        try:
            if chat:
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(num_calls)])
            async for i, item in _chained(first, events):
                if isinstance(item, GenerateResult):
                    usages[i] = item.usage
                    yield event([{"index": i, **({"delta": {}} if chat else {"text": ""}), "logprobs": None,
                                  "finish_reason": finish_reason(item.finish_reason)}])
                    continue
                logprobs = None
                if job.logprobs and item.logprobs:
                    text_of = await self._texts(token_ids_of(item.logprobs))
                    logprobs = (chat_logprobs(item.logprobs, text_of) if chat
                                else completion_logprobs(item.logprobs, text_of, offsets[i]))
                offsets[i] += len(item.text)
                if item.text or logprobs:
                    body = {"delta": {"content": item.text}} if chat else {"text": item.text}
                    yield event([{"index": i, **body, "logprobs": logprobs, "finish_reason": None}])
            if job.include_usage:
                yield event([], usage=usage_body(usages, job.n))
        except ClientError as e:
            yield f"data: {json.dumps(_openai_error(e).body())}\n\n"
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        yield "data: [DONE]\n\n"
