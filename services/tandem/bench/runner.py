"""Sending a workload to an endpoint and timing every request from the client's side.

`run_requests` schedules the requests and times them whatever the server; `send_all` sends
them to a Tandem deployment (tandem.bench.openai_api to an OpenAI-compatible server).

Requests go out at their arrival times (all at once for an offline run), at most
`max_concurrency` at a time; each one is streamed so that the first token's arrival is seen
(unless `SendOptions.stream` is off: each request then asks for its result alone, and only its
end-to-end latency is measured). Time to first token counts from the moment a request is sent, so
waiting for a `max_concurrency` slot is not part of it (as in vLLM's serving benchmark).
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from tandem.bench.cputime import CpuWindow
from tandem.bench.metrics import Counters, ServiceProbe
from tandem.bench.profiling import ProcessWatch
from tandem.bench.workload import Request


@dataclass
class RequestRecord:
    """What one request did; times in seconds from the start of the measured run."""

    index: int
    prompt_len: int
    output_len: int  # asked for
    sent_s: float = 0.0
    first_token_s: float | None = None
    done_s: float | None = None
    output_tokens: int = 0  # received
    error: str | None = None


@dataclass
class Measurement:
    """A measured run: per-request records, its wall time and, when known, the services' counters,
    the CPU time of its processes and their profiles."""

    records: list[RequestRecord]
    wall_s: float
    counters: Counters | None = None  # deltas over the run
    stage_addresses: tuple[str, ...] = ()
    sampler_addresses: tuple[str, ...] = ()
    cpu: CpuWindow | None = None
    profiles: dict[str, dict] | None = None  # by process, see tandem.bench.profiling
    layout: list[str] = field(default_factory=list)  # how the deployment was laid out: cores, layer split
    layout_warnings: list[str] = field(default_factory=list)  # where processes outnumber cores
    window_ns: tuple[int, int] = (0, 0)  # the measured requests' span on the host's monotonic clock
    timeline: dict | None = None  # with --timeline: the stages' steps in the window (tandem.bench.timeline)
    prefix_cache: tuple[int, int] | None = None  # a Tandem deployment's prompt tokens looked up, and found cached


@dataclass(frozen=True)
class SendOptions:
    sampling: Mapping[str, float | int] = field(default_factory=lambda: {"temperature": 0.0})  # client SDK names
    seed: int = 0
    max_concurrency: int | None = None
    timeout_s: float | None = None
    stream: bool = True  # off: each request asks for its result alone (no first-token time)


# Sends one request and fills in its record: first_token_s and output_tokens (or error); times are
# seconds from `start`, a time.perf_counter() reading. The caller sets sent_s and done_s around it.
SendOne = Callable[[Request, RequestRecord, float], Awaitable[None]]
# Sends a list of requests (showing progress or not); returns their records and the wall time.
SendAll = Callable[[Sequence[Request], bool], Coroutine[Any, Any, tuple[list[RequestRecord], float]]]


def measure_endpoint(endpoint: str, requests: Sequence[Request], warmup: Sequence[Request], options: SendOptions,
                     probe: ServiceProbe | None = None, label: str = "", watch: ProcessWatch | None = None
                     ) -> Measurement:
    """A Tandem deployment's measurement, see `measure_requests`."""
    def send(batch: Sequence[Request], progress: bool):
        return send_all(endpoint, batch, options, progress=progress, label=label)
    return measure_requests(send, requests, warmup, probe, watch)


def measure_requests(send: SendAll, requests: Sequence[Request], warmup: Sequence[Request],
                     probe: ServiceProbe | None = None, watch: ProcessWatch | None = None) -> Measurement:
    """Run the warm-up, then inside `watch`: read the counters, run the measured requests, read them again."""
    if warmup:
        asyncio.run(send(warmup, False))
    with watch or nullcontext():
        before = probe.read() if probe else None
        start_ns = time.monotonic_ns()
        records, wall_s = asyncio.run(send(requests, True))
        end_ns = time.monotonic_ns()
        after = probe.read() if probe else None
    return Measurement(records, wall_s, after.minus(before) if probe else None,
                       tuple(probe.stage_addresses) if probe else (), tuple(probe.sampler_addresses) if probe else (),
                       watch.cpu if watch else None, watch.profiles if watch else None, window_ns=(start_ns, end_ns))


async def send_all(endpoint: str, requests: Sequence[Request], options: SendOptions, progress: bool = False,
                   label: str = "") -> tuple[list[RequestRecord], float]:
    """Send every request to a Tandem endpoint at its arrival time; return the records and the run's wall time."""
    from tandem.client import AsyncTandemClient

    async with AsyncTandemClient(endpoint, timeout_s=options.timeout_s) as client:
        return await run_requests(requests, options, functools.partial(_send_one, client, options), progress, label)


async def run_requests(requests: Sequence[Request], options: SendOptions, send_one: SendOne, progress: bool = False,
                       label: str = "") -> tuple[list[RequestRecord], float]:
    """Send every request through `send_one` at its arrival time, at most options.max_concurrency at a time."""
    from tqdm import tqdm

    slots = asyncio.Semaphore(options.max_concurrency or len(requests) or 1)
    bar = tqdm(total=len(requests), desc=label or "requests", unit="req", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, leave=False)
    start = time.perf_counter()

    async def one(request: Request) -> RequestRecord:
        record = RequestRecord(request.index, request.prompt_len, request.output_len)
        await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
        async with slots:
            record.sent_s = time.perf_counter() - start
            await send_one(request, record, start)
            record.done_s = time.perf_counter() - start
        return record

    tasks = [asyncio.create_task(one(r)) for r in requests]
    for task in asyncio.as_completed(tasks):
        await task
        bar.update(1)
    wall_s = time.perf_counter() - start
    bar.close()
    return [t.result() for t in tasks], wall_s


async def _send_one(client, options: SendOptions, request: Request, record: RequestRecord, start: float) -> None:
    from tandem.client import ClientError

    if not options.stream:
        try:
            result = await client.generate(prompt_ids=list(request.prompt_ids), max_tokens=request.output_len,
                                           ignore_eos=True, seed=options.seed + max(request.index, 0),
                                           **options.sampling)
        except ClientError as e:
            record.error = str(e)
            return
        record.output_tokens = len(result.token_ids)
        return
    stream = client.generate_stream(prompt_ids=list(request.prompt_ids), max_tokens=request.output_len,
                                    ignore_eos=True, seed=options.seed + max(request.index, 0), **options.sampling)
    try:
        async for chunk in stream:
            if chunk.token_ids and record.first_token_s is None:
                record.first_token_s = time.perf_counter() - start
            record.output_tokens += len(chunk.token_ids)
    except ClientError as e:
        record.error = str(e)
    finally:
        stream.close()
