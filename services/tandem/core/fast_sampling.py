"""A fast sampler that returns exactly what `tandem.core.sampling.sample` returns.

The reference spends most of its time on one full stable sort of the vocabulary per top-p
row, and the rest on per-row work: a `torch.unique` over the whole history, one small tensor
op after another, a fresh full-vocabulary tensor per step. `FastSampler` returns the same
token ids and the same logprobs, bit for bit, because it performs the same float operations
on the same values, only far fewer of them:

* Penalties: each sequence keeps its seen ids and output counts incrementally
  (`PenaltyHistory`: one new token is a dict lookup and at most two array writes). A frame
  applies every row's bias, min_tokens mask and penalties with one gather and one write over
  the touched ids of all rows, with the reference's float32 formulas element by element.
* Full-vocabulary steps (temperature, softmax, log_softmax, argmax, cumsum) run once on the
  whole frame, in buffers reused from frame to frame. These kernels work row by row, so a
  row comes out exactly as from its own call.
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
* Logprobs: one log_softmax over the frame; the top n via topk, ties at the boundary
  resolved to the lowest ids as the reference's stable sort resolves them.

Rows the fast path does not cover go through the reference code: replay rows (an index below
the recorded outputs) and frames that hold one sequence twice (the reference's row order
then matters).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from tandem.core.argmax import first_argmax
from tandem.core.errors import InvalidArgumentError
from tandem.core.penalty_history import PenaltyHistory
from tandem.core.sampling import (
    FLOAT32_MAX,
    GREEDY_TEMPERATURE,
    SamplingOptions,
    SequenceState,
    _sample_one,
    check_row,
    sample,
    sample_key,
    truncated_probs,
)
from tandem.core.top_p_candidates import (
    MASS_MARGIN,
    MassHistogram,
    Workspace,
    block_candidates,
    block_max,
    cut,
)
from tandem.v1 import common_pb2

BLOCK = 64  # tokens per block whose maximum bounds them in the cheap first candidate rounds
BLOCK_ROUNDS = (16,)  # blocks gathered per row, round by round (one round proves as many rows as 4 then 16)
HISTOGRAM_SLACK = (1e-4, 1e-2)  # then every token above a threshold of mass top_p + margin + slack
CHUNK_ROWS = 64  # rows sampled together; bounds the reused buffers to CHUNK_ROWS x vocab
REFERENCE_BELOW = 16384  # frames of fewer logits go to the reference, faster there (see FastSampler)

Result = tuple[int, common_pb2.SampleLogprobs | None]


def check_rows(logits: torch.Tensor, states: Sequence[SequenceState], sample_indices: Sequence[int]) -> None:
    """`check_row` on every row, with the row maxima taken in one pass over the frame."""
    tops = logits.amax(dim=1).tolist() if logits.shape[1] else [None] * logits.shape[0]
    for row, (state, index) in enumerate(zip(states, sample_indices)):
        check_row(logits[row], state, index, tops[row])


class FastSampler:
    """`sample()` with the same results, many times faster on real vocabularies (module doc).

    Keeps a PenaltyHistory per sequence, weakly keyed: a released state takes its history
    with it. Frames are sampled in chunks of at most `chunk_rows` rows, spread over
    `num_threads` threads (torch ops release the GIL); a row's result does not depend on the
    chunk it lands in.

    The fast path costs about a millisecond of small tensor ops per frame whatever its size,
    so frames of fewer than `reference_below` logits (rows x vocab: one row of a 2k-token
    vocabulary, say) go to the reference, which is faster there and gives the same results
    by definition. That and the round parameters exist so tests can drive every path on
    small vocabularies; the defaults suit real ones.
    """

    def __init__(self, num_threads: int = 1, *, chunk_rows: int = CHUNK_ROWS, block: int = BLOCK,
                 block_rounds: Sequence[int] = BLOCK_ROUNDS,
                 histogram_slack: Sequence[float] = HISTOGRAM_SLACK, reference_below: int = REFERENCE_BELOW):
        if num_threads < 1:
            raise InvalidArgumentError(f"num_threads={num_threads} must be >= 1")
        if chunk_rows < 1:
            raise InvalidArgumentError(f"chunk_rows={chunk_rows} must be >= 1")
        self.num_threads = num_threads
        self.chunk_rows = chunk_rows
        self.block = block
        self.block_rounds = tuple(block_rounds)
        self.histogram_slack = tuple(histogram_slack)
        self.reference_below = reference_below
        self._histories: weakref.WeakKeyDictionary[SequenceState, PenaltyHistory] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # one frame at a time: histories and buffers are shared
        self._workspace = Workspace()  # the calling thread's buffers
        self._local = threading.local()  # each worker thread's buffers
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="fast-sampler") if num_threads > 1 else None
        # Top-p rows by the round that proved their cut ("block", "histogram"), or "reference"
        # for those that took the reference's full sort. For tests and benchmarks.
        self.top_p_rows: Counter[str] = Counter()
        self._stats_lock = threading.Lock()

    def close(self) -> None:
        """Stop the worker threads (if any)."""
        if self._pool:
            self._pool.shutdown()

    def sample(self, logits: torch.Tensor, states: Sequence[SequenceState], sample_indices: Sequence[int],
               *, checked: bool = False) -> list[Result]:
        """Same contract and results as `sampling.sample`. `checked`: the caller already ran
        check_row on every row (the engine does, to skip bad rows), so it is not run twice."""
        if logits.dim() != 2 or logits.dtype != torch.float32:
            raise InvalidArgumentError(f"logits must be [rows, vocab] float32, got {list(logits.shape)} {logits.dtype}")
        if not logits.shape[0] == len(states) == len(sample_indices):
            raise InvalidArgumentError(
                f"{logits.shape[0]} logits rows, {len(states)} states, {len(sample_indices)} sample indices")
        with self._lock:
            return self._sample(logits, states, sample_indices, checked)

    def _sample(self, logits: torch.Tensor, states: Sequence[SequenceState], sample_indices: Sequence[int],
                checked: bool) -> list[Result]:
        if not checked:
            check_rows(logits, states, sample_indices)
        if len({id(state) for state in states}) < len(states):
            return sample(logits, states, sample_indices)  # rows of one sequence depend on their order
        if logits.numel() < self.reference_below:
            return sample(logits, states, sample_indices)  # a small frame: the reference is faster
        if all(index == state.num_outputs and _argmax_only(state) for state, index in zip(states, sample_indices)):
            tokens = first_argmax(logits).tolist()  # nothing changes the logits: no copy, no pass before
            for state, token in zip(states, tokens):
                state.append(token)
            return [(token, None) for token in tokens]
        results: list[Result | None] = [None] * len(states)
        new_rows = []
        for row, (state, index) in enumerate(zip(states, sample_indices)):
            if index < state.num_outputs:  # replay: the recorded token, logprobs from this row
                results[row] = _sample_one(logits[row], state, index)
            else:
                new_rows.append(row)
        histories = {row: self._history(states[row]) for row in new_rows}  # never in a worker thread
        chunks = _split(new_rows, max(self.num_threads, -(-len(new_rows) // self.chunk_rows)))
        if self._pool and len(chunks) > 1:
            done = list(self._pool.map(
                lambda rows: self._sample_new(self._worker_workspace(), logits, rows, states, histories), chunks))
        else:
            done = [self._sample_new(self._workspace, logits, rows, states, histories) for rows in chunks]
        for rows, chunk_results in zip(chunks, done):
            for row, result in zip(rows, chunk_results):
                results[row] = result
        return results  # type: ignore[return-value]

    def _history(self, state: SequenceState) -> PenaltyHistory | None:
        """The state's up-to-date PenaltyHistory; None when its options have no penalty."""
        opts = state.options
        if opts.repetition_penalty == 1.0 and not (opts.frequency_penalty or opts.presence_penalty):
            return None
        history = self._histories.get(state)
        if history is None or history.synced > state.num_outputs:
            history = self._histories[state] = PenaltyHistory(state)
        history.sync(state.output_ids)
        return history

    def _worker_workspace(self) -> Workspace:
        workspace = getattr(self._local, "workspace", None)
        if workspace is None:
            workspace = self._local.workspace = Workspace()
        return workspace

    def _sample_new(self, ws: Workspace, logits: torch.Tensor, rows: list[int], states: Sequence[SequenceState],
                    histories: dict[int, PenaltyHistory | None]) -> list[Result]:
        """Sample the rows (each the next output of a distinct sequence); record the tokens."""
        frame = [states[row] for row in rows]
        opts = [state.options for state in frame]
        x = ws.get("scaled", len(rows), logits.shape[1])  # [n, vocab]
        torch.index_select(logits, 0, torch.tensor(rows), out=x)
        _penalize(x, frame, [histories[row] for row in rows])
        greedy = [o.temperature < GREEDY_TEMPERATURE for o in opts]
        if any(not g and o.temperature != 1.0 for g, o in zip(greedy, opts)):
            temperature = torch.tensor([[1.0 if g else o.temperature] for g, o in zip(greedy, opts)])
            x.div_(temperature)  # [n, vocab] / [n, 1]: float32 division, as x / temperature is
        scaled = x.clamp_(max=FLOAT32_MAX)  # [n, vocab]
        tokens = [0] * len(rows)
        greedy_rows = [i for i, g in enumerate(greedy) if g]
        if greedy_rows:
            for i, token in zip(greedy_rows, first_argmax(ws.rows("greedy", scaled, greedy_rows)).tolist()):
                tokens[i] = token
        logprob_rows = [i for i, o in enumerate(opts) if o.logprobs is not None]
        if logprob_rows:
            logprobs = torch.log_softmax(ws.rows("logprobs_in", scaled, logprob_rows), dim=1,
                                         out=ws.get("logprobs", len(logprob_rows), scaled.shape[1]))
        sampled_rows = [i for i, g in enumerate(greedy) if not g]
        if sampled_rows:  # may overwrite `scaled`: greedy tokens and logprobs are taken already
            drawn = self._draw(ws, ws.rows("work", scaled, sampled_rows), [frame[i] for i in sampled_rows])
            for i, token in zip(sampled_rows, drawn):
                tokens[i] = token
        for state, token in zip(frame, tokens):
            state.append(token)
        results: list[Result] = [(token, None) for token in tokens]
        for j, i in enumerate(logprob_rows):
            results[i] = (tokens[i], _logprobs(logprobs[j], tokens[i], opts[i].logprobs))
        return results

    def _draw(self, ws: Workspace, scaled: torch.Tensor, frame: list[SequenceState]) -> list[int]:
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


