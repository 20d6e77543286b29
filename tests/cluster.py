"""Start a whole Tandem deployment in this process: real gRPC servers on 127.0.0.1, port 0."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from tandem import compose
from tandem.coordinator import servicer as coordinator
from tandem.coordinator.config import CoordinatorConfig
from tandem.core.metrics import Metrics
from tandem.core.wire.tls import TlsConfig
from tandem.cpu_sampler import servicer as cpu_sampler
from tandem.cpu_sampler.config import SamplerConfig
from tandem.cpu_sampler.runner import SamplerRunner
from tandem.kv_store import servicer as kv_store
from tandem.kv_store.config import KvStoreConfig
from tandem.presets import resolve
from tandem.stage_worker.config import StageWorkerConfig


@dataclass
class Cluster:
    endpoint: str = ""
    stages: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)
    kv_store: str = ""
    health: dict[str, str] = field(default_factory=dict)  # each server's address -> its health port's
    stage_metrics: list[Metrics] = field(default_factory=list)  # by stage; the baseline's sampler's are the last one's
    sampler_metrics: list[Metrics] = field(default_factory=list)  # by sampler, labelled sampler="sampler-I"
    stage_configs: list[StageWorkerConfig] = field(default_factory=list)
    coordinator_metrics: Metrics = field(default_factory=Metrics)
    kv_store_metrics: Metrics = field(default_factory=Metrics)
    _servers: list = field(default_factory=list)
    _stage_servers: list = field(default_factory=list)

    def stop(self) -> None:
        for server in reversed(self._servers):
            server.stop(0)

    def kill_stage(self, index: int) -> None:
        """Stop stage `index` at once, its KV cache with it, as a killed pod would."""
        self._stage_servers[index].stop(0)

    def start_stage(self, index: int) -> None:
        """Start stage `index` again on its address, fresh (no KV), as a restarted pod would."""
        port = int(self.stages[index].rsplit(":", 1)[1])
        server = compose.serve_stage_worker(dataclasses.replace(self.stage_configs[index], port=port), Metrics())
        self._servers.append(server)
        self._stage_servers[index] = server


def start_cluster(
    model: Path, num_stages: int = 2, num_samplers: int = 2, num_blocks: int = 128, block_size: int = 4,
    with_kv_store: bool = True, kv_capacity_bytes: int = 1 << 30, preset: str = "full", device: str = "cpu",
    tls: TlsConfig | None = None, **coordinator_options,
) -> Cluster:
    """`preset` as `tandem up --preset`: with `baseline` the last stage samples (num_samplers is ignored).
    `device`: the stages' torch device (in float32 on any device). `tls`: every service's (mutual TLS)."""
    tls = tls or TlsConfig()
    techniques = resolve(preset)
    if not techniques.cpu_sampling:
        num_samplers = 0
    c = Cluster()
    try:
        if with_kv_store:
            server = kv_store.serve(KvStoreConfig(capacity_bytes=kv_capacity_bytes, tls=tls), c.kv_store_metrics)
            c._servers.append(server)
            c.kv_store = server.address
        for i in range(num_samplers):
            config = SamplerConfig(model=str(model), **techniques.sampler_options(), tls=tls)
            runner = SamplerRunner(config, name=f"sampler-{i}")
            server = cpu_sampler.serve(config, runner)
            c._servers.append(server)
            c.samplers.append(server.address)
            c.sampler_metrics.append(runner.metrics)
        for index in reversed(range(num_stages)):
            cfg = StageWorkerConfig(model=str(model), stage_index=index, num_stages=num_stages,
                                    next_stage=c.stages[0] if c.stages else "", kv_store=c.kv_store,
                                    last_stage=c.stages[-1] if index == 0 and c.stages and techniques.decode_chaining else "",
                                    num_blocks=num_blocks, block_size=block_size, device=device, dtype="float32", tls=tls,
                                    samplers=tuple(c.samplers) if index == num_stages - 1 else (),
                                    **techniques.stage_options(is_last=index == num_stages - 1))
            metrics = Metrics()
            server = compose.serve_stage_worker(cfg, metrics)
            c._servers.append(server)
            c.stages.insert(0, server.address)
            c.stage_metrics.insert(0, metrics)
            c.stage_configs.insert(0, cfg)
            c._stage_servers.insert(0, server)
        c.samplers = c.samplers or [c.stages[-1]]
        cfg = CoordinatorConfig(model=str(model), stages=tuple(c.stages), samplers=tuple(c.samplers),
                                kv_store=c.kv_store, num_blocks=num_blocks, block_size=block_size, tls=tls,
                                **{**techniques.coordinator_options(), **coordinator_options})
        server = coordinator.serve(cfg, c.coordinator_metrics)
        c._servers.append(server)
        c.endpoint = server.address
        c.health = {s.address: s.health_address for s in c._servers}
    except BaseException:
        c.stop()
        raise
    return c
