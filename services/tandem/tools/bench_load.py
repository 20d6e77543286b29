"""Load benchmark: many concurrent streams against `tandem up`, then a burst past the queue limit.

    PYTHONPATH=services python -m tandem.tools.bench_load [--streams 500] [--max-tokens 64]
        [--prompt-len 8] [--max-queue N] [--burst 100] [--connections 4] [--json PATH]

It starts `tandem up` on the bundled tiny model (every service a process, no gateway) and:

1. opens `--streams` Generate streams at once with the asyncio client (greedy, `ignore_eos`,
   `--max-tokens` each) and counts how each ended: OK or its status code;
2. fills the coordinator's queue with long streams until it reports `--max-queue` requests
   waiting (in batches no larger than the room left, each taken in before the next is sent, so
   that no call past the limit is still waiting to be accepted), then sends `--burst` requests
   at once, then 10 more one at a time: each should be refused RESOURCE_EXHAUSTED, and how long
   a refusal took is reported (p50, p99, max; the goal is under 100 ms);
3. lets every held stream go (the clients leave, so the coordinator aborts them), waits until
   nothing runs or waits, and sends one more request, which must succeed (recovery).

Throughout, another thread checks the coordinator's health (its readiness) every
`--health-interval-s` and the latency of each answer is kept (the goal: all under 1 s), and
every service's resident memory is read from /proc: at the start, at the end, and its peak
(VmHWM). The CPU time each service used during the streams phase is reported too, with the
coordinator's per output token. Every process it started is stopped at the end. It prints a
summary (or all of it as JSON with `--json`) and exits 1 when a goal was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.bench.cputime import process_cpu_s
from tandem.bench.stats import percentile
from tandem.client import AsyncGenerateStream, AsyncTandemClient
from tandem.client.errors import ClientError
from tandem.tools.local_deployment import memory_mb, services_of, start_up, stop

SERVICE = "tandem.v1.Coordinator"
HOLD_TOKENS = 400  # a stream that fills the queue: long enough to outlast the burst
ADMITTED_AFTER_S = 5.0  # a burst request not answered by then was admitted (it waits for a slot)
FILL_BATCH = 50  # most held streams sent at once while filling the queue
NUM_SINGLES = 10  # requests then sent past the limit one at a time, each after the last was answered
SETTLE_S = 10.0  # the longest a batch of held streams is waited for before the next is sent


class HealthProbe(threading.Thread):
    """Checks the coordinator's readiness every `interval_s` until stopped; keeps each latency."""

    def __init__(self, endpoint: str, interval_s: float):
        super().__init__(name="health-probe", daemon=True)
        self.endpoint, self.interval_s = endpoint, interval_s
        self.latencies_s: list[float] = []
        self.failures: Counter[str] = Counter()
        self._done = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.endpoint) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._done.wait(self.interval_s):
                start = time.perf_counter()
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
                    if status != health_pb2.HealthCheckResponse.SERVING:
                        self.failures[health_pb2.HealthCheckResponse.ServingStatus.Name(status)] += 1
                except grpc.RpcError as e:
                    self.failures[e.code().name] += 1
                self.latencies_s.append(time.perf_counter() - start)

    def stop(self) -> None:
        self._done.set()
        self.join(10)


def figures_ms(values_s: list[float]) -> dict[str, float]:
    values = sorted(v * 1e3 for v in values_s)
    if not values:
        return {"count": 0}
    return {"count": len(values), "p50_ms": round(percentile(values, 50), 2), "p99_ms": round(percentile(values, 99), 2),
            "max_ms": round(values[-1], 2)}


async def one_stream(client: AsyncTandemClient, prompt: list[int], max_tokens: int) -> tuple[str, int, float]:
    """How the stream ended (OK or a status code), its tokens, and its time to first token."""
    start, first, num_tokens = time.perf_counter(), 0.0, 0
    try:
        async with client.generate_stream(prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True,
                                          temperature=0.0) as stream:
            async for chunk in stream:
                first = first or time.perf_counter() - start
                num_tokens += len(chunk.token_ids)
    except ClientError as e:
        return e.code.name, num_tokens, first
    return "OK" if num_tokens == max_tokens else "SHORT", num_tokens, first


