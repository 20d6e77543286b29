"""The coordinator refuses to serve stages that disagree with its configuration, naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from tandem import compose
from tandem.coordinator import checks
from tandem.coordinator import servicer as coordinator
from tandem.coordinator.config import CoordinatorConfig
from tandem.core.errors import ConfigError
from tandem.stage_worker.config import StageWorkerConfig
from tandem.v1 import stage_worker_pb2 as pb

STAGES = ("10.0.0.1:50051", "10.0.0.2:50051")
CONFIG = CoordinatorConfig(model="/models/m", stages=STAGES, samplers=("10.0.0.3:50051",), num_blocks=64,
                           block_size=16, sample_plans=True)


def infos(**last) -> list[pb.GetStageInfoResponse]:
    """Two stages that agree with CONFIG; `last` changes fields of the second."""
    common = dict(kv_blocks_total=64, block_size=16, num_layers=4, model_config_sha256="abc", structured_streams=True)
    return [pb.GetStageInfoResponse(index=0, layer_start=0, layer_end=2, **common),
            pb.GetStageInfoResponse(**{**common, "index": 1, "layer_start": 2, "layer_end": 4, **last})]


def test_agreeing_stages_pass():
    assert checks.stage_mismatches(CONFIG, "abc", infos()) == []


@pytest.mark.parametrize("changed, field", [
    ({"block_size": 8}, "block_size: stage 1 at 10.0.0.2:50051 has 8, the coordinator 16"),
    ({"kv_blocks_total": 32}, "num_blocks: stage 1 at 10.0.0.2:50051 has 32, the coordinator 64"),
    ({"model_config_sha256": "def"}, "model: stage 1"),
    ({"structured_streams": False}, "structured_streams: the last stage at 10.0.0.2:50051 has False"),
    ({"index": 0}, "stage_index: stage 1 at 10.0.0.2:50051 is stage 0"),
    ({"layer_start": 3}, "num_stages or stage_boundaries: stage 1"),
    ({"layer_end": 3}, "num_stages or stage_boundaries: stage 1"),
])
def test_each_mismatch_is_named(changed, field):
    [found] = checks.stage_mismatches(CONFIG, "abc", infos(**changed))
    assert found.startswith(field)


def test_stream_mode_does_not_matter_when_the_last_stage_samples():
    assert checks.stage_mismatches(CONFIG, "abc", infos(structured_streams=False, sample_on_stage=True)) == []


def test_argmax_rows_on_the_stage_need_a_stage_that_hosts_a_sampler_and_the_replicas_stream_mode():
    config = dataclasses.replace(CONFIG, greedy_on_stage=True)
    assert checks.stage_mismatches(config, "abc", infos(sample_on_stage=True)) == []
    [found] = checks.stage_mismatches(config, "abc", infos())
    assert found.startswith("greedy_on_stage: the coordinator has the last stage at 10.0.0.2:50051 sample argmax rows")
    [found] = checks.stage_mismatches(config, "abc", infos(sample_on_stage=True, structured_streams=False))
    assert found.startswith("structured_streams: the last stage at 10.0.0.2:50051 has False")


def test_a_stage_with_another_block_size_is_refused(checkpoint):
    model = str(checkpoint("llama"))
    stage = compose.serve_stage_worker(StageWorkerConfig(model=model, num_blocks=32, block_size=8,
                                                         profile_at_startup=False))
    try:
        config = CoordinatorConfig(model=model, stages=(stage.address,), samplers=("127.0.0.1:1",), num_blocks=32,
                                   block_size=4)
        with pytest.raises(ConfigError, match=r"block_size: stage 0 at \S+ has 8, the coordinator 4"):
            coordinator.serve(config)
        checks.check_stages(dataclasses.replace(config, block_size=8))  # agreeing: no error
    finally:
        stage.stop(0)
