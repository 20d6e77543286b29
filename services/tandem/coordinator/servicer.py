"""The public Coordinator gRPC service: thin adapters from protobuf to the engine.

It is served on asyncio (core/aio_server.py): each call is a coroutine on the server's loop, a
stream waits for its tokens without holding a thread, and the engine's loop wakes the streams it
gave tokens once per turn (front.Wakeups). Tokenizing and detokenizing whole texts run on the
server's worker threads, so a large prompt never stalls the loop that serves every other call."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import uuid
from pathlib import Path

import torch

from tandem import __version__
from tandem.coordinator import checks, ports, request_trace, td_pipe
from tandem.coordinator.config import CoordinatorConfig
from tandem.coordinator.engine import Engine, Inbox
from tandem.coordinator.front import Chunk, TextStream, Wakeups
from tandem.coordinator.info import ServiceProbe
from tandem.coordinator.limits import Admission
from tandem.coordinator.metrics import CoordinatorMetrics
from tandem.coordinator.requests import Request
from tandem.coordinator.scheduler import Scheduler
from tandem.coordinator.stage_health import StageHealth
from tandem.core import tracing
from tandem.core.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from tandem.core.metrics import Metrics
from tandem.core.modeling.model_config import ModelConfig
from tandem.core.sampling.options import SamplingOptions
from tandem.core.tokenizer import Tokenizer
from tandem.core.wire import discovery
from tandem.core.wire.aio_server import AsyncServer
from tandem.core.wire.interceptors import carries_key
from tandem.core.wire.server import wait_ready
from tandem.core.wire.tls import Credentials
from tandem.v1 import common_pb2
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc as pb_grpc

SERVICE_NAME = "tandem.v1.Coordinator"
GIL_SWITCH_INTERVAL_S = 0.0005  # see serve()


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, config: CoordinatorConfig, engine: Engine, probe: ServiceProbe, tokenizer: Tokenizer,
                 model: ModelConfig, block_bytes: int, metrics: CoordinatorMetrics, wakeups: Wakeups | None = None,
                 admin_key: str = ""):
        self.config, self.engine, self.probe, self.tokenizer, self.model = config, engine, probe, tokenizer, model
        self.admin_key = admin_key  # empty: no caller is given internal addresses
        self.metrics = metrics
        self.wakeups = wakeups or Wakeups()  # the engine's on_outputs must notify these
        self.max_model_len = config.max_model_len or model.max_position_embeddings
        self.block_bytes = block_bytes  # one KV block over all layers of all stages
        self.limits = config.limits()
        self.admission = Admission(lambda num_preparing: self.engine.check_admission(num_preparing))

    async def Generate(self, request: pb.GenerateRequest, context):
        self.limits.check_generate(request)
        with self.admission.preparing():  # a full queue refuses here, before the prompt is tokenized
            req, text = await asyncio.to_thread(self._new_request, request)
        # No await until submit: the request is counted by the front until here, by the engine from there.
        req.trace = request_trace.start(req.request_id, len(req.prompt_ids), context.invocation_metadata() or (),
                                        self.config.trace_every_n_steps)
        ready, stats, error = self.wakeups.watch(req), None, None
        streaming = request.stream if request.HasField("stream") else True
        try:
            self.engine.submit(req)  # AlreadyExistsError for a live id: nothing of the other is touched
            stats = self.metrics.start(req)  # from here on the request is the engine's
            while not text.is_finished:
                # The first token goes out at once; later ones in chunks of stream_interval.
                held = text.output_ids and not req.outputs.has(self.config.stream_interval)
                chunk = None if held else text.take()  # what has accumulated goes out as one chunk
                if chunk is None:
                    await ready.wait()
                    ready.clear()
                    continue
                stats.tokens(len(chunk.token_ids))
                if text.finish_reason == common_pb2.FINISH_REASON_STOP_SEQUENCE and chunk.end is None:
                    self.engine.abort(req.request_id, common_pb2.FINISH_REASON_STOP_SEQUENCE)
                if chunk.token_ids and streaming:  # without streaming the completion carries them all
                    yield self._chunk(req, text, chunk)
                if chunk.end is not None and chunk.end.error is not None:
                    raise chunk.end.error
            stats.end(text)
            yield pb.GenerateResponse(request_id=req.request_id, complete=self._complete(req, text))
        except Exception as e:
            error = e
            raise
        finally:  # the end, an error, or the client left (the call was cancelled or its stream dropped)
            self.wakeups.forget(req)
            if stats is not None:  # submitted
                if not text.is_finished:
                    self.engine.abort(req.request_id)
                stats.end(text)
            if req.trace is not None:
                req.trace.finish(text.finish_reason, len(text.output_ids), error)

    async def Abort(self, request: pb.AbortRequest, context):
        if not self.engine.abort(request.request_id):
            raise NotFoundError(f"no live request with id {request.request_id!r}")
        return pb.AbortResponse()

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        self.limits.check_text("text", request.text)
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = await asyncio.to_thread(self.tokenizer.encode, request.text, add_special_tokens=add)
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        self.limits.check_token_ids("token_ids", len(request.token_ids))
        ids = self._check_ids(list(request.token_ids), "token_ids")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return pb.DetokenizeResponse(text=await asyncio.to_thread(self.tokenizer.decode, ids, skip_special_tokens=skip))

    async def GetServerInfo(self, request, context):
        """Counts, states and indices for any caller; internal addresses only for the admin key."""
        if request.include_addresses and not carries_key(context.invocation_metadata(), self.admin_key):
            raise PermissionDeniedError(
                "include_addresses: internal addresses are given only to a caller presenting the admin key "
                f"('authorization: Bearer <key>', the key in ${self.config.admin_key_env})")
        show = request.include_addresses
        snapshot, report, cfg = self.engine.snapshot, self.probe.report, self.config
        info = pb.GetServerInfoResponse(
            model=Path(cfg.model).name, version=__version__, vocab_size=self.model.vocab_size,
            max_model_len=self.max_model_len, num_requests_running=snapshot.num_running,
            num_requests_waiting=snapshot.num_waiting, kv_blocks_total=cfg.num_blocks,
            kv_blocks_used=snapshot.num_blocks_used, block_size=cfg.block_size,
            num_preemptions_total=snapshot.num_preemptions, dtype=self.probe.stages[-1].dtype,
            device=self.probe.stages[-1].device, prefix_cache_queries_total=snapshot.prefix_cache_queries,
            prefix_cache_hits_total=snapshot.prefix_cache_hits,
        )
        for i, (stage, num_blocks) in enumerate(zip(self.probe.stages, report.stage_blocks_used)):
            info.stages.add(index=i, address=stage.address if show else "", layer_start=stage.layer_start,
                            layer_end=stage.layer_end, kv_blocks_used=num_blocks)
        for index, address in sorted(zip(snapshot.sampler_indices, snapshot.samplers)):
            info.samplers.add(index=index, address=address if show else "",
                              num_sequences=report.sampler_sequences.get(address, 0))
        if self.probe.kv_store:
            info.kv_store_blocks_used = report.kv_store_used_bytes // self.block_bytes
        return info

    # --- helpers ------------------------------------------------------------------------

    def _new_request(self, request: pb.GenerateRequest) -> tuple[Request, TextStream]:
        which = request.WhichOneof("input")
        if which == "text":
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            prompt_ids = self.tokenizer.encode(request.text, add_special_tokens=add)
        elif which == "token_ids":
            prompt_ids = self._check_ids(list(request.token_ids.ids), "token_ids")
        else:
            raise InvalidArgumentError("the request has no prompt: set text or token_ids")
        if not prompt_ids:
            raise InvalidArgumentError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidArgumentError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.max_model_len} tokens"
            )
        room = self.max_model_len - len(prompt_ids)
        params = request.sampling
        if params.HasField("max_tokens") and params.max_tokens > room:
            raise InvalidArgumentError(
                f"max_tokens={params.max_tokens} does not fit: the prompt has {len(prompt_ids)} tokens and "
                f"the context {self.max_model_len}, leaving {room}"
            )
        options = SamplingOptions.from_proto(params, self.model.vocab_size, max_tokens_limit=room)
        request_id = request.request_id or uuid.uuid4().hex
        # Any int64 seed is accepted; the samplers take it modulo 2**64 (their seeds are uint64).
        seed = options.seed % 2**64 if options.seed is not None else secrets.randbits(63)
        req = Request(request_id=request_id, prompt_ids=prompt_ids, max_tokens=options.max_tokens, params=params,
                      options=options, seed=seed, eos_token_ids=frozenset(self.model.eos_token_ids),
                      output_len_hint=request.output_len_hint)
        return req, TextStream(req, self.tokenizer.detokenizer(prompt_ids))

    def _check_ids(self, ids: list[int], field: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise InvalidArgumentError(f"{field} has ids outside the vocabulary [0, {self.model.vocab_size}): {bad[:5]}")
        return ids

    @staticmethod
    def _chunk(req: Request, text: TextStream, chunk: Chunk) -> pb.GenerateResponse:
        return pb.GenerateResponse(request_id=req.request_id, chunk=pb.GenerateChunk(
            token_ids=chunk.token_ids, text=chunk.text, logprobs=chunk.logprobs,
            prompt_tokens=len(req.prompt_ids), completion_tokens=len(text.output_ids)))

    def _complete(self, req: Request, text: TextStream) -> pb.GenerateComplete:
        start = req.arrival_time
        return pb.GenerateComplete(
            output_ids=text.output_ids, text=text.text, finish_reason=text.finish_reason, logprobs=text.logprobs,
            usage=common_pb2.TokenUsage(prompt_tokens=len(req.prompt_ids), completion_tokens=len(text.output_ids)),
            time_to_first_token_s=(text.first_token_time or start) - start,
            e2e_latency_s=(text.finish_time or start) - start,
            queue_time_s=(req.scheduled_time or start) - start,
        )


def _kv_figures(config: CoordinatorConfig, model: ModelConfig, probe: ServiceProbe) -> tuple[int, int]:
    """(bytes of one KV block over all layers, KV blocks the KV store can hold)."""
    itemsize = getattr(torch, probe.stages[0].dtype, torch.float32).itemsize
    block_bytes = model.kv_block_bytes(config.block_size, itemsize)
    return block_bytes, probe.kv_store_capacity_bytes // block_bytes


def serve(config: CoordinatorConfig, metrics: Metrics | None = None) -> AsyncServer:
    """Wait for the stages, samplers and KV store, start the engine and the public server, and its
    metrics on config.metrics_port. Pass `metrics` to observe them (`metrics.port`)."""
    # Every step crosses threads here (a sampler's results thread, the loop, gRPC's senders) and a
    # thread woken holds no GIL until the running one gives it up: by default after 5 ms. On the
    # engine run of docs/benchmarks.md a plan waited 1.5 ms on average between the loop and the
    # thread that sends it, 0.6 ms at this interval.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    tracing.configure(config.tracing_endpoint, "tandem-coordinator")
    model = ModelConfig.from_dir(config.model)
    tokenizer = Tokenizer.from_dir(config.model)
    credentials = Credentials.load(config.tls)
    for address in config.stages:
        wait_ready(address, "tandem.v1.StageWorker", credentials=credentials)
    stage_infos = checks.check_stages(config, credentials=credentials)
    if config.sampler_discovery == "static":
        for address in config.samplers:
            wait_ready(address, "tandem.v1.CpuSampler", credentials=credentials)
    if config.kv_store:
        wait_ready(config.kv_store, "tandem.v1.KvStore", credentials=credentials)
    inbox: Inbox = Inbox()
    wakeups = Wakeups()
    engine: Engine | None = None
    probe = ServiceProbe(list(config.stages), config.kv_store, lambda: engine.snapshot.samplers if engine else (),
                         credentials=credentials)
    block_bytes, num_host_blocks = _kv_figures(config, model, probe)
    scheduler = Scheduler(config.num_blocks, config.block_size, config.max_num_seqs, config.max_num_batched_tokens,
                          config.max_in_flight or len(config.stages), num_host_blocks,
                          prefix_caching=config.enable_prefix_caching, chunked_prefill=config.enable_chunked_prefill,
                          phases=td_pipe.for_stages(config.num_blocks, config.block_size, config.max_num_batched_tokens,
                                                    stage_infos, num_host_blocks) if config.temporal_phases else None,
                          chain_sampler=checks.chain_sampler(config, stage_infos))
    last = len(config.stages) - 1
    engine = Engine(scheduler, [ports.GrpcStage(i, a, inbox.put, credentials=credentials, is_last=i == last)
                                for i, a in enumerate(config.stages)],
                    lambda address: ports.GrpcSampler(address, inbox.put, credentials),
                    ports.GrpcKvStore(config.kv_store, credentials) if config.kv_store else None, inbox,
                    max_queue=config.max_queue, step_timeout_s=config.step_timeout_s, sample_plans=config.sample_plans,
                    hosted_sampler=config.stages[-1] if config.greedy_on_stage else "",
                    stage_health=StageHealth(config.stage_down_timeout_s, config.recompute_on_stage_failure),
                    on_outputs=wakeups.notify)
    engine.start(discovery.from_config(config))
    probe.start()
    max_model_len = config.max_model_len or model.max_position_embeddings
    metrics = metrics or Metrics()
    coordinator_metrics = CoordinatorMetrics(
        metrics, Path(config.model).name, max_model_len, config.num_blocks, lambda: engine.snapshot,
        lambda: probe.report, block_bytes=block_bytes, num_host_blocks=num_host_blocks,
        vllm_names=config.metrics_vllm_names)
    admin_key = os.environ.get(config.admin_key_env, "")
    server = AsyncServer(config.host, config.port, config.max_workers, api_key=os.environ.get(config.api_key_env, ""),
                         credentials=credentials, health_port=config.tls.health_port, admin_key=admin_key)
    server.add(pb_grpc.add_CoordinatorServicer_to_server,
               CoordinatorServicer(config, engine, probe, tokenizer, model, block_bytes, coordinator_metrics, wakeups,
                                   admin_key),
               [SERVICE_NAME])
    metrics.serve(config.host, config.metrics_port)
    server.on_drain(engine.drain)
    server.on_stop(engine.stop)
    server.on_stop(probe.stop)
    server.on_stop(metrics.stop)
    server.start()
    server.set_ready()
    return server
