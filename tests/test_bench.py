"""`tandem bench`: workloads, the report's arithmetic, and one small end-to-end comparison."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from processes import alive, children_of
from tandem.bench import stats
from tandem.bench.command import Target, plan_targets
from tandem.bench.hf import plan_batches
from tandem.bench.metrics import Counters
from tandem.bench.report import compare, format_comparison, format_run, run_figures
from tandem.bench.runner import Measurement, RequestRecord
from tandem.bench.workload import (
    DatasetError,
    Request,
    TraceEntry,
    arrival_times,
    build_workload,
    check_fits,
    parse_length,
    read_dataset,
    synthetic_entries,
)
from tandem.cli import build_parser, main

VOCAB = 331


def synthetic(seed: int, n: int = 50, prompt: str = "uniform:3,9", output: str = "lognormal:20,0.8,40", **kw):
    entries = synthetic_entries(n, parse_length(prompt), parse_length(output), seed)
    return build_workload(entries, VOCAB, seed, **kw)


# --- workload ------------------------------------------------------------------------------


def test_length_specs_parse_and_round_trip():
    assert parse_length("7") == parse_length("fixed:7")
    assert parse_length("uniform:2,5").low == 2 and parse_length("uniform:2,5").high == 5
    lognormal = parse_length("lognormal:10,0.5")
    assert lognormal.cap == 40 and lognormal.low == 1  # the documented default clip, 4 * MEAN
    for spec in ("fixed:7", "uniform:2,5", "lognormal:10,0.5,25"):
        assert parse_length(spec).spec() == spec
    for bad in ("uniform:5,2", "fixed:0", "fixed:1.5", "gauss:3", "lognormal:10", "uniform:a,b", ""):
        with pytest.raises(ValueError):
            parse_length(bad)


def test_synthetic_workload_is_deterministic_per_seed():
    a, b, c = synthetic(1), synthetic(1), synthetic(2)
    assert a.requests == b.requests and a.warmup == b.warmup
    assert [r.prompt_ids for r in a.requests] != [r.prompt_ids for r in c.requests]
    assert [r.output_len for r in a.requests] != [r.output_len for r in c.requests]
    # Warm-up prompts are fresh, so a prefix cache cannot make the measured requests cheaper.
    assert not {r.prompt_ids for r in a.warmup} & {r.prompt_ids for r in a.requests}
    # A different request rate moves only the arrivals, not the prompts.
    d = synthetic(1, request_rate=5.0)
    assert [r.prompt_ids for r in d.requests] == [r.prompt_ids for r in a.requests]
    assert [r.arrival_s for r in d.requests] != [r.arrival_s for r in a.requests]


def test_lengths_follow_their_distributions():
    w = synthetic(3, n=4000, prompt="uniform:3,9", output="lognormal:20,0.5,60")
    prompts = [r.prompt_len for r in w.requests]
    outputs = [r.output_len for r in w.requests]
    assert min(prompts) == 3 and max(prompts) == 9  # both ends reached, never passed
    assert abs(sum(prompts) / len(prompts) - 6) < 0.1
    assert 1 <= min(outputs) and max(outputs) <= 60
    assert abs(sum(outputs) / len(outputs) - 20) < 0.5  # MEAN is the mean of the lengths
    assert all(0 <= t < VOCAB for r in w.requests for t in r.prompt_ids)
    clipped = synthetic(3, n=500, output="lognormal:20,2.0,30")
    assert max(r.output_len for r in clipped.requests) == 30
    fixed = synthetic(3, n=20, prompt="5", output="fixed:8")
    assert {(r.prompt_len, r.output_len) for r in fixed.requests} == {(5, 8)}
    assert fixed.output_tokens == 160 and fixed.description["output_tokens"] == 160
    assert all(r.output_len <= 16 for r in synthetic(3, output="fixed:50").warmup)  # warm-up kept short


def test_poisson_arrivals():
    import random

    times = arrival_times(4000, 8.0, random.Random(0))
    assert times[0] == 0 and times == sorted(times)
    assert abs(times[-1] / (len(times) - 1) - 1 / 8.0) < 0.01  # mean gap is 1/rate
    assert arrival_times(3, math.inf, random.Random(0)) == [0.0, 0.0, 0.0]


def test_dataset_reader_reads_a_trace(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"prompt_len": 4, "output_len": 7}\n\n{"prompt_len": 5, "output_len": 2, "prompt": "abc"}\n')
    entries = read_dataset(path)
    assert entries == [TraceEntry(4, 7), TraceEntry(5, 2, "abc")]
    w = build_workload(entries, VOCAB, 0, tokenize=lambda text: [ord(ch) for ch in text])
    assert [r.prompt_len for r in w.requests] == [4, 5] and [r.output_len for r in w.requests] == [7, 2]
    assert w.requests[1].prompt_ids == (97, 98, 99, 97, 98)  # the text's tokens, repeated up to prompt_len
    with pytest.raises(ValueError, match="request 0"):
        check_fits(w, 10)
    check_fits(w, 11)


@pytest.mark.parametrize("line, field", [
    ('{"prompt_len": 4}', "output_len"),
    ('{"prompt_len": "4", "output_len": 3}', "prompt_len"),
    ('{"prompt_len": 4, "output_len": 0}', "output_len"),
    ('{"prompt_len": true, "output_len": 3}', "prompt_len"),
    ('{"prompt_len": 4, "output_len": 3, "prompt": 12}', "prompt"),
    ('{"prompt_len": 4, "output_len": 3', "not valid JSON"),
    ('[4, 3]', "JSON object"),
])
def test_dataset_reader_names_the_bad_line_and_field(tmp_path, line, field):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"prompt_len": 4, "output_len": 3}\n\n' + line + "\n")
    with pytest.raises(DatasetError) as info:
        read_dataset(path)
    assert f"{path}, line 3" in str(info.value) and field in str(info.value)


def test_bench_command_rejects_a_bad_trace_before_starting_anything(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"prompt_len": 4, "output_len": -1}\n')
    assert main(["bench", "--dataset", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 1" in err and "output_len" in err


def test_bench_options():
    parse = build_parser().parse_args
    with pytest.raises(SystemExit):
        parse(["bench", "--prompt-len", "uniform:9,3"])
    presets = ["baseline", "full"]
    assert plan_targets(parse(["bench", "--compare", "baseline,full,transformers"]), presets) == [
        Target("baseline", "tandem", "tandem preset baseline: 2 stages, 2 samplers, cpu"),
        Target("full", "tandem", "tandem preset full: 2 stages, 2 samplers, cpu"),
        Target("transformers", "transformers", "transformers generate, static batches of up to 16, cpu"),
    ]
    assert [t.kind for t in plan_targets(parse(["bench", "--endpoint", "h:1"]), presets)] == ["endpoint"]
    for bad in (["--compare", "full,nope"], ["--compare", "full,full"], ["--endpoint", "h:1", "--compare", "full"],
                ["--stage-addresses", "h:2"]):
        with pytest.raises(ValueError):
            plan_targets(parse(["bench", *bad]), presets)


def test_transformers_batches_group_similar_output_lengths():
    requests = [Request(i, (1,) * (i + 1), out) for i, out in enumerate([3, 9, 5, 9, 1])]
    batches = plan_batches(requests, 2)
    assert [[r.index for r in b] for b in batches] == [[3, 1], [2, 0], [4]]


# --- arithmetic ------------------------------------------------------------------------------


def test_percentiles():
    assert stats.percentile([4, 1, 3, 2], 50) == 2.5
    assert stats.percentile([4, 1, 3, 2], 0) == 1 and stats.percentile([4, 1, 3, 2], 100) == 4
    assert stats.percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert stats.percentile(list(range(101)), 99) == 99
    assert stats.percentile([5.0], 99) == 5.0
    assert stats.percentile([], 50) is None
    with pytest.raises(ValueError):
        stats.percentile([1], 101)


def test_ratios():
    assert stats.ratio(3, 2) == 1.5
    assert stats.ratio(3, 0) is None and stats.ratio(None, 2) is None
    runs = {"full": {"tps": 30.0}, "baseline": {"tps": 10.0}, "transformers": {"tps": 0.0}}
    r = stats.pairwise_ratios(runs, ["tps"])
    assert set(r) == {"full/baseline", "baseline/full", "full/transformers", "transformers/full",
                      "baseline/transformers", "transformers/baseline"}
    assert r["full/baseline"]["tps"] == 3.0 and r["baseline/full"]["tps"] == pytest.approx(1 / 3)
    assert r["full/transformers"]["tps"] is None and r["transformers/full"]["tps"] == 0.0


def test_machine_bound():
    # 4 s of compute spread over 2 cores cannot take less than 2 s: 1000 tokens in 2 s.
    assert stats.machine_bound(1000, 4_000_000_000, 2) == 500.0
    assert stats.machine_bound(1000, 4_000_000_000, 1) == 250.0
    assert stats.machine_bound(1000, 0, 2) is None
    assert stats.time_per_output_token(1.0, 3.0, 5) == 0.5
    assert stats.time_per_output_token(1.0, 3.0, 1) is None


def stage(uptime: int, busy: int, wait: int, compute: int, wire: int, tensor: int, frames: int) -> dict[str, int]:
    return {"uptime_ns": uptime, "busy_ns_total": busy, "wait_ns_total": wait, "compute_ns_total": compute,
            "wire_bytes_out_total": wire, "tensor_bytes_out_total": tensor, "frames_out_total": frames,
            "num_steps_total": frames}


def test_run_figures_from_counters():
    records = [RequestRecord(0, 4, 3, sent_s=0.0, first_token_s=0.5, done_s=1.5, output_tokens=3),
               RequestRecord(1, 6, 3, sent_s=0.5, first_token_s=0.75, done_s=1.75, output_tokens=3),
               RequestRecord(2, 5, 3, sent_s=0.0, done_s=0.1, error="boom")]
    no_samples = {"num_frames_total": 0, "num_rows_total": 0, "sample_ns_total": 0, "wire_bytes_in_total": 0,
                  "tensor_bytes_in_total": 0}
    before = Counters((stage(5_000_000_000, 500_000_000, 0, 0, 0, 0, 0),) * 2, (no_samples,))
    after = Counters((stage(7_000_000_000, 2_000_000_000, 0, 1_000_000_000, 1100, 1000, 10),
                      stage(7_000_000_000, 1_500_000_000, 500_000_000, 800_000_000, 8200, 8000, 10)),
                     ({"num_frames_total": 10, "num_rows_total": 25, "sample_ns_total": 200_000_000,
                       "wire_bytes_in_total": 8200, "tensor_bytes_in_total": 8000},))
    m = Measurement(records, wall_s=2.0, counters=after.minus(before), stage_addresses=("a", "b"),
                    sampler_addresses=("s",))
    f = run_figures("full", m, num_cores=2, kind="tandem")
    assert (f["num_requests"], f["num_failed"], f["output_tokens"], f["prompt_tokens"]) == (3, 1, 6, 10)
    assert f["output_tokens_per_s"] == 3.0 and f["total_tokens_per_s"] == 8.0
    assert f["ttft_p50_s"] == pytest.approx(0.375) and f["tpot_p50_s"] == pytest.approx(0.5)
    assert [s["busy_fraction"] for s in f["stages"]] == [0.75, 0.5]
    assert [s["idle_fraction"] for s in f["stages"]] == [0.25, 0.5]
    assert f["stages"][1]["wait_fraction"] == 0.25
    assert f["sampler_time_per_microbatch_s"] == pytest.approx(0.02)
    assert f["samplers"][0]["rows_per_microbatch"] == 2.5
    assert [(h["hop"], h["wire_to_tensor_ratio"]) for h in f["hops"]] == [("stage0->stage1", 1.1),
                                                                          ("stage1->samplers", 1.025)]
    # 1.0 + 0.8 + 0.2 s of compute on 2 cores: at best 1 s for 6 tokens.
    assert f["compute_s"] == pytest.approx(2.0) and f["machine_bound_output_tokens_per_s"] == pytest.approx(6.0)
    assert f["fraction_of_bound"] == pytest.approx(0.5)
    assert f["errors"] == ["boom"]
    text = format_run(f)
    assert "busy 75.0%" in text and "stage1->samplers" in text and "50.0% of it" in text

    other = run_figures("transformers", Measurement(records[:2], wall_s=1.0), num_cores=2)
    assert "stages" not in other and other["fraction_of_bound"] is None
    ratios = compare([f, other])
    assert ratios["full/transformers"]["output_tokens_per_s"] == 0.5
    assert "2.00x" in format_comparison([f, other], ratios)


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_compares_full_with_transformers(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "tandem.cli", "bench", "--compare", "full,transformers", "--num-requests", "4",
           "--prompt-len", "uniform:4,12", "--output-len", "8", "--stages", "2", "--samplers", "1", "--warmup", "1",
           "--num-blocks", "64", "--log-dir", str(tmp_path), "--json", str(out_json), "--plot", str(out_png)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen: set[int] = set()
    deadline = time.monotonic() + 600
    while proc.poll() is None:  # note every service the command starts, to check they are all stopped
        seen |= set(children_of(proc.pid))
        assert time.monotonic() < deadline, "tandem bench did not finish"
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert len(seen) >= 5  # KV store, sampler, two stages, coordinator
    assert not [pid for pid in seen if alive(pid)], "services left running"

    report = json.loads(out_json.read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["full", "transformers"]
    workload = report["workload"]
    assert workload["num_requests"] == 4 and workload["output_tokens"] == 32
    for run in runs.values():
        assert run["output_tokens_per_s"] > 0 and run["num_failed"] == 0
        assert run["output_tokens"] == workload["output_tokens"]
        assert run["prompt_tokens"] == workload["prompt_tokens"]
        assert [r["output_tokens"] for r in run["requests"]] == [8] * 4
    full = runs["full"]
    assert [h["hop"] for h in full["hops"]] == ["stage0->stage1", "stage1->samplers"]
    assert all(0 <= s["busy_fraction"] <= 1 and s["steps"] > 0 for s in full["stages"])
    assert full["machine_bound_output_tokens_per_s"] > 0 and full["sampler_time_per_microbatch_s"] > 0
    assert report["ratios"]["full/transformers"]["output_tokens_per_s"] == pytest.approx(
        full["output_tokens_per_s"] / runs["transformers"]["output_tokens_per_s"])
    assert report["machine"]["num_cores"] == len(os.sched_getaffinity(0))
    assert "--compare full,transformers" in report["command"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "== full" in stdout and "== transformers" in stdout and "row / column" in stdout
