"""The random rows of a FastSampler frame: the reference's top-k, top-p and min-p
(`reference.truncated_probs`) and its inverse-CDF draw, with the same results and no full sort.

* Top-p without a full sort. The kept set is a prefix of the probabilities sorted descending
  (ties: lower id first). A candidate set C, every token above a threshold tau, is gathered
  cheaply: first from the few 64-token blocks with the largest maxima (tau: the largest
  maximum among the other blocks), then, for flat rows, with tau read off a histogram of the
  row's mass by float bits. Every token outside C is below every token inside, so the
  sorted vocabulary starts with sorted C, and the reference's cumsum over that prefix gives
  the same masses. Once C's mass exceeds top_p by MASS_MARGIN (far more than the rounding
  of the reference's float32 cumsum, about 2e-7), every token outside C is provably
  dropped. A row that no round can prove goes through the reference's own code.
* The draw: the reference's float64 CDF runs over the whole vocabulary in id order, but it
  only rises at kept tokens, and adding 0.0 changes nothing; so the cumsum of the kept
  tokens' probabilities in id order holds exactly the same values, and the first kept token
  whose CDF exceeds u * total is the reference's token. u comes from the same per-sample
  generator, drawn the same way. The kept tokens' probabilities still come from a softmax
  over the whole masked row, because that is how the reference's sum is formed.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from tandem.core.sampling.options import SamplingOptions
from tandem.core.sampling.reference import SequenceState, sample_key, truncated_probs
from tandem.core.sampling.top_p_candidates import (
    MASS_MARGIN,
    MassHistogram,
    Workspace,
    block_candidates,
    block_max,
    cut,
)

BLOCK = 64  # tokens per block whose maximum bounds them in the cheap first candidate rounds
BLOCK_ROUNDS = (16,)  # blocks gathered per row, round by round (one round proves as many rows as 4 then 16)
HISTOGRAM_SLACK = (1e-4, 1e-2)  # then every token above a threshold of mass top_p + margin + slack


class FastDraw:
    """Top-k, top-p, min-p and the draw for the sampled (not greedy) rows of a frame.

    `block`, `block_rounds` and `histogram_slack` set the candidate rounds of top-p (module
    doc); `top_p_rows` counts top-p rows by the round that proved their cut ("block",
    "histogram"), or "reference" for those that took the reference's full sort, for tests and
    benchmarks. Safe to call from several threads at once, each with its own Workspace.
    """

    def __init__(self, block: int = BLOCK, block_rounds: Sequence[int] = BLOCK_ROUNDS,
                 histogram_slack: Sequence[float] = HISTOGRAM_SLACK):
        self.block = block
        self.block_rounds = tuple(block_rounds)
        self.histogram_slack = tuple(histogram_slack)
        self.top_p_rows: Counter[str] = Counter()
        self._stats_lock = threading.Lock()

    def tokens(self, ws: Workspace, scaled: torch.Tensor, frame: list[SequenceState]) -> list[int]:
        """Top-k, top-p, min-p and the inverse-CDF draw for the rows of scaled [n, vocab],
        which it overwrites."""
        vocab = scaled.shape[1]
        whole, compact = self.distributions(scaled, [s.options for s in frame], ws)
        u = [_uniform(state) for state in frame]
        tokens = [0] * len(frame)
        if whole:
            order = list(whole)
            stacked = torch.stack([whole[i] for i in order], out=ws.get("whole", len(order), vocab))
            cdf = ws.get("cdf", len(order), vocab, torch.float64).copy_(stacked)
            cdf = torch.cumsum(cdf, dim=1, out=ws.get("cdf_out", len(order), vocab, torch.float64))
            for i, pick in zip(order, _search(cdf, [u[i] for i in order])):
                tokens[i] = min(pick, vocab - 1)
        if compact:
            order, ids, values = compact
            cdf = values.to(torch.float64).cumsum(dim=1)  # the reference's CDF at the kept ids
            for j, (i, pick) in enumerate(zip(order, _search(cdf, [u[i] for i in order]))):
                tokens[i] = int(ids[j, pick]) if pick < ids.shape[1] else vocab - 1  # as the clamp
        return tokens

    def distributions(self, scaled: torch.Tensor, opts: list[SamplingOptions], ws: Workspace | None = None
                      ) -> tuple[dict[int, torch.Tensor], tuple[list[int], torch.Tensor, torch.Tensor] | None]:
        """The reference's `truncated_probs` for each row of scaled [n, vocab] (overwritten).

        Returns `whole`: row -> its probabilities over the vocabulary, for rows without top-p
        or with min-p (or proven by no round); and for the other rows `(rows, ids, probs)`:
        the ids each keeps [rows, width] (ascending, padded with vocab) and their
        probabilities (padding: 0). Every other token of those rows has probability 0.
        `ws`: the buffers to use (a fresh set when None).
        """
        ws = ws or Workspace()
        n, vocab = scaled.shape
        _top_k(scaled, opts)
        probs = torch.softmax(scaled, dim=1, out=ws.get("probs", n, vocab))  # [n, vocab]
        whole: dict[int, torch.Tensor] = {}
        kept: dict[int, torch.Tensor] = {}  # top-p row -> the ids it keeps, ascending
        finished = set()  # rows of `whole` that min-p was applied to already
        p_rows = [i for i, o in enumerate(opts) if o.top_p < 1.0]
        for i, o in enumerate(opts):
            if o.top_p >= 1.0:
                whole[i] = probs[i]
        if p_rows:
            nuclei = self._nucleus(ws, ws.rows("top_p_probs", probs, p_rows), [opts[i].top_p for i in p_rows])
            for i, ids in zip(p_rows, nuclei):
                if ids is None:  # the reference's own full sort; the top-k mask above is idempotent
                    whole[i] = truncated_probs(scaled[i].clone(), opts[i])
                    finished.add(i)
                else:
                    kept[i] = ids
        compact = None
        if kept:
            kept_probs = _softmax_of_kept(ws, scaled, kept)  # [len(kept), vocab]
            kept_row = {i: j for j, i in enumerate(kept)}
            for i in [i for i in kept if opts[i].min_p > 0.0]:
                whole[i] = kept_probs[kept_row[i]]  # min-p needs the whole row
                del kept[i]
        if kept:
            order = list(kept)
            ids = pad_sequence([kept[i] for i in order], batch_first=True, padding_value=vocab)  # [rows, width]
            at = torch.tensor([[kept_row[i] * vocab] for i in order]) + ids.clamp(max=vocab - 1)
            compact = (order, ids, torch.where(ids < vocab, kept_probs.view(-1)[at], 0.0))
        for i, row in whole.items():
            if opts[i].min_p > 0.0 and i not in finished:
                whole[i] = _min_p(row, opts[i])
        return whole, compact

    def _nucleus(self, ws: Workspace, probs: torch.Tensor, top_p: list[float]) -> list[torch.Tensor | None]:
        """For each row of probs [n, vocab], the ids (ascending) the reference's top-p keeps,
        or None where no candidate round could prove the cut."""
        n = probs.shape[0]
        kept: list[torch.Tensor | None] = [None] * n
        pending = list(range(n))
        top_p_t = torch.tensor(top_p)  # float32: the reference compares in float32
        maxima = None
        for size in self.block_rounds:
            if maxima is None:
                maxima = block_max(probs, self.block)  # [n, blocks]
            size = min(size, maxima.shape[1] - 1)  # one block must be left out to bound the rest
            if not pending or size < 1:
                break
            ids, values = block_candidates(probs, maxima, pending, size, self.block)
            pending = self._prove(kept, pending, ids, values, top_p_t, "block")
        histogram = None
        for slack in self.histogram_slack:
            if not pending:
                break
            if histogram is None:
                histogram = MassHistogram(ws, probs, pending)
            ids, values = histogram.candidates(pending, [top_p[i] + MASS_MARGIN + slack for i in pending])
            pending = self._prove(kept, pending, ids, values, top_p_t, "histogram")
        with self._stats_lock:
            self.top_p_rows["reference"] += len(pending)
        return kept

    def _prove(self, kept: list[torch.Tensor | None], pending: list[int], ids: torch.Tensor,
               values: torch.Tensor, top_p: torch.Tensor, path: str) -> list[int]:
        """Record the cuts that the candidates of the pending rows prove; return the rest."""
        still = []
        for i, proven in zip(pending, cut(ids, values, top_p[pending])):
            if proven is None:
                still.append(i)
            else:
                kept[i] = proven
        with self._stats_lock:
            self.top_p_rows[path] += len(pending) - len(still)
        return still


def _softmax_of_kept(ws: Workspace, scaled: torch.Tensor, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """The reference's softmax of `scaled.masked_fill(drop, -inf)` for the kept rows: on the
    full row, so that its sum is formed exactly as the reference's. [len(kept), vocab]."""
    vocab = scaled.shape[1]
    masked = ws.get("masked", len(kept), vocab).fill_(-math.inf)
    lengths = torch.tensor([len(ids) for ids in kept.values()])
    ids = torch.cat(list(kept.values()))
    source = torch.tensor(list(kept)).repeat_interleave(lengths) * vocab + ids
    target = torch.arange(len(kept)).repeat_interleave(lengths) * vocab + ids
    masked.view(-1)[target] = scaled.view(-1)[source]
    return torch.softmax(masked, dim=1, out=ws.get("kept_probs", len(kept), vocab))


