"""The requests a benchmark sends: synthetic (seeded) or read from a JSONL trace.

Length distributions, written `KIND:PARAMS` (a bare integer N means `fixed:N`):

- `fixed:N`                  every request has N tokens.
- `uniform:LO,HI`            an integer drawn uniformly from [LO, HI], both included.
- `lognormal:MEAN,SIGMA[,MAX]`  a log-normal draw whose *mean* is MEAN tokens and whose
  underlying normal has standard deviation SIGMA (so mu = ln(MEAN) - SIGMA**2 / 2), rounded
  to an integer and clipped to [1, MAX]; MAX defaults to 4 * MEAN. Real traces have long
  tails; the clip keeps one unlucky draw from dominating a short benchmark.

Every random choice comes from its own stream, seeded by (seed, purpose), so that the
prompts stay the same when, say, only the request rate changes, and two runs compared with
each other see exactly the same requests.

A trace (`--dataset FILE.jsonl`) has one JSON object per line with integer `prompt_len` and
`output_len` (both >= 1) and optionally `prompt` (text). Blank lines are skipped. Without
`prompt`, the prompt is `prompt_len` random token ids; with it, the prompt is the text's
tokens, cut to `prompt_len` or repeated up to it, so that the trace's lengths always hold.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Warm-up requests only need to touch every code path once; long outputs would waste time.
WARMUP_MAX_OUTPUT_LEN = 16
LOGNORMAL_DEFAULT_CAP = 4


@dataclass(frozen=True)
class LengthDistribution:
    """A distribution of token counts; see the module docstring for the kinds."""

    kind: str  # "fixed", "uniform" or "lognormal"
    a: float  # fixed: N; uniform: LO; lognormal: MEAN
    b: float = 0.0  # uniform: HI; lognormal: SIGMA
    cap: int = 0  # lognormal: MAX

    @property
    def low(self) -> int:
        """The smallest length the distribution can give."""
        return {"fixed": int(self.a), "uniform": int(self.a)}.get(self.kind, 1)

    @property
    def high(self) -> int:
        """The largest length the distribution can give."""
        return {"fixed": int(self.a), "uniform": int(self.b)}.get(self.kind, self.cap)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        mu = math.log(self.a) - self.b**2 / 2
        return min(self.cap, max(1, round(rng.lognormvariate(mu, self.b))))

    def spec(self) -> str:
        """The `KIND:PARAMS` text that parses back to this distribution."""
        if self.kind == "fixed":
            return f"fixed:{int(self.a)}"
        if self.kind == "uniform":
            return f"uniform:{int(self.a)},{int(self.b)}"
        return f"lognormal:{self.a:g},{self.b:g},{self.cap}"


def parse_length(text: str) -> LengthDistribution:
    """Parse `N`, `fixed:N`, `uniform:LO,HI` or `lognormal:MEAN,SIGMA[,MAX]`; ValueError if bad."""
    kind, _, params = text.strip().partition(":")
    if not params and kind.isdigit():
        kind, params = "fixed", kind
    try:
        values = [float(p) for p in params.split(",")] if params else []
    except ValueError:
        raise ValueError(f"{text!r}: parameters must be numbers") from None

    def whole(v: float, what: str) -> int:
        if v != int(v) or v < 1:
            raise ValueError(f"{text!r}: {what} must be a whole number >= 1")
        return int(v)

    if kind == "fixed" and len(values) == 1:
        return LengthDistribution("fixed", whole(values[0], "N"))
    if kind == "uniform" and len(values) == 2:
        lo, hi = whole(values[0], "LO"), whole(values[1], "HI")
        if lo > hi:
            raise ValueError(f"{text!r}: LO must not exceed HI")
        return LengthDistribution("uniform", lo, hi)
    if kind == "lognormal" and len(values) in (2, 3):
        mean, sigma = values[0], values[1]
        if mean < 1 or sigma < 0:
            raise ValueError(f"{text!r}: MEAN must be >= 1 and SIGMA >= 0")
        cap = whole(values[2], "MAX") if len(values) == 3 else math.ceil(LOGNORMAL_DEFAULT_CAP * mean)
        return LengthDistribution("lognormal", mean, sigma, cap)
    raise ValueError(f"{text!r}: expected N, fixed:N, uniform:LO,HI or lognormal:MEAN,SIGMA[,MAX]")


@dataclass(frozen=True)
class Request:
    """One request of a workload: what to send and when, relative to the start."""

    index: int
    prompt_ids: tuple[int, ...]
    output_len: int
    arrival_s: float = 0.0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class TraceEntry:
    """One line of a JSONL trace."""

    prompt_len: int
    output_len: int
    prompt: str | None = None


@dataclass(frozen=True)
class Workload:
    """The measured requests, the warm-up requests, and how they were made (for the report)."""

    requests: tuple[Request, ...]
    warmup: tuple[Request, ...]
    description: dict

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_len for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)


def _rng(seed: int, purpose: str) -> random.Random:
    """An independent, reproducible stream per purpose (string seeds hash with SHA-512)."""
    return random.Random(f"tandem-bench:{seed}:{purpose}")


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(rng.randrange(vocab_size) for _ in range(length))


def arrival_times(n: int, request_rate: float, rng: random.Random) -> list[float]:
    """Poisson arrivals at `request_rate` per second (first at 0); all at 0 when it is inf."""
    if math.isinf(request_rate):
        return [0.0] * n
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(request_rate)
    return times


def synthetic_entries(num_requests: int, prompt_len: LengthDistribution, output_len: LengthDistribution,
                      seed: int) -> list[TraceEntry]:
    prompt_rng, output_rng = _rng(seed, "prompt_len"), _rng(seed, "output_len")
    return [TraceEntry(prompt_len.sample(prompt_rng), output_len.sample(output_rng)) for _ in range(num_requests)]


class DatasetError(ValueError):
    """A trace file that cannot be read; the message names the file, line and field."""


def read_dataset(path: str | Path) -> list[TraceEntry]:
    """Read a JSONL trace (see the module docstring); DatasetError names the bad line and field."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                entries.append(_parse_trace_line(line, f"{path}, line {number}"))
    if not entries:
        raise DatasetError(f"{path}: no requests in the file")
    return entries


