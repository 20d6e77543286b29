"""`tandem bench` against other servers: the vLLM runs' planning and start-up, the OpenAI-compatible
client against a fake server on loopback, and the model-FLOPs / peak figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tandem.bench import flops, peer
from tandem.bench.command import Target, plan_targets
from tandem.bench.facts import run_dtype
from tandem.bench.flops import Peak, context_sum, matmul_parameters, measure_peak, request_flops
from tandem.bench.openai_api import base_url, measure_openai, parse_event
from tandem.bench.peer import (
    VllmServer,
    core_groups,
    descendants,
    find_peer_python,
    is_alive,
    pipeline_size,
    process_title,
    thread_binding,
)
from tandem.bench.report import format_comparison, format_run, request_figures, run_figures
from tandem.bench.runner import SendOptions
from tandem.bench.workload import Request
from tandem.cli import build_parser, main
from tandem.core.modeling.model_config import ModelConfig

parse = build_parser().parse_args


# --- planning -----------------------------------------------------------------------------------


def test_vllm_runs_are_planned_with_their_core_binding():
    assert pipeline_size("vllm") == 1 and pipeline_size("vllm-pp2") == 2 and pipeline_size("vllm-pp12") == 12
    assert pipeline_size("vllm-pp1") is None and pipeline_size("vllm-ppx") is None and pipeline_size("full") is None
    targets = plan_targets(parse(["bench", "--compare", "full,vllm,vllm-pp2"]))
    assert [(t.name, t.kind) for t in targets] == [("full", "tandem"), ("vllm", "vllm"), ("vllm-pp2", "vllm")]
    assert targets[1].description.endswith(thread_binding(core_groups(1)))
    assert "pipeline size 2" in targets[2].description
    with pytest.raises(ValueError, match="at least 9 cores"):
        plan_targets(parse(["bench", "--compare", "vllm-pp9"]))
    with pytest.raises(ValueError, match="vllm or vllm-ppN for vLLM"):
        plan_targets(parse(["bench", "--compare", "vllm-pp1"]))


def test_core_groups_are_contiguous_and_even():
    assert core_groups(3, range(8)) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert core_groups(2, [3, 1]) == [[1], [3]]
    assert thread_binding([[0, 1]]) == "0-1" and thread_binding([[0], [1]]) == "0|1"
    assert thread_binding([[0, 2, 3, 4], [5, 6]]) == "0,2-4|5-6"
    with pytest.raises(ValueError):
        core_groups(3, [0, 1])


def test_peer_endpoint_is_a_run_after_the_others_or_alone():
    alone = plan_targets(parse(["bench", "--peer-endpoint", "http://127.0.0.1:8000"]))
    assert alone == [Target("peer", "openai", "the OpenAI-compatible server at http://127.0.0.1:8000")]
    both = plan_targets(parse(["bench", "--compare", "full,vllm", "--peer-endpoint", "http://h:1",
                               "--peer-name", "sglang"]))
    assert [(t.name, t.kind) for t in both] == [("full", "tandem"), ("vllm", "vllm"), ("sglang", "openai")]
    with_endpoint = plan_targets(parse(["bench", "--endpoint", "h:2", "--peer-endpoint", "http://h:1"]))
    assert [t.kind for t in with_endpoint] == ["endpoint", "openai"]
    with pytest.raises(ValueError, match="twice"):
        plan_targets(parse(["bench", "--compare", "full", "--peer-endpoint", "http://h:1", "--peer-name", "full"]))


def test_vllm_runs_are_refused_without_a_peer_venv(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nope" / "python"
    assert main(["bench", "--compare", "full,vllm", "--peer-python", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "make peer-vllm" in err and str(missing) in err
    monkeypatch.setattr(peer, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no \.venv-peer at .*make peer-vllm"):
        find_peer_python(None)
    with pytest.raises(ValueError, match="has no vllm package.*make peer-vllm"):
        find_peer_python(sys.executable)  # the project's own Python: vLLM is never installed there


def test_vllm_server_command_and_environment(tmp_path):
    pp2 = VllmServer("/peer/bin/python", "/models/m", 2, "bfloat16", tmp_path)
    cmd = pp2.command()
    assert cmd[:3] == ["/peer/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in (("--model", "/models/m"), ("--host", "127.0.0.1"), ("--port", str(pp2.port)),
                        ("--dtype", "bfloat16"), ("--pipeline-parallel-size", "2")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enforce-eager" not in cmd  # vLLM as its users run it: compiled
    env = pp2.environment()
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == thread_binding(core_groups(2)) and env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == str(peer.KV_CACHE_GIB)
    assert "PYTHONPATH" not in env  # Tandem's own path must not leak into vLLM's environment
    one = VllmServer("/peer/bin/python", "/models/m", 1, "float32", tmp_path, extra_args=["--max-num-seqs", "8"])
    assert "--pipeline-parallel-size" not in one.command() and one.command()[-2:] == ["--max-num-seqs", "8"]
    assert "VLLM_SERVER_DEV_MODE" not in one.environment()


def test_a_vllm_server_that_exits_at_start_names_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=f"exited with status 1 before it was ready; see {tmp_path}/vllm.log"):
        with VllmServer(sys.executable, "/models/m", 1, "float32", tmp_path):
            pass
    assert "No module named" in (tmp_path / "vllm.log").read_text()


def test_a_servers_processes_are_found_and_named():
    script = "import subprocess, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", "from multiprocessing.resource_tracker import main; " + script])
    try:
        deadline = time.monotonic() + 10
        while not (below := descendants(child.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in descendants(os.getpid()) and len(below) == 1
        grandchild = below[0]
        assert process_title(child.pid) == "resource_tracker" and process_title(grandchild) is None
        assert is_alive(grandchild)
    finally:
        for pid in descendants(child.pid):
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()


def test_dtype_option_resolves_against_the_model():
    config = llama(dtype="bfloat16")
    assert run_dtype(parse(["bench"]), config) == "float32"  # auto on CPU
    assert run_dtype(parse(["bench", "--dtype", "bfloat16"]), config) == "bfloat16"
    assert run_dtype(parse(["bench"]), None) is None
    with pytest.raises(SystemExit):
        parse(["bench", "--dtype", "int8"])


# --- the OpenAI-compatible client ----------------------------------------------------------------


class FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/models and a streamed /v1/completions that writes two tokens per chunk, one text character
    per chunk (so that counting text would be wrong), then the usage chunk. A prompt starting with
    token 999 gets an HTTP 400; one starting with 998 gets a stream without usage."""

    bodies: list[dict] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: str, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        self.wfile.write(body.encode())

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}))
        else:
            self._send(404, "{}")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        if body["prompt"][0] == 999:
            self._send(400, json.dumps({"error": {"message": "prompt too odd", "type": "BadRequestError",
                                                  "param": None, "code": 400}}))
            return
        n = body["max_tokens"]
        if body["stream"] is False:
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": len(body["prompt"]) + n}
            answer = {"choices": [{"index": 0, "text": "x" * n, "finish_reason": "length"}]}
            self._send(200, json.dumps({**answer, **({"usage": usage} if body["prompt"][0] != 998 else {})}))
            return
        events = [{"choices": [{"index": 0, "text": "x", "finish_reason": None}], "usage": None}
                  for _ in range((n + 1) // 2)]
        if body["prompt"][0] != 998:
            events.append({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                                                    "total_tokens": len(body["prompt"]) + n}})
        stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        self._send(200, stream, "text/event-stream")


@pytest.fixture
def fake_openai():
    FakeOpenAI.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_openai_client_sends_the_workload_and_counts_tokens_from_usage(fake_openai):
    requests = [Request(i, (10 + i, 11, 12), out) for i, out in enumerate([5, 1, 8])]
    warmup = [Request(-1, (7, 8), 2)]
    options = SendOptions({"temperature": 0.7, "top_p": 0.9, "top_k": 20}, seed=3, max_concurrency=2)
    m = measure_openai(fake_openai + "/v1/", requests, warmup, options)
    assert [r.output_tokens for r in m.records] == [5, 1, 8]
    assert all(r.error is None and r.sent_s <= r.first_token_s <= r.done_s for r in m.records)
    assert m.wall_s > 0 and m.counters is None
    bodies = FakeOpenAI.bodies
    assert len(bodies) == 4 and bodies[0]["prompt"] == [7, 8]  # warm-up first, unmeasured
    sent = {tuple(b["prompt"]): b for b in bodies[1:]}
    for r in requests:
        b = sent[r.prompt_ids]
        assert b["model"] == "fake-model" and b["max_tokens"] == b["min_tokens"] == r.output_len
        assert b["ignore_eos"] is True and b["seed"] == 3 + r.index
        assert (b["temperature"], b["top_p"], b["top_k"]) == (0.7, 0.9, 20)
        assert b["stream"] is True and b["stream_options"] == {"include_usage": True}


def test_openai_client_reports_errors_and_missing_usage(fake_openai):
    requests = [Request(0, (999, 1), 4), Request(1, (998, 1), 4), Request(2, (5, 1), 4)]
    m = measure_openai(fake_openai, requests, [], SendOptions())
    errors = [r.error for r in m.records]
    assert errors[0] == "HTTP 400: prompt too odd"
    assert "no usage" in errors[1]
    assert errors[2] is None and m.records[2].output_tokens == 4
    assert base_url("http://h:1/v1/") == "http://h:1" and base_url("http://h:1") == "http://h:1"
    assert parse_event(b"data: [DONE]\n") is None and parse_event(": keep-alive") is None
    assert parse_event('data: {"a": 1}') == {"a": 1}


def test_openai_client_without_streaming_counts_tokens_from_the_answer(fake_openai):
    requests = [Request(i, (10 + i, 11), out) for i, out in enumerate([5, 3])] + [Request(2, (998, 1), 4)]
    m = measure_openai(fake_openai, requests, [], SendOptions(stream=False))
    assert [r.output_tokens for r in m.records[:2]] == [5, 3]
    assert [r.error for r in m.records[:2]] == [None, None] and "no usage" in m.records[2].error
    assert all(r.first_token_s is None for r in m.records)  # no token is seen before the answer
    assert all(b["stream"] is False and "stream_options" not in b for b in FakeOpenAI.bodies)
    figures = request_figures(m.records[0])
    assert figures["ttft_s"] is None and figures["tpot_s"] is None
    assert figures["e2e_s"] == pytest.approx(m.records[0].done_s - m.records[0].sent_s) and figures["e2e_s"] > 0
    assert request_figures(m.records[2])["e2e_s"] is None  # a failed request has no latency


def test_bench_measures_a_peer_endpoint_with_the_peak(fake_openai, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(flops, "measure_peak", lambda dtype, device: Peak(1e9, dtype, device, 2, 256))
    out = tmp_path / "bench.json"
    assert main(["bench", "--peer-endpoint", fake_openai, "--peer-name", "fake", "--num-requests", "3",
                 "--prompt-len", "4", "--output-len", "6", "--warmup", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert run["name"] == "fake" and run["kind"] == "openai" and run["output_tokens"] == 18
    assert run["model_flops_per_s"] > 0 and run["fraction_of_peak"] == pytest.approx(run["model_flops_per_s"] / 1e9)
    assert report["machine"]["peak_flops_per_s"] == 1e9 and report["machine"]["peak_dtype"] == "float32"
    assert "of peak" in capsys.readouterr().out
    assert len(FakeOpenAI.bodies) == 4


# --- model FLOPs and the peak ------------------------------------------------------------------------


def llama(**kw) -> ModelConfig:
    raw = dict(model_type="llama", vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=64)
    return ModelConfig.from_dict({**raw, **kw})


def test_model_flops_count_linear_layers_lm_head_and_attention():
    c = llama()
    # q and o: 8x8 each; k and v: 8x4 each; mlp: 3 x 8x12; per layer 128 + 64 + 288 = 480; head 8x100.
    assert matmul_parameters(c) == (2 * 480, 800)
    # 5 prompt tokens, 3 output tokens: 7 tokens through the layers, 3 through the head, contexts 1..7.
    attention = 4 * 2 * 4 * 2 * (7 * 8 // 2)
    assert request_flops(c, 5, 3) == 2 * 960 * 7 + 2 * 800 * 3 + attention
    assert request_flops(c, 5, 0) == 0
    assert context_sum(7, None) == 28 and context_sum(7, 3) == 6 + 4 * 3 and context_sum(2, 3) == 3


def test_run_figures_give_model_flops_as_a_fraction_of_peak():
    from tandem.bench.runner import Measurement, RequestRecord

    c = llama()
    records = [RequestRecord(0, 5, 3, 0.0, 0.1, 0.5, 3), RequestRecord(1, 4, 2, 0.0, 0.1, 0.5, 0, "boom")]
    fig = run_figures("x", Measurement(records, 2.0), 2, model=c, peak_flops_per_s=1e4, kind="vllm")
    assert fig["model_flops_per_s"] == request_flops(c, 5, 3) / 2.0  # the failed request does not count
    assert fig["fraction_of_peak"] == pytest.approx(fig["model_flops_per_s"] / 1e4)
    assert "model FLOPs" in format_run(fig)
    assert format_comparison([fig], {}).splitlines()[0].rstrip().endswith("of peak")
    bare = run_figures("y", Measurement(records, 2.0), 2)
    assert bare["model_flops_per_s"] is None and bare["fraction_of_peak"] is None


def test_peak_is_a_positive_matmul_rate_measured_once():
    peak = measure_peak("float32", "cpu", 0.2)
    assert peak.flops_per_s > 1e8 and peak.dtype == "float32" and peak.matrix_size in flops.CPU_SIZES
    assert measure_peak("float32", "cpu", 0.2) is peak  # cached for the invocation


def test_a_stopped_vllm_leaves_no_shared_memory_behind(tmp_path):
    from tandem.bench.peer import remove_new_shm, shm_entries

    (tmp_path / "vllm_dist_old-cpushm_0").write_bytes(b"x")  # another server's, there before
    (tmp_path / "tandem-logits-1").write_bytes(b"x")  # not vLLM's
    before = shm_entries(tmp_path)
    for name in ("vllm_dist_new-pp:0-[0-1]-cpushm_0", "vllm_dist_new-pp:0-[0-1]-cpushm_1"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_new_shm(before, tmp_path) == ["vllm_dist_new-pp:0-[0-1]-cpushm_0", "vllm_dist_new-pp:0-[0-1]-cpushm_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tandem-logits-1", "vllm_dist_old-cpushm_0"]
