"""Output-length prediction for TD-Pipe's memory simulation (coordinator/td_pipe.py).

TD-Pipe's paper predicts each request's output length with a small BERT regressor; nothing can
be downloaded here, so the default learns online from the requests that complete: the mean
output length per bucket of prompt length (powers of two), falling back to the mean over all
buckets, then to a prior. A client that knows better sends a hint with its request, which wins.
Any object with `predict` and `observe` can take the default's place.
"""

from __future__ import annotations

from typing import Protocol


class OutputLengthPredictor(Protocol):
    def predict(self, prompt_len: int, max_tokens: int, hint: int | None = None) -> int:
        """Output tokens the request is expected to generate, in [1, max_tokens]."""

    def observe(self, prompt_len: int, output_len: int) -> None:
        """A request with a prompt of `prompt_len` tokens ended after `output_len` output tokens."""


class BucketMeans:
    """Mean output length per prompt-length bucket, learnt from completed requests."""

    def __init__(self, prior: int = 256, min_samples: int = 8):
        self.prior, self.min_samples = prior, min_samples
        self._sums: dict[int, int] = {}
        self._counts: dict[int, int] = {}

    @staticmethod
    def bucket(prompt_len: int) -> int:
        """The bucket of a prompt length: the power of two it does not exceed, 1 for 1."""
        return max(1, prompt_len).bit_length()

    def predict(self, prompt_len: int, max_tokens: int, hint: int | None = None) -> int:
        if hint is not None and hint > 0:
            guess = hint
        else:
            b = self.bucket(prompt_len)
            total, count = sum(self._sums.values()), sum(self._counts.values())
            if self._counts.get(b, 0) >= self.min_samples:
                guess = round(self._sums[b] / self._counts[b])
            elif count >= self.min_samples:
                guess = round(total / count)
            else:
                guess = self.prior
        return max(1, min(guess, max_tokens))

    def observe(self, prompt_len: int, output_len: int) -> None:
        b = self.bucket(prompt_len)
        self._sums[b] = self._sums.get(b, 0) + output_len
        self._counts[b] = self._counts.get(b, 0) + 1
