"""Cores of one process: core lists, the launcher's plan, and what a started service reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest

from processes import wait_gone
from tandem.core.config import load_config
from tandem.core.cpus import SHARED_NICE, format_cpu_list, parse_cpu_list, place_process, plan_cores
from tandem.core.errors import ConfigError
from tandem.cpu_sampler.config import SamplerConfig
from tandem.launcher import Launcher
from tandem.stage_worker.config import StageWorkerConfig
from tandem.v1 import cpu_sampler_pb2, cpu_sampler_pb2_grpc, stage_worker_pb2, stage_worker_pb2_grpc

CORES = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize("text, cpus", [("", ()), ("3", (3,)), ("0-3,8", (0, 1, 2, 3, 8)),
                                        (" 2, 0-1 ,1", (0, 1, 2)), ("10-11,4", (4, 10, 11))])
def test_core_lists_parse_and_format_as_linux_writes_them(text, cpus):
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus


@pytest.mark.parametrize("text", ["a", "3-1", "-1", "0-", "1.5"])
def test_bad_core_lists_are_refused(text):
    with pytest.raises(ValueError):
        parse_cpu_list(text)


@pytest.mark.parametrize("cls, extra", [(StageWorkerConfig, {"model": "m", "samplers": ["s:1"]}),
                                        (SamplerConfig, {"vocab_size": 8})])
def test_the_cpus_field_is_checked_by_name(cls, extra):
    assert load_config(cls, {**extra, "cpus": "0-1"}).cpus == "0-1"
    with pytest.raises(ConfigError, match="'cpus'"):
        load_config(cls, {**extra, "cpus": "two"})


def test_two_stages_on_two_cores_get_one_each_and_the_rest_floats():
    plan = plan_cores([0, 1], num_stages=2, num_samplers=2)
    assert plan.stages == ((0,), (1,)) and plan.stage_threads == 1
    assert plan.others == (0, 1) and plan.others_float and not plan.warnings
    assert "stage 0 on 0, stage 1 on 1" in plan.describe()[0] and "no core left over" in plan.describe()[0]
    assert plan.others_nice == SHARED_NICE > 0 and f"at nice {SHARED_NICE}" in plan.describe()[0]


def test_cores_beyond_the_stages_go_to_the_samplers_coordinator_and_kv_store():
    plan = plan_cores(range(16), num_stages=2, num_samplers=2)
    assert plan.stages == (tuple(range(6)), tuple(range(6, 12))) and plan.stage_threads == 6
    assert plan.others == (12, 13, 14, 15) and not plan.others_float and plan.others_nice == 0
    assert "nice" not in plan.describe()[0]
    plan = plan_cores([4, 5, 6], num_stages=2, num_samplers=2)  # the cores this process was given
    assert plan.stages == ((4,), (5,)) and plan.others == (6,)
    assert plan_cores(range(8), 2, 0, stage_threads=2).stages == ((0, 1), (2, 3))


@pytest.mark.parametrize("cores, stages, threads, shared", [
    ([0, 1], 3, 0, "stages 0 and 2 share core 0"),
    ([0], 2, 0, "stages 0 and 1 share core 0"),
    ([0, 1], 2, 2, "stages 0 and 1 share core 1"),
    ([0, 1], 1, 4, "threads outnumber cores"),
])
def test_too_few_cores_are_shared_and_said(cores, stages, threads, shared):
    plan = plan_cores(cores, stages, 2, threads)
    assert len(plan.stages) == stages and all(plan.stages)
    (warning,) = plan.warnings
    assert shared in warning and f"there are {len(cores)}" in warning
    assert plan.describe()[-1] == warning


def test_a_process_pins_every_thread_and_reports_what_it_has():
    core = CORES[-1]
    code = ("import json, os, threading, torch\n"
            "threading.Thread(target=lambda: None).start()\n"
            "from tandem.core.cpus import place_process\n"
            f"p = place_process([{core}], 0)\n"
            "tids = os.listdir('/proc/self/task')\n"
            "print(json.dumps([list(p.cpus), p.num_threads, p.num_interop_threads,"
            " sorted({tuple(sorted(os.sched_getaffinity(int(t)))) for t in tids})]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    cpus, threads, interop, per_thread = json.loads(out.stdout)
    assert cpus == [core] and threads == 1 and interop == 1 and per_thread == [[core]]


def test_cores_the_os_refuses_are_a_config_error():
    with pytest.raises(ConfigError, match="'cpus'.*may use"):
        place_process([max(CORES) + 1000], 1)


@pytest.fixture
def launcher(tmp_path):
    launcher = Launcher(workdir=str(tmp_path))
    yield launcher
    pids = [proc.pid for _, proc in launcher.children]
    launcher.stop()
    wait_gone(pids)


def test_a_started_stage_and_sampler_report_their_threads_and_cores(launcher, checkpoint):
    core = CORES[-1]
    stage = launcher.start("stage", "stage_worker", StageWorkerConfig(model=str(checkpoint("llama")),
                                                                       cpus=str(core), num_threads=1,
                                                                       samplers=("127.0.0.1:1",)))
    sampler = launcher.start("sampler", "cpu_sampler", SamplerConfig(model=str(checkpoint("llama")),
                                                                    cpus=format_cpu_list(CORES), num_threads=2))
    with grpc.insecure_channel(stage) as channel:
        info = stage_worker_pb2_grpc.StageWorkerStub(channel).GetStageInfo(stage_worker_pb2.GetStageInfoRequest(),
                                                                          timeout=30)
    assert list(info.cpus) == [core] and info.num_threads == 1 and info.num_interop_threads == 1
    profile = json.loads(info.profile_json)
    assert profile["num_threads"] == 1 and profile["cpus"] == [core]
    with grpc.insecure_channel(sampler) as channel:
        info = cpu_sampler_pb2_grpc.CpuSamplerStub(channel).GetSamplerInfo(cpu_sampler_pb2.GetSamplerInfoRequest(),
                                                                          timeout=30)
    assert list(info.cpus) == CORES and info.torch_threads == 1 and info.num_threads == 2
    assert info.num_interop_threads == 1


def test_freed_memory_is_kept_unless_the_user_chose_an_allocator(monkeypatch):
    from tandem.core.cpus import keep_freed_memory

    for name in [k for k in os.environ if k.startswith("MALLOC_")] + ["LD_PRELOAD"]:
        monkeypatch.delenv(name, raising=False)
    assert keep_freed_memory()  # glibc here: the settings are taken
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert not keep_freed_memory()
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert not keep_freed_memory()
