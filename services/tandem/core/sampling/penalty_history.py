"""FastSampler's penalties: each sequence's penalty state kept up to date one token at a time,
and the reference's steps 1-4 (`reference.penalized_logits`) applied to a whole frame at once.

Each sequence keeps its seen ids and output counts incrementally (`PenaltyHistory`: one new
token is a dict lookup and at most two array writes). `penalize` applies every row's bias,
min_tokens mask and penalties with one gather and one write over the touched ids of all rows,
with the reference's float32 formulas element by element.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from tandem.core.sampling.options import SamplingOptions
from tandem.core.sampling.reference import SequenceState


class _Growable:
    """A numpy array that grows by doubling, so appending one value is O(1)."""

    def __init__(self, dtype: type, initial: np.ndarray | None = None):
        n = 0 if initial is None else len(initial)
        self.data: np.ndarray = np.empty(max(16, 2 * n), dtype=dtype)
        if n:
            self.data[:n] = initial
        self.size = n

    def append(self, value: float) -> None:
        if self.size == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        self.data[self.size] = value
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class PenaltyHistory:
    """The ids a sequence's penalties touch, kept up to date one token at a time.

    The reference rebuilds the seen set (`unique` over prompt and outputs) and the count
    tensors for every row; here `sync` folds in only the outputs recorded since the last
    frame, whoever recorded them (this sampler, or the reference on a fallback frame).
    """

    def __init__(self, state: SequenceState):
        prompt = state.prompt_ids.numpy()  # sorted, unique
        self.seen_ids = _Growable(np.int64, prompt)  # prompt and output ids, each once
        self._seen = set(prompt.tolist())
        self.output_ids = _Growable(np.int64)  # distinct output ids, in first-seen order
        self.output_counts = _Growable(np.float32)  # their occurrences (exact in float32)
        self._slot: dict[int, int] = {}
        self.synced = 0  # outputs folded in so far

    def sync(self, output_ids: list[int]) -> None:
        for token in output_ids[self.synced:]:
            slot = self._slot.get(token)
            if slot is not None:
                self.output_counts.data[slot] += 1
                continue
            self._slot[token] = self.output_ids.size
            self.output_ids.append(token)
            self.output_counts.append(1)
            if token not in self._seen:
                self._seen.add(token)
                self.seen_ids.append(token)
        self.synced = len(output_ids)


def penalize(x: torch.Tensor, frame: list[SequenceState], histories: list[PenaltyHistory | None]) -> None:
    """Steps 1-4 of `reference.penalized_logits` on every row of x [n, vocab], in place.

    Each step gathers the touched entries of all rows, applies the reference's float32
    formula to them and writes them back; steps run in the reference's order, and a step
    touches only its own row's entries, so each row sees exactly the reference's sequence.
    """
    vocab = x.shape[1]
    flat = x.view(-1)
    bias = [(i * vocab + s.bias_ids, s.bias_values) for i, s in enumerate(frame) if s.bias_ids.numel()]
    if bias:
        flat.index_add_(0, torch.cat([b[0] for b in bias]), torch.cat([b[1] for b in bias]))
    blocked = [i * vocab + s.blocked_ids for i, s in enumerate(frame)
               if s.num_outputs < s.options.min_tokens and s.blocked_ids.numel()]
    if blocked:
        flat[torch.cat(blocked)] = -math.inf
    repeated = [(i, s.options, h.seen_ids.view()) for i, (s, h) in enumerate(zip(frame, histories))
                if h and s.options.repetition_penalty != 1.0]
    if repeated:
        ids, (penalty,) = _flat(repeated, vocab, lambda o: [o.repetition_penalty])
        v = flat[ids]
        flat[ids] = torch.where(v > 0, v / penalty, v * penalty)
    counted = [(i, s.options, h.output_ids.view()) for i, (s, h) in enumerate(zip(frame, histories))
               if h and h.output_ids.size and (s.options.frequency_penalty or s.options.presence_penalty)]
    if counted:
        ids, (frequency, presence) = _flat(counted, vocab, lambda o: [o.frequency_penalty, o.presence_penalty])
        counts = torch.from_numpy(np.concatenate([histories[i].output_counts.view() for i, _, _ in counted]))
        flat[ids] -= frequency * counts + presence


def _flat(entries: list, vocab: int, scalars: Callable[[SamplingOptions], list[float]]
          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Flat ids (row * vocab + id) of (row, options, ids) entries, and per id a float32 copy
    of each of the row's scalars, as the reference's `tensor op python float` casts them."""
    lengths = [len(ids) for _, _, ids in entries]
    ids = torch.from_numpy(np.concatenate([ids + i * vocab for i, _, ids in entries]))
    values = np.array([scalars(o) for _, o, _ in entries], dtype=np.float32)  # [entries, scalars]
    return ids, [torch.from_numpy(np.repeat(values[:, k], lengths)) for k in range(values.shape[1])]
