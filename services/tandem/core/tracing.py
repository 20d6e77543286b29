"""OpenTelemetry traces, off unless a service's `tracing_endpoint` is set (docs/tracing.md).

One tracer provider per process: `configure` exports to an OTLP gRPC endpoint in batches;
tests `install` their own span processor (an in-memory exporter). While none is installed,
`tracer()` is None and nothing else here is called: the hot paths check one attribute.
Context crosses services as a W3C `traceparent` string, in gRPC metadata from clients and in
the step plans (StepPlan, SamplePlan) to stages and samplers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_NOTHING = contextlib.nullcontext()


def configure(endpoint: str, service_name: str) -> None:
    """Export this process's spans to the OTLP gRPC collector at `endpoint` (host:port, or a URL);
    an empty endpoint leaves things as they are (off, unless a provider is installed)."""
    if not endpoint or _provider is not None:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    insecure = not endpoint.startswith("https://")
    install(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure)), service_name)


def install(processor: SpanProcessor | None, service_name: str = "tandem") -> None:
    """Send every span of this process to `processor`; None turns tracing off again."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
    _provider = None
    if processor is not None:
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(processor)
        _provider = provider


def tracer(service: str) -> Tracer | None:
    """The tracer of one service (`coordinator`, `stage_worker`, `cpu_sampler`: the instrumentation
    scope `tandem.<service>`); None while tracing is off."""
    return _provider.get_tracer(f"tandem.{service}") if _provider is not None else None


def traceparent(span: Span) -> str:
    """The W3C traceparent naming `span`, to carry to another service."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=set_span_in_context(span))
    return carrier.get("traceparent", "")


def extract(carrier: Mapping[str, str]) -> Context:
    """The remote parent a `traceparent` (and `tracestate`) in `carrier` names; an empty context
    when there is none (then a new trace starts)."""
    return _propagator.extract(carrier)


def child_span(service: str, name: str, parent: str, attributes: Mapping[str, Any]) -> AbstractContextManager:
    """A span of `service` under the remote span `parent` names (a traceparent); nothing when
    `parent` is empty or this process does not trace."""
    t = tracer(service) if parent else None
    if t is None:
        return _NOTHING
    return t.start_as_current_span(name, context=extract({"traceparent": parent}), kind=SpanKind.SERVER,
                                   attributes=dict(attributes))
