"""The async plumbing under the gateway's routes: the Generate streams of a request's choices
merged into one, and work that stops when the HTTP client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request

from tandem.client import AsyncGenerateStream, GenerateChunk, GenerateResult

T = TypeVar("T")
Event = tuple[int, GenerateChunk | GenerateResult]


async def merged(streams: list[AsyncGenerateStream]) -> AsyncIterator[Event]:
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


async def chained(first: Event, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    yield first
    async for e in events:
        yield e


async def final_results(events: AsyncIterator[Event], n: int) -> list[GenerateResult]:
    """The result of each of the n calls, in call order, once every one has finished."""
    results: list[Any] = [None] * n
    async for i, item in events:
        if isinstance(item, GenerateResult):
            results[i] = item
    return results


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
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
