"""The reference sampler: logits rows in, token ids and logprobs out.

Pure and gRPC-free; its parameters are `tandem.core.sampling.options.SamplingOptions`. For each
row, in this order:

1. logit_bias is added;
2. while fewer than min_tokens outputs exist, min_tokens_blocked_ids are set to -inf;
3. repetition penalty (vLLM): for tokens in the prompt or the output, positive logits are
   divided by it and negative ones multiplied;
4. frequency and presence penalties (output tokens only): logit -= frequency * count +
   presence * (count > 0);
5. logprobs are taken: log_softmax of the penalized logits divided by the temperature (by 1
   when the temperature is 0);
6. temperature 0 (below 1e-5) takes the argmax (ties to the lowest id); else logits are divided
   by the temperature, then top-k, top-p (the smallest set whose mass reaches top_p, never
   empty) and min-p cut the candidates, and one uniform draw from a torch.Generator seeded
   with `sample_key` picks a token by inverse CDF (a token of probability 0 can never win).

A token is therefore a pure function of (logits row, parameters, seed, request, sample index,
token history): any replica gives the same token for the same row, whatever else the batch
holds. When the client set a seed, the key leaves the request id out, so that the same seed,
prompt and parameters give the same output in any request (vLLM's promise); server-chosen
seeds are distinct per request anyway.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

from tandem.core.errors import InvalidArgumentError
from tandem.core.sampling.options import GREEDY_TEMPERATURE, SamplingOptions  # also imported from here
from tandem.v1 import common_pb2

FLOAT32_MAX = torch.finfo(torch.float32).max


def sample_key(seed: int, request_id: str, sample_index: int) -> int:
    """A stable 63-bit generator key for one sample (blake2b; never Python's salted hash)."""
    data = (seed.to_bytes(16, "little", signed=True) + sample_index.to_bytes(8, "little")
            + request_id.encode("utf-8"))
    digest = hashlib.blake2b(data, digest_size=8, person=b"tandem-sample").digest()
    return int.from_bytes(digest, "little") >> 1


def _ids(name: str, request_id: str, ids: Iterable[int]) -> tuple[int, ...]:
    ids = tuple(ids)
    for i, token_id in enumerate(ids):
        if token_id < 0:
            raise InvalidArgumentError(f"request {request_id!r}: {name}[{i}]={token_id} is negative")
    return ids


class SequenceState:
    """What the sampler keeps per sequence: options, seed, prompt set and output history."""

    def __init__(self, request_id: str, options: SamplingOptions, seed: int,
                 prompt_ids: Iterable[int], output_ids: Iterable[int] = (),
                 min_tokens_blocked_ids: Iterable[int] = ()):
        if not request_id:
            raise InvalidArgumentError("request_id must not be empty")
        self.request_id = request_id
        self.options = options
        self.seed = seed
        self.prompt_ids = torch.tensor(_ids("prompt_ids", request_id, prompt_ids), dtype=torch.long).unique()
        self.output_ids: list[int] = list(_ids("output_ids", request_id, output_ids))
        self.output_counts: Counter[int] = Counter(self.output_ids)  # token id -> occurrences
        blocked = _ids("min_tokens_blocked_ids", request_id, min_tokens_blocked_ids)
        self.blocked_ids = torch.tensor(blocked, dtype=torch.long)
        self.bias_ids = torch.tensor([i for i, _ in options.logit_bias], dtype=torch.long)
        self.bias_values = torch.tensor([b for _, b in options.logit_bias], dtype=torch.float32)
        self.key_request_id = "" if options.seed is not None else request_id
        self._checked_vocab_size = 0

    @property
    def num_outputs(self) -> int:
        return len(self.output_ids)

    def append(self, token_id: int) -> None:
        """Record one new output token, updating the counts incrementally."""
        self.output_ids.append(token_id)
        self.output_counts[token_id] += 1

    def counts_before(self, sample_index: int) -> Counter[int]:
        """Output token counts as they were when output `sample_index` was sampled."""
        if sample_index == self.num_outputs:
            return self.output_counts
        return Counter(self.output_ids[:sample_index])

    def check_vocab(self, vocab_size: int) -> None:
        """Every token id this state holds lies in [0, vocab_size); checked once per size."""
        if vocab_size == self._checked_vocab_size:
            return
        for name, ids in (("prompt_ids", self.prompt_ids.tolist()), ("output_ids", self.output_ids),
                          ("min_tokens_blocked_ids", self.blocked_ids.tolist()),
                          ("logit_bias", self.bias_ids.tolist()),
                          ("stop_token_ids", self.options.stop_token_ids)):
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise InvalidArgumentError(
                    f"request {self.request_id!r}: {name} holds token id {bad[0]}, "
                    f"outside the vocabulary of {vocab_size} tokens")
        self._checked_vocab_size = vocab_size


def check_row(logits: torch.Tensor, state: SequenceState, sample_index: int,
              top: float | None = None) -> None:
    """Raise InvalidArgumentError if this row [vocab] cannot be sampled for `state`.

    `top` is the row's max when the caller already has it (one amax over a whole frame is
    far cheaper than a max per row); it must be NaN when the row holds a NaN."""
    if sample_index < 0:
        raise InvalidArgumentError(f"request {state.request_id!r}: sample index {sample_index} is negative")
    if sample_index > state.num_outputs:
        raise InvalidArgumentError(
            f"request {state.request_id!r}: sample index {sample_index} skips ahead of the "
            f"{state.num_outputs} outputs recorded (expected at most {state.num_outputs})")
    if logits.dim() != 1 or logits.numel() == 0:
        raise InvalidArgumentError(f"a logits row must be [vocab] with vocab > 0, got {list(logits.shape)}")
    state.check_vocab(logits.shape[-1])
    top = float(logits.max()) if top is None else top  # NaN if any is NaN
    if math.isnan(top) or top == math.inf:
        raise InvalidArgumentError(f"request {state.request_id!r}: logits hold NaN or +inf")
    masked = top == -math.inf
    if not masked and sample_index < state.options.min_tokens and state.blocked_ids.numel():
        possible = torch.isfinite(logits)  # [vocab]
        possible[state.blocked_ids] = False
        masked = not bool(possible.any())
    if masked:
        raise InvalidArgumentError(f"request {state.request_id!r}: every token is masked")


def penalized_logits(logits: torch.Tensor, state: SequenceState, sample_index: int) -> torch.Tensor:
    """Steps 1-4 of the module docstring on one row: [vocab] -> new [vocab] float32 tensor."""
    opts = state.options
    x = logits.to(torch.float32).clone()  # [vocab]
    if state.bias_ids.numel():
        x.index_add_(0, state.bias_ids, state.bias_values)
    if sample_index < opts.min_tokens and state.blocked_ids.numel():
        x[state.blocked_ids] = -math.inf
    counts = state.counts_before(sample_index)
    out_ids = torch.tensor(list(counts), dtype=torch.long)  # [distinct outputs]
    if opts.repetition_penalty != 1.0:
        seen = torch.cat([state.prompt_ids, out_ids]).unique()  # [seen tokens]
        v = x[seen]
        x[seen] = torch.where(v > 0, v / opts.repetition_penalty, v * opts.repetition_penalty)
    if out_ids.numel() and (opts.frequency_penalty or opts.presence_penalty):
        occurrences = torch.tensor(list(counts.values()), dtype=torch.float32)  # [distinct outputs]
        x[out_ids] -= opts.frequency_penalty * occurrences + opts.presence_penalty
    return x


def truncated_probs(scaled: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """Top-k, top-p, then min-p on temperature-scaled logits [vocab] -> probabilities [vocab]."""
    if opts.top_k is not None and opts.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, opts.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if opts.top_p < 1.0:
        probs = torch.softmax(scaled, dim=-1)  # [vocab]
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)  # [vocab] each
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [vocab]
        drop_sorted = mass_before >= opts.top_p
        drop_sorted[0] = False
        drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)  # [vocab]
        scaled = scaled.masked_fill(drop, -math.inf)
    probs = torch.softmax(scaled, dim=-1)  # [vocab]
    if opts.min_p > 0.0:
        probs = probs.masked_fill(probs < opts.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


def _draw(probs: torch.Tensor, key: int) -> int:
    """Inverse-CDF draw from probs [vocab]; tokens of probability 0 are never returned."""
    generator = torch.Generator().manual_seed(key)
    u = torch.rand((), generator=generator, dtype=torch.float64)
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)  # [vocab]
    token = torch.searchsorted(cdf, u * cdf[-1], right=True)
    return int(token.clamp_(max=probs.shape[-1] - 1))


