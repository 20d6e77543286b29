"""The limits at the coordinator's front door. Request sizes: refused with INVALID_ARGUMENT naming
the field, before any work is done, and everyone else still served. The queue: past `max_queue`
requests waiting, refused with RESOURCE_EXHAUSTED before the prompt is tokenized, counting the
requests still being prepared, and accepted again once requests have left the queue."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cluster import start_cluster
from tandem import assets
from tandem.client import TandemClient
from tandem.client import errors as client_errors
from tandem.coordinator.config import CoordinatorConfig
from tandem.coordinator.events import MembershipChanged
from tandem.coordinator.front import Wakeups
from tandem.coordinator.info import ServiceProbe
from tandem.coordinator.limits import Admission
from tandem.coordinator.metrics import CoordinatorMetrics
from tandem.coordinator.servicer import SERVICE_NAME, CoordinatorServicer
from tandem.core.errors import ConfigError, InvalidArgumentError, ResourceExhaustedError
from tandem.core.metrics import Metrics
from tandem.core.modeling.model_config import ModelConfig
from tandem.core.tokenizer import Tokenizer
from tandem.core.wire.aio_server import AsyncServer
from tandem.v1 import coordinator_pb2_grpc
from test_engine_loop import Rig

LIMITS = dict(max_prompt_bytes=2000, max_prompt_tokens=300, max_request_id_bytes=32, max_stop_strings=4,
              max_stop_string_bytes=16, max_stop_token_ids=8, max_logit_bias=8)


@pytest.fixture(scope="module")
def cluster(checkpoint):
    c = start_cluster(checkpoint("llama"), num_stages=1, num_samplers=1, with_kv_store=False, **LIMITS)
    yield c
    c.stop()


@pytest.mark.parametrize("options,field", [
    (dict(prompt="x" * 2001), "text has 2001 bytes; at most 2000"),
    (dict(prompt="é" * 1001), "text has 2002 bytes; at most 2000"),  # bytes, not characters
    (dict(prompt_ids=[1] * 301), "token_ids has 301 ids; at most 300"),
    (dict(prompt_ids=[1], request_id="r" * 33), "request_id has 33 bytes; at most 32"),
    (dict(prompt_ids=[1], stop=["a"] * 50_000), "sampling.stop has 50000 strings; at most 4"),
    (dict(prompt_ids=[1], stop=["ok", "x" * 17]), "sampling.stop[1] has 17 bytes; at most 16"),
    (dict(prompt_ids=[1], stop_token_ids=list(range(9))), "sampling.stop_token_ids has 9 ids; at most 8"),
    (dict(prompt_ids=[1], logit_bias={i: 1.0 for i in range(9)}), "sampling.logit_bias has 9 entries; at most 8"),
])
def test_an_oversized_request_is_refused_naming_the_field(cluster, options, field):
    with TandemClient(cluster.endpoint, timeout_s=30) as client:
        start = time.monotonic()
        with pytest.raises(client_errors.InvalidArgumentError, match=field.replace("[", r"\[").replace("]", r"\]")):
            client.generate(max_tokens=2, **options)
        assert time.monotonic() - start < 5  # refused up front, not after running
        # The service goes on serving everyone else.
        assert len(client.generate(prompt_ids=[5, 6, 7], max_tokens=3, ignore_eos=True).token_ids) == 3


def test_tokenize_and_detokenize_are_limited_too(cluster):
    with TandemClient(cluster.endpoint, timeout_s=30) as client:
        with pytest.raises(client_errors.InvalidArgumentError, match="text has 100000 bytes; at most 2000"):
            client.tokenize("y" * 100_000)
        with pytest.raises(client_errors.InvalidArgumentError, match="token_ids has 301 ids; at most 300"):
            client.detokenize([1] * 301)
        assert client.detokenize(client.tokenize("hello")).strip() != ""  # within the limits: served


def test_a_limit_below_one_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="'max_stop_strings' must be >= 1"):
        CoordinatorConfig(model="m", stages=("s:1",), samplers=("x:1",), max_stop_strings=0).validate()


# --- the queue limit ---------------------------------------------------------------------------

QUEUE_FULL = r"the queue is full \(2 requests waiting\)"


def test_admission_counts_requests_being_prepared_and_frees_them_on_every_exit():
    rig = Rig(samplers=(), max_queue=2)  # no sampler: whatever is submitted stays waiting
    admission = Admission(rig.engine.check_admission)
    with admission.preparing(), admission.preparing():  # two prompts being tokenized fill the queue
        with pytest.raises(ResourceExhaustedError, match=QUEUE_FULL), admission.preparing():
            pass
    assert admission.num_preparing == 0
    with pytest.raises(InvalidArgumentError), admission.preparing():  # a preparation that fails
        raise InvalidArgumentError("the prompt is empty")
    with admission.preparing():
        rig.request("a")  # submitted: the engine counts it from here
    with admission.preparing():  # the last place
        with pytest.raises(ResourceExhaustedError, match=QUEUE_FULL), admission.preparing():
            pass
        rig.request("b")
    rig.turn()
    assert rig.engine.snapshot.num_waiting == 2
    with pytest.raises(ResourceExhaustedError, match=QUEUE_FULL), admission.preparing():
        pass
    rig.engine.abort("a")
    rig.turn()
    with admission.preparing():  # a place again
        rig.request("c")


@pytest.fixture
def front():
    """The coordinator's public server and servicer over an engine whose loop the test turns:
    (the rig, an endpoint)."""
    tiny = Path(assets.__path__[0]) / "tiny"
    config = CoordinatorConfig(model=str(tiny), stages=("stage:1",), samplers=("sampler:1",), max_queue=2)
    wakeups = Wakeups()
    rig = Rig(samplers=(), max_queue=config.max_queue, on_outputs=wakeups.notify)
    model = ModelConfig.from_dir(str(tiny))
    metrics = CoordinatorMetrics(Metrics(), "tiny", model.max_position_embeddings, 64, lambda: rig.engine.snapshot,
                                 lambda: probe.report)
    probe = ServiceProbe([], "", lambda: ())
    servicer = CoordinatorServicer(config, rig.engine, probe, Tokenizer.from_dir(str(tiny)), model, 1, metrics, wakeups)
    server = AsyncServer("127.0.0.1", 0, max_workers=2)
    server.add(coordinator_pb2_grpc.add_CoordinatorServicer_to_server, servicer, [SERVICE_NAME])
    server.start()
    yield rig, server.address
    server.stop(0)


def turn_until(rig: Rig, condition, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        rig.turn()
        time.sleep(0.01)


def drive(rig: Rig, stop: threading.Event) -> None:
    """The engine's loop, with the samplers and stages answering every step, until `stop`."""
    while not stop.wait(0.005):
        rig.run(max_turns=1)


def test_a_full_queue_refuses_with_resource_exhausted_and_admits_again_once_requests_end(front):
    rig, endpoint = front
    with TandemClient(endpoint, timeout_s=60) as client:
        held = [client.generate_stream(prompt_ids=[5, 6, 7], max_tokens=4, request_id=f"held-{i}") for i in range(2)]
        turn_until(rig, lambda: rig.engine.snapshot.num_waiting == 2, "the two held requests wait")
        for _ in range(3):
            with pytest.raises(client_errors.ResourceExhaustedError, match=QUEUE_FULL):
                client.generate(prompt_ids=[5, 6, 7], max_tokens=4)

        rig.post(MembershipChanged(frozenset({"s0"})))  # a sampler: the held requests run and end
        stop = threading.Event()
        driver = threading.Thread(target=drive, args=(rig, stop))
        driver.start()
        try:
            assert [len(stream.wait().token_ids) for stream in held] == [4, 4]
            assert len(client.generate(prompt_ids=[5, 6, 7], max_tokens=4, ignore_eos=True).token_ids) == 4  # admitted again
        finally:
            stop.set()
            driver.join(10)
    assert rig.engine.snapshot.num_waiting == 0
