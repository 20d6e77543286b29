"""One stage at work, gRPC-free: plans in, activations in, activations or logits out.

A `StageRunner` loads the stage, prepares each plan's inputs (stage_worker.inputs), waits for
the step's activations or chained tokens (stage_worker.arrivals), runs the executor and hands
the outputs to its `StagePeers` (the next stage, the samplers, the KV store; stage_worker.peers
reaches them over gRPC). A last stage given a `sample` function samples in-process instead of
sending logits (the baseline preset; tandem.compose wires it).
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import torch

from tandem.core import tracing
from tandem.core.errors import CodecError, InvalidArgumentError, UnavailableError
from tandem.core.metrics import Metrics
from tandem.core.modeling.model_config import config_sha256
from tandem.core.modeling.profile import BALANCE_CONTEXT, BALANCE_TOKENS, StageProfile
from tandem.core.modeling.profiler import measure_profile
from tandem.core.wire import frames
from tandem.core.wire.frames import Arrived
from tandem.stage_worker.arrivals import Arrivals, StageStopped
from tandem.stage_worker.config import StageWorkerConfig
from tandem.stage_worker.executor import StageExecutor
from tandem.stage_worker.inputs import InputPreparer, Prepared
from tandem.stage_worker.meters import StageMeters
from tandem.stage_worker.ports import Sample, StagePeers
from tandem.stage_worker.samplers import SamplerDirectory
from tandem.stage_worker.tokens import TokenFeed
from tandem.v1 import stage_worker_pb2 as pb

log = logging.getLogger(__name__)

# How long stage 0 waits at start-up for the last stage's Tokens stream before it serves without
# decode chaining (it goes on trying; GetStageInfo's follows_tokens tells the coordinator).
FOLLOW_WAIT_S = 30.0
# How long a chained step waits for the tokens it names before stage 0 refuses it.
TOKENS_WAIT_S = 30.0


class StageRunner:
    """`metrics` gets the stage's `tandem:stage_*` metrics (stage_worker.meters). A last stage that
    sends logits is given `samplers`, the replicas its own configuration names: it dials no other."""

    def __init__(self, config: StageWorkerConfig, peers: StagePeers, sample: Sample | None = None,
                 metrics: Metrics | None = None, samplers: SamplerDirectory | None = None):
        self.config, self.peers, self.sample, self.samplers = config, peers, sample, samplers
        self.metrics = metrics or Metrics()
        self._meters = StageMeters(self.metrics, config.stage_index, lambda: self.executor, peers.hops)
        self.executor: StageExecutor | None = None  # set by load()
        self._inputs: InputPreparer | None = None  # set by load()
        self._done: queue.Queue[pb.StepDone] = queue.Queue()
        # A stage before the last answers only the steps it failed: the last stage's answer, which
        # can only come after theirs, tells the coordinator the step went through them all.
        self._answers_every_step = config.stage_index == config.num_stages - 1
        self.token_feed = TokenFeed()  # the last stage's Tokens stream
        self._arrivals = Arrivals()  # what steps wait for, and the plan streams' epochs
        self._stopping = False
        self._plan_epochs: dict[int, int] = {}  # id(plan) -> the epoch it came in, until it runs
        self.ready_ns = 0
        self._step_log: TextIO | None = None  # config.step_log, opened by load()
        self.profile: StageProfile | None = None  # measured by load() when config.profile_at_startup
        self.profile_json = ""
        self.model_config_sha256 = ""  # set by load()
        # written by the executor thread only
        self._idle_since_ns = 0  # when the last step ended (or the stage became ready)
        self.busy_ns_total = self.wait_ns_total = self.compute_ns_total = self.compute_cpu_ns_total = 0

    def load(self) -> None:
        """Load the stage's weights, measure its profile, and start executing plans."""
        c = self.config
        executor = StageExecutor(c, self._is_known_sampler())
        self.model_config_sha256 = config_sha256(c.model)
        if c.profile_at_startup:
            self.profile = measure_profile(c.model, c.device, c.dtype, config=executor.model_config)
            log.info("stage %d profile in %.1f s: one layer %.2f ms, LM head %.2f ms (%d tokens, context %d)",
                     c.stage_index, self.profile.measure_s, self.profile.layer(BALANCE_TOKENS, BALANCE_CONTEXT),
                     self.profile.head(BALANCE_TOKENS), BALANCE_TOKENS, BALANCE_CONTEXT)
            self.profile_json = self.profile.to_json()
            if c.profile_file:
                Path(c.profile_file).write_text(self.profile_json)
        self.peers.connect(executor)
        if c.last_stage:
            self.peers.follow_tokens(self.arrive_tokens)
            if not self.peers.follows_tokens.wait(FOLLOW_WAIT_S):
                log.warning("stage 0 does not follow the last stage's Tokens stream yet (%s): no decode chaining "
                            "until it does", c.last_stage)
        self.executor = executor
        self._inputs = InputPreparer(lambda plan, slot: executor.prepare(plan, slot.buffers),
                                     overlap=c.overlap_input_prep)
        self.ready_ns = self._idle_since_ns = time.perf_counter_ns()
        if c.step_log:  # line-buffered, open for the process's life
            self._step_log = open(c.step_log, "a", buffering=1)  # noqa: SIM115
        threading.Thread(target=self._execute_loop, name="stage-executor", daemon=True).start()

    def _is_known_sampler(self) -> Callable[[str], bool] | None:
        """Which sampler names a plan may use: those the stage's own configuration found, and its
        hosted sampler's when it hosts one; None on a stage that sends no logits."""
        directory = self.samplers
        if directory is None:
            return None
        if self.sample is None:
            return directory.knows
        return lambda address: address == frames.HOSTED_SAMPLER or directory.knows(address)

    def ready(self) -> StageExecutor:
        if self.executor is None:
            raise UnavailableError("stage is still loading its weights")
        return self.executor

    def open_steps(self) -> tuple[queue.Queue[pb.StepDone], int]:
        """A fresh queue of finished steps for a new coordinator stream, and the stream's epoch:
        the newest stream wins, and plans of older ones not yet run are dropped."""
        self.ready()
        self._done = queue.Queue()
        return self._done, self._arrivals.new_epoch()

    def submit(self, plan: pb.StepPlan, epoch: int) -> None:
        self._plan_epochs[id(plan)] = epoch
        self._inputs.submit(plan)

    def arrive(self, step_id: int, hidden: Arrived) -> None:
        self._arrivals.put_activations(step_id, hidden)

    def arrive_tokens(self, step_id: int, request_ids: Sequence[str], token_ids: Sequence[int]) -> None:
        self._arrivals.put_tokens(step_id, request_ids, token_ids)

    @property
    def follows_tokens(self) -> bool:
        """Whether plans may chain decode steps on this stage 0: it follows the last stage's
        tokens, or is the last stage itself."""
        c = self.config
        if c.stage_index != 0:
            return False
        return c.num_stages == 1 or (bool(c.last_stage) and self.peers.follows_tokens.is_set())

    @property
    def is_stopping(self) -> bool:
        return self._stopping

    def close(self) -> None:
        self._stopping = True
        self._arrivals.stop()
        if self._inputs is not None:
            self._inputs.close()
        self.peers.close()

    # --- execution ----------------------------------------------------------------------

    def _execute_loop(self) -> None:
        while (prepared := self._inputs.next()) is not None:
            plan = prepared.plan
            done = pb.StepDone(step_id=plan.step_id)
            start, start_wall, start_cpu = time.perf_counter_ns(), time.monotonic_ns(), time.thread_time_ns()
            try:
                with tracing.child_span("stage_worker", "forward", plan.traceparent, {
                        "tandem.stage_index": self.config.stage_index, "tandem.step_id": plan.step_id,
                        "tandem.num_sequences": len(plan.sequences)}):
                    self._execute(prepared, done)
            except StageStopped:  # neither computed nor answered: the coordinator sees the streams end
                return
            except Exception as e:  # noqa: BLE001 - reported to the coordinator on the step
                if not isinstance(e, InvalidArgumentError):
                    log.exception("step %d failed", plan.step_id)
                done.error, done.error_code = str(e) or type(e).__name__, frames.error_code(e)
                if self.config.stage_index == self.config.num_stages - 1 and plan.sequences:
                    self._publish_tokens(plan.step_id, [])  # a step chained on this one need not wait
            finally:
                self._inputs.release(prepared)  # its outputs are sent: the slot may be reused
            end = time.perf_counter_ns()
            busy_ns, idle_ns = end - start - done.wait_ns, start - self._idle_since_ns + done.wait_ns
            self._idle_since_ns = end
            self.busy_ns_total += busy_ns
            self.wait_ns_total += done.wait_ns
            self.compute_ns_total += done.forward_ns
            self._meters.executed(busy_ns, idle_ns, done.forward_ns)
            if self._step_log is not None and plan.sequences:
                self._log_step(plan, start_wall, start_wall + done.wait_ns, start_wall + end - start,
                               time.thread_time_ns() - start_cpu)
            if done.error or self._answers_every_step:
                self._done.put(done)

    def _log_step(self, plan: pb.StepPlan, ready_ns: int, start_ns: int, end_ns: int, cpu_ns: int) -> None:
        """One line of the step log: when its inputs were ready (its plan came and was prepared),
        when it computed (after its activations or chained tokens came), the CPU time its thread
        got meanwhile (less than end - start when other processes took the core), its rows, the
        prompt tokens among them, and the step whose tokens it takes (decode chaining; 0: none)."""
        prefill = sum(len(s.input_ids) for s in plan.sequences if len(s.input_ids) > 1)
        decode = sum(1 for s in plan.sequences if len(s.input_ids) == 1 or plan.input_step_id)
        self._step_log.write(json.dumps({"step": plan.step_id, "ready_ns": ready_ns, "start_ns": start_ns,
                                         "end_ns": end_ns, "cpu_ns": cpu_ns, "prefill_tokens": prefill,
                                         "decode_rows": decode, "input_step": plan.input_step_id}) + "\n")

    def _execute(self, prepared: Prepared, done: pb.StepDone) -> None:
        ex, plan = self.executor, prepared.plan
        epoch = self._plan_epochs.pop(id(plan), self._arrivals.epoch)
        if epoch != self._arrivals.epoch:  # neither computed nor its blocks moved: the coordinator replans
            self._arrivals.drop_activations(plan.step_id)
            raise InvalidArgumentError(f"step {plan.step_id}: superseded by a newer plan stream")
        t0 = time.perf_counter_ns()
        if plan.swap_out or plan.swap_in:
            if not self.peers.has_kv_store:
                raise InvalidArgumentError(f"step {plan.step_id}: plan moves blocks but this stage has no KV store")
            ex.swap_out(plan, self.peers.put_blocks)
            ex.swap_in(plan, self.peers.get_blocks)
        done.swap_ns = time.perf_counter_ns() - t0
        if prepared.error is not None:
            raise prepared.error
        if prepared.inputs is None:  # no sequences: only housekeeping
            return
        t1 = time.perf_counter_ns()
        hidden = None if ex.layers.is_first else self._wait_activations(plan.step_id, prepared.inputs.num_tokens, epoch)
        if plan.input_step_id and ex.layers.is_first:
            ex.fill_input_ids(prepared.inputs, self._wait_tokens(plan, epoch))
        t2, cpu = time.perf_counter_ns(), time.process_time_ns()
        out = ex.run(plan, prepared.inputs, hidden)
        done.wait_ns, done.forward_ns = t2 - t1, time.perf_counter_ns() - t2
        self.compute_cpu_ns_total += time.process_time_ns() - cpu
        if out.hidden is not None:
            self.peers.send_hidden(plan.step_id, out.hidden)
        else:
            self._send_logits(plan, prepared.inputs.samplers, out.logits)

    def _wait_activations(self, step_id: int, num_tokens: int, epoch: int) -> torch.Tensor:
        """The step's activations, shaped by the plan when they came as raw bytes."""
        hidden = self._arrivals.activations(step_id, epoch)
        try:
            return frames.shape_activations(hidden, num_tokens)
        except CodecError as e:
            raise InvalidArgumentError(f"step {step_id}: activations do not fit the plan: {e}") from None

    def _wait_tokens(self, plan: pb.StepPlan, epoch: int) -> list[int]:
        """Stage 0: each sequence's input token of a chained step, from the tokens of the step it names."""
        tokens = self._arrivals.tokens(plan.step_id, plan.input_step_id, epoch, TOKENS_WAIT_S)
        # A row without a token is a request that ended after this step was planned (its sampler
        # released it, or could not sample it): it is computed on token 0 and its output dropped.
        return [tokens.get(s.request_id, 0) for s in plan.sequences]

    def _publish_tokens(self, step_id: int, sampled: Sequence[tuple[str, int]]) -> None:
        """A step every row of which was sampled here: its tokens to stage 0 (decode chaining)."""
        request_ids, token_ids = [rid for rid, _ in sampled], [t for _, t in sampled]
        if self.config.stage_index == 0:  # a one-stage pipeline: stage 0 is here
            self.arrive_tokens(step_id, request_ids, token_ids)
        else:
            self.token_feed.publish(step_id, request_ids, token_ids)

    def _send_logits(self, plan: pb.StepPlan, samplers: list[str], logits: torch.Tensor) -> None:
        """Each sampler its rows; `samplers` is the address of each row's, from the sampler table.
        `logits` has a row for each sequence but partial prefill chunks, which are not sampled."""
        sampled = [i for i, s in enumerate(plan.sequences) if not s.is_partial_prefill]
        if not sampled:
            return
        rows: dict[str, list[int]] = defaultdict(list)  # address -> its rows of `logits`
        if self.sample is not None and self.samplers is None:  # every row sampled here, in series (baseline)
            rows[frames.HOSTED_SAMPLER] = list(range(len(sampled)))
        else:
            for row, i in enumerate(sampled):
                rows[samplers[i]].append(row)
        hosted = rows.pop(frames.HOSTED_SAMPLER, None)  # sampled here, once the others' rows are on their way
        for address, idx in [*rows.items(), *([(frames.HOSTED_SAMPLER, hosted)] if hosted else [])]:
            seqs = [plan.sequences[sampled[row]] for row in idx]
            rows_logits = logits if len(idx) == len(sampled) else logits[idx]
            request_ids, sample_indices = [s.request_id for s in seqs], [s.sample_index for s in seqs]
            if address == frames.HOSTED_SAMPLER and self.sample is not None:  # known only when hosted
                # Every row sampled here: a step chaining on this one may continue, so its tokens go
                # to stage 0 first, the critical path, and to the coordinator after.
                chains = len(idx) == len(plan.sequences)
                self.sample(plan.step_id, request_ids, sample_indices, rows_logits, plan.traceparent,
                            functools.partial(self._publish_tokens, plan.step_id) if chains else None)
            else:
                self.peers.send_logits(address, plan.step_id, request_ids, sample_indices, rows_logits)
