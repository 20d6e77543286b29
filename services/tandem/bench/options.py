"""The options of `tandem bench`: what to measure, peers, the workload, sampling and output,
each checked as argparse reads it; and the sampling parameters they put on every request.
"""

from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Callable

from tandem.bench.measure import TRANSFORMERS
from tandem.bench.peer import PEER_VENV, VLLM
from tandem.bench.workload import parse_length
from tandem.launcher import add_layout_arguments

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_NUM_REQUESTS = 32
# Sampling parameters sent on every request when given, by their client SDK names.
SAMPLING = ("top_p", "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty")


def _length(text: str):
    try:
        return parse_length(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(kind: type) -> Callable[[str], float]:
    def convert(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return convert


def _within(kind: type, low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    def convert(text: str):
        value = kind(text)
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}], got {text}")
        return value
    return convert


def _addresses(text: str) -> list[str]:
    return [a.strip() for a in text.split(",") if a.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `tandem bench` (see tandem.bench for what it measures)."""
    where = p.add_argument_group("what to measure")
    where.add_argument("--model", help="Hugging Face model directory (default: the bundled tiny model)")
    where.add_argument("--preset", default="full",
                       help="technique preset of the deployment started: full, baseline, full-SWITCH (full with one "
                            "switch off) or baseline+SWITCH (baseline with one on), see tandem.presets "
                            "(default: full)")
    where.add_argument("--compare", type=lambda s: [n.strip() for n in s.split(",") if n.strip()],
                       help="comma-separated runs on the same workload, each in turn: preset names (as --preset) "
                            f"and/or '{TRANSFORMERS}' (Hugging Face generate), '{VLLM}' (the real vLLM's server on "
                            f"every core) and '{VLLM}-ppN' (vLLM, N pipeline stages, the cores split between them), "
                            f"e.g. baseline,full,{TRANSFORMERS},{VLLM},{VLLM}-pp2")
    where.add_argument("--repeats", type=_positive(int), default=1,
                       help="measurements of each run, alternating (A,B,A,B,... for --compare A,B), each on a "
                            "deployment of its own; the report gives medians and the spread (default: 1)")
    where.add_argument("--stages", type=_positive(int), default=2, help="pipeline stages (default: 2)")
    where.add_argument("--samplers", type=_positive(int), default=2, help="CPU sampler replicas (default: 2)")
    where.add_argument("--device", default="cpu", help="device of the stages and of the transformers run")
    where.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="weights and activations of every run, and of the peak matmul (default: auto, the "
                            "checkpoint's dtype on CUDA and float32 on CPU)")
    add_layout_arguments(where)
    where.add_argument("--settle", type=float, default=30.0, metavar="SECONDS",
                       help="before each run, wait up to this long for the cores to be under 15%% busy, so that "
                            "what the run before left (a server stopping, memory being reclaimed) does not slow "
                            "the next one's start and its stage profile; 0: do not wait (default: 30)")
    where.add_argument("--num-blocks", type=_positive(int),
                       help="KV blocks per stage (default: as many as the KV memory each vLLM worker gets, "
                            "VLLM_CPU_KVCACHE_SPACE, would hold with every layer of the model on one stage)")
    where.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                       help="start Tandem's coordinators with prefix caching off (vLLM: --no-enable-prefix-caching "
                            "in --vllm-args)")
    where.add_argument("--log-dir", help="where the started services (and vLLM) write their logs, one folder per run "
                                         "(default: a temporary folder)")
    where.add_argument("--endpoint", help="HOST:PORT of a running deployment to measure instead of starting one")
    where.add_argument("--stage-addresses", type=_addresses, default=[],
                       help="with --endpoint: comma-separated stage addresses, stage 0 first, for stage figures")
    where.add_argument("--sampler-addresses", type=_addresses, default=[],
                       help="with --endpoint: comma-separated sampler addresses, for sampler figures")
    where.add_argument("--hf-batch-size", type=_positive(int), default=16,
                       help=f"requests per static batch of the '{TRANSFORMERS}' run (default: 16)")

    peer = p.add_argument_group("peers: other servers on the same requests (tandem.bench.peer)")
    peer.add_argument("--peer-python", help=f"Python of the virtualenv with vLLM for the '{VLLM}' runs (default: "
                                            f"{PEER_VENV}/bin/python at the repository root, made by `make peer-vllm`)")
    peer.add_argument("--vllm-args", type=shlex.split, default=[],
                      help="more arguments for the vLLM server, as one string, e.g. '--max-num-seqs 64'")
    peer.add_argument("--peer-endpoint", metavar="URL",
                      help="a running OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp) to measure through "
                           "/v1/completions after the other runs (alone without --compare), e.g. http://127.0.0.1:8000")
    peer.add_argument("--peer-name", default="peer", help="the --peer-endpoint run's name (default: peer)")

    load = p.add_argument_group("workload")
    load.add_argument("--num-requests", type=_positive(int),
                      help=f"requests measured (default: {DEFAULT_NUM_REQUESTS}, or every line of --dataset)")
    load.add_argument("--prompt-len", type=_length, default=parse_length("uniform:32,128"),
                      help="prompt length distribution: N, fixed:N, uniform:LO,HI or lognormal:MEAN,SIGMA[,MAX] "
                           "(default: uniform:32,128)")
    load.add_argument("--output-len", type=_length, default=parse_length("uniform:32,128"),
                      help="output length distribution, as --prompt-len (default: uniform:32,128)")
    load.add_argument("--dataset", help="JSONL trace, one {\"prompt_len\": N, \"output_len\": M[, \"prompt\": "
                                        "TEXT]} per line, instead of --prompt-len/--output-len")
    load.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts, arrivals and sampling")
    load.add_argument("--shared-prefix-len", type=int, default=0,
                      help="tokens of one random system prompt every measured prompt starts with, before its own "
                           "prompt length (default: 0; a prefix cache's workload)")
    load.add_argument("--request-rate", type=_positive(float), default=math.inf,
                      help="Poisson arrivals per second (default: inf, every request at once)")
    load.add_argument("--max-concurrency", type=_positive(int),
                      help="most requests in flight (default: no limit; a coordinator refuses requests "
                           "beyond its queue, 256 waiting by default)")
    load.add_argument("--no-stream", dest="stream", action="store_false",
                      help="each request asks for its result alone instead of its tokens as they come (Generate's "
                           "stream: false, and /v1/completions' for the vLLM and --peer-endpoint runs): offline "
                           "use, where no client reads a token early; time to first token and per output token "
                           "are then not measured")
    load.add_argument("--warmup", type=int, default=2, help="unmeasured warm-up requests per run (default: 2)")
    load.add_argument("--timeout", type=_positive(float), help="seconds a request may take (default: no limit)")

    sample = p.add_argument_group("sampling, on every request (unset: the server's default)")
    sample.add_argument("--temperature", type=_within(float, 0, math.inf), default=0.0,
                        help="sampling temperature (default: 0, greedy)")
    sample.add_argument("--top-p", type=_within(float, 0, 1, low_open=True), help="nucleus sampling mass, in (0, 1]")
    sample.add_argument("--top-k", type=_within(int, -1, math.inf), help="most likely tokens kept; -1 or 0: all")
    sample.add_argument("--repetition-penalty", type=_positive(float),
                        help="penalty on tokens already in the prompt or output, > 0 (1: none)")
    for name in ("frequency", "presence"):
        sample.add_argument(f"--{name}-penalty", type=_within(float, -2, 2),
                            help=f"{name} penalty, in [-2, 2]; '{TRANSFORMERS}' runs are refused with a non-zero "
                                 "value, as generate has no such penalty")

    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    out.add_argument("--plot", metavar="PATH.png", help="draw throughput and latency side by side to this PNG")
    out.add_argument("--timeline", metavar="PATH.png",
                     help="draw each Tandem run's first repeat as a timeline of its stages' steps (prefill, decode or "
                          "both) to PATH-RUN.png")
    out.add_argument("--profile", metavar="DIR",
                     help="record every process of each run with py-spy over the measured window, to "
                          "DIR/RUN-PROCESS.txt (collapsed stacks), and report each one's hottest functions; "
                          "py-spy's own CPU time (a row of the CPU table) slows a profiled run, so take "
                          "throughput from runs without it")


def sampling_options(args: argparse.Namespace) -> dict[str, float | int]:
    """The sampling parameters every request carries: the temperature and those given."""
    given = {name: getattr(args, name) for name in SAMPLING if getattr(args, name) is not None}
    return {"temperature": args.temperature, **given}
