"""The gateway's answers in OpenAI's shapes: a generation job's whole body or its server-sent
events, built from the merged events of its calls, and the client SDK's errors as OpenAI errors
with their HTTP status.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.responses import JSONResponse

from tandem.client import (
    ClientError,
    DeadlineExceededError,
    GenerateResult,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from tandem.gateway.protocol import (
    Job,
    OpenAIError,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    token_ids_of,
    usage_body,
)
from tandem.gateway.streams import Event, chained

HTTP_STATUS: list[tuple[type[ClientError], int]] = [
    (InvalidArgumentError, 400), (NotFoundError, 404), (ResourceExhaustedError, 429),
    (UnavailableError, 503), (DeadlineExceededError, 504),
]
TokenTexts = Callable[[set[int]], Awaitable[Mapping[int, str]]]  # token ids -> the text of each (for logprobs)


def error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def openai_error(e: ClientError) -> OpenAIError:
    status = next((s for cls, s in HTTP_STATUS if isinstance(e, cls)), 500)
    return OpenAIError(status, e.message, code=e.code.name.lower())


async def whole_body(head: dict[str, Any], job: Job, results: list[GenerateResult], chat: bool,
                     texts: TokenTexts) -> dict[str, Any]:
    """The one JSON body of an answer that is not streamed."""
    choices = []
    for i, r in enumerate(results):
        logprobs = None
        if job.logprobs and r.logprobs is not None:
            text_of = await texts(token_ids_of(r.logprobs))
            logprobs = chat_logprobs(r.logprobs, text_of) if chat else completion_logprobs(r.logprobs, text_of, 0)
        body = {"message": {"role": "assistant", "content": r.text}} if chat else {"text": r.text}
        choices.append({"index": i, **body, "logprobs": logprobs, "finish_reason": finish_reason(r.finish_reason)})
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": usage_body([r.usage for r in results], job.n)}


async def sse_events(head: dict[str, Any], job: Job, chat: bool, first: Event, events: AsyncIterator[Event],
                     texts: TokenTexts) -> AsyncIterator[str]:
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
        async for i, item in chained(first, events):
            if isinstance(item, GenerateResult):
                usages[i] = item.usage
                yield event([{"index": i, **({"delta": {}} if chat else {"text": ""}), "logprobs": None,
                              "finish_reason": finish_reason(item.finish_reason)}])
                continue
            logprobs = None
            if job.logprobs and item.logprobs:
                text_of = await texts(token_ids_of(item.logprobs))
                logprobs = (chat_logprobs(item.logprobs, text_of) if chat
                            else completion_logprobs(item.logprobs, text_of, offsets[i]))
            offsets[i] += len(item.text)
            if item.text or logprobs:
                body = {"delta": {"content": item.text}} if chat else {"text": item.text}
                yield event([{"index": i, **body, "logprobs": logprobs, "finish_reason": None}])
        if job.include_usage:
            yield event([], usage=usage_body(usages, job.n))
    except ClientError as e:
        yield f"data: {json.dumps(openai_error(e).body())}\n\n"
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"
