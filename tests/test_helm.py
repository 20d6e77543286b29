"""The Helm chart in helm/tandem, rendered by a real Helm (helm-python-sdk), and the Dockerfiles.

Every example values file is linted with `helm lint --strict`, rendered, and each rendered
object is validated against the Kubernetes OpenAPI schemas in strict mode; then the objects
are checked for the chart's promises (GPU placement, probes, non-root, least-privilege RBAC)
and every ConfigMap is loaded with tandem's own config loader. The `techniques` block must
render every preset's config fields exactly as services/tandem/presets.py gives them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm  # the real Helm v4 library, installed by `make` (test extras)
import kubernetes_validate
import pytest
import yaml

from tandem.coordinator.checks import stage_mismatches
from tandem.coordinator.config import CoordinatorConfig
from tandem.core.config import load_config
from tandem.cpu_sampler.config import SamplerConfig
from tandem.gateway.config import GatewayConfig
from tandem.kv_store.config import KvStoreConfig
from tandem.presets import PRESETS, SWITCHES, Techniques, resolve
from tandem.stage_worker.config import StageWorkerConfig
from tandem.v1 import stage_worker_pb2

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tandem"
EXAMPLES = sorted((ROOT / "helm" / "values-examples").glob("*.yaml"))
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "demo", "llm"
GPU = "nvidia.com/gpu"
CONFIG_CLASSES = {
    "coordinator": CoordinatorConfig,
    "stage-worker": StageWorkerConfig,
    "cpu-sampler": SamplerConfig,
    "kv-store": KvStoreConfig,
    "gateway": GatewayConfig,
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


def _values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


@cache
def _chart() -> Any:
    return helm.Chart.load(str(CHART))


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = _chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for name, text in sorted(manifests.items()) if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


@cache
def _objects(example: str) -> tuple[dict[str, Any], ...]:
    return tuple(_render(_values(ROOT / "helm" / "values-examples" / example)))


def _of_kind(objs: tuple[dict[str, Any], ...], *kinds: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in kinds]


def _component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _techniques(block: dict[str, Any]) -> Techniques:
    """What a (merged) `techniques` block resolves to: its preset, with every switch it sets."""
    switches = {k: v for k, v in block.items() if k != "preset" and v is not None}
    return dataclasses.replace(PRESETS[block["preset"]], **switches)


EXAMPLE_IDS = [p.name for p in EXAMPLES]


def test_examples_exist() -> None:
    assert {"defaults.yaml", "four-stages.yaml", "tls-apikey.yaml", "autoscaling.yaml", "baseline.yaml"} <= set(EXAMPLE_IDS)


@pytest.mark.parametrize("example", EXAMPLE_IDS)
def test_lint_strict(example: str) -> None:
    report = helm.lint(str(CHART), _values(ROOT / "helm" / "values-examples" / example), strict=True,
                       namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("example", EXAMPLE_IDS)
def test_objects_validate_against_kubernetes_schemas(example: str) -> None:
    objs = _objects(example)
    assert objs
    for obj in objs:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("example", EXAMPLE_IDS)
def test_stage_workers_get_gpus_and_nothing_else_does(example: str) -> None:
    objs = _objects(example)
    values = _chart().merge_values(_values(ROOT / "helm" / "values-examples" / example))
    stages = [w for w in _of_kind(objs, *WORKLOAD_KINDS) if _component(w) == "stage-worker"]
    assert len(stages) == values["pipeline"]["numStages"]
    for workload in _of_kind(objs, *WORKLOAD_KINDS):
        pod = workload["spec"]["template"]["spec"]
        main = pod["containers"][0]
        gpus = [c for c in _containers(workload)
                if GPU in c["resources"].get("requests", {}) or GPU in c["resources"].get("limits", {})]
        if _component(workload) == "stage-worker":
            assert main["resources"]["requests"][GPU] >= 1 and main["resources"]["limits"][GPU] >= 1
            assert pod["nodeSelector"].get("nvidia.com/gpu.present") == "true"
            assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in pod["tolerations"])
        else:
            assert not gpus, workload["metadata"]["name"]
            assert not any(t.get("key") == GPU for t in pod.get("tolerations", []))


@pytest.mark.parametrize("example", EXAMPLE_IDS)
def test_every_container_has_probes_resources_and_runs_as_non_root(example: str) -> None:
    for workload in _of_kind(_objects(example), *WORKLOAD_KINDS):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in _containers(workload):
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
        for c in pod["containers"]:
            if _component(workload) == "gateway":  # HTTP: up once it listens, ready while the coordinator answers
                assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
                assert c["livenessProbe"]["tcpSocket"] == c["startupProbe"]["tcpSocket"] == {"port": "http"}
                assert c["args"][:3] == ["gateway", "--config", "/etc/tandem/config.yaml"]
                continue
            service = {"coordinator": "tandem.v1.Coordinator", "stage-worker": "tandem.v1.StageWorker",
                       "cpu-sampler": "tandem.v1.CpuSampler", "kv-store": "tandem.v1.KvStore"}[_component(workload)]
            port = 50052 if example == "tls-apikey.yaml" else 50051  # with TLS: the plaintext health port
            assert c["readinessProbe"]["grpc"] == {"port": port, "service": service}
            assert c["livenessProbe"]["grpc"] == {"port": port}
            assert c["startupProbe"]["grpc"] == {"port": port}
            assert c["args"][:3] == [_component(workload), "--config", "/etc/tandem/config.yaml"]


@pytest.mark.parametrize("example", EXAMPLE_IDS)
def test_the_coordinator_drains_within_its_grace_period(example: str) -> None:
    for workload in _of_kind(_objects(example), *WORKLOAD_KINDS):
        pod = workload["spec"]["template"]["spec"]
        grace = pod["terminationGracePeriodSeconds"]
        for c in pod["containers"]:
            drain_s = float(c["args"][c["args"].index("--drain-s") + 1])
            assert 1 <= drain_s <= grace - 5 - 1, (c["name"], drain_s, grace)  # preStop pause and a margin
            if _component(workload) in ("coordinator", "gateway"):
                assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
            else:
                assert "lifecycle" not in c


def test_tracing_endpoint_reaches_every_service_that_traces() -> None:
    objs = _render({"tracing": {"endpoint": "otel-collector:4317"}})
    configs = {cm["metadata"]["labels"]["app.kubernetes.io/component"]: yaml.safe_load(cm["data"]["config.yaml"])
               for cm in _of_kind(objs, "ConfigMap") if "config.yaml" in cm.get("data", {})}
    for component in ("coordinator", "stage-worker", "cpu-sampler"):
        assert configs[component]["tracing_endpoint"] == "otel-collector:4317", component
    assert "tracing_endpoint" not in configs.get("kv-store", {}) and "tracing_endpoint" not in configs.get("gateway", {})


def test_coordinator_role_grants_only_endpointslice_reads() -> None:
    objs = _objects("defaults.yaml")
    (role,) = _of_kind(objs, "Role")
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    assert not _of_kind(objs, "ClusterRole", "ClusterRoleBinding")
    (binding,) = _of_kind(objs, "RoleBinding")
    (coordinator,) = [w for w in _of_kind(objs, "Deployment") if _component(w) == "coordinator"]
    last_stage = f"demo-tandem-stage-{_chart().merge_values({})['pipeline']['numStages'] - 1}"
    readers = {coordinator["metadata"]["name"], last_stage}  # the last stage finds its samplers itself
    assert {s["name"] for s in binding["subjects"]} == readers
    assert readers <= {a["metadata"]["name"] for a in _of_kind(objs, "ServiceAccount")}
    for workload in _of_kind(objs, *WORKLOAD_KINDS):
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is (workload["metadata"]["name"] in readers)
        if workload["metadata"]["name"] in readers:
            assert pod["serviceAccountName"] == workload["metadata"]["name"]


def test_static_discovery_grants_no_api_access() -> None:
    objs = _objects("four-stages.yaml")
    assert not _of_kind(objs, "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    (samplers,) = [w for w in _of_kind(objs, *WORKLOAD_KINDS) if _component(w) == "cpu-sampler"]
    assert samplers["kind"] == "StatefulSet"
    for workload in _of_kind(objs, *WORKLOAD_KINDS):
        assert workload["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_services_public_clusterip_internal_headless() -> None:
    services = _of_kind(_objects("four-stages.yaml"), "Service")
    public = [s for s in services if s["spec"].get("clusterIP") != "None"]
    assert [(s["metadata"]["name"], s["spec"]["type"]) for s in public] == [
        ("demo-tandem", "ClusterIP"), ("demo-tandem-gateway", "ClusterIP")]
    assert len(services) == 2 + 4 + 1 + 1  # public and gateway, one per stage, samplers, kv-store


@pytest.mark.parametrize("example", EXAMPLE_IDS)
def test_configmaps_load_with_tandem_config(example: str) -> None:
    objs = _objects(example)
    configs: dict[str, list[Any]] = {}
    for cm in _of_kind(objs, "ConfigMap"):
        cls = CONFIG_CLASSES[_component(cm)]
        config = load_config(cls, yaml.safe_load(cm["data"]["config.yaml"]))
        assert (config.host, config.port) == ("0.0.0.0", 8000 if cls is GatewayConfig else 50051)
        configs.setdefault(_component(cm), []).append(config)
    (coordinator,) = configs["coordinator"]
    (gateway,) = configs["gateway"]
    assert (gateway.coordinator, gateway.model) == (f"demo-tandem.{NAMESPACE}.svc.cluster.local:50051", coordinator.model)
    stages = sorted(configs["stage-worker"], key=lambda s: s.stage_index)
    suffix = f".{NAMESPACE}.svc.cluster.local:50051"
    assert coordinator.stages == tuple(f"demo-tandem-stage-{i}{suffix}" for i in range(len(stages)))
    source = ("samplers", "sampler_discovery", "sampler_service", "sampler_namespace", "sampler_port_name", "kubernetes_api")
    for i, stage in enumerate(stages):
        assert stage.stage_index == i and stage.num_stages == len(stages)
        assert stage.next_stage == (coordinator.stages[i + 1] if i + 1 < len(stages) else "")
        assert stage.model == coordinator.model
        # the last stage finds its samplers where the coordinator does (unless it samples every row)
        if i + 1 == len(stages) and (not stage.sample_on_stage or coordinator.greedy_on_stage):
            assert [getattr(stage, f) for f in source] == [getattr(coordinator, f) for f in source]
        else:
            assert (stage.samplers, stage.sampler_service) == ((), "")
    for sampler in configs.get("cpu-sampler", []):
        assert sampler.model == coordinator.model  # its vocabulary
    values = _chart().merge_values(_values(ROOT / "helm" / "values-examples" / example))
    assert list(stages[0].stage_boundaries) == values["pipeline"]["stageBoundaries"]  # no example uses auto
    if not _techniques(values["techniques"]).cpu_sampling:
        assert "cpu-sampler" not in configs and stages[-1].sample_on_stage
        assert coordinator.samplers == coordinator.stages[-1:]  # the last stage samples, as `tandem up` has it
    elif values["cpuSampler"]["discovery"] == "static":
        n = values["cpuSampler"]["replicas"]
        assert coordinator.sampler_discovery == "static"
        assert coordinator.samplers == tuple(
            f"demo-tandem-cpu-sampler-{i}.demo-tandem-cpu-sampler{suffix}" for i in range(n))
    else:  # the coordinator watches the EndpointSlices of the sampler Service, on its named gRPC port
        assert (coordinator.sampler_discovery, coordinator.samplers) == ("endpointslices", ())
        assert coordinator.sampler_namespace == NAMESPACE and not coordinator.kubernetes_api
        (service,) = [o for o in _of_kind(_objects(example), "Service") if o["metadata"]["name"] == coordinator.sampler_service]
        assert _component(service) == "cpu-sampler"
        assert coordinator.sampler_port_name in [p["name"] for p in service["spec"]["ports"]]


@pytest.mark.parametrize("example", EXAMPLE_IDS)
def test_every_service_but_the_gateway_is_scraped_on_its_metrics_port(example: str) -> None:
    objs = _objects(example)
    port = _chart().merge_values(_values(ROOT / "helm" / "values-examples" / example))["metricsPort"]
    served = {"coordinator", "stage-worker", "cpu-sampler", "kv-store"}
    for workload in _of_kind(objs, *WORKLOAD_KINDS):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if _component(workload) in served:
            assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
            assert annotations["prometheus.io/port"] == str(port) and ports["metrics"] == port
        else:  # the gateway serves /metrics on its HTTP port
            assert "prometheus.io/scrape" not in annotations and "metrics" not in ports
    for service in _of_kind(objs, "Service"):
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ("metrics" in ports) == (_component(service) in served)
        if "metrics" in ports:
            assert ports["metrics"]["port"] == port and ports["metrics"]["targetPort"] == "metrics"
    for cm in _of_kind(objs, "ConfigMap"):
        if _component(cm) in served:
            assert yaml.safe_load(cm["data"]["config.yaml"])["metrics_port"] == port
    assert not _of_kind(objs, "ServiceMonitor")  # off by default, and so is the dashboard
    assert not [cm for cm in _of_kind(objs, "ConfigMap") if _component(cm) == "metrics"]


def test_service_monitor_dashboard_and_vllm_names_when_asked_for() -> None:
    objs = _render({"metrics": {"vllmNames": True, "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                                "grafanaDashboard": {"enabled": True}}})
    (monitor,) = _of_kind(objs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    selected = [s for s in _of_kind(objs, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert {_component(s) for s in selected if "metrics" in [p["name"] for p in s["spec"]["ports"]]} == {
        "coordinator", "stage-worker", "cpu-sampler", "kv-store"}
    (dashboard,) = [cm for cm in _of_kind(objs, "ConfigMap") if _component(cm) == "metrics"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(dashboard["data"]["tandem.json"])["panels"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for name in ("generation_tokens_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "num_requests_waiting", "kv_cache_usage_perc", "stage_idle_seconds_total", "sampler_sample_seconds"):
        assert "tandem:" + name in exprs
    (coordinator,) = [cm for cm in _of_kind(objs, "ConfigMap") if _component(cm) == "coordinator"]
    config = load_config(CoordinatorConfig, yaml.safe_load(coordinator["data"]["config.yaml"]))
    assert config.metrics_vllm_names


def _coordinator_config(values: dict[str, Any]) -> CoordinatorConfig:
    (cm,) = [cm for cm in _of_kind(tuple(_render(values)), "ConfigMap") if _component(cm) == "coordinator"]
    return load_config(CoordinatorConfig, yaml.safe_load(cm["data"]["config.yaml"]))


def test_chunked_prefill_is_on_unless_turned_off() -> None:
    assert _coordinator_config({}).enable_chunked_prefill
    assert not _coordinator_config({"pipeline": {"enableChunkedPrefill": False}}).enable_chunked_prefill
    budget = _coordinator_config({"coordinator": {"config": {"max_num_batched_tokens": 512}}})
    assert (budget.max_num_batched_tokens, budget.enable_chunked_prefill) == (512, True)


def test_four_stage_partition_is_passed_through() -> None:
    stages = [load_config(StageWorkerConfig, yaml.safe_load(cm["data"]["config.yaml"]))
              for cm in _of_kind(_objects("four-stages.yaml"), "ConfigMap") if _component(cm) == "stage-worker"]
    assert {s.stage_boundaries for s in stages} == {(7, 15, 24)}


def _stage_configs(objs) -> list[StageWorkerConfig]:
    return sorted((load_config(StageWorkerConfig, yaml.safe_load(cm["data"]["config.yaml"]))
                   for cm in _of_kind(objs, "ConfigMap") if _component(cm) == "stage-worker"),
                  key=lambda s: s.stage_index)


@pytest.mark.parametrize("resources, threads", [
    ({}, 4),  # the defaults: 4 cores requested and limited
    ({"requests": {"cpu": "8"}, "limits": {"cpu": "6500m"}}, 6),
    ({"requests": {"cpu": 3}, "limits": {"cpu": None}}, 3),
    ({"requests": {"cpu": "500m"}, "limits": {"cpu": None}}, 1),
])
def test_stage_threads_follow_the_cpu_limit(resources, threads) -> None:
    assert {s.num_threads for s in _stage_configs(_render({"stageWorker": {"resources": resources}}))} == {threads}


def test_stage_threads_beyond_the_cpu_limit_are_refused() -> None:
    assert {s.num_threads for s in _stage_configs(_render({"stageWorker": {"config": {"num_threads": 2}}}))} == {2}
    with pytest.raises(helm.HelmError, match="num_threads=8"):
        _render({"stageWorker": {"config": {"num_threads": 8}}})


def test_auto_boundaries_mount_one_profile_in_every_stage() -> None:
    from tandem.core.modeling.profile import balanced_split, parse_profile
    from test_stage_profile import profile

    values = {"pipeline": {"numStages": 2, "stageBoundaries": "auto", "stageProfile": profile().to_json()}}
    objs = _render(values)
    stages = _stage_configs(objs)
    assert {(s.stage_boundaries, s.stage_profile) for s in stages} == {("auto", "/etc/tandem/stage-profile.json")}
    for cm in _of_kind(objs, "ConfigMap"):
        if _component(cm) == "stage-worker":
            assert parse_profile(cm["data"]["stage-profile.json"]) == profile()
    for workload in _of_kind(objs, *WORKLOAD_KINDS):
        mounts = {m["mountPath"]: m for m in workload["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        has = "/etc/tandem/stage-profile.json" in mounts
        assert has == (_component(workload) == "stage-worker")
    assert balanced_split(profile(), 2).boundaries == (7,)  # what each stage computes from it
    with pytest.raises(helm.HelmError, match="profile_stage"):
        _render({"pipeline": {"stageBoundaries": "auto"}})
    with pytest.raises(helm.HelmError, match="not a stage profile"):
        _render({"pipeline": {"stageBoundaries": "auto", "stageProfile": "{}"}})


def test_tls_and_api_key_mounts_only_when_enabled() -> None:
    def secrets(example: str) -> set[str]:
        names = set()
        for w in _of_kind(_objects(example), *WORKLOAD_KINDS):
            pod = w["spec"]["template"]["spec"]
            names |= {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
            for c in _containers(w):
                names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                          if "secretKeyRef" in e.get("valueFrom", {})}
        return names

    assert secrets("defaults.yaml") == set()
    assert secrets("tls-apikey.yaml") == {"tandem-tls", "tandem-api-key", "hf-token"}


def test_tls_reaches_every_service_config_and_the_probes_use_the_health_port() -> None:
    mounted = {"cert_file": "/etc/tandem/tls/tls.crt", "key_file": "/etc/tandem/tls/tls.key",
               "ca_file": "/etc/tandem/tls/ca.crt"}
    for example, enabled in (("tls-apikey.yaml", True), ("defaults.yaml", False)):
        for cm in _of_kind(_objects(example), "ConfigMap"):
            cls = CONFIG_CLASSES[_component(cm)]
            config = load_config(cls, yaml.safe_load(cm["data"]["config.yaml"]))
            if cls is GatewayConfig:
                assert config.coordinator_tls_ca_file == (mounted["ca_file"] if enabled else "")
                continue
            assert {k: getattr(config.tls, k) for k in mounted} == (mounted if enabled else dict.fromkeys(mounted, ""))
            assert config.tls.health_port == (50052 if enabled else 0)
        for w in _of_kind(_objects(example), *WORKLOAD_KINDS):
            ports = {p["name"]: p["containerPort"] for p in w["spec"]["template"]["spec"]["containers"][0]["ports"]}
            assert ("health" in ports) == (enabled and _component(w) != "gateway")


def test_network_policy_admits_only_the_release_to_internal_ports() -> None:
    policies = _of_kind(_objects("defaults.yaml"), "NetworkPolicy")
    assert sorted(_component(p) for p in policies) == ["cpu-sampler", "kv-store", "stage-worker"]
    release = {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": RELEASE}
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in _of_kind(_objects("defaults.yaml"), *WORKLOAD_KINDS)]
    for policy in policies:
        spec = policy["spec"]
        assert spec["podSelector"]["matchLabels"] == {**release, "app.kubernetes.io/component": _component(policy)}
        grpc_rule, open_rule = spec["ingress"]
        assert grpc_rule["from"] == [{"podSelector": {"matchLabels": release}}]
        assert grpc_rule["ports"] == [{"port": 50051, "protocol": "TCP"}]
        assert "from" not in open_rule and 50051 not in [p["port"] for p in open_rule["ports"]]
        assert any(all(labels.get(k) == v for k, v in spec["podSelector"]["matchLabels"].items()) for labels in pods)
    assert not _of_kind(tuple(_render({"networkPolicy": {"enabled": False}})), "NetworkPolicy")


def test_gateway_serves_http_reads_the_model_files_it_needs_and_can_be_left_out() -> None:
    (gateway,) = [w for w in _of_kind(_objects("tls-apikey.yaml"), "Deployment") if _component(w) == "gateway"]
    pod = gateway["spec"]["template"]["spec"]
    assert pod["containers"][0]["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert "TANDEM_API_KEY" in [e["name"] for e in pod["containers"][0]["env"]]
    (download,) = pod["initContainers"]
    assert {"name": "MODEL_PATTERNS", "value": "*.json *.jinja"} in download["env"]
    objs = _render({"gateway": {"enabled": False}})
    assert not [o for o in objs if _component(o) == "gateway"] and objs


def test_only_the_coordinator_gets_the_admin_key_and_only_when_asked_for() -> None:
    def holders(objs: list[dict[str, Any]]) -> list[str]:
        return [_component(w) for w in _of_kind(objs, *WORKLOAD_KINDS)
                if "TANDEM_ADMIN_KEY" in [e["name"] for e in w["spec"]["template"]["spec"]["containers"][0].get("env", [])]]

    assert holders(_objects("tls-apikey.yaml")) == ["coordinator"]
    assert holders(_objects("defaults.yaml")) == []


def test_samplers_download_only_the_model_config_they_read_their_vocabulary_from() -> None:
    (sampler,) = [w for w in _of_kind(_objects("tls-apikey.yaml"), *WORKLOAD_KINDS) if _component(w) == "cpu-sampler"]
    (download,) = sampler["spec"]["template"]["spec"]["initContainers"]
    assert {"name": "MODEL_PATTERNS", "value": "config.json"} in download["env"]


def test_autoscaling_targets_the_sampler_deployment() -> None:
    objs = _objects("autoscaling.yaml")
    (hpa,) = _of_kind(objs, "HorizontalPodAutoscaler")
    (sampler,) = [w for w in _of_kind(objs, *WORKLOAD_KINDS) if _component(w) == "cpu-sampler"]
    assert sampler["kind"] == "Deployment" and "replicas" not in sampler["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": sampler["metadata"]["name"]}
    assert not _of_kind(_objects("defaults.yaml"), "HorizontalPodAutoscaler")


PRESET_NAMES = ["full", "baseline", *(f"full-{s}" for s in SWITCHES), *(f"baseline+{s}" for s in SWITCHES)]


def _techniques_block(preset: str) -> dict[str, Any]:
    """The chart's `techniques` values for a name presets.resolve takes: `full-SWITCH` is preset full
    with SWITCH false, `baseline+SWITCH` preset baseline with SWITCH true."""
    for base, sep, value in (("full", "-", False), ("baseline", "+", True)):
        if preset.startswith(base + sep):
            return {"preset": base, preset[len(base) + 1:]: value}
    return {"preset": preset}


def _fields(config: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return {k: config.get(k, "<not rendered>") for k in options}


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_techniques_render_every_service_field_as_presets_does(preset: str) -> None:
    """The chart and services/tandem/presets.py cannot drift: each config field a preset sets is
    rendered, and rendered as Techniques.*_options() gives it."""
    techniques = resolve(preset)
    objs = tuple(_render({"techniques": _techniques_block(preset)}))
    raw: dict[str, list[dict[str, Any]]] = {}
    for cm in _of_kind(objs, "ConfigMap"):
        raw.setdefault(_component(cm), []).append(yaml.safe_load(cm["data"]["config.yaml"]))
    (coordinator,) = raw["coordinator"]
    assert _fields(coordinator, techniques.coordinator_options()) == techniques.coordinator_options()
    stages = sorted(raw["stage-worker"], key=lambda c: c["stage_index"])
    for stage in stages:
        options = techniques.stage_options(is_last=stage["stage_index"] == len(stages) - 1)
        assert _fields(stage, options) == options, stage["stage_index"]
    if techniques.cpu_sampling:
        (sampler,) = raw["cpu-sampler"]
        assert _fields(sampler, techniques.sampler_options()) == techniques.sampler_options()
    else:  # the last stage samples: no pool, and the coordinator's one sampler is that stage
        assert "cpu-sampler" not in raw and coordinator["samplers"] == coordinator["stages"][-1:]
    # and the coordinator's start-up check finds the stages agreeing with it
    config = load_config(CoordinatorConfig, coordinator)
    infos = [stage_worker_pb2.GetStageInfoResponse(
        index=s.stage_index, layer_start=s.stage_index, layer_end=s.stage_index + 1, num_layers=len(stages),
        kv_blocks_total=s.num_blocks, block_size=s.block_size, model_config_sha256="same",
        structured_streams=s.structured_streams, sample_on_stage=s.sample_on_stage)
        for s in (load_config(StageWorkerConfig, stage) for stage in stages)]
    assert stage_mismatches(config, "same", infos) == []


@pytest.mark.parametrize("discovery", ["endpointslices", "static"])
def test_without_cpu_sampling_no_sampler_pool_is_deployed(discovery: str) -> None:
    """Its HPA, PDB and NetworkPolicy neither, though asked for; nothing reads EndpointSlices."""
    objs = tuple(_render({"techniques": {"preset": "full", "cpu_sampling": False},
                          "cpuSampler": {"discovery": discovery, "podDisruptionBudget": {"enabled": True},
                                         "autoscaling": {"enabled": discovery == "endpointslices"}}}))
    assert not [o for o in objs if o["metadata"]["labels"].get("app.kubernetes.io/component") == "cpu-sampler"]
    assert not _of_kind(objs, "HorizontalPodAutoscaler", "Role", "RoleBinding")
    for workload in _of_kind(objs, *WORKLOAD_KINDS):
        assert workload["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    for obj in objs:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    (coordinator,) = [load_config(CoordinatorConfig, yaml.safe_load(cm["data"]["config.yaml"]))
                      for cm in _of_kind(objs, "ConfigMap") if _component(cm) == "coordinator"]
    *_, last = _stage_configs(objs)
    assert (coordinator.sampler_discovery, coordinator.samplers) == ("static", coordinator.stages[-1:])
    assert last.sample_on_stage and (last.samplers, last.sampler_service) == ((), "")


def test_the_chart_has_exactly_the_switches_of_presets() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["techniques"]
    assert list(schema["properties"]) == ["preset", *SWITCHES] and schema["additionalProperties"] is False
    assert schema["properties"]["preset"]["enum"] == list(PRESETS)
    assert {s: schema["properties"][s]["type"] for s in SWITCHES} == dict.fromkeys(SWITCHES, ["boolean", "null"])
    assert _values(CHART / "values.yaml")["techniques"] == {"preset": "full", **dict.fromkeys(SWITCHES)}


@pytest.mark.parametrize("techniques, named", [
    ({"preset": "fast"}, "at '/techniques/preset': value must be one of 'full', 'baseline'"),
    ({"preset": "full-cpu_sampling"}, "at '/techniques/preset'"),  # a switch is its own value
    ({"cpu_samplng": False}, "additional properties 'cpu_samplng' not allowed"),
    ({"fast_sampler": "off"}, "at '/techniques/fast_sampler'"),
])
def test_bad_techniques_fail_schema_validation_naming_them(techniques: dict[str, Any], named: str) -> None:
    with pytest.raises(helm.HelmError, match="schema") as e:
        _render({"techniques": techniques})
    assert named in str(e.value)


@pytest.mark.parametrize("role, field", [
    *(("coordinator", f) for f in resolve("full").coordinator_options()),
    *(("stageWorker", f) for f in resolve("full").stage_options(is_last=True)),
    *(("cpuSampler", f) for f in resolve("full").sampler_options()),
])
def test_a_field_the_switches_set_is_refused_in_a_role_config(role: str, field: str) -> None:
    with pytest.raises(helm.HelmError, match=f"{role}.config.{field} is set from the technique switches"):
        _render({role: {"config": {field: True}}})


@pytest.mark.parametrize("bad", [
    {"pipeline": {"numStages": 4, "stageBoundaries": [7, 15]}},
    {"pipeline": {"numStages": 3, "stageBoundaries": [9, 5]}},
    {"pipeline": {"stageBoundaries": "even"}},
    {"cpuSampler": {"discovery": "static", "autoscaling": {"enabled": True}}},
    {"cpuSampler": {"discovery": "dns"}},
    {"stageWorker": {"replicas": 2}},
    {"coordinator": {"unknownKey": 1}},
])
def test_bad_values_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError):
        _render(bad)


def test_every_value_is_documented() -> None:
    """Each key has a `# --` comment, or sits inside a section or value whose key has one."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented: list[tuple[int, bool]] = []  # (indent, is documented) of the open ancestors
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while documented and documented[-1][0] >= indent:
            documented.pop()
        j = i - 1
        while j > 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1  # a `# --` comment may run over several lines
        has_doc = j >= 0 and lines[j].strip().startswith("# --")
        is_section = stripped.endswith(":") and i + 1 < len(lines) and not lines[i + 1].strip().startswith("-") \
            and len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent
        if not (has_doc or is_section or any(d for _, d in documented)):
            raise AssertionError(f"values.yaml:{i + 1} {stripped!r} has no `# --` comment")
        documented.append((indent, has_doc))


HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def test_dockerfiles_pass_hadolint() -> None:
    files = [str(ROOT / "docker" / name) for name in ("Dockerfile.cpu", "Dockerfile.cuda")]
    result = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "info", *files],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for f in files:
        text = Path(f).read_text()
        assert 'ENTRYPOINT ["tandem", "serve"]' in text and "USER 10001" in text
        assert text.count("FROM ") >= 2 and ":latest" not in text