async def streams_phase(clients: list[AsyncTandemClient], args: argparse.Namespace, rng: random.Random) -> dict:
    prompts = [[rng.randrange(3, 4096) for _ in range(args.prompt_len)] for _ in range(args.streams)]
    start = time.perf_counter()
    ends = await asyncio.gather(*(one_stream(clients[i % len(clients)], p, args.max_tokens) for i, p in enumerate(prompts)))
    wall_s = time.perf_counter() - start
    num_tokens = sum(n for _, n, _ in ends)
    return {"streams": args.streams, "ends": dict(Counter(code for code, _, _ in ends)), "output_tokens": num_tokens,
            "wall_s": round(wall_s, 2), "output_tokens_per_s": round(num_tokens / wall_s, 1),
            "time_to_first_token": figures_ms([t for _, _, t in ends if t])}


async def refused_in(client: AsyncTandemClient, request_id: str = "") -> tuple[str, float]:
    start = time.perf_counter()
    try:
        await client.generate(prompt_ids=[5, 6, 7], max_tokens=1, request_id=request_id)
        code = "OK"
    except ClientError as e:
        code = e.code.name
    return code, time.perf_counter() - start


async def one_past_the_limit(client: AsyncTandemClient, request_id: str) -> tuple[str, float]:
    """A request sent alone, after the burst: refused, or ADMITTED if not answered in time."""
    try:
        return await asyncio.wait_for(refused_in(client, request_id), ADMITTED_AFTER_S)
    except asyncio.TimeoutError:
        return "ADMITTED", ADMITTED_AFTER_S


async def fill_queue(clients: list[AsyncTandemClient], args: argparse.Namespace) -> list[AsyncGenerateStream]:
    """Hold streams until the coordinator reports `max_queue` waiting, sending no more at a time than
    the room left and the next batch only once it has taken in the last (every held stream running
    or waiting): calls sent past a limit it has not yet reported would wait in its accept queue,
    and the burst behind them would time their refusals, not its own. The held streams are not
    read (their few tokens wait in flow-control windows): this process's event loop stays free to
    time the burst."""
    held: list[AsyncGenerateStream] = []
    start = settled = time.perf_counter()
    while True:
        info = await clients[0].server_info()
        num_taken = info.num_requests_running + info.num_requests_waiting
        if num_taken >= len(held) or time.perf_counter() - settled > SETTLE_S:
            if info.num_requests_waiting >= args.max_queue:
                return held
            room = min(FILL_BATCH, args.max_queue - info.num_requests_waiting)
            held += [clients[i % len(clients)].generate_stream(prompt_ids=[7, 8, 9], max_tokens=HOLD_TOKENS,
                                                               ignore_eos=True) for i in range(len(held), len(held) + room)]
            settled = time.perf_counter()
        if time.perf_counter() - start > args.timeout_s:
            raise RuntimeError(f"the queue did not fill within {args.timeout_s:.0f}s ({len(held)} streams held)")
        await asyncio.sleep(0.05)


async def burst_phase(clients: list[AsyncTandemClient], args: argparse.Namespace) -> dict:
    """Fill the queue with held streams, burst past it, let go, and check that a request succeeds."""
    client = clients[0]
    held = await fill_queue(clients, args)
    at_burst = await client.server_info()
    burst = [asyncio.create_task(refused_in(clients[i % len(clients)], f"burst-{i}")) for i in range(args.burst)]
    done, admitted = await asyncio.wait(burst, timeout=ADMITTED_AFTER_S)
    ends = [task.result() for task in done]
    singles = [await one_past_the_limit(client, f"single-{i}") for i in range(NUM_SINGLES)]
    for stream in held:  # the clients leave: the coordinator aborts their requests
        stream.close()
    for task in admitted:
        task.cancel()
    await asyncio.gather(*admitted, return_exceptions=True)
    let_go = time.perf_counter()
    while (info := await client.server_info()).num_requests_running or info.num_requests_waiting:
        if time.perf_counter() - let_go > args.timeout_s:
            raise RuntimeError(f"requests still held {args.timeout_s:.0f}s after their clients left: {info}")
        await asyncio.sleep(0.05)
    released_s = time.perf_counter() - let_go
    after, after_s = await refused_in(client)
    return {"held_streams": len(held), "running_at_burst": at_burst.num_requests_running,
            "waiting_at_burst": at_burst.num_requests_waiting, "burst": args.burst,
            "ends": {**Counter(code for code, _ in ends), **({"ADMITTED": len(admitted)} if admitted else {})},
            "refusal": figures_ms([s for code, s in ends if code == "RESOURCE_EXHAUSTED"]),
            "one_at_a_time": {"ends": dict(Counter(code for code, _ in singles)),
                              "refusal": figures_ms([s for code, s in singles if code == "RESOURCE_EXHAUSTED"])},
            "released_s": round(released_s, 2), "after": {"end": after, "latency_ms": round(after_s * 1e3, 1)}}