def _parse_trace_line(line: str, where: str) -> TraceEntry:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    lengths = {}
    for field in ("prompt_len", "output_len"):
        value = obj.get(field)
        if field not in obj:
            raise DatasetError(f"{where}: field {field!r} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DatasetError(f"{where}: field {field!r} must be an integer >= 1, got {value!r}")
        lengths[field] = value
    prompt = obj.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise DatasetError(f"{where}: field 'prompt' must be non-empty text, got {prompt!r}")
    return TraceEntry(lengths["prompt_len"], lengths["output_len"], prompt)


def fit_to_length(ids: Sequence[int], length: int) -> tuple[int, ...]:
    """`ids` cut to `length`, or repeated until it is that long."""
    if not ids:
        raise ValueError("cannot fit an empty token list")
    repeats = -(-length // len(ids))
    return tuple((list(ids) * repeats)[:length])


def build_workload(entries: Sequence[TraceEntry], vocab_size: int, seed: int, *, num_warmup: int = 2,
                   request_rate: float = math.inf, tokenize: Callable[[str], list[int]] | None = None,
                   description: dict | None = None, shared_prefix_len: int = 0) -> Workload:
    """Turn lengths (synthetic or from a trace) into requests with prompts and arrival times.

    With `shared_prefix_len`, every measured prompt starts with the same that many random tokens
    (a system prompt) before its own `prompt_len` tokens: a prefix cache's workload.
    Warm-up requests get fresh random prompts, not the measured ones: a prefix cache would
    otherwise make the measured requests cheaper than they are.
    """
    prefix = random_prompt(_rng(seed, "shared_prefix"), shared_prefix_len, vocab_size)
    prompt_rng = _rng(seed, "prompt_ids")
    arrivals = arrival_times(len(entries), request_rate, _rng(seed, "arrivals"))
    requests = []
    for i, (entry, arrival) in enumerate(zip(entries, arrivals)):
        if entry.prompt is not None:
            if tokenize is None:
                raise ValueError("the trace has prompt text but no tokenizer was given")
            prompt = fit_to_length(tokenize(entry.prompt), entry.prompt_len)
        else:
            prompt = random_prompt(prompt_rng, entry.prompt_len, vocab_size)
        requests.append(Request(i, prefix + prompt, entry.output_len, arrival))
    warm_rng = _rng(seed, "warmup")
    warmup = tuple(Request(-1 - i, random_prompt(warm_rng, e.prompt_len, vocab_size),
                           min(e.output_len, WARMUP_MAX_OUTPUT_LEN))
                   for i, e in enumerate(entries[:num_warmup]))
    info = dict(description or {})
    info.update(seed=seed, num_requests=len(requests), num_warmup=len(warmup),
                request_rate=None if math.isinf(request_rate) else request_rate, shared_prefix_len=shared_prefix_len,
                prompt_tokens=sum(r.prompt_len for r in requests),
                output_tokens=sum(r.output_len for r in requests), vocab_size=vocab_size)
    return Workload(tuple(requests), warmup, info)


def check_fits(workload: Workload, max_model_len: int) -> None:
    """ValueError naming the first request whose prompt plus output exceeds the model's context."""
    for r in workload.requests:  # warm-up requests are never longer than these
        if r.prompt_len + r.output_len > max_model_len:
            raise ValueError(f"request {r.index}: prompt {r.prompt_len} + output {r.output_len} tokens exceed the "
                             f"model's {max_model_len}; use shorter lengths")
