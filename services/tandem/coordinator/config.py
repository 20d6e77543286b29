"""Coordinator configuration (the YAML `tandem serve coordinator --config` loads)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tandem.coordinator.limits import Limits
from tandem.core.config import doc
from tandem.core.errors import ConfigError
from tandem.core.metrics import check_metrics_port, metrics_port_field
from tandem.core.wire import discovery
from tandem.core.wire.tls import TlsConfig, tls_field


@dataclass(frozen=True)
class CoordinatorConfig:
    model: str = doc("Hugging Face model directory (config.json, tokenizer.json)", "")
    stages: tuple[str, ...] = doc("host:port of each stage worker, stage 0 first", ())
    samplers: tuple[str, ...] = doc("host:port of each CPU sampler replica (sampler_discovery: static)", ())
    sampler_discovery: str = doc(
        "how sampler replicas are found: static (the samplers list) or endpointslices (follow the "
        "EndpointSlices of sampler_service through the Kubernetes API)", "static")
    sampler_service: str = doc("Kubernetes Service of the sampler pool (sampler_discovery: endpointslices)", "")
    sampler_namespace: str = doc("namespace of sampler_service; empty: the coordinator pod's own", "")
    sampler_port_name: str = doc("name of the sampler Service's gRPC port; empty: its first port", "grpc")
    kubernetes_api: str = doc("URL of the Kubernetes API; empty: the in-cluster API with the pod's service account", "")
    kv_store: str = doc("host:port of the KV store; empty: preempted sequences are recomputed", "")
    host: str = doc("address to listen on", "127.0.0.1")
    port: int = doc("port to listen on; 0 picks a free one", 0)
    num_blocks: int = doc("KV blocks per stage (every stage has the same number)", 512)
    block_size: int = doc("tokens per KV block", 16)
    max_num_seqs: int = doc("most sequences in one micro-batch", 64)
    max_num_batched_tokens: int = doc(
        "most tokens in one micro-batch: decodes first, then prefills with what is left (in chunks with "
        "enable_chunked_prefill, else whole, and a longer prompt runs alone)", 2048)
    enable_chunked_prefill: bool = doc(
        "split a prefill over several micro-batches to fit max_num_batched_tokens, each beside the running "
        "sequences' decodes, as vLLM does; only a prompt's last chunk is sampled", True)
    max_in_flight: int = doc(
        "micro-batches in flight; 0 means one per stage (as vLLM's pipeline runs): each stage has a step to work "
        "on while the others compute, and every micro-batch holds as many rows as it can", 0)
    enable_prefix_caching: bool = doc(
        "reuse the KV blocks of prompt prefixes computed before (whole blocks, found by a hash of every "
        "token up to them); cached blocks no request holds are given up, oldest first, when memory is needed", True)
    temporal_phases: bool = doc(
        "TD-Pipe: the whole pipeline runs prefill micro-batches or decode micro-batches, switching rarely, "
        "and admits prompts while the projected KV peak (from predicted output lengths) fits 90% of the blocks",
        False)
    max_queue: int = doc("most requests waiting for admission; more are refused with RESOURCE_EXHAUSTED", 256)
    max_model_len: int = doc("longest prompt plus output in tokens; 0 means the model's max positions", 0)
    sample_plans: bool = doc(
        "structure-aware transmission: send each sampler the row plan of every step ahead of its logits, "
        "so the last stage's logits frames carry only a step tag and raw bytes (the stages' "
        "structured_streams must be on too)", True)
    greedy_on_stage: bool = doc(
        "the last stage hosts a sampler too (its sample_on_stage) and samples the rows that need only an argmax "
        "(greedy, no penalty, logit bias or logprobs) next to their logits; the sampler replicas take the rest, "
        "and the stage takes every row while no replica is up", False)
    decode_chaining: bool = doc(
        "with greedy_on_stage: while every running sequence decodes and nothing waits, a micro-batch's next "
        "step is sent before its tokens are sampled, and stage 0 takes them straight from the last stage "
        "(which must host the sampler, and stage 0 follow it: its last_stage), so a step starts without a "
        "round trip through the coordinator (coordinator/chaining.py)", False)
    stage_down_timeout_s: float = doc(
        "a stage whose plan stream broke (it died or restarted) may stay down this long; then every request "
        "fails with UNAVAILABLE and new ones are refused until it is back", 15.0)
    recompute_on_stage_failure: bool = doc(
        "when a stage comes back, its lost KV cache is rebuilt by recomputing every sequence from its tokens "
        "(same output); off: the sequences running when it failed fail at once", True)
    step_timeout_s: float = doc("a step not finished within this many seconds fails its requests", 60.0)
    metrics_port: int = metrics_port_field()
    tls: TlsConfig = tls_field()
    metrics_vllm_names: bool = doc(
        "serve every coordinator metric under `vllm:` as well as `tandem:` (same samples), for dashboards, "
        "KEDA ScaledObjects and llm-d's scheduler written for vLLM", False)
    tracing_endpoint: str = doc(
        "OpenTelemetry: the OTLP gRPC collector this process sends its spans to (host:port, or an https:// "
        "URL); empty: tracing is off (docs/tracing.md)", "")
    trace_every_n_steps: int = doc(
        "with tracing on: a request's prefill step has a span, and of its later steps every Nth (counting "
        "its steps from 0), so a long generation does not make thousands of spans; 1: every step", 16)
    stream_interval: int = doc(
        "a Generate stream sends a request's first token at once, then its tokens in chunks of this many "
        "(fewer at the end), as vLLM's and SGLang's --stream-interval: each message costs the server core time, "
        "and with many requests streaming token by token that time is taken from the stages", 1)
    max_workers: int = doc(
        "threads that tokenize prompts and serve Tokenize and Detokenize off the public API's event loop; "
        "calls, streams included, hold none (the API is served on asyncio)", 8)
    api_key_env: str = doc(
        "environment variable holding the API key clients must send as 'authorization: Bearer KEY'; "
        "the variable unset or empty: no key is asked for", "TANDEM_API_KEY")
    admin_key_env: str = doc(
        "environment variable holding the admin key: a call sending it as 'authorization: Bearer KEY' passes "
        "wherever the API key does and may also read the internal addresses of the stages and samplers "
        "(GetServerInfo include_addresses); the variable unset or empty: no caller may", "TANDEM_ADMIN_KEY")

    max_prompt_bytes: int = doc("longest prompt text, or text to tokenize, in UTF-8 bytes", 1 << 20)
    max_prompt_tokens: int = doc("most token ids in a prompt given as ids, or to detokenize", 1 << 18)
    max_request_id_bytes: int = doc("longest request id, in UTF-8 bytes", 256)
    max_stop_strings: int = doc("most stop strings in one request", 64)
    max_stop_string_bytes: int = doc("longest stop string, in UTF-8 bytes", 1024)
    max_stop_token_ids: int = doc("most stop token ids in one request", 1024)
    max_logit_bias: int = doc("most logit_bias entries in one request", 1024)

    def limits(self) -> Limits:
        """The request size limits (coordinator.limits)."""
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("config field 'model' must name a model directory")
        if not self.stages:
            raise ConfigError("config field 'stages' must list at least one stage worker")
        discovery.check_config(self)
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_queue", "trace_every_n_steps",
                     "stream_interval", "max_workers", *(f.name for f in dataclasses.fields(Limits))):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name!r} must be >= 1")
        check_metrics_port(self.metrics_port)
