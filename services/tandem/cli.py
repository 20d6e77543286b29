"""The `tandem` command line."""

from __future__ import annotations

import argparse
import os
import sys
from importlib.resources import files
from pathlib import Path

from tandem import compose
from tandem.core.wire.tls import TlsConfig
from tandem.presets import SWITCHES, resolve

BUNDLED_MODEL = "tiny"


def bundled_model_dir() -> Path:
    """The tiny Llama-architecture model shipped with the package, trained on Python source."""
    return Path(str(files("tandem.assets") / BUNDLED_MODEL))


def _preset(name: str) -> str:
    try:
        resolve(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def _demo(args: argparse.Namespace) -> int:
    """Start every service on loopback, stream one completion, shut down."""
    import time

    from tandem.client import TandemClient
    from tandem.launcher import Launcher

    model = args.model or str(bundled_model_dir())
    launcher = Launcher(say=_say)
    try:
        t0 = time.monotonic()
        endpoint = launcher.up(model, args.stages, args.samplers, port=0, device=args.device)
        print(f"# {Path(model).name}: {args.stages} stages, {args.samplers} samplers and a KV store ready on "
              f"{endpoint} in {time.monotonic() - t0:.1f}s (logs in {launcher.log_dir})", file=sys.stderr)
        with TandemClient(endpoint, timeout_s=300) as client:
            sys.stdout.write(args.prompt)
            stream = client.generate_stream(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                            top_p=0.95, seed=args.seed)
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            r = stream.result
            sys.stdout.write("\n")
            if r is not None:
                print(f"# {r.usage.completion_tokens} tokens, finish reason {r.finish_reason}, "
                      f"{r.e2e_latency_s:.2f}s", file=sys.stderr)
    finally:
        launcher.stop()
    return 0


def _say(line: str) -> None:
    print(f"tandem: {line}", file=sys.stderr, flush=True)


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from tandem.core.config import load_config
    from tandem.core.cpus import keep_freed_memory, limit_interop_threads
    from tandem.launcher import READY_PREFIX

    keep_freed_memory()  # before the service allocates its working memory
    limit_interop_threads()  # before the service runs any torch work

    service = args.service.replace("-", "_")
    server = compose.serve(service, load_config(compose.config_class(service), args.config))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"{READY_PREFIX}{server.address}", flush=True)
    stop.wait()
    if (drain := getattr(server, "drain", None)) is not None:  # SIGTERM: finish what is held first
        drain(args.drain_s)
    server.stop()
    return 0


