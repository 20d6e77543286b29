"""OpenTelemetry traces across the services (docs/tracing.md): the in-process cluster runs every
service in this process, so one in-memory exporter collects the spans of all of them."""

from __future__ import annotations

import json
import time
import urllib.request

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cluster import start_cluster
from tandem.client import TandemClient
from tandem.coordinator import request_trace
from tandem.core import tracing
from tandem.gateway.config import GatewayConfig
from tandem.gateway.server import GatewayServer
from tandem.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

PROMPT = [5, 7, 9, 11, 13, 200, 3]
MAX_TOKENS = 10
EVERY_N = 4  # traced steps of a 10-token request: its prefill (step 0) and its decode steps 4 and 8
NUM_STEP_SPANS = 3


@pytest.fixture(scope="module")
def cluster(checkpoint):
    c = start_cluster(checkpoint("llama"), num_stages=2, num_samplers=2, trace_every_n_steps=EVERY_N)
    yield c
    c.stop()


@pytest.fixture
def exporter():
    exporter = InMemorySpanExporter()
    tracing.install(SimpleSpanProcessor(exporter))
    yield exporter
    tracing.install(None)


def generate(endpoint: str, request_id: str, traceparent: str = "") -> None:
    request = coordinator_pb2.GenerateRequest(
        request_id=request_id, token_ids=coordinator_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    metadata = (("traceparent", traceparent),) if traceparent else None
    with grpc.insecure_channel(endpoint) as channel:
        responses = list(coordinator_pb2_grpc.CoordinatorStub(channel).Generate(request, timeout=60, metadata=metadata))
    assert responses[-1].complete.usage.completion_tokens == MAX_TOKENS


def spans_of_request(exporter: InMemorySpanExporter, request_id: str, num_spans: int, timeout_s: float = 10.0):
    """The finished spans of the trace whose root is `request_id`'s Generate span, once there are
    `num_spans` (the last stage and the sampler may end theirs just after the client has its answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = exporter.get_finished_spans()
        roots = [s for s in spans if s.name == "Generate" and s.attributes["tandem.request_id"] == request_id]
        if roots:
            ours = [s for s in spans if s.context.trace_id == roots[0].context.trace_id]
            if len(ours) >= num_spans or time.monotonic() > deadline:
                return roots[0], ours
        assert time.monotonic() < deadline, f"no Generate span for {request_id}"
        time.sleep(0.05)


def by_scope(spans, scope: str) -> list:
    return [s for s in spans if s.instrumentation_scope.name == f"tandem.{scope}"]


# Generate, queue, the step spans, each step's forward pass on 2 stages and its sampling
NUM_SPANS = 2 + NUM_STEP_SPANS + 2 * NUM_STEP_SPANS + NUM_STEP_SPANS


def test_one_request_is_one_trace_across_coordinator_stages_and_sampler(cluster, exporter):
    generate(cluster.endpoint, "traced")
    root, spans = spans_of_request(exporter, "traced", NUM_SPANS)
    assert len(spans) == NUM_SPANS, sorted(s.name for s in spans)
    assert root.parent is None  # the client sent no traceparent: a new trace
    assert root.attributes["tandem.finish_reason"] == "FINISH_REASON_LENGTH"
    assert root.attributes["tandem.num_output_tokens"] == MAX_TOKENS

    coordinator = by_scope(spans, "coordinator")
    steps = [s for s in coordinator if s.name in ("prefill", "decode")]
    assert sorted(s.name for s in coordinator) == ["Generate", "decode", "decode", "prefill", "queue"]
    assert [s.attributes["tandem.step_index"] for s in sorted(steps, key=lambda s: s.start_time)] == [0, 4, 8]
    for span in coordinator:
        if span is not root:
            assert span.parent.span_id == root.context.span_id, span.name

    step_ids = {s.context.span_id: s.attributes["tandem.step_id"] for s in steps}
    stage_spans, sampler_spans = by_scope(spans, "stage_worker"), by_scope(spans, "cpu_sampler")
    assert {s.name for s in stage_spans} == {"forward"} and {s.name for s in sampler_spans} == {"sample"}
    for span in stage_spans + sampler_spans:  # each under the coordinator's span of its step
        assert step_ids[span.parent.span_id] == span.attributes["tandem.step_id"], span.name
    for step_id in step_ids.values():
        assert sorted(s.attributes["tandem.stage_index"] for s in stage_spans
                      if s.attributes["tandem.step_id"] == step_id) == [0, 1]
        assert [s.attributes["tandem.step_id"] for s in sampler_spans].count(step_id) == 1


TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def assert_continued(exporter: InMemorySpanExporter, request_id: str, trace_id: str = TRACE_ID,
                     parent_id: str = PARENT_ID) -> None:
    root, spans = spans_of_request(exporter, request_id, NUM_SPANS)
    assert root.context.trace_id == int(trace_id, 16)
    assert root.parent.span_id == int(parent_id, 16) and root.parent.is_remote
    assert len(spans) == NUM_SPANS
    assert {s.instrumentation_scope.name for s in spans} == {"tandem.coordinator", "tandem.stage_worker",
                                                             "tandem.cpu_sampler"}


def test_a_client_traceparent_is_continued(cluster, exporter):
    generate(cluster.endpoint, "continued", f"00-{TRACE_ID}-{PARENT_ID}-01")
    assert_continued(exporter, "continued")


def test_the_sdk_sends_a_traceparent(cluster, exporter):
    with TandemClient(cluster.endpoint, timeout_s=60) as client:
        client.generate(prompt_ids=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                        request_id="from-sdk", traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01")
    assert_continued(exporter, "from-sdk")


def test_the_gateway_forwards_an_http_traceparent(cluster, exporter):
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    gateway = GatewayServer(GatewayConfig(port=0, coordinator=cluster.endpoint, api_key_env="TANDEM_TEST_NO_KEY"))
    try:
        body = {"model": "tandem", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        request = urllib.request.Request(f"http://{gateway.address}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json",
                                                  "traceparent": f"00-{trace_id}-{PARENT_ID}-01"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.load(response)["usage"]["completion_tokens"] == MAX_TOKENS
    finally:
        gateway.stop()
    deadline = time.monotonic() + 10
    while not (roots := [s for s in exporter.get_finished_spans() if s.name == "Generate"]):
        assert time.monotonic() < deadline, "no Generate span"
        time.sleep(0.05)
    assert_continued(exporter, roots[0].attributes["tandem.request_id"], trace_id)


def test_no_span_at_all_when_tracing_is_off(cluster):
    """Off, nothing reaches OpenTelemetry, not even its global API (a provider set there collects nothing)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert tracing.tracer("coordinator") is None
    generate(cluster.endpoint, "untraced", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    time.sleep(0.5)
    assert exporter.get_finished_spans() == ()


def test_requests_sharing_a_step_link_to_the_span_the_plans_name(exporter):
    tracer = tracing.tracer("coordinator")
    first, other = tracer.start_span("decode"), tracer.start_span("decode")
    traceparent = request_trace.step_traceparent([first, other])
    first.end()
    other.end()
    context = first.get_span_context()
    assert traceparent.startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
    assert [link.context.span_id for link in exporter.get_finished_spans()[1].links] == [context.span_id]


def test_an_endpoint_turns_tracing_on_and_none_leaves_it_off():
    tracing.configure("", "tandem-test")
    assert tracing.tracer("coordinator") is None
    tracing.configure("127.0.0.1:1", "tandem-test")  # nothing listens: spans would be dropped, not raised
    try:
        assert tracing.tracer("coordinator") is not None
    finally:
        tracing.install(None)
    assert tracing.tracer("coordinator") is None