async def load(endpoint: str, args: argparse.Namespace, services: dict[str, int]) -> dict:
    clients = [AsyncTandemClient(endpoint, timeout_s=args.timeout_s) for _ in range(args.connections)]
    try:
        cpu_start = {name: process_cpu_s(pid) for name, pid in services.items()}
        streams = await streams_phase(clients, args, random.Random(0))
        cpu = {name: round(process_cpu_s(pid) - cpu_start[name], 2) for name, pid in services.items()}
        coordinator_s = cpu.get("coordinator", 0.0)
        streams["cpu_s"] = cpu
        streams["coordinator_cpu_us_per_token"] = round(coordinator_s * 1e6 / max(1, streams["output_tokens"]), 1)
        return {"streams": streams, "burst": await burst_phase(clients, args)}
    finally:
        for client in clients:
            await client.close()


def goals(report: dict) -> dict[str, bool]:
    streams, burst, health = report["streams"], report["burst"], report["health"]
    return {
        "every_stream_ok": streams["ends"] == {"OK": streams["streams"]},
        "health_always_serving": not health["failures"],
        "health_max_under_1s": health.get("max_ms", 0) < 1000,
        "refused_under_100ms": burst["refusal"].get("max_ms", 1e9) < 100,
        "alone_refused_under_100ms": burst["one_at_a_time"]["refusal"].get("max_ms", 1e9) < 100,
        "burst_refused": burst["ends"].get("RESOURCE_EXHAUSTED", 0) > 0,
        "recovered": burst["after"]["end"] == "OK",
    }


def run(args: argparse.Namespace) -> dict:
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="tandem-bench-load-")
    proc, endpoint = start_up(["--no-gateway", "--stages", str(args.stages), "--samplers", str(args.samplers),
                               "--num-blocks", str(args.num_blocks), "--max-queue", str(args.max_queue)], log_dir)
    services: dict[str, int] = {}
    try:
        services = services_of(proc.pid)
        memory_start = {name: memory_mb(pid)["rss_mb"] for name, pid in services.items()}
        probe = HealthProbe(endpoint, args.health_interval_s)
        probe.start()
        try:
            report = asyncio.run(load(endpoint, args, services))
        finally:
            probe.stop()
        report["health"] = {**figures_ms(probe.latencies_s), "failures": dict(probe.failures)}
        report["memory"] = {name: {"start_rss_mb": memory_start[name], **memory_mb(pid)} for name, pid in services.items()}
        report["goals"] = goals(report)
        report["log_dir"] = log_dir
        return report
    finally:
        stop(proc, services)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams (default: 500)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each stream generates (default: 64)")
    parser.add_argument("--prompt-len", type=int, default=8, help="random prompt tokens of each stream (default: 8)")
    parser.add_argument("--max-queue", type=int, default=0,
                        help="the coordinator's max_queue (default: 0, the number of streams, so all may wait at once)")
    parser.add_argument("--burst", type=int, default=100, help="requests sent at once past the full queue (default: 100)")
    parser.add_argument("--connections", type=int, default=4, help="client channels the streams share (default: 4)")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages (default: 2)")
    parser.add_argument("--samplers", type=int, default=2, help="CPU sampler replicas (default: 2)")
    parser.add_argument("--num-blocks", type=int, default=2048, help="KV blocks per stage (default: 2048)")
    parser.add_argument("--health-interval-s", type=float, default=0.05, help="between health checks (default: 0.05)")
    parser.add_argument("--timeout-s", type=float, default=600, help="longest a phase may take (default: 600)")
    parser.add_argument("--log-dir", help="where the services write their logs (default: a temporary directory)")
    parser.add_argument("--json", help="write the whole report here as JSON")
    args = parser.parse_args(argv)
    for name in ("streams", "max_tokens", "prompt_len", "burst", "connections", "stages", "samplers", "num_blocks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.max_queue = args.max_queue or args.streams
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("streams", "burst", "health", "goals")}, indent=2))
    for name, figures in report["memory"].items():
        print(f"{name}: RSS {figures['start_rss_mb']} MiB at the start, {figures['rss_mb']} at the end, "
              f"peak {figures['peak_rss_mb']}")
    missed = [goal for goal, met in report["goals"].items() if not met]
    if missed:
        print(f"goals missed: {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
