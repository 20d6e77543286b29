"""Stage worker configuration (the YAML `tandem serve stage_worker --config` loads)."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.core.config import doc
from tandem.core.cpus import cpus_field
from tandem.core.errors import ConfigError
from tandem.core.metrics import check_metrics_port, metrics_port_field
from tandem.core.modeling.stages import AUTO
from tandem.core.wire import discovery
from tandem.core.wire.tls import TlsConfig, tls_field


@dataclass(frozen=True)
class StageWorkerConfig:
    model: str = doc("Hugging Face model directory (config.json, *.safetensors)", "")
    stage_index: int = doc("this stage's index, 0 first", 0)
    num_stages: int = doc("stages in the pipeline", 1)
    stage_boundaries: str | tuple[int, ...] = doc(
        "first layer of stages 1..N-1; empty for an even split; `auto`: the split that gives every stage "
        "the same time by the layer and LM head costs in `stage_profile` (docs/stage-profile.md)", ())
    stage_profile: str = doc(
        "with stage_boundaries `auto`: a stage profile JSON file (python -m tandem.tools.profile_stage); "
        "every stage reads the same file and so computes the same split", "")
    next_stage: str = doc("host:port of the next stage; empty on the last stage", "")
    last_stage: str = doc(
        "stage 0 of a pipeline of more than one stage: host:port of the last stage, whose Tokens stream it "
        "follows so that decode steps chain without the coordinator (its decode_chaining); empty: it does not", "")
    kv_store: str = doc("host:port of the KV store; empty when there is none", "")
    samplers: tuple[str, ...] = doc(
        "last stage: host:port of each CPU sampler replica it may send logits to (sampler_discovery: static), "
        "spelled as in the coordinator's list; a plan naming any other sampler is refused", ())
    sampler_discovery: str = doc(
        "last stage: how it finds the samplers it may send logits to, on its own (never from a plan): static "
        "(the samplers list) or endpointslices (the EndpointSlices of sampler_service, which the coordinator "
        "follows too, so scaling the pool works)", "static")
    sampler_service: str = doc("last stage: Kubernetes Service of the sampler pool (sampler_discovery: endpointslices)", "")
    sampler_namespace: str = doc("last stage: namespace of sampler_service; empty: this pod's own", "")
    sampler_port_name: str = doc("last stage: name of the sampler Service's gRPC port; empty: its first port", "grpc")
    kubernetes_api: str = doc("last stage: URL of the Kubernetes API; empty: the in-cluster API with the pod's service account", "")
    sampler_wait_s: float = doc(
        "last stage, sampler_discovery endpointslices: how long a plan naming a sampler this stage has not "
        "discovered yet waits for it before the step is refused", 5.0)
    host: str = doc("address to listen on", "127.0.0.1")
    port: int = doc("port to listen on; 0 picks a free one", 0)
    metrics_port: int = metrics_port_field()
    tls: TlsConfig = tls_field()
    tracing_endpoint: str = doc(
        "OpenTelemetry: the OTLP gRPC collector this process sends its spans to (host:port, or an https:// "
        "URL); empty: tracing is off (docs/tracing.md)", "")
    device: str = doc("torch device: cpu or cuda[:N]", "cpu")
    dtype: str = doc("activation and KV dtype: auto, float32, bfloat16 or float16", "auto")
    num_blocks: int = doc("KV cache blocks on this stage", 512)
    block_size: int = doc("tokens per KV block", 16)
    max_workers: int = doc("gRPC server threads", 16)
    cuda_graphs: bool = doc(
        "on CUDA, run decode steps from CUDA graphs captured once per padded shape (batch and context); "
        "steps they do not cover run eagerly", True)
    cuda_graph_max_batch: int = doc("largest decode batch run from a CUDA graph", 256)
    cuda_graph_max_context: int = doc("longest context (tokens) of a decode step run from a CUDA graph", 4096)
    overlap_input_prep: bool = doc(
        "build the next step's input tensors while this one computes, in two alternating buffers "
        "(token-safe: a buffer is reused only after the step that read it finished); off: in series", True)
    sample_on_stage: bool = doc(
        "last stage only: also serve the CpuSampler API and sample here, in series with the forward pass, "
        "the rows the coordinator places on this stage: every row when it lists this stage as its one "
        "sampler, as a vLLM-style pipeline does (the baseline preset), or the argmax-only rows when it "
        "has greedy_on_stage and this stage's samplers (or sampler discovery) name replicas for the rest", False)
    fast_sampler: bool = doc("with sample_on_stage: use the fast sampler instead of the straightforward one", False)
    structured_streams: bool = doc(
        "structure-aware transmission: outgoing streams send the tensor layout once, then each frame is a "
        "step tag and raw bytes (the receiver shapes them from its plan); off: every frame carries dtype, "
        "shape and per-row metadata", True)
    shared_memory_logits: bool = doc(
        "last stage: hand logits to a sampler on the same host through a shared-memory ring in /dev/shm "
        "(only a slot handle crosses gRPC); samplers elsewhere get them over the stream", True)
    logits_ring_slots: int = doc("slots of each sampler's shared-memory ring (frames in flight to it)", 4)
    logits_ring_mib: int = doc(
        "MiB of each sampler's ring, split evenly into its slots; a frame larger than a slot goes over the stream", 64)
    logits_ring_wait_s: float = doc(
        "how long a frame waits for the sampler to free a slot before it goes over the stream instead", 5.0)
    num_threads: int = doc(
        "torch intra-op threads of this stage; 0: one per core it may use (`cpus`, else its affinity), no "
        "more than the container's CPU limit. More threads than cores is allowed but logged: OpenMP threads "
        "that wait for a core slow down many times over", 0)
    cpus: str = doc(
        "cores this stage runs on, as Linux writes them (\"0-3,8\"); every thread of the process is pinned "
        "to them at start-up; empty: leave the affinity as it is", "")
    profile_at_startup: bool = doc(
        "after loading, measure the stage profile (one decoder layer and the LM head against tokens and "
        "context, a few seconds at most; it loads the last layer and the LM head for the while) and serve it "
        "by GetStageInfo", True)
    profile_file: str = doc("also write the start-up profile to this JSON file; empty: do not", "")
    step_log: str = doc(
        "append one JSON line per step to this file (start and end on the host's monotonic clock, the "
        "CPU time the step's thread got, rows, prefill tokens): the timeline `tandem bench --timeline` draws; "
        "empty: none", "")

    @property
    def has_sampler_replicas(self) -> bool:
        """Whether this config names sampler replicas (a list, or a discovery source) to send logits to."""
        return bool(self.samplers) or self.sampler_discovery != "static"

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("config field 'model' must name a model directory")
        if not 0 <= self.stage_index < self.num_stages:
            raise ConfigError(f"config field 'stage_index'={self.stage_index} must be in [0, num_stages={self.num_stages})")
        if self.logits_ring_slots < 1 or self.logits_ring_mib < 1:
            raise ConfigError("config fields 'logits_ring_slots' and 'logits_ring_mib' must be >= 1")
        if self.num_threads < 0:
            raise ConfigError(f"config field 'num_threads'={self.num_threads} must be >= 0")
        check_metrics_port(self.metrics_port)
        cpus_field("cpus", self.cpus)
        if isinstance(self.stage_boundaries, str):
            if self.stage_boundaries != AUTO:
                raise ConfigError(f"config field 'stage_boundaries'={self.stage_boundaries!r} must be a list of "
                                  "layer indices or 'auto'")
            if not self.stage_profile:
                raise ConfigError("config field 'stage_profile' must name a profile file when stage_boundaries is "
                                  "'auto' (python -m tandem.tools.profile_stage writes one)")
        if self.cuda_graph_max_batch < 1 or self.cuda_graph_max_context < 1:
            raise ConfigError("config fields 'cuda_graph_max_batch' and 'cuda_graph_max_context' must be >= 1")
        if self.num_blocks < 1 or self.block_size < 1:
            raise ConfigError("config fields 'num_blocks' and 'block_size' must be >= 1")
        is_last = self.stage_index == self.num_stages - 1
        if self.last_stage and (self.stage_index != 0 or is_last):
            raise ConfigError("config field 'last_stage' may only be set on stage 0 of a pipeline of more than one stage")
        if self.sample_on_stage and not is_last:
            raise ConfigError("config field 'sample_on_stage' may only be set on the last stage")
        if is_last and (not self.sample_on_stage or self.has_sampler_replicas):
            discovery.check_config(self)
        if self.sampler_wait_s < 0:
            raise ConfigError(f"config field 'sampler_wait_s'={self.sampler_wait_s} must be >= 0")
        if is_last == bool(self.next_stage):
            raise ConfigError("config field 'next_stage' must be set on every stage but the last, and only there")