def _argmax_only(state: SequenceState) -> bool:
    """Whether the state's next token is the argmax of its logits row as they come: greedy, with
    no penalty, logit bias or logprobs, and no token blocked by min_tokens."""
    o = state.options
    return (o.temperature < GREEDY_TEMPERATURE and o.repetition_penalty == 1.0 and not o.frequency_penalty
            and not o.presence_penalty and o.logprobs is None and not state.bias_ids.numel()
            and not (state.num_outputs < o.min_tokens and state.blocked_ids.numel()))


def _penalize(x: torch.Tensor, frame: list[SequenceState], histories: list[PenaltyHistory | None]) -> None:
    """Steps 1-4 of `sampling.penalized_logits` on every row of x [n, vocab], in place.

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


def _logprobs(logprobs: torch.Tensor, token_id: int, num_top: int) -> common_pb2.SampleLogprobs:
    """`sampling._logprobs` without its full sort: the num_top best via topk, ties at the
    boundary resolved to the lowest ids as the reference's stable sort resolves them."""
    result = common_pb2.SampleLogprobs(
        sampled=common_pb2.TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id])))
    if not num_top:
        return result
    vocab = logprobs.shape[0]
    if num_top >= vocab:
        ids = torch.arange(vocab)
    else:
        top = torch.topk(logprobs, num_top + 1)
        boundary = top.values[num_top - 1]
        if top.values[num_top] < boundary:  # no tie crosses the boundary: topk's set is exact
            ids = top.indices[:num_top]
        else:  # every token above the boundary, then the lowest ids equal to it
            above = top.indices[top.values > boundary]
            ties = (logprobs == boundary).nonzero().squeeze(1)[: num_top - len(above)]
            ids = torch.cat([above, ties])
    ids = ids.sort().values
    values, order = logprobs[ids].sort(descending=True, stable=True)
    for token, value in zip(ids[order][:num_top].tolist(), values[:num_top].tolist()):
        result.top.add(token_id=token, logprob=value)
    return result


def _split(rows: list[int], parts: int) -> list[list[int]]:
    """rows in at most `parts` contiguous chunks of near-equal size, none empty."""
    parts = max(1, min(parts, len(rows)))
    size, extra = divmod(len(rows), parts)
    chunks, start = [], 0
    for p in range(parts):
        end = start + size + (p < extra)
        chunks.append(rows[start:end])
        start = end
    return [c for c in chunks if c]
