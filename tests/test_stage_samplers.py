"""A last stage dials only the samplers its own configuration names, never an address a plan
brings: a plan naming any other is refused with INVALID_ARGUMENT, and discovery lets the pool scale."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest

from kube_api import FakeKubeApi
from tandem.core.config import load_config
from tandem.core.errors import ConfigError, InvalidArgumentError
from tandem.core.wire.discovery import StaticDiscovery
from tandem.core.wire.frames import HOSTED_SAMPLER
from tandem.stage_worker import servicer as stage_worker
from tandem.stage_worker.config import StageWorkerConfig
from tandem.stage_worker.runner import StageRunner
from tandem.stage_worker.samplers import SamplerDirectory, open_directory
from tandem.stage_worker.tables import PlanTables
from tandem.v1 import stage_worker_pb2 as pb
from tandem.v1 import stage_worker_pb2_grpc as pb_grpc


class HandDiscovery:
    """A discovery source the test announces by hand."""

    def __init__(self) -> None:
        self.on_change = None

    def start(self, on_change) -> None:
        self.on_change = on_change

    def stop(self) -> None:
        pass


def test_a_plan_naming_a_sampler_the_stage_does_not_know_is_refused_before_its_table_changes():
    stage = PlanTables(num_blocks=8, is_known_sampler={"s0:1"}.__contains__)
    stage.apply(pb.StepPlan(step_id=1, sampler_addresses=["s0:1", "evil:25"], sequences=[
        pb.SequencePlan(request_id="a", input_ids=[5], block_table=[0], sampler_index=0)]))
    with pytest.raises(InvalidArgumentError, match=r"step 2: request 'b' names sampler 'evil:25', which this stage's own "
                                                   r"sampler configuration .* does not know"):
        stage.apply(pb.StepPlan(step_id=2, sequences=[
            pb.SequencePlan(request_id="b", input_ids=[5], block_table=[1], sampler_index=1)]))
    assert stage.blocks_of == {"a": [0]}


class NoPeers:
    def hops(self) -> dict:
        return {}


def hosted_names(sample) -> list[bool]:
    """Which of the names a plan may use a last stage with sampler s0:1 (and `sample`) accepts."""
    directory = SamplerDirectory(StaticDiscovery(("s0:1",)), wait_s=0.0)
    directory.start()
    config = StageWorkerConfig(model="m", stage_index=1, num_stages=2, samplers=("s0:1",), sample_on_stage=sample is not None)
    known = StageRunner(config, NoPeers(), sample=sample, samplers=directory)._is_known_sampler()
    return [known(name) for name in (HOSTED_SAMPLER, "s0:1", "evil:25")]


def test_only_a_stage_that_hosts_a_sampler_takes_rows_for_the_table_s_empty_name():
    assert hosted_names(sample=None) == [False, True, False]
    assert hosted_names(sample=lambda *row: None) == [True, True, False]


def test_a_stage_that_sends_no_logits_checks_no_sampler():
    resolved = PlanTables(num_blocks=8).apply(pb.StepPlan(step_id=1, sampler_addresses=["anything:1"], sequences=[
        pb.SequencePlan(request_id="a", input_ids=[5], block_table=[0])]))
    assert resolved.samplers == ["anything:1"]


def test_the_directory_waits_for_discovery_and_keeps_what_it_announced():
    source = HandDiscovery()
    directory = SamplerDirectory(source, wait_s=5.0)
    directory.start()
    source.on_change(frozenset({"10.0.0.1:50051"}))
    assert directory.knows("10.0.0.1:50051")
    late = threading.Timer(0.2, lambda: source.on_change(frozenset({"10.0.0.1:50051", "10.0.0.2:50051"})))
    late.start()  # the coordinator may name a new replica a moment before the stage hears of it
    assert directory.knows("10.0.0.2:50051")
    source.on_change(frozenset({"10.0.0.2:50051"}))  # scaled down: plans in flight may still name it
    assert directory.known == {"10.0.0.1:50051", "10.0.0.2:50051"}
    directory.wait_s = 0.05
    assert not directory.knows("10.0.0.3:50051")
    late.join()


def test_a_static_list_is_never_waited_for():
    directory = open_directory(StageWorkerConfig(model="m", samplers=("a:1",)))
    directory.start()
    assert directory.wait_s == 0.0 and directory.knows("a:1") and not directory.knows("b:1")


def test_the_last_stage_config_must_say_where_its_samplers_are():
    base = {"model": "m", "stage_index": 1, "num_stages": 2}
    with pytest.raises(ConfigError, match="config field 'samplers'"):
        load_config(StageWorkerConfig, base)
    with pytest.raises(ConfigError, match="config field 'sampler_service'"):
        load_config(StageWorkerConfig, {**base, "sampler_discovery": "endpointslices"})
    assert load_config(StageWorkerConfig, {**base, "samplers": ["s:1"]}).samplers == ("s:1",)
    assert load_config(StageWorkerConfig, {**base, "sample_on_stage": True}).samplers == ()
    assert load_config(StageWorkerConfig, {**base, "stage_index": 0, "next_stage": "x:1"}).samplers == ()


def test_a_served_last_stage_refuses_a_plan_naming_an_unknown_sampler(checkpoint):
    """Over gRPC: the step fails naming the sampler; the stage sends nothing and stays up."""
    api = FakeKubeApi()
    api.set_endpoints("pool-0", "pool", [("127.0.0.1", True)], 1)
    config = StageWorkerConfig(model=str(checkpoint("llama")), num_blocks=8, block_size=4, profile_at_startup=False,
                               sampler_discovery="endpointslices", sampler_service="pool",
                               sampler_namespace=api.namespace, kubernetes_api=api.url, sampler_wait_s=0.2)
    server = stage_worker.serve(config)
    plans: queue.Queue[pb.StepPlan | None] = queue.Queue()
    try:
        with grpc.insecure_channel(server.address) as channel:
            done = pb_grpc.StageWorkerStub(channel).Steps(iter(plans.get, None), timeout=60)
            plans.put(pb.StepPlan(step_id=1, sampler_addresses=["127.0.0.1:1", "203.0.113.9:50051"], sequences=[
                pb.SequencePlan(request_id="r", input_ids=[5, 6], block_table=[0], sampler_index=1)]))
            first = next(done)
            assert first.step_id == 1 and "names sampler '203.0.113.9:50051'" in first.error
            info = pb_grpc.StageWorkerStub(channel).GetStageInfo(pb.GetStageInfoRequest(), timeout=10)
            assert info.frames_out_total == 0 and info.num_sequences == 0
            plans.put(None)
            assert list(done) == []  # the stream ends cleanly: nothing else was refused
    finally:
        server.stop(0)
        api.close()
