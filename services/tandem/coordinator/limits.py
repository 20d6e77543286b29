"""The limits a request meets at the front door, checked before any work is done for it.

Size: one request must not be able to slow everyone else down or grow the coordinator without
bound: a prompt of many megabytes, tens of thousands of stop strings, a huge logit-bias map.
Each limit is a config field (CoordinatorConfig), and a request over one is refused with
INVALID_ARGUMENT naming the field, the size and the limit.

The queue (`Admission`): past `max_queue` requests waiting, a request is refused with
RESOURCE_EXHAUSTED before its prompt is tokenized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tandem.core.errors import InvalidArgumentError
from tandem.v1 import coordinator_pb2 as pb


@dataclass(frozen=True)
class Limits:
    max_prompt_bytes: int  # UTF-8 bytes of a prompt's text, or of text to tokenize
    max_prompt_tokens: int  # token ids given as the prompt, or to detokenize
    max_request_id_bytes: int
    max_stop_strings: int
    max_stop_string_bytes: int  # UTF-8 bytes of each stop string
    max_stop_token_ids: int
    max_logit_bias: int  # entries of logit_bias

    def check_generate(self, request: pb.GenerateRequest) -> None:
        _at_most("request_id", len(request.request_id.encode()), self.max_request_id_bytes, "bytes")
        which = request.WhichOneof("input")
        if which == "text":
            self.check_text("text", request.text)
        elif which == "token_ids":
            self.check_token_ids("token_ids", len(request.token_ids.ids))
        params = request.sampling
        _at_most("sampling.stop", len(params.stop), self.max_stop_strings, "strings")
        for i, stop in enumerate(params.stop):
            _at_most(f"sampling.stop[{i}]", len(stop.encode()), self.max_stop_string_bytes, "bytes")
        _at_most("sampling.stop_token_ids", len(params.stop_token_ids), self.max_stop_token_ids, "ids")
        _at_most("sampling.logit_bias", len(params.logit_bias), self.max_logit_bias, "entries")
        if request.output_len_hint < 0:
            raise InvalidArgumentError(f"output_len_hint is {request.output_len_hint}; it must be >= 0 (0: no hint)")

    def check_text(self, field: str, text: str) -> None:
        # str length first: its UTF-8 form is at least that long, and encoding a huge text costs
        _at_most(field, len(text), self.max_prompt_bytes, "bytes")
        _at_most(field, len(text.encode()), self.max_prompt_bytes, "bytes")

    def check_token_ids(self, field: str, count: int) -> None:
        _at_most(field, count, self.max_prompt_tokens, "ids")


class Admission:
    """The queue limit at the front door, on the public API's event loop (one thread, no lock).

    The engine counts a request from its submission: the requests waiting, and those submitted
    and not yet taken in by its loop. A request the front has let in is first prepared (its
    prompt tokenized, off the loop); those are counted here, so that a burst arriving at a nearly
    full queue is refused at once, not each after its tokenization. A request is counted in one
    place at any time: here until `preparing` ends, which is right before the front submits it
    (with no await between) or when its preparation fails or its client leaves.
    """

    def __init__(self, check_admission: Callable[[int], None]):
        self._check_admission = check_admission  # Engine.check_admission: raises its refusal
        self.num_preparing = 0

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Let one request in for its preparation, or raise the refusal (RESOURCE_EXHAUSTED with
        the queue full, UNAVAILABLE when the coordinator takes no requests)."""
        self._check_admission(self.num_preparing)
        self.num_preparing += 1
        try:
            yield
        finally:
            self.num_preparing -= 1


def _at_most(field: str, size: int, limit: int, unit: str) -> None:
    if size > limit:
        raise InvalidArgumentError(f"{field} has {size} {unit}; at most {limit} are accepted")
