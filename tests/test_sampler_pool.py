"""The sampler pool follows discovery while requests stream.

Sampler replicas are real processes, published as EndpointSlices on a local stand-in for the
Kubernetes API that the coordinator watches. While requests stream, one replica is added,
one is removed, and one is killed with SIGKILL; every request must end with exactly the
tokens of a run where none of that happened.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest

from kube_api import FakeKubeApi
from tandem.client import TandemClient
from tandem.coordinator import servicer as coordinator
from tandem.coordinator.config import CoordinatorConfig
from tandem.cpu_sampler.config import SamplerConfig
from tandem.launcher import Launcher
from tandem.stage_worker import servicer as stage_worker
from tandem.stage_worker.config import StageWorkerConfig
from tandem.v1 import cpu_sampler_pb2, cpu_sampler_pb2_grpc

SERVICE = "pool"
MAX_TOKENS = 236  # prompts are at most 12 tokens; the test model has 256 positions
PROMPTS = [[5, 7, 9, 11], [100, 4, 40], list(range(20, 32)), [300, 17], [8, 8, 8], [250, 3, 77, 1, 9], [64], [31, 41, 59]]


def sampling(i: int) -> dict:
    """Half the requests greedy, half seeded random sampling."""
    if i % 2 == 0:
        return {"temperature": 0.0}
    return {"temperature": 0.9, "top_p": 0.9, "seed": 1000 + i, "repetition_penalty": 1.1}


def wait_until(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class Streamer:
    """Streams requests from threads and records their tokens as they arrive."""

    def __init__(self, client: TandemClient):
        self.client = client
        self.tokens: dict[int, list[int]] = {}
        self.results: dict[int, object] = {}
        self.threads: list[threading.Thread] = []

    def start(self, indices) -> None:
        for i in indices:
            self.tokens[i] = []
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _run(self, i: int) -> None:
        stream = self.client.generate_stream(prompt_ids=PROMPTS[i], max_tokens=MAX_TOKENS, ignore_eos=True,
                                             **sampling(i))
        for chunk in stream:
            self.tokens[i].extend(chunk.token_ids)
        self.results[i] = stream.result

    def at_least(self, indices, n: int) -> bool:
        return all(len(self.tokens[i]) >= n for i in indices)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=300)


ADMIN_KEY_ENV, ADMIN_KEY = "TANDEM_TEST_POOL_ADMIN_KEY", "pool-admin"  # the pool is watched by its addresses


def test_replicas_come_and_go_while_requests_stream(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    model = str(checkpoint("llama"))
    api = FakeKubeApi()
    launcher = Launcher(workdir=str(tmp_path))
    servers = []
    try:
        samplers = [launcher.start(f"sampler-{i}", "cpu_sampler", SamplerConfig(model=model)) for i in range(3)]

        def publish(i: int, ready: bool = True) -> None:  # one slice per replica: each has its own port
            host, port = samplers[i].rsplit(":", 1)
            api.set_endpoints(f"{SERVICE}-{i}", SERVICE, [(host, ready)], int(port))

        publish(0)
        publish(1)
        stages: list[str] = []
        for index in (1, 0):  # the last stage follows the same EndpointSlices to know where it may send logits
            discovery = {"sampler_discovery": "endpointslices", "sampler_service": SERVICE, "sampler_namespace": api.namespace,
                         "kubernetes_api": api.url} if index == 1 else {}
            cfg = StageWorkerConfig(model=model, stage_index=index, num_stages=2, next_stage=stages[0] if stages else "",
                                    num_blocks=512, block_size=4, **discovery)
            servers.append(stage_worker.serve(cfg))
            stages.insert(0, servers[-1].address)
        servers.append(coordinator.serve(CoordinatorConfig(
            model=model, stages=tuple(stages), sampler_discovery="endpointslices", sampler_service=SERVICE,
            sampler_namespace=api.namespace, kubernetes_api=api.url, num_blocks=512, block_size=4,
            admin_key_env=ADMIN_KEY_ENV)))
        client = TandemClient(servers[-1].address, timeout_s=300, api_key=ADMIN_KEY)

        def pool() -> set[str]:
            return {s.address for s in client.server_info(include_addresses=True).samplers}

        wait_until(lambda: pool() == {samplers[0], samplers[1]}, "the first two replicas")

        undisturbed = Streamer(client)
        undisturbed.start(range(len(PROMPTS)))
        undisturbed.join()
        expected = {i: r.token_ids for i, r in undisturbed.results.items()}
        assert all(len(ids) == MAX_TOKENS for ids in expected.values())

        run = Streamer(client)
        first, second = range(0, 4), range(4, len(PROMPTS))
        run.start(first)
        wait_until(lambda: run.at_least(first, 5), "the first tokens")
        publish(2)  # kubectl scale --replicas=3
        wait_until(lambda: pool() == set(samplers), "the new replica to take sequences")
        run.start(second)  # arrives while the new replica is the least loaded
        wait_until(lambda: run.at_least(second, 5), "the second wave's first tokens")
        api.delete(f"{SERVICE}-0")  # kubectl scale down removes the endpoint, then stops the pod
        wait_until(lambda: pool() == {samplers[1], samplers[2]}, "the removed replica to leave the pool")
        launcher.children[0][1].terminate()
        launcher.children[1][1].send_signal(signal.SIGKILL)  # a replica dies while still listed
        wait_until(lambda: pool() == {samplers[2]}, "the killed replica to leave the pool")
        publish(1, ready=False)  # what its failing readiness probe would do later
        still_streaming = [i for i in run.tokens if i not in run.results]
        run.join()

        assert still_streaming, "every request finished before the pool changed; the test proved nothing"
        for i, result in sorted(run.results.items()):
            assert result.finish_reason == "length"
            assert run.tokens[i] == result.token_ids, f"request {i}: streamed tokens differ from the result"
            assert result.token_ids == expected[i], f"request {i} differs from the undisturbed run"
        assert len(run.results) == len(PROMPTS)
        with grpc.insecure_channel(samplers[2]) as channel:
            def info():
                return cpu_sampler_pb2_grpc.CpuSamplerStub(channel).GetSamplerInfo(
                    cpu_sampler_pb2.GetSamplerInfoRequest(), timeout=10)

            assert info().num_rows_total > 0, "the added replica never sampled"
            # Releases go out from the replica's own worker thread, just after each request ends.
            wait_until(lambda: info().num_sequences == 0, "the surviving replica to release finished sequences",
                       timeout_s=5)
        client.close()
    finally:
        for server in reversed(servers):
            server.stop(0)
        launcher.stop()
        api.close()
    assert all(proc.poll() is not None for _, proc in launcher.children) or not launcher.children
