"""A fast sampler that returns exactly what `tandem.core.sampling.reference.sample` returns.

The reference spends most of its time on one full stable sort of the vocabulary per top-p
row, and the rest on per-row work: a `torch.unique` over the whole history, one small tensor
op after another, a fresh full-vocabulary tensor per step. `FastSampler` returns the same
token ids and the same logprobs, bit for bit, because it performs the same float operations
on the same values, only far fewer of them:

* Penalties: kept per sequence incrementally and applied to the whole frame in one pass
  (`tandem.core.sampling.penalty_history`).
* Full-vocabulary steps (temperature, softmax, log_softmax, argmax, cumsum) run once on the
  whole frame, in buffers reused from frame to frame. These kernels work row by row, so a
  row comes out exactly as from its own call.
* Top-k, top-p without a full sort, min-p and the draw: `tandem.core.sampling.fast_draw`.
* Logprobs: one log_softmax over the frame; the top n via topk, ties at the boundary
  resolved to the lowest ids as the reference's stable sort resolves them.

Rows the fast path does not cover go through the reference code: replay rows (an index below
the recorded outputs) and frames that hold one sequence twice (the reference's row order
then matters).
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from tandem.core.errors import InvalidArgumentError
from tandem.core.sampling.argmax import first_argmax
from tandem.core.sampling.fast_draw import BLOCK, BLOCK_ROUNDS, HISTOGRAM_SLACK, FastDraw
from tandem.core.sampling.penalty_history import PenaltyHistory, penalize
from tandem.core.sampling.reference import (
    FLOAT32_MAX,
    GREEDY_TEMPERATURE,
    SequenceState,
    _sample_one,
    check_row,
    sample,
)
from tandem.core.sampling.top_p_candidates import Workspace
from tandem.v1 import common_pb2

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

    `draw` (a FastDraw, built from the round parameters) cuts and draws the rows that are not
    greedy; `draw.top_p_rows` counts top-p rows by the path that cut them.
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
        self.reference_below = reference_below
        self.draw = FastDraw(block, block_rounds, histogram_slack)
        self._histories: weakref.WeakKeyDictionary[SequenceState, PenaltyHistory] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # one frame at a time: histories and buffers are shared
        self._workspace = Workspace()  # the calling thread's buffers
        self._local = threading.local()  # each worker thread's buffers
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="fast-sampler") if num_threads > 1 else None

    def close(self) -> None:
        """Stop the worker threads (if any)."""
        if self._pool:
            self._pool.shutdown()

    def sample(self, logits: torch.Tensor, states: Sequence[SequenceState], sample_indices: Sequence[int],
               *, checked: bool = False) -> list[Result]:
        """Same contract and results as `reference.sample`. `checked`: the caller already ran
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
        penalize(x, frame, [histories[row] for row in rows])
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
            drawn = self.draw.tokens(ws, ws.rows("work", scaled, sampled_rows), [frame[i] for i in sampled_rows])
            for i, token in zip(sampled_rows, drawn):
                tokens[i] = token
        for state, token in zip(frame, tokens):
            state.append(token)
        results: list[Result] = [(token, None) for token in tokens]
        for j, i in enumerate(logprob_rows):
            results[i] = (tokens[i], _logprobs(logprobs[j], tokens[i], opts[i].logprobs))
        return results


def _argmax_only(state: SequenceState) -> bool:
    """Whether the state's next token is the argmax of its logits row as they come: its options
    need only an argmax, and min_tokens blocks no token any more."""
    return state.options.needs_only_argmax and not (state.num_outputs < state.options.min_tokens
                                                    and state.blocked_ids.numel())


def _logprobs(logprobs: torch.Tensor, token_id: int, num_top: int) -> common_pb2.SampleLogprobs:
    """`reference._logprobs` without its full sort: the num_top best via topk, ties at the
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
