"""Per-sequence penalty state kept up to date one token at a time (see FastSampler)."""

from __future__ import annotations

import numpy as np

from tandem.core.sampling import SequenceState


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
