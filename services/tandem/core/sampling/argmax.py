"""The index of each row's largest value, fast on CPU.

torch.argmax over a [rows, vocabulary] float32 frame runs at about 1.5 ns an element on one
core here, while torch.amax is vectorized and some 30 times faster. `first_argmax` takes the
maximum of each chunk of columns with amax, picks the first chunk that holds the row's maximum,
and runs argmax within that chunk only: the same index torch.argmax gives (the first
occurrence of the maximum), for a tenth of the time at a 32,000-token vocabulary.
"""

from __future__ import annotations

import torch

CHUNK = 256  # columns reduced together by amax


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=1) of a 2-D tensor x [rows, columns] holding no NaN: int64 [rows]."""
    rows, columns = x.shape
    if columns <= 2 * CHUNK or x.device.type != "cpu":
        return x.argmax(dim=1)
    whole = columns // CHUNK * CHUNK
    chunk_max = x[:, :whole].reshape(rows, -1, CHUNK).amax(dim=2)  # [rows, chunks]
    if whole < columns:
        chunk_max = torch.cat([chunk_max, x[:, whole:].amax(dim=1, keepdim=True)], dim=1)
    starts = chunk_max.argmax(dim=1) * CHUNK  # the first chunk that holds each row's maximum
    columns_of = (starts[:, None] + torch.arange(CHUNK)).clamp_(max=columns - 1)  # a short last chunk repeats its end
    return starts + x.gather(1, columns_of).argmax(dim=1)
