"""`tandem up`, `tandem generate` and `tandem serve` as a user runs them: real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import openai
import pytest
import torch

from processes import children_of, wait_gone
from tandem.client import TandemClient
from tandem.client.errors import ClientError
from tandem.core.cpus import plan_cores
from tandem.stage_worker.config import StageWorkerConfig
from tandem.v1.stage_worker_pb2 import GetStageInfoRequest
from tandem.v1.stage_worker_pb2_grpc import StageWorkerStub

ADMIN_KEY = "test-admin-key"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TANDEM_ADMIN_KEY": ADMIN_KEY}  # `tandem up` hands it to the coordinator


def start_up(model: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "tandem.cli", "up", "--model", str(model), "--port", "0", "--gateway-port", "0",
           "--num-blocks", "64", "--log-dir", str(tmp_path), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        if line.startswith("tandem ready on "):
            return proc, line.split()[-1]
        assert time.monotonic() < deadline
    proc.kill()
    raise AssertionError(f"tandem up never became ready: {proc.stderr.read()}")


@pytest.fixture
def up(checkpoint, tmp_path):
    procs = []

    def start(*extra):
        proc, endpoint = start_up(checkpoint("llama"), tmp_path, *extra)
        procs.append(proc)
        return proc, endpoint

    yield start
    for proc in procs:
        kids = children_of(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        wait_gone(kids)


def generate(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tandem.cli", "generate", "--endpoint", endpoint, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)


def test_up_generate_and_clean_shutdown(up, checkpoint, reference_model):
    proc, endpoint = up("--stages", "2", "--samplers", "2")
    gateway = proc.stdout.readline().split()[-1]
    kids = children_of(proc.pid)
    assert len(kids) == 7  # kv store, 2 samplers, 2 stages, coordinator, gateway

    out = generate(endpoint, "--prompt-ids", "5,7,9,11", "--max-tokens", "6", "--temperature", "0",
                   "--ignore-eos", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    model = reference_model(checkpoint("llama"))
    want = model.generate(torch.tensor([[5, 7, 9, 11]]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 4:].tolist()
    assert result["token_ids"] == want and result["finish_reason"] == "length"
    with openai.OpenAI(base_url=gateway, api_key="none", max_retries=0, timeout=60) as client:
        completion = client.completions.create(model=client.models.list().data[0].id, prompt=[5, 7, 9, 11],
                                               max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert completion.choices[0].text == result["text"]

    streamed = generate(endpoint, "The quick brown", "--max-tokens", "5", "--temperature", "0")
    assert streamed.returncode == 0 and streamed.stdout.strip() != ""

    bad = generate(endpoint, "--prompt-ids", "1,2", "--top-p", "7")
    assert bad.returncode == 1 and "top_p" in bad.stderr

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    wait_gone(kids)


def test_up_gives_each_stage_its_cores_and_balances_the_layers(up):
    proc, endpoint = up("--stages", "2", "--samplers", "1", "--stage-boundaries", "auto")
    kids = children_of(proc.pid)
    with TandemClient(endpoint, timeout_s=60, api_key=ADMIN_KEY) as client:
        stages = client.server_info(include_addresses=True).stages
    plan = plan_cores(sorted(os.sched_getaffinity(0)), num_stages=2, num_samplers=1)
    infos = []
    for stage in stages:
        with grpc.insecure_channel(stage.address) as channel:
            infos.append(StageWorkerStub(channel).GetStageInfo(GetStageInfoRequest(), timeout=30))
    assert [tuple(i.cpus) for i in infos] == list(plan.stages)
    assert {i.num_threads for i in infos} == {plan.stage_threads} and {i.num_interop_threads for i in infos} == {1}
    assert all(json.loads(i.profile_json)["cpus"] == list(c) for i, c in zip(infos, plan.stages))
    # The stages at the default priority; the others below it when they share the stages' cores.
    nice = {(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[4].decode(), os.getpriority(os.PRIO_PROCESS, pid))
            for pid in kids}
    assert nice == {("stage_worker", 0), *((name, plan.others_nice) for name in
                                           ("cpu_sampler", "kv_store", "coordinator", "gateway"))}, nice
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    wait_gone(kids)
    said = proc.stderr.read()
    assert "tandem: cores: stage 0 on " in said
    assert f"tandem: stage boundaries auto [{infos[1].layer_start}] " in said, said


def test_up_stops_everything_when_a_service_dies(up):
    proc, _ = up("--stages", "1", "--samplers", "2")
    kids = children_of(proc.pid)
    os.kill(kids[1], signal.SIGKILL)
    assert proc.wait(60) == 1
    wait_gone(kids)


def test_serve_rejects_unknown_config_field(tmp_path):
    cfg = tmp_path / "sampler.yaml"
    cfg.write_text("port: 0\nnum_replicas: 3\n")
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "serve", "cpu-sampler", "--config", str(cfg)],
                         capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode != 0 and "num_replicas" in out.stderr


def test_a_service_that_never_gets_ready_is_reported_with_its_error(tmp_path):
    from tandem.launcher import Launcher

    launcher = Launcher(log_dir=tmp_path, say=lambda line: None)
    bad = StageWorkerConfig(model=str(tmp_path / "no-such-model"), samplers=("127.0.0.1:1",))
    with pytest.raises(RuntimeError, match=r"stage-worker-0 did not become ready; see .*stage-worker-0.log: .*no-such-model"):
        launcher.start("stage-worker-0", "stage_worker", bad, timeout_s=120)
    assert launcher.children == []


def test_up_with_tls_dir_serves_a_client_that_trusts_the_ca(up, tmp_path):
    from pki import make_pki

    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    files = make_pki(tls_dir, "cluster")
    for kind, name in (("ca", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key")):
        files[kind].rename(tls_dir / name)
    proc, endpoint = up("--stages", "2", "--samplers", "1", "--no-gateway", "--tls-dir", str(tls_dir))
    with TandemClient(endpoint, timeout_s=120, root_certificates=(tls_dir / "ca.crt").read_bytes()) as client:
        assert len(client.generate(prompt_ids=[5, 7, 9], max_tokens=4, temperature=0.0).token_ids) == 4
    with TandemClient(endpoint, timeout_s=5) as plaintext, pytest.raises(ClientError):
        plaintext.server_info()
