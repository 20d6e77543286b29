"""The start-up check: the stages serve what the coordinator's configuration says.

A stage whose block size, block count, model or stream mode differs from the coordinator's
would not fail cleanly: its KV writes land in the wrong places, or its logits frames wait for
row plans that never come. So before serving, the coordinator asks every stage for its
GetStageInfo and refuses to start, naming each field that disagrees.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tandem.coordinator.config import CoordinatorConfig
from tandem.core.errors import ConfigError
from tandem.core.modeling.model_config import config_sha256
from tandem.core.wire.tls import Credentials, open_channel
from tandem.v1 import stage_worker_pb2 as pb
from tandem.v1 import stage_worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def check_stages(config: CoordinatorConfig, timeout_s: float = 10.0,
                 credentials: Credentials | None = None) -> list[pb.GetStageInfoResponse]:
    """Raise ConfigError, naming every mismatched field, unless each stage agrees with `config`;
    the stages' GetStageInfo answers when they do."""
    infos = []
    for address in config.stages:
        with open_channel(address, credentials) as channel:
            infos.append(pb_grpc.StageWorkerStub(channel).GetStageInfo(pb.GetStageInfoRequest(), timeout=timeout_s))
    mismatches = stage_mismatches(config, config_sha256(config.model), infos)
    if mismatches:
        raise ConfigError("the stages do not match the coordinator's configuration, so it will not serve: "
                          + "; ".join(mismatches))
    return infos


def stage_mismatches(config: CoordinatorConfig, model_config_sha256: str,
                     infos: Sequence[pb.GetStageInfoResponse]) -> list[str]:
    """One line per field on which a stage (infos[i] answering for config.stages[i]) disagrees."""
    found = []
    for i, (address, info) in enumerate(zip(config.stages, infos)):
        stage = f"stage {i} at {address}"
        if info.index != i:
            found.append(f"stage_index: {stage} is stage {info.index}")
        if info.block_size != config.block_size:
            found.append(f"block_size: {stage} has {info.block_size}, the coordinator {config.block_size}")
        if info.kv_blocks_total != config.num_blocks:
            found.append(f"num_blocks: {stage} has {info.kv_blocks_total}, the coordinator {config.num_blocks}")
        if info.model_config_sha256 != model_config_sha256:
            found.append(f"model: {stage} loaded a model whose config.json differs from that of the coordinator's "
                         f"{config.model} (sha256 {info.model_config_sha256[:12]} against {model_config_sha256[:12]})")
        expected_start = infos[i - 1].layer_end if i else 0
        if info.layer_start != expected_start or (i == len(infos) - 1 and info.layer_end != info.num_layers):
            found.append(f"num_stages or stage_boundaries: {stage} holds layers [{info.layer_start}, "
                         f"{info.layer_end}) of {info.num_layers}, which leaves a gap or an overlap in the pipeline")
    last = infos[-1] if infos else None
    if last is not None and config.greedy_on_stage and not last.sample_on_stage:
        found.append(f"greedy_on_stage: the coordinator has the last stage at {config.stages[-1]} sample argmax rows, "
                     "but it hosts no sampler (its sample_on_stage is false)")
    samplers_apart = last is not None and (not last.sample_on_stage or config.greedy_on_stage)
    if samplers_apart and last.structured_streams != config.sample_plans:
        found.append(f"structured_streams: the last stage at {config.stages[-1]} has {last.structured_streams}, but "
                     f"the coordinator's sample_plans is {config.sample_plans} (the two must agree when the samplers "
                     "are apart from the stages)")
    return found


def chain_sampler(config: CoordinatorConfig, infos: Sequence[pb.GetStageInfoResponse]) -> str:
    """With decode_chaining: the sampler whose rows may chain (the last stage's own, when it hosts
    one and stage 0 follows its tokens), else "" (no chaining, said in the log when asked for)."""
    if not config.decode_chaining or not infos:
        return ""
    if not infos[-1].sample_on_stage:
        log.warning("decode_chaining is off: the last stage at %s hosts no sampler", config.stages[-1])
        return ""
    if not infos[0].follows_tokens:
        log.warning("decode_chaining is off: stage 0 at %s does not follow the last stage's tokens (its last_stage "
                    "must name %s)", config.stages[0], config.stages[-1])
        return ""
    return config.stages[-1]
