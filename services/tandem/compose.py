"""Where services are composed into servers: `tandem serve SERVICE` starts one through here.

Service packages never import each other; what one service needs of another is wired here.
One case so far: a last stage that also samples (StageWorkerConfig.sample_on_stage, the
baseline preset) hosts a CpuSampler service in its own server and hands it its logits in-process.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.core.metrics import Metrics
    from tandem.core.wire.server import Server
    from tandem.stage_worker.config import StageWorkerConfig

# service -> (its config module, config class, the module whose serve(config) starts it)
SERVICE_MODULES = {
    "coordinator": ("tandem.coordinator.config", "CoordinatorConfig", "tandem.coordinator.servicer"),
    "stage_worker": ("tandem.stage_worker.config", "StageWorkerConfig", "tandem.stage_worker.servicer"),
    "cpu_sampler": ("tandem.cpu_sampler.config", "SamplerConfig", "tandem.cpu_sampler.servicer"),
    "kv_store": ("tandem.kv_store.config", "KvStoreConfig", "tandem.kv_store.servicer"),
    "gateway": ("tandem.gateway.config", "GatewayConfig", "tandem.gateway.server"),  # HTTP; same address and stop()
}
SERVICES = tuple(SERVICE_MODULES)


def config_class(service: str) -> type:
    """The configuration dataclass of `service` (one of SERVICES)."""
    module, name, _ = SERVICE_MODULES[service]
    return getattr(importlib.import_module(module), name)


def serve(service: str, config: Any) -> Server:
    """Start `service` (one of SERVICES) with `config` and mark it ready; the caller stops it."""
    if service == "stage_worker":  # composed here: a last stage may host the baseline's sampler
        return serve_stage_worker(config)
    return importlib.import_module(SERVICE_MODULES[service][2]).serve(config)


def serve_stage_worker(config: StageWorkerConfig, metrics: Metrics | None = None) -> Server:
    """A stage worker; with sample_on_stage, together with the sampler it feeds in-process, whose
    metrics (labelled sampler="stage-N") join the stage's. Pass `metrics` to observe them."""
    from tandem.core.metrics import Metrics
    from tandem.stage_worker import servicer as stage_worker

    metrics = metrics or Metrics()
    if not config.sample_on_stage:
        return stage_worker.serve(config, metrics=metrics)
    from tandem.cpu_sampler import servicer as cpu_sampler
    from tandem.cpu_sampler.config import SamplerConfig
    from tandem.cpu_sampler.runner import SamplerRunner
    from tandem.v1 import cpu_sampler_pb2_grpc

    sampler = SamplerRunner(SamplerConfig(model=config.model, fast_sampler=config.fast_sampler), metrics, f"stage-{config.stage_index}")
    hosted = (cpu_sampler_pb2_grpc.add_CpuSamplerServicer_to_server, cpu_sampler.CpuSamplerServicer(sampler),
              [cpu_sampler.SERVICE_NAME])
    return stage_worker.serve(config, sample=sampler.sample, hosted=[hosted], metrics=metrics)
