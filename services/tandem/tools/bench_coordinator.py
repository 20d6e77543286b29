"""Benchmark: the coordinator's engine loop alone, over fake stages and samplers.

    PYTHONPATH=services python -m tandem.tools.bench_coordinator [--seqs 64 256 1024] [--steps 200]
        [--prompt-len 128] [--stages 2] [--samplers 2] [--max-in-flight 1] [--repeats 3] [--model DIR]
        [--json PATH]

`--seqs` requests decode with no end in sight; once all of them are past their prefill, the
loop is timed over `--steps` steps. With `--max-in-flight 1` (the default) every step holds
every running sequence, so a step is one token for each; with more, the sequences spread over
that many micro-batches. The fakes answer every row at once, off the clock; on the clock is
what the coordinator's own threads would do: parse each sampler's SampledBatch, the loop's
turn (commit each token with its token stop rules, schedule, build the plans) and the
serialization of each stage's and sampler's plan. The public front's work (detokenization
and stop strings, done in each request's coroutine on the front) is timed apart. CPU time is the
thread's own (time.thread_time), so other work on shared cores does not count. It prints,
per run, the loop's CPU milliseconds a step (median and 90th percentile), microseconds a
sequence-step, the front's CPU milliseconds a step, and the bytes of one stage's plan and of
the samplers' plans a step.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from tandem.coordinator.engine import Engine, Inbox
from tandem.coordinator.events import (
    MembershipChanged,
    SamplerUp,
    SequencesAdded,
    StepComputed,
    TokensSampled,
)
from tandem.coordinator.front import TextStream
from tandem.coordinator.requests import Request
from tandem.coordinator.scheduler import Scheduler
from tandem.core.sampling.options import SamplingOptions
from tandem.core.tokenizer import Tokenizer
from tandem.v1 import common_pb2, cpu_sampler_pb2

TINY_MODEL = Path(__file__).resolve().parents[1] / "assets" / "tiny"
BLOCK_SIZE = 16


class Stage:
    """A stage that takes plans: serializes each, as its stream would, and counts the bytes."""

    def __init__(self) -> None:
        self.plans: list = []
        self.num_bytes = 0
        self.samplers: list[str] = []  # the sampler table the plans sent

    def send(self, plan) -> None:
        self.num_bytes += len(plan.SerializeToString())
        self.plans.append(plan)
        if plan.sampler_addresses:
            self.samplers = list(plan.sampler_addresses)

    def reset(self) -> None:
        pass

    def watch(self) -> None:
        pass

    def close(self) -> None:
        pass


class Sampler:
    """A replica that holds whatever it is given and answers every row it is asked (off the clock)."""

    def __init__(self, address: str, inbox: Inbox, rng: random.Random, vocab_size: int):
        self.address, self.inbox, self.rng, self.vocab_size = address, inbox, rng, vocab_size
        self.num_plan_bytes = 0

    def start(self) -> None:
        self.inbox.put(SamplerUp(self))

    def add(self, sequences) -> None:
        self.inbox.put(SequencesAdded(self, tuple(s.request_id for s in sequences)))

    def release(self, request_ids) -> None:
        pass

    def send_plan(self, plan) -> None:
        self.num_plan_bytes += len(plan.SerializeToString())

    def reconnect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def answer(self, step_id: int, rows: list[tuple[str, int]]) -> bytes:
        """The SampledBatch this replica would send for its rows of a step, serialized."""
        tokens = [cpu_sampler_pb2.SampledToken(request_id=rid, sample_index=index,
                                               token_id=self.rng.randrange(3, self.vocab_size))
                  for rid, index in rows]
        return cpu_sampler_pb2.SampledBatch(step_id=step_id, tokens=tokens).SerializeToString()


def run(num_seqs: int, num_steps: int, prompt_len: int, num_stages: int, num_samplers: int, max_in_flight: int,
        tokenizer: Tokenizer) -> dict:
    inbox: Inbox = Inbox()
    rng = random.Random(0)
    stages = [Stage() for _ in range(num_stages)]
    samplers: dict[str, Sampler] = {}

    def open_sampler(address: str) -> Sampler:
        samplers[address] = Sampler(address, inbox, rng, tokenizer.vocab_size)
        return samplers[address]

    max_tokens = num_steps * 2 + prompt_len + 64
    blocks_per_seq = -(-(prompt_len + max_tokens) // BLOCK_SIZE)
    scheduler = Scheduler(num_seqs * blocks_per_seq, BLOCK_SIZE, num_seqs, 8192, max_in_flight)
    engine = Engine(scheduler, stages, open_sampler, None, inbox, max_queue=num_seqs + 1, step_timeout_s=600.0)
    inbox.put(MembershipChanged(frozenset(f"sampler-{i}:1" for i in range(num_samplers))))
    engine.run_once()
    params = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    options = SamplingOptions.from_proto(params, tokenizer.vocab_size, max_tokens_limit=max_tokens)
    fronts = []
    for i in range(num_seqs):
        prompt = [rng.randrange(3, tokenizer.vocab_size) for _ in range(prompt_len)]
        request = Request(request_id=f"request-{i}", prompt_ids=prompt, max_tokens=max_tokens, params=params,
                          options=options, seed=i, eos_token_ids=frozenset())
        engine.submit(request)
        fronts.append(TextStream(request, tokenizer.detokenizer(prompt)))

    answers: list[tuple[Sampler, bytes]] = []
    cpu_s: list[float] = []
    front_cpu_s: list[float] = []
    num_rows: list[float] = []
    plan_bytes: list[float] = []
    sample_plan_bytes: list[float] = []
    while len(cpu_s) < num_steps:
        is_decoding = scheduler.num_running == num_seqs and not scheduler.waiting and scheduler.in_flight
        start_bytes = stages[0].num_bytes, sum(s.num_plan_bytes for s in samplers.values())
        start = time.thread_time()
        for sampler, data in answers:  # what the Results streams' threads parse
            inbox.put(TokensSampled(sampler, cpu_sampler_pb2.SampledBatch.FromString(data)))
        engine.run_once()
        elapsed = time.thread_time() - start
        start = time.thread_time()
        for front in fronts:  # what the request coroutines on the front do with the tokens
            front.take()
        front_elapsed = time.thread_time() - start
        answers = []
        plans = [p for stage in stages[:1] for p in stage.plans]
        for stage in stages:
            stage.plans.clear()
        for plan in plans:  # off the clock: the last stage has run the step, every replica answers its rows at once
            if plan.sequences:
                inbox.put(StepComputed(plan.step_id))
            by_sampler: dict[str, list[tuple[str, int]]] = {}
            for s in plan.sequences:
                if s.is_partial_prefill:  # a prefill chunk: no sampler row
                    continue
                by_sampler.setdefault(stages[0].samplers[s.sampler_index], []).append((s.request_id, s.sample_index))
            answers += [(samplers[a], samplers[a].answer(plan.step_id, rows)) for a, rows in by_sampler.items()]
        decode_plans = [p for p in plans if p.sequences]
        if is_decoding and decode_plans:  # a turn that answered steps and sent new ones
            cpu_s.append(elapsed / len(decode_plans))
            front_cpu_s.append(front_elapsed / len(decode_plans))
            num_rows.append(sum(len(p.sequences) for p in decode_plans) / len(decode_plans))
            plan_bytes.append((stages[0].num_bytes - start_bytes[0]) / len(decode_plans))
            sampler_bytes = sum(s.num_plan_bytes for s in samplers.values()) - start_bytes[1]
            sample_plan_bytes.append(sampler_bytes / len(decode_plans))
    per_step_ms = sorted(c * 1e3 for c in cpu_s)
    mean_rows = statistics.mean(num_rows)
    return {
        "running_sequences": num_seqs, "sequences_per_step": round(mean_rows, 1),
        "cpu_ms_per_step_median": round(statistics.median(per_step_ms), 3),
        "cpu_ms_per_step_p90": round(per_step_ms[int(len(per_step_ms) * 0.9)], 3),
        "cpu_us_per_sequence_step": round(statistics.median(per_step_ms) * 1e3 / mean_rows, 2),
        "front_cpu_ms_per_step_median": round(statistics.median(front_cpu_s) * 1e3, 3),
        "stage_plan_bytes_per_step": round(statistics.mean(plan_bytes)),
        "sample_plan_bytes_per_step": round(statistics.mean(sample_plan_bytes)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[64, 256, 1024], help="running decode sequences")
    parser.add_argument("--steps", type=int, default=200, help="timed decode steps a run")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of each sequence")
    parser.add_argument("--stages", type=int, default=2, help="fake stages (each gets every plan)")
    parser.add_argument("--samplers", type=int, default=2, help="fake sampler replicas")
    parser.add_argument("--max-in-flight", type=int, default=1, help="micro-batches in flight")
    parser.add_argument("--model", type=Path, default=TINY_MODEL, help="model directory whose tokenizer detokenizes")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each size; the one with the lowest median is kept (the cores are shared)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_dir(args.model)
    results = []
    for num_seqs in args.seqs:
        result = min((run(num_seqs, args.steps, args.prompt_len, args.stages, args.samplers, args.max_in_flight,
                          tokenizer) for _ in range(args.repeats)), key=lambda r: r["cpu_ms_per_step_median"])
        results.append(result)
        print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