def _logprobs(logprobs: torch.Tensor, token_id: int, num_top: int) -> common_pb2.SampleLogprobs:
    """The sampled token's logprob and the num_top best, most likely first (ties: lower id)."""
    result = common_pb2.SampleLogprobs(
        sampled=common_pb2.TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id])))
    if num_top:
        values, ids = torch.sort(logprobs, descending=True, stable=True)  # [vocab] each
        for token, value in zip(ids[:num_top].tolist(), values[:num_top].tolist()):
            result.top.add(token_id=token, logprob=value)
    return result


def _sample_one(logits: torch.Tensor, state: SequenceState, sample_index: int
                ) -> tuple[int, common_pb2.SampleLogprobs | None]:
    """Sample one checked row [vocab]; record the token unless the row is a replay."""
    opts = state.options
    x = penalized_logits(logits, state, sample_index)  # [vocab]
    greedy = opts.temperature < GREEDY_TEMPERATURE
    scaled = (x if greedy else x / opts.temperature).clamp_(max=FLOAT32_MAX)  # [vocab], no +inf
    is_replay = sample_index < state.num_outputs
    if is_replay:
        token = state.output_ids[sample_index]
    elif greedy:
        token = int(torch.argmax(scaled))
    else:
        key = sample_key(state.seed, state.key_request_id, sample_index)
        token = _draw(truncated_probs(scaled, opts), key)
    if not is_replay:
        state.append(token)
    if opts.logprobs is None:
        return token, None
    return token, _logprobs(torch.log_softmax(scaled, dim=-1), token, opts.logprobs)


def sample(logits: torch.Tensor, states: Sequence[SequenceState], sample_indices: Sequence[int]
           ) -> list[tuple[int, common_pb2.SampleLogprobs | None]]:
    """Sample every row of logits [rows, vocab] float32; row i belongs to states[i].

    Each new token is recorded in its state. Replay: a row whose index is below the number
    of recorded outputs returns the recorded token (logprobs recomputed from this row and the
    history before it) and changes nothing. All rows are checked before any state changes, so
    a bad row raises InvalidArgumentError and leaves every state as it was.
    """
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise InvalidArgumentError(f"logits must be [rows, vocab] float32, got {list(logits.shape)} {logits.dtype}")
    if not logits.shape[0] == len(states) == len(sample_indices):
        raise InvalidArgumentError(
            f"{logits.shape[0]} logits rows, {len(states)} states, {len(sample_indices)} sample indices")
    for row, (state, index) in enumerate(zip(states, sample_indices)):
        check_row(logits[row], state, index)
    return [_sample_one(logits[row], state, index)
            for row, (state, index) in enumerate(zip(states, sample_indices))]
