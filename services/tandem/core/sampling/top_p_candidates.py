"""The reference's top-p cut, proven on small candidate sets instead of a full sort.

A candidate set holds every token above a threshold, so the vocabulary sorted by probability
starts with the set sorted; `cut` applies the reference's cumulative-mass rule to it and
accepts the result only when the set's mass exceeds top_p by MASS_MARGIN, which proves that
every token outside it is dropped. Candidates come from the 64-token blocks with the largest
maxima (`block_candidates`) or, for flat rows, from a histogram of the mass (`MassHistogram`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

MASS_MARGIN = 1e-6  # a candidate set this far above top_p provably holds the whole kept set


class Workspace:
    """Buffers reused from frame to frame, one set per thread.

    A fresh [rows, vocab] tensor is megabytes that the allocator maps from the OS anew each
    time; faulting its pages in costs more than the softmax computed in it.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialized contiguous [rows, cols] tensor, valid until `name` is asked again."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < rows * cols or buffer.dtype != dtype:
            grown = 0 if buffer is None or buffer.dtype != dtype else 2 * buffer.numel()  # amortized
            buffer = self._buffers[name] = torch.empty(max(rows * cols, grown), dtype=dtype)
        return buffer[: rows * cols].view(rows, cols)

    def rows(self, name: str, t: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """t itself when `rows` are all its rows in order, else those rows copied into `name`."""
        if len(rows) == t.shape[0]:
            return t
        out = self.get(name, len(rows), t.shape[1], t.dtype)
        return torch.index_select(t, 0, torch.tensor(rows), out=out)


class MassHistogram:
    """The mass of some rows at or above a fine ladder of thresholds, in one pass.

    A float32 >= 0 orders as its bits do; its top bits (exponent and 3 mantissa bits) name a
    bucket 2^(1/8) wide, and summing probabilities per bucket gives the mass above every
    bucket boundary. Float32 sums, so only a guide: the cut is proven on the exact candidates.
    """

    SHIFT = 20  # bits below the bucket number

    def __init__(self, ws: Workspace, probs: torch.Tensor, rows: list[int]):
        self.probs = ws.rows("histogram_probs", probs, rows)  # [rows, vocab]
        self.index = {row: j for j, row in enumerate(rows)}
        num_rows, vocab = self.probs.shape
        shifted = torch.bitwise_right_shift(self.probs.view(torch.int32), self.SHIFT,
                                            out=ws.get("histogram_shifted", num_rows, vocab, torch.int32))
        buckets = ws.get("histogram_buckets", num_rows, vocab, torch.int64).copy_(shifted)
        mass = torch.zeros(len(rows), 2 ** (31 - self.SHIFT)).scatter_add_(1, buckets, self.probs)
        self.mass_from = mass.flip(1).cumsum(dim=1).flip(1)  # [rows, buckets]: mass at or above each

    def candidates(self, rows: list[int], masses: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, every token at or above the highest boundary with at least that mass
        (none where the row's whole mass falls short); -1 pads."""
        at = [self.index[row] for row in rows]
        mass = self.mass_from[at]
        reach = (mass >= torch.tensor(masses, dtype=torch.float64).unsqueeze(1)).sum(dim=1)  # buckets
        tau = ((reach - 1).clamp(min=0) << self.SHIFT).int().view(torch.float32)
        tau = torch.where(reach > 0, tau, math.inf).unsqueeze(1)  # [rows, 1]
        probs = self.probs if len(at) == self.probs.shape[0] else self.probs[at]
        return pack(probs >= tau, probs)


def block_candidates(probs: torch.Tensor, block_max: torch.Tensor, rows: list[int], size: int, block: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates from the `size` blocks with the largest maxima: every token there above the
    next block's maximum, which bounds every token outside those blocks."""
    vocab = probs.shape[1]
    top = torch.topk(block_max[rows] if len(rows) < len(block_max) else block_max, size + 1, dim=1)
    tau = top.values[:, size:]  # [rows, 1]
    blocks = top.indices[:, :size].sort(dim=1).values  # ascending, so the ids come out ascending
    ids = (blocks.unsqueeze(2) * block + torch.arange(block)).flatten(1)  # [rows, size*block]
    inside = ids < vocab
    ids.clamp_(max=vocab - 1)
    values = probs.view(-1)[torch.tensor(rows).unsqueeze(1) * vocab + ids]  # [rows, size*block]
    return pack(inside & (values > tau), values, ids)


def pack(valid: torch.Tensor, values: torch.Tensor, ids: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid entries of each row of values [rows, m] (and of ids, by default the column
    numbers), in order and left-aligned: ids and values [rows, width], padded with -1."""
    rows, m = valid.shape
    flat = torch.from_numpy(np.flatnonzero(valid.numpy()))  # numpy's is ~3x torch's nonzero
    row = flat // m
    counts = torch.bincount(row, minlength=rows)
    width = max(int(counts.max()), 1)
    position = torch.arange(len(flat)) - (counts.cumsum(0) - counts)[row]
    packed_ids = torch.full((rows, width), -1, dtype=torch.long)
    packed_values = torch.full((rows, width), -1.0)
    packed_ids[row, position] = flat % m if ids is None else ids.view(-1)[flat]
    packed_values[row, position] = values.reshape(-1)[flat]
    return packed_ids, packed_values


def cut(ids: torch.Tensor, values: torch.Tensor, top_p: torch.Tensor) -> list[torch.Tensor | None]:
    """The reference's top-p cut on candidate sets: ids (ascending) and probabilities
    [rows, m], -1 where a row has fewer candidates. Per row the kept ids, ascending, or None
    when the set's mass does not prove that every token outside it is dropped."""
    # A stable descending sort of id-ascending candidates: the reference's order (ties: lower
    # id first), and -1 padding sorts last.
    values, order = values.sort(dim=1, descending=True, stable=True)
    valid = values >= 0
    probs = values.clamp(min=0.0)
    cumulative = probs.cumsum(dim=1)  # the reference's ops on the same prefix: the same masses
    drop = (cumulative - probs) >= top_p.unsqueeze(1)
    drop[:, 0] = False
    keep = torch.empty_like(valid).scatter_(1, order, valid & ~drop)  # back in id order
    count = valid.sum(dim=1)
    last = cumulative.gather(1, (count - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    proven = ((count > 0) & (last.double() >= top_p.double() + MASS_MARGIN)).tolist()
    kept = torch.split(ids[keep], keep.sum(dim=1).tolist())
    return [k if ok else None for k, ok in zip(kept, proven)]


def block_max(probs: torch.Tensor, block: int) -> torch.Tensor:
    """The maximum of each run of `block` tokens (the last run may be shorter): [n, blocks]."""
    n, vocab = probs.shape
    whole = vocab // block
    parts = []
    if whole:
        parts.append(probs.as_strided((n, whole, block), (probs.stride(0), block, 1)).amax(dim=2))
    if vocab % block:
        parts.append(probs[:, whole * block:].amax(dim=1, keepdim=True))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