def _up(args: argparse.Namespace) -> int:
    import signal
    import threading

    from tandem.launcher import Launcher

    model = args.model or str(bundled_model_dir())
    launcher = Launcher(log_dir=args.log_dir, say=_say)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        address = launcher.up(model, args.stages, args.samplers, args.port, num_blocks=args.num_blocks,
                              kv_store=not args.no_kv_store, device=args.device, preset=args.preset,
                              stage_threads=args.stage_threads, stage_boundaries=args.stage_boundaries,
                              max_in_flight=args.max_in_flight, max_num_seqs=args.max_num_seqs,
                              gateway_port=None if args.no_gateway else args.gateway_port,
                              tls=_tls_dir(args.tls_dir), max_queue=args.max_queue,
                              stream_interval=args.stream_interval)
        print(f"tandem ready on {address}", flush=True)
        if launcher.gateway:
            print(f"tandem OpenAI-compatible API on http://{launcher.gateway}/v1", flush=True)
        while not stop.wait(0.5):
            if (dead := launcher.first_exited()) is not None:
                print(f"tandem: {dead[0]} exited with status {dead[1]}; stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        launcher.stop()


def _tls_dir(directory: str | None) -> TlsConfig | None:
    """The TlsConfig of a directory holding ca.crt, tls.crt and tls.key (a kubernetes.io/tls Secret's
    files plus its CA); None: plaintext."""
    if not directory:
        return None
    path = Path(directory)
    return TlsConfig(cert_file=str(path / "tls.crt"), key_file=str(path / "tls.key"), ca_file=str(path / "ca.crt"))


def _generate(args: argparse.Namespace) -> int:
    import json

    from tandem.client import TandemClient
    from tandem.client.errors import ClientError

    prompt_ids = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
    if (args.prompt is None) == (prompt_ids is None):
        print("tandem generate: give a PROMPT or --prompt-ids, not both", file=sys.stderr)
        return 2
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, ignore_eos=args.ignore_eos)
    try:
        with TandemClient(args.endpoint, timeout_s=args.timeout, api_key=args.api_key or None) as client:
            if args.json:
                r = client.generate(args.prompt, prompt_ids=prompt_ids, **sampling)
                print(json.dumps({"request_id": r.request_id, "token_ids": list(r.token_ids), "text": r.text,
                                  "finish_reason": r.finish_reason}))
                return 0
            stream = client.generate_stream(args.prompt, prompt_ids=prompt_ids, **sampling)
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
    except ClientError as e:
        print(f"tandem generate: {e}", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Measure throughput and latency; see tandem.bench."""
    from tandem.bench.command import run

    return run(args, str(bundled_model_dir()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="start the services with the bundled model, stream one completion, stop")
    demo.add_argument("--model", help="Hugging Face model directory (default: the bundled tiny model)")
    demo.add_argument("--prompt", default="def parse_args(", help="text to continue")
    demo.add_argument("--max-tokens", type=int, default=96, help="tokens to generate")
    demo.add_argument("--stages", type=int, default=2, help="pipeline stages to split the model into")
    demo.add_argument("--samplers", type=int, default=2, help="CPU sampler replicas")
    demo.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    demo.add_argument("--seed", type=int, default=0, help="sampling seed")
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    demo.set_defaults(func=_demo)

    serve = sub.add_parser("serve", help="run one service (what the containers run)")
    serve.add_argument("service", choices=[*compose.SERVICES, *(n.replace("_", "-") for n in compose.SERVICES)])
    serve.add_argument("--config", required=True, help="the service's YAML configuration")
    serve.add_argument("--drain-s", type=float, default=30.0,
                       help="on SIGTERM, report NOT_SERVING and let the coordinator finish its requests for at "
                            "most this long before stopping (new ones get UNAVAILABLE); default 30")
    serve.set_defaults(func=_serve)

    from tandem.launcher import add_layout_arguments

    up = sub.add_parser("up", help="start every service on loopback and stop them all on Ctrl-C")
    up.add_argument("--model", help="Hugging Face model directory (default: the bundled tiny model)")
    up.add_argument("--stages", type=int, default=2, help="pipeline stages")
    up.add_argument("--samplers", type=int, default=2, help="CPU sampler replicas")
    up.add_argument("--port", type=int, default=50051, help="port of the public API")
    up.add_argument("--gateway-port", type=int, default=8000, help="port of the OpenAI-compatible HTTP API")
    up.add_argument("--no-gateway", action="store_true", help="do not start the OpenAI-compatible gateway")
    up.add_argument("--num-blocks", type=int, default=512, help="KV blocks per stage")
    up.add_argument("--device", default="cpu", help="device of the stage workers")
    up.add_argument("--no-kv-store", action="store_true", help="no host KV tier: preemption recomputes")
    up.add_argument("--max-queue", type=int, default=256,
                    help="most requests waiting for admission; more are refused with RESOURCE_EXHAUSTED (default: 256)")
    up.add_argument("--preset", default="full", type=_preset,
                    help="techniques switched on: full (all), baseline (a vLLM-style pipeline), full-SWITCH "
                         "(all but one) or baseline+SWITCH (only one); switches: " + ", ".join(SWITCHES))
    add_layout_arguments(up)
    up.add_argument("--log-dir", help="where each service writes its log (default: a temporary directory)")
    up.add_argument("--tls-dir", help="directory of ca.crt, tls.crt and tls.key: mutual TLS between the services "
                                      "and TLS on the public API (default: plaintext)")
    up.set_defaults(func=_up)

    gen = sub.add_parser("generate", help="stream a completion from a running deployment")
    gen.add_argument("prompt", nargs="?", help="prompt text")
    gen.add_argument("--prompt-ids", help="comma-separated prompt token ids instead of text")
    gen.add_argument("--endpoint", default="127.0.0.1:50051", help="host:port of the coordinator")
    gen.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate")
    gen.add_argument("--temperature", type=float, default=None, help="0 for greedy")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--ignore-eos", action="store_true", help="keep going past EOS")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    gen.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY", ""),
                     help="API key sent as a bearer token (default: $TANDEM_API_KEY)")
    gen.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    gen.set_defaults(func=_generate)

    import tandem.bench
    from tandem.bench.options import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="measure throughput and latency on a synthetic or recorded workload",
                           description=tandem.bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tandem.core.errors import ConfigError, ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ModelLoadError) as e:
        print(f"tandem {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
