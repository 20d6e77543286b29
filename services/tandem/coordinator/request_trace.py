"""A traced request's spans on the coordinator (docs/tracing.md): `Generate` (the root, made by
its coroutine on the front), `queue` (arrival to its first step) and one span for its prefill and for
every Nth step after, made by the loop as it sends them. Requests are traced only while the
process has a tracer; an untraced request has `trace = None` and costs the loop one check."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context

from tandem.core import tracing
from tandem.v1 import common_pb2


class RequestTrace:
    def __init__(self, tracer: Tracer, request_id: str, num_prompt_tokens: int, parent: Mapping[str, str],
                 every_n_steps: int):
        self._tracer, self._every_n_steps = tracer, every_n_steps
        self._start_ns = time.time_ns()
        self.root = tracer.start_span("Generate", context=tracing.extract(parent), kind=SpanKind.SERVER,
                                      start_time=self._start_ns, attributes={
                                          "tandem.request_id": request_id,
                                          "tandem.num_prompt_tokens": num_prompt_tokens})
        self._context = set_span_in_context(self.root)
        self.num_steps = 0  # steps the request has been in
        self.step_span: Span | None = None  # the open span of its traced step in flight

    def begin_step(self, step_id: int, num_input_tokens: int, num_sequences: int) -> Span | None:
        """The request goes into a step (loop thread): the step's span when this step is traced."""
        self.end_step()
        if self.num_steps == 0:
            self._tracer.start_span("queue", context=self._context, start_time=self._start_ns).end()
        n, self.num_steps = self.num_steps, self.num_steps + 1
        if num_input_tokens == 1 and n % self._every_n_steps:
            return None
        self.step_span = self._tracer.start_span(
            "prefill" if num_input_tokens > 1 else "decode", context=self._context, attributes={
                "tandem.step_id": step_id, "tandem.step_index": n, "tandem.num_input_tokens": num_input_tokens,
                "tandem.num_sequences": num_sequences})
        return self.step_span

    def end_step(self) -> None:
        """Its step committed, failed, or the request ended (loop thread)."""
        if self.step_span is not None:
            self.step_span.end()
            self.step_span = None

    def finish(self, finish_reason: int, num_output_tokens: int, error: BaseException | None = None) -> None:
        """The request's stream ended (its coroutine on the front)."""
        self.root.set_attribute("tandem.finish_reason", common_pb2.FinishReason.Name(finish_reason))
        self.root.set_attribute("tandem.num_output_tokens", num_output_tokens)
        if error is not None:
            self.root.record_exception(error)
            self.root.set_status(Status(StatusCode.ERROR, str(error)))
        self.root.end()


def start(request_id: str, num_prompt_tokens: int, metadata: Iterable[tuple[str, str]],
          every_n_steps: int) -> RequestTrace | None:
    """A trace for a new request, continuing the client's `traceparent` metadata if it sent one;
    None when this process does not trace."""
    tracer = tracing.tracer("coordinator")
    if tracer is None:
        return None
    return RequestTrace(tracer, request_id, num_prompt_tokens, dict(metadata), every_n_steps)


def step_traceparent(spans: Sequence[Span]) -> str:
    """The traceparent a step's plans carry, given the spans of its traced requests: the first's.
    The others link to it, so their traces lead to the stage and sampler spans of the step."""
    first = spans[0].get_span_context()
    for span in spans[1:]:
        span.add_link(first)
    return tracing.traceparent(spans[0])

