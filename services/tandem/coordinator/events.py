"""What reaches the engine's loop: one frozen dataclass per kind of event, dispatched by type.

Servicer threads post `Submitted` and `Aborted`; discovery posts `MembershipChanged`; the
ports' threads post what the stages and samplers answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tandem.coordinator.requests import Request
from tandem.v1 import cpu_sampler_pb2

if TYPE_CHECKING:
    from tandem.coordinator.ports import SamplerPort


@dataclass(frozen=True)
class Submitted:
    """A new request, its id already reserved by `Engine.submit`."""

    request: Request


@dataclass(frozen=True)
class Aborted:
    """End a live request early (client abort, disconnect)."""

    request_id: str
    finish_reason: int


@dataclass(frozen=True)
class MembershipChanged:
    """The full set of sampler replicas discovery sees now."""

    addresses: frozenset[str]


@dataclass(frozen=True)
class SamplerUp:
    """The replica's Results stream is confirmed: it may take sequences."""

    port: SamplerPort


@dataclass(frozen=True)
class SamplerDown:
    """The replica's Results stream broke: its sequences must move."""

    port: SamplerPort
    reason: str


@dataclass(frozen=True)
class SequencesAdded:
    """The answer to `SamplerPort.add`: the replica holds these sequences, or `error` says why not."""

    port: SamplerPort
    request_ids: tuple[str, ...]
    error: str = ""


@dataclass(frozen=True)
class TokensSampled:
    """A replica's tokens for its rows of one step (and an error for rows it could not sample)."""

    port: SamplerPort
    batch: cpu_sampler_pb2.SampledBatch


@dataclass(frozen=True)
class StepComputed:
    """The last stage ran a step: every stage holds the KV it computed (prefill chunks commit)."""

    step_id: int


@dataclass(frozen=True)
class StepFailed:
    """A stage could not run a step (stage -1: the step timed out)."""

    step_id: int
    stage: int
    error: str
    code: int = 0  # the stage's ErrorCode (common.proto); 0 when it sent none


@dataclass(frozen=True)
class StageDown:
    """A stage's plan stream broke: the stage died or restarted, and its KV cache with it."""

    stage: int
    reason: str


@dataclass(frozen=True)
class StageUp:
    """A stage that was down answers again, its weights loaded."""

    stage: int


Event = (Submitted | Aborted | MembershipChanged | SamplerUp | SamplerDown | SequencesAdded | TokensSampled
         | StepComputed | StepFailed | StageDown | StageUp)
