"""The OpenAI-compatible HTTP API: a Starlette app that calls the coordinator through AsyncTandemClient.

Each choice of a request is one Generate call; a client that disconnects closes the calls, and the
coordinator aborts the requests. The routes are here; how the calls' streams are merged is
streams.py, and how the answer is written, answers.py.
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
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tandem.client import AsyncGenerateStream, AsyncTandemClient, ClientError
from tandem.core.metrics import Metrics
from tandem.gateway.answers import error_response, openai_error, sse_events, whole_body
from tandem.gateway.chat import ChatTemplate, ChatTemplateError
from tandem.gateway.config import GatewayConfig
from tandem.gateway.protocol import Job, OpenAIError, parse_chat, parse_completion
from tandem.gateway.streams import final_results, merged, unless_disconnected

log = logging.getLogger(__name__)
CLIENT_CLOSED_REQUEST = 499  # what nginx logs for a client that left; nobody reads the answer


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
                return error_response(e)
            except ClientError as e:
                return error_response(openai_error(e))
            except Exception as e:  # noqa: BLE001 - a bug here still answers in OpenAI's shape
                log.exception("%s %s failed", request.method, request.url.path)
                return error_response(OpenAIError(500, f"internal error: {type(e).__name__}: {e}"))

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
            return error_response(OpenAIError(503, f"the coordinator does not answer: {e}"))
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
                                                           traceparent=traceparent, stream=job.stream, **options))
        except (TypeError, ValueError) as e:  # a value the request message cannot hold, such as a huge token id
            for stream in streams:
                stream.close()
            raise OpenAIError(400, str(e)) from None
        events = merged(streams)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_name}
        if not job.stream:
            results = await unless_disconnected(request, final_results(events, len(streams)))
            if results is None:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            return JSONResponse(await whole_body(head, job, results, chat, self._texts))
        first = await unless_disconnected(request, anext(events))  # errors before any token keep their status
        if first is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return StreamingResponse(sse_events(head, job, chat, first, events, self._texts), media_type="text/event-stream")

    async def _texts(self, ids: set[int]) -> dict[int, str]:
        """Text of each token id (for logprobs), asked of the coordinator once per id."""
        assert self.client is not None
        missing = sorted(ids - self._token_texts.keys())
        texts = await asyncio.gather(*(self.client.detokenize([t], skip_special_tokens=False) for t in missing))
        self._token_texts.update(zip(missing, texts))
        return self._token_texts
