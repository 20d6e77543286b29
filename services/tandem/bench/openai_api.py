"""The same workload through an OpenAI-compatible server's /v1/completions (vLLM, SGLang, TGI, llama.cpp).

Each request is one completion: the workload's token ids as the prompt (`prompt: [ids]`),
`max_tokens` its output length with `ignore_eos` and `min_tokens` equal to it (vLLM's and
SGLang's extensions that keep a request from stopping early; a server that knows neither may stop
at an end-of-sequence token, which shows as fewer output tokens), the bench's sampling parameters
under the same names, the same per-request seed as Tandem's requests, and `stream: true` with
`stream_options: {"include_usage": true}` so that the stream ends with the token counts (with
`SendOptions.stream` off, `stream: false`: one JSON answer, whose usage gives the counts).

The first chunk with a choice marks the first token. Output tokens are the usage chunk's
`completion_tokens`, never counted from text (a chunk's text may hold several tokens or none); a
stream without usage fails its request, as does an HTTP error or an error event, with the
server's message. The model name sent is the first one /v1/models lists.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Mapping, Sequence

from tandem.bench.profiling import ProcessWatch
from tandem.bench.runner import Measurement, RequestRecord, SendOptions, measure_requests, run_requests
from tandem.bench.workload import Request


def base_url(url: str) -> str:
    """The server's root, from its root or its /v1 URL ("http://h:8000/v1/" -> "http://h:8000")."""
    url = url.rstrip("/")
    return url.removesuffix("/v1") if url.endswith("/v1") else url


def completion_body(request: Request, options: SendOptions, model: str) -> dict:
    """The JSON body of `request` as a /v1/completions call, streamed unless options.stream is off."""
    stream = {"stream": True, "stream_options": {"include_usage": True}} if options.stream else {"stream": False}
    return {"model": model, "prompt": list(request.prompt_ids), "max_tokens": request.output_len,
            "min_tokens": request.output_len, "ignore_eos": True, "seed": options.seed + max(request.index, 0),
            **options.sampling, **stream}


def parse_event(line: bytes | str) -> dict | None:
    """The JSON object of one server-sent-event line; None for other lines and for `data: [DONE]`."""
    text = line.decode() if isinstance(line, bytes) else line
    text = text.strip()
    if not text.startswith("data:"):
        return None
    data = text[len("data:"):].strip()
    return None if data == "[DONE]" else json.loads(data)


def error_message(status: int, body: str) -> str:
    """An HTTP error's message: the OpenAI error object's message where the body is one."""
    try:
        error = json.loads(body).get("error", body)
        message = error.get("message", error) if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = body
    return f"HTTP {status}: {str(message).strip()[:500]}"


def measure_openai(url: str, requests: Sequence[Request], warmup: Sequence[Request], options: SendOptions,
                   label: str = "", watch: ProcessWatch | None = None) -> Measurement:
    """The warm-up, then the measured requests inside `watch`, against the server at `url`."""
    def send(batch: Sequence[Request], progress: bool):
        return send_all(url, batch, options, progress=progress, label=label)
    return measure_requests(send, requests, warmup, watch=watch)


async def send_all(url: str, requests: Sequence[Request], options: SendOptions, progress: bool = False,
                   label: str = "") -> tuple[list[RequestRecord], float]:
    """Send every request at its arrival time; return the records and the run's wall time."""
    import aiohttp

    root = base_url(url)
    timeout = aiohttp.ClientTimeout(total=options.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        model = await served_model(session, root)
        send_one = functools.partial(_send_one, session, f"{root}/v1/completions", model, options)
        return await run_requests(requests, options, send_one, progress, label)


async def served_model(session, root: str) -> str:
    """The first model id of GET /v1/models; RuntimeError if the server lists none or cannot be reached."""
    import aiohttp

    try:
        async with session.get(f"{root}/v1/models") as response:
            body = await response.text()
            if response.status != 200:
                raise RuntimeError(f"{root}/v1/models: {error_message(response.status, body)}")
            models = json.loads(body).get("data") or []
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        raise RuntimeError(f"{root}/v1/models: {e}") from None
    if not models:
        raise RuntimeError(f"{root}/v1/models lists no model")
    return models[0]["id"]


async def _send_one(session, url: str, model: str, options: SendOptions, request: Request, record: RequestRecord,
                    start: float) -> None:
    import aiohttp

    usage: Mapping | None = None
    try:
        async with session.post(url, json=completion_body(request, options, model)) as response:
            if response.status != 200:
                record.error = error_message(response.status, await response.text())
                return
            if not options.stream:
                usage = json.loads(await response.text()).get("usage")
            else:
                async for line in response.content:
                    event = parse_event(line)
                    if event is None:
                        continue
                    if "error" in event:
                        record.error = error_message(response.status, json.dumps(event))
                        return
                    if event.get("choices") and record.first_token_s is None:
                        record.first_token_s = time.perf_counter() - start
                    usage = event.get("usage") or usage
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return
    if usage is None:
        record.error = ("the stream carried no usage (the server ignored stream_options.include_usage)"
                        if options.stream else "the answer carried no usage")
        return
    record.output_tokens = int(usage.get("completion_tokens", 0))