def _min_p(probs: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """The reference's min-p step, on a fresh row like the reference's."""
    probs = probs.clone()
    probs = probs.masked_fill(probs < opts.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def _top_k(scaled: torch.Tensor, opts: list[SamplingOptions]) -> None:
    """The reference's top-k mask, in place on the rows that have one."""
    vocab = scaled.shape[1]
    rows = [i for i, o in enumerate(opts) if o.top_k is not None and o.top_k < vocab]
    if not rows:
        return
    sub = scaled if len(rows) == scaled.shape[0] else scaled[rows]
    values = torch.topk(sub, max(opts[i].top_k for i in rows), dim=1).values  # [rows, max k]
    kth = values.gather(1, torch.tensor([[opts[i].top_k - 1] for i in rows]))  # [rows, 1]
    sub.masked_fill_(sub < kth, -math.inf)
    if sub is not scaled:
        scaled[rows] = sub


def _uniform(state: SequenceState) -> float:
    """The reference's uniform draw for this state's next output (same generator, same call)."""
    key = sample_key(state.seed, state.key_request_id, state.num_outputs)
    generator = torch.Generator().manual_seed(key)
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _search(cdf: torch.Tensor, u: list[float]) -> list[int]:
    """Per row of cdf [rows, m], the reference's searchsorted(cdf, u * cdf[-1], right=True)
    (m where even the total does not exceed the target)."""
    target = torch.tensor(u, dtype=torch.float64) * cdf[:, -1]  # float64 products, as u * cdf[-1]
    return torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1).tolist()
