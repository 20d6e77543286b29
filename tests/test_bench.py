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
from tandem.bench import command, flops, stats
from tandem.bench.command import Target, plan_targets
from tandem.bench.cputime import (
    CpuClock,
    CpuWindow,
    cpu_by_process,
    machine_ticks,
    parse_stat_cpu_ticks,
    process_cpu_s,
    wait_until_quiet,
)
from tandem.bench.flops import Peak
from tandem.bench.hf import generate_options, plan_batches
from tandem.bench.metrics import Counters
from tandem.bench.options import sampling_options
from tandem.bench.profiling import Profiler, find_py_spy, parse_collapsed, summarize
from tandem.bench.repeats import alternate, median_figures, run_label
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
    for bad in (["--prompt-len", "uniform:9,3"], ["--top-p", "0"], ["--top-k", "-2"], ["--frequency-penalty", "3"],
                ["--repetition-penalty", "0"], ["--temperature", "-1"]):
        with pytest.raises(SystemExit):
            parse(["bench", *bad])
    assert plan_targets(parse(["bench", "--compare", "baseline,full,transformers"])) == [
        Target("baseline", "tandem", "tandem preset baseline: 2 stages, 2 samplers, cpu"),
        Target("full", "tandem", "tandem preset full: 2 stages, 2 samplers, cpu"),
        Target("transformers", "transformers", "transformers generate, static batches of up to 16, cpu"),
    ]
    ablations = plan_targets(parse(["bench", "--compare", "full-fast_sampler,baseline+cpu_sampling"]))
    assert [(t.name, t.kind) for t in ablations] == [("full-fast_sampler", "tandem"),
                                                     ("baseline+cpu_sampling", "tandem")]
    one = plan_targets(parse(["bench", "--preset", "full-token_safe_prep"]))
    assert [t.name for t in one] == ["full-token_safe_prep"]
    assert [t.kind for t in plan_targets(parse(["bench", "--endpoint", "h:1"]))] == ["endpoint"]
    for bad in (["--compare", "full,full"], ["--endpoint", "h:1", "--compare", "full"], ["--stage-addresses", "h:2"],
                ["--endpoint", "h:1", "--profile", "out"]):
        with pytest.raises(ValueError):
            plan_targets(parse(["bench", *bad]))


@pytest.mark.parametrize("options, message", [
    (["--compare", "full,nope"], "unknown preset 'nope'"),
    (["--preset", "fast"], "unknown preset 'fast'"),
    (["--compare", "full-turbo"], "unknown switch 'turbo'"),
    (["--preset", "baseline+nope"], "unknown switch 'nope'"),
])
def test_bad_preset_names_get_the_presets_message(options, message):
    with pytest.raises(ValueError, match=message) as info:
        plan_targets(build_parser().parse_args(["bench", *options]))
    assert "transformers" in str(info.value)  # the other kind of run is named too


def test_bench_command_names_a_bad_preset_before_starting_anything(capsys):
    assert main(["bench", "--compare", "full,full-nope"]) == 2
    assert "unknown switch 'nope'" in capsys.readouterr().err


def test_sampling_options_go_on_every_request_and_to_transformers_where_it_has_them():
    parse = build_parser().parse_args
    assert sampling_options(parse(["bench"])) == {"temperature": 0.0}
    args = parse(["bench", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "20", "--repetition-penalty", "1.2",
                  "--presence-penalty", "0.5"])
    assert sampling_options(args) == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.2,
                                      "presence_penalty": 0.5}
    assert generate_options({"temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.2}) == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.2}
    # Unset ones take Tandem's defaults, not the checkpoint's generation config (top_k 50 in many).
    assert generate_options({"temperature": 1.0, "top_k": -1}) == {
        "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": None, "repetition_penalty": 1.0}
    assert generate_options({"temperature": 0.0, "top_p": 0.5}) == {"do_sample": False, "repetition_penalty": 1.0}
    assert generate_options({"temperature": 0.0, "frequency_penalty": 0.0}) == {"do_sample": False,
                                                                                "repetition_penalty": 1.0}


@pytest.mark.parametrize("option", ["--frequency-penalty", "--presence-penalty"])
def test_transformers_run_is_refused_with_a_penalty_generate_lacks(option, capsys):
    parse = build_parser().parse_args
    with pytest.raises(ValueError, match=option):
        plan_targets(parse(["bench", "--compare", "full,transformers", option, "0.5"]))
    with pytest.raises(ValueError, match=option):
        plan_targets(parse(["bench", "--preset", "transformers", option, "-1"]))
    assert len(plan_targets(parse(["bench", "--compare", "baseline,full", option, "0.5"]))) == 2
    assert len(plan_targets(parse(["bench", "--compare", "full,transformers", option, "0"]))) == 2  # 0 is off
    assert main(["bench", "--compare", "full,transformers", option, "0.5"]) == 2
    assert option in capsys.readouterr().err


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


def stage(uptime: int, busy: int, wait: int, compute: int, wire: int, tensor: int, frames: int, compute_cpu: int = 0,
          shm: int = 0) -> dict[str, int]:
    return {"uptime_ns": uptime, "busy_ns_total": busy, "wait_ns_total": wait, "compute_ns_total": compute,
            "compute_cpu_ns_total": compute_cpu, "wire_bytes_out_total": wire, "shm_bytes_out_total": shm,
            "tensor_bytes_out_total": tensor, "frames_out_total": frames, "num_steps_total": frames}


def sampler(frames: int, rows: int, sample: int, wire: int, tensor: int, sample_cpu: int = 0, shm: int = 0
            ) -> dict[str, int]:
    return {"num_frames_total": frames, "num_rows_total": rows, "sample_ns_total": sample,
            "sample_cpu_ns_total": sample_cpu, "wire_bytes_in_total": wire, "shm_bytes_in_total": shm,
            "tensor_bytes_in_total": tensor}


def test_run_figures_from_counters():
    records = [RequestRecord(0, 4, 3, sent_s=0.0, first_token_s=0.5, done_s=1.5, output_tokens=3),
               RequestRecord(1, 6, 3, sent_s=0.5, first_token_s=0.75, done_s=1.75, output_tokens=3),
               RequestRecord(2, 5, 3, sent_s=0.0, done_s=0.1, error="boom")]
    before = Counters((stage(5_000_000_000, 500_000_000, 0, 0, 0, 0, 0),) * 2, (sampler(0, 0, 0, 0, 0),))
    after = Counters((stage(7_000_000_000, 2_000_000_000, 0, 1_000_000_000, 1100, 1000, 10),
                      stage(7_000_000_000, 1_500_000_000, 500_000_000, 800_000_000, 8200, 8000, 10)),
                     (sampler(10, 25, 200_000_000, 8200, 8000),))
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
    # 1.0 + 0.8 + 0.2 s of compute on 2 cores: at best 1 s for 6 tokens. No CPU time counted: wall basis.
    assert f["compute_s"] == pytest.approx(2.0) and f["machine_bound_output_tokens_per_s"] == pytest.approx(6.0)
    assert f["bound_basis"] == "wall" and f["compute_cpu_s"] == 0
    assert f["fraction_of_bound"] == pytest.approx(0.5)
    assert "wall-clock compute time" in format_run(f) and "count no CPU time" in format_run(f)
    assert "cpu_by_process" not in f and "profile" not in f
    assert f["errors"] == ["boom"]
    text = format_run(f)
    assert "busy 75.0%" in text and "stage1->samplers" in text and "50.0% of it" in text

    other = run_figures("transformers", Measurement(records[:2], wall_s=1.0), num_cores=2)
    assert "stages" not in other and other["fraction_of_bound"] is None
    ratios = compare([f, other])
    assert ratios["full/transformers"]["output_tokens_per_s"] == 0.5
    assert "2.00x" in format_comparison([f, other], ratios)


def test_bound_basis_is_cpu_only_when_every_service_that_computed_counted_cpu_time():
    busy = stage(1, 1, 0, 100, 0, 0, 1, compute_cpu=80)
    idle_stage = stage(1, 0, 0, 0, 0, 0, 0)
    assert stats.bound_basis([busy, busy], [sampler(1, 1, 10, 0, 0, sample_cpu=9)]) == "cpu"
    assert stats.bound_basis([busy, idle_stage], [sampler(0, 0, 0, 0, 0)]) == "cpu"  # did nothing: nothing missing
    assert stats.bound_basis([busy, stage(1, 1, 0, 100, 0, 0, 1)], []) == "wall"  # an older stage: no mixing
    assert stats.bound_basis([busy], [sampler(1, 1, 10, 0, 0)]) == "wall"
    assert stats.bound_basis([idle_stage], []) == "wall"


def test_machine_bound_from_cpu_time_and_shared_memory_bytes():
    records = [RequestRecord(0, 4, 4, sent_s=0.0, first_token_s=0.5, done_s=2.0, output_tokens=4)]
    counters = Counters((stage(2_000_000_000, 1_500_000_000, 0, 1_000_000_000, 1100, 1000, 10,
                               compute_cpu=600_000_000),
                         stage(2_000_000_000, 1_500_000_000, 0, 1_200_000_000, 300, 8000, 10,
                               compute_cpu=1_000_000_000, shm=7800)),
                        (sampler(10, 10, 400_000_000, 300, 8000, sample_cpu=400_000_000, shm=7800),))
    m = Measurement(records, wall_s=2.0, counters=counters, stage_addresses=("a", "b"), sampler_addresses=("s",))
    f = run_figures("full", m, num_cores=2)
    # 0.6 + 1.0 + 0.4 s of CPU time on 2 cores: at best 1 s for 4 tokens; wall-clock compute was 2.6 s.
    assert f["bound_basis"] == "cpu"
    assert (f["compute_s"], f["compute_cpu_s"], f["compute_wall_s"]) == pytest.approx((2.0, 2.0, 2.6))
    assert f["machine_bound_output_tokens_per_s"] == pytest.approx(4.0) and f["fraction_of_bound"] == 0.5
    last = f["hops"][1]
    assert (last["wire_bytes"], last["shm_bytes"], last["tensor_bytes"]) == (300, 7800, 8000)
    assert last["wire_to_tensor_ratio"] == pytest.approx(300 / 8000)  # the wire only
    assert f["hops"][0]["shm_bytes"] == 0 and f["samplers"][0]["shm_bytes_in"] == 7800
    text = format_run(f)
    assert "2.00 s of CPU compute time" in text and "wall-clock 2.60 s" in text
    assert "7.62 KiB through shared memory" in text and "through shared memory" not in text.split("stage1->")[0]


# --- repeats ---------------------------------------------------------------------------------


def test_runs_alternate_and_every_repeat_is_labelled():
    parse = build_parser().parse_args
    targets = plan_targets(parse(["bench", "--compare", "baseline,full,transformers", "--repeats", "3"]))
    order = [run_label(t.name, repeat, 3) for repeat, t in alternate(targets, 3)]
    assert order == ["baseline.1", "full.1", "transformers.1", "baseline.2", "full.2", "transformers.2",
                     "baseline.3", "full.3", "transformers.3"]
    assert [(r, t.name) for r, t in alternate(targets[:1], 1)] == [(1, "baseline")]
    assert run_label("full", 1, 1) == "full"  # one repeat: named as without --repeats
    # A running server alone is measured again and again, in turn with a peer.
    same = plan_targets(parse(["bench", "--endpoint", "h:1", "--peer-endpoint", "http://h:2", "--repeats", "2"]))
    assert [(r, t.kind) for r, t in alternate(same, 2)] == [(1, "endpoint"), (1, "openai"), (2, "endpoint"),
                                                            (2, "openai")]
    assert parse(["bench"]).repeats == 1
    for bad in ("0", "-1", "1.5"):
        with pytest.raises(SystemExit):
            parse(["bench", "--repeats", bad])
    with pytest.raises(ValueError):
        alternate(targets, 0)


def repeat_figures(repeat: int, tps: float, ttft: float, bound: float | None = None, failed: int = 0,
                   errors: tuple[str, ...] = (), busy: float = 0.5) -> dict:
    return {"name": "full", "repeat": repeat, "num_requests": 4, "num_failed": failed, "output_tokens": 32,
            "output_tokens_per_s": tps, "ttft_p50_s": ttft, "fraction_of_bound": bound,
            "stages": [{"index": 0, "busy_fraction": busy}], "errors": list(errors)}


def test_median_figures_over_repeats():
    repeats = [repeat_figures(1, 30.0, 0.2, bound=0.3, busy=0.1),
               repeat_figures(2, 10.0, 0.4, failed=1, errors=("boom",), busy=0.2),
               repeat_figures(3, 20.0, 0.1, bound=0.5, busy=0.3)]
    m = median_figures(repeats)
    assert m["output_tokens_per_s"] == 20.0 and m["ttft_p50_s"] == 0.2  # each figure its own median
    assert m["fraction_of_bound"] == pytest.approx(0.4)  # over the repeats that have one
    assert m["median_repeat"] == 3 and m["stages"] == [{"index": 0, "busy_fraction": 0.3}]  # its details
    assert (m["num_requests"], m["output_tokens"]) == (4, 32) and "repeat" not in m
    assert m["num_failed"] == 1 and m["errors"] == ["boom"]  # a failure in any repeat counts
    assert m["output_tokens_per_s_all"] == [30.0, 10.0, 20.0] and m["num_repeats"] == 3
    assert m["repeats"] == repeats
    even = median_figures(repeats[:2])
    assert even["output_tokens_per_s"] == 20.0 and even["ttft_p50_s"] == pytest.approx(0.3)
    assert even["median_repeat"] == 2 and even["stages"][0]["busy_fraction"] == 0.2  # the lower middle one
    one = median_figures(repeats[:1])
    assert {k: v for k, v in one.items() if k not in ("num_repeats", "median_repeat", "output_tokens_per_s_all",
                                                      "repeats")} == {k: v for k, v in repeats[0].items()
                                                                      if k != "repeat"}
    with pytest.raises(ValueError):
        median_figures([])
    assert stats.median([3.0, None, 1.0]) == 2.0 and stats.median([None]) is None


def test_bench_json_and_report_with_repeats(tmp_path, monkeypatch, capsys):
    """Three alternating repeats of two runs, each measurement faked with a known wall time."""
    walls = iter([1.0, 1.0, 4.0, 0.5, 2.0, 3.0])  # baseline 1, full 1, baseline 2, ...
    labels = []

    def fake_measure(target, args, model, workload, dtype, label, sampling):
        labels.append(label)
        records = [RequestRecord(r.index, r.prompt_len, r.output_len, sent_s=0.0, first_token_s=0.1, done_s=0.5,
                                 output_tokens=r.output_len) for r in workload.requests]
        return Measurement(records, wall_s=next(walls))

    monkeypatch.setattr(command, "measure", fake_measure)
    monkeypatch.setattr(flops, "measure_peak", lambda dtype, device: Peak(1e9, dtype, device, 2, 256))
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--compare", "baseline,full", "--repeats", "3", "--num-requests", "2", "--prompt-len", "4",
                 "--output-len", "3", "--warmup", "0", "--json", str(out), "--plot", str(png)]) == 0
    assert labels == ["baseline.1", "full.1", "baseline.2", "full.2", "baseline.3", "full.3"]
    report = json.loads(out.read_text())
    baseline, full = report["runs"]
    assert (baseline["name"], full["name"]) == ("baseline", "full")
    # 6 output tokens a repeat: baseline 6, 1.5, 3 tok/s; full 6, 12, 2.
    assert baseline["output_tokens_per_s_all"] == [6.0, 1.5, 3.0] and baseline["output_tokens_per_s"] == 3.0
    assert full["output_tokens_per_s_all"] == [6.0, 12.0, 2.0] and full["output_tokens_per_s"] == 6.0
    assert full["wall_time_s"] == 1.0 and full["total_tokens_per_s"] == 14.0 and full["median_repeat"] == 1
    assert full["fraction_of_peak"] == pytest.approx(full["model_flops_per_s"] / 1e9)
    assert [r["repeat"] for r in full["repeats"]] == [1, 2, 3]
    assert [r["output_tokens_per_s"] for r in full["repeats"]] == [6.0, 12.0, 2.0]
    assert all(len(r["requests"]) == 2 and "repeats" not in r for r in full["repeats"])
    assert report["ratios"]["full/baseline"]["output_tokens_per_s"] == 2.0  # of the medians
    assert report["options"]["repeats"] == 3
    text = capsys.readouterr().out
    assert "== baseline, repeat 1 of 3 (" in text and "== full, repeat 3 of 3 (" in text
    assert "medians of 3 alternating repeats" in text
    assert "2.0..12.0   6.0, 12.0, 2.0" in text and "2.00x" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- processes -------------------------------------------------------------------------------


def test_proc_stat_cpu_ticks_are_counted_after_the_command_name():
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime ...
    fields = "S 1 1 1 0 -1 4194560 100 0 0 0 250 75 9999 9999 20 0 3 0"
    assert parse_stat_cpu_ticks(f"4242 (python) {fields}") == 325
    # A command name may hold spaces, parentheses and what looks like fields; children's time is not counted.
    assert parse_stat_cpu_ticks(f"4242 (a) 1 2 (b c)) {fields}") == 325
    if os.path.exists("/proc/self/stat"):
        with open("/proc/self/stat") as f:
            assert parse_stat_cpu_ticks(f.read()) >= 0


def test_machine_ticks_leave_idle_and_iowait_out_of_busy():
    #          user nice system idle iowait irq softirq steal guest guest_nice
    line = "cpu  100 5 40 800 50 3 2 0 0 0"
    assert machine_ticks(line) == (150, 1000)
    if os.path.exists("/proc/stat"):
        busy, total = machine_ticks()
        assert 0 <= busy <= total


def test_waiting_for_quiet_cores_stops_at_the_first_quiet_interval_or_gives_up():
    def readings(*busy_shares):  # ticks before and after each interval, 100 ticks an interval
        out, busy = [(0, 0)], 0
        for share in busy_shares:
            busy += round(100 * share)
            out += [(busy, len(out) // 2 * 100 + 100)] * 2
        return iter(out)

    slept = []
    ticks = readings(0.9, 0.5, 0.05, 0.9)
    assert wait_until_quiet(0.15, 10, 1, ticks=lambda: next(ticks), sleep=slept.append) == pytest.approx(0.05)
    assert len(slept) == 3  # two busy intervals, then a quiet one
    slept.clear()
    ticks = readings(*[0.8] * 5)
    assert wait_until_quiet(0.15, 5, 1, ticks=lambda: next(ticks), sleep=slept.append) == pytest.approx(0.8)
    assert len(slept) == 5  # gave up after max_wait_s
    assert wait_until_quiet(ticks=lambda: None, sleep=slept.append) is None  # no /proc/stat: no waiting


def test_cpu_clock_reads_processes_and_marks_the_unreadable():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        clock = CpuClock({"bench": [os.getpid()], "child": [child.pid], "gone": [2**22 + 7]})
        clock.start()
        sum(i * i for i in range(200_000))
        window = clock.stop()
    finally:
        child.communicate(b"")
    assert window.wall_s > 0 and window.cpu_s["gone"] is None
    assert window.cpu_s["bench"] > 0  # the loop above ran on this process
    if os.path.exists(f"/proc/{os.getpid()}/stat"):
        assert window.cpu_s["child"] >= 0
    assert process_cpu_s(child.pid) is None  # exited and reaped


def test_cpu_shares_of_the_machine_and_the_idle_rest():
    shares = cpu_by_process(CpuWindow(wall_s=2.0, cpu_s={"stage-worker-0": 1.0, "bench": 0.5, "coordinator": 2.0}),
                            num_cores=2)
    assert list(shares) == ["coordinator", "stage-worker-0", "bench", "idle"]  # most first, idle last
    assert [s["share"] for s in shares.values()] == [0.5, 0.25, 0.125, 0.125]
    assert shares["idle"]["cpu_s"] == 0.5 and shares["coordinator"]["cpu_s"] == 2.0
    partial = cpu_by_process(CpuWindow(wall_s=2.0, cpu_s={"bench": 1.0, "stage-worker-0": None}), num_cores=4)
    assert partial["bench"]["share"] == 0.125 and partial["stage-worker-0"] == {"cpu_s": None, "share": None}
    assert partial["idle"] == {"cpu_s": None, "share": None}  # unknown when a process is unmeasured


COLLAPSED = """\
<module> (run.py:1);main (run.py:10);step (engine.py:40);forward (model.py:5) 6
<module> (run.py:1);main (run.py:10);step (engine.py:40);sample (sampler.py:7) 3
<module> (run.py:1);main (run.py:10);fib (m.py:2);fib (m.py:2);fib (m.py:2) 1

"""


def test_collapsed_stacks_give_self_and_inclusive_fractions():
    stacks = parse_collapsed(COLLAPSED)
    assert stacks[("<module> (run.py:1)", "main (run.py:10)", "step (engine.py:40)", "forward (model.py:5)")] == 6
    summary = summarize(stacks, top=3)
    assert summary["samples"] == 10
    assert summary["top_self"] == [["forward (model.py:5)", 0.6], ["sample (sampler.py:7)", 0.3],
                                   ["fib (m.py:2)", 0.1]]
    # Inclusive: a recursive function counts once per sample; ties go by name.
    assert summary["top_inclusive"] == [["<module> (run.py:1)", 1.0], ["main (run.py:10)", 1.0],
                                        ["step (engine.py:40)", 0.9]]
    assert summarize(parse_collapsed("")) == {"samples": 0, "top_self": [], "top_inclusive": []}


def test_report_shows_cpu_by_process_and_profiles():
    records = [RequestRecord(0, 4, 2, sent_s=0.0, first_token_s=0.5, done_s=1.0, output_tokens=2)]
    profiles = {"coordinator": {**summarize(parse_collapsed(COLLAPSED)), "file": "p/full-coordinator.txt"},
                "bench": {"error": "py-spy could not profile it: Error: Permission denied"}}
    m = Measurement(records, wall_s=1.0, cpu=CpuWindow(1.0, {"coordinator": 1.5, "bench": None}), profiles=profiles)
    f = run_figures("full", m, num_cores=2)
    assert f["cpu_by_process"]["coordinator"] == {"cpu_s": 1.5, "share": 0.75}
    assert "bench" in f["cpu_note"] and f["profile"] == profiles
    text = format_run(f)
    assert "coordinator" in text and "75.0%" in text and "idle unknown" in text
    assert "60.0%  forward (model.py:5)" in text and "Permission denied" in text


def test_report_says_how_the_deployment_was_laid_out():
    records = [RequestRecord(0, 4, 2, sent_s=0.0, first_token_s=0.5, done_s=1.0, output_tokens=2)]
    m = Measurement(records, wall_s=1.0, layout=["cores: stage 0 on 0, stage 1 on 1"],
                    layout_warnings=["stages 0 and 2 share core 0"])
    f = run_figures("full", m, num_cores=2)
    assert f["layout"] == m.layout and f["layout_warnings"] == m.layout_warnings
    text = format_run(f)
    assert "layout       cores: stage 0 on 0" in text and "WARNING      stages 0 and 2 share core 0" in text
    assert "layout" not in run_figures("transformers", Measurement(records, wall_s=1.0), num_cores=2)


@pytest.mark.slow
@pytest.mark.skipif(find_py_spy() is None, reason="py-spy is not installed")
def test_profiler_records_a_python_process_until_stopped(tmp_path):
    code = "import sys\ndef spin():\n    while True:\n        sum(i * i for i in range(1000))\nspin()"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        profiler = Profiler(find_py_spy(), tmp_path, "run", {"spinner": child.pid, "missing": 2**22 + 7})
        profiler.start()
        time.sleep(0.5)
        profiles = profiler.stop()
    finally:
        child.kill()
        child.wait()
    assert "error" in profiles["missing"] and "run-missing.log" in profiles["missing"]["error"]
    spinner = profiles["spinner"]
    assert "error" not in spinner, spinner
    assert spinner["samples"] > 0 and spinner["file"] == str(tmp_path / "run-spinner.txt")
    assert any(frame.startswith("spin (<string>:") for frame, _ in spinner["top_inclusive"])


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_compares_full_with_transformers(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "tandem.cli", "bench", "--compare", "full,transformers", "--num-requests", "4",
           "--prompt-len", "uniform:4,12", "--output-len", "8", "--stages", "2", "--samplers", "1", "--warmup", "1",
           "--num-blocks", "64", "--log-dir", str(tmp_path), "--json", str(out_json), "--plot", str(out_png),
           "--profile", str(tmp_path / "profile")]
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
    assert full["layout"][0].startswith("cores: stage 0 on ") and "layout" not in runs["transformers"]
    assert [h["hop"] for h in full["hops"]] == ["stage0->stage1", "stage1->samplers"]
    assert all(0 <= s["busy_fraction"] <= 1 and s["steps"] > 0 for s in full["stages"])
    assert full["machine_bound_output_tokens_per_s"] > 0 and full["sampler_time_per_microbatch_s"] > 0
    assert report["ratios"]["full/transformers"]["output_tokens_per_s"] == pytest.approx(
        full["output_tokens_per_s"] / runs["transformers"]["output_tokens_per_s"])
    services = {"kv-store", "cpu-sampler-0", "stage-worker-0", "stage-worker-1", "coordinator"}
    assert set(full["cpu_by_process"]) == services | {"bench", "py-spy", "idle"}
    assert all(full["cpu_by_process"][name]["cpu_s"] > 0 for name in ("stage-worker-0", "stage-worker-1"))
    assert set(full["profile"]) == services | {"bench"}
    assert full["profile"]["stage-worker-1"]["samples"] > 0
    assert (tmp_path / "profile" / "full-stage-worker-1.txt").exists()
    assert runs["transformers"]["cpu_by_process"]["bench"]["cpu_s"] > 0
    assert runs["transformers"]["profile"]["bench"]["samples"] > 0
    assert report["machine"]["num_cores"] == len(os.sched_getaffinity(0))
    assert report["machine"]["peak_flops_per_s"] > 0 and report["machine"]["peak_dtype"] == "float32"
    for run in runs.values():
        assert run["fraction_of_peak"] == pytest.approx(run["model_flops_per_s"] / report["machine"]["peak_flops_per_s"])
    assert "--compare full,transformers" in report["command"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "== full" in stdout and "== transformers" in stdout and "row / column" in stdout


def test_auto_split_balances_the_workloads_decode_step():
    from tandem.bench.measure import typical_decode_step
    from tandem.bench.workload import Request, Workload

    requests = tuple(Request(i, tuple(range(32)), 128) for i in range(64))
    # 64 requests over 2 micro-batches in flight (one per stage): 32 rows; 32 prompt tokens plus half of 128 out.
    assert typical_decode_step(Workload(requests, (), {}), num_stages=2) == (32, 96)
    assert typical_decode_step(Workload(requests, (), {}), num_stages=2, max_in_flight=3) == (22, 96)
    many = tuple(Request(i, (1, 2), 10) for i in range(1000))
    assert typical_decode_step(Workload(many, (), {}), num_stages=1) == (64, 7)


def test_a_shared_prefix_starts_every_measured_prompt_and_no_warmup():
    plain, shared = synthetic(4, prompt="fixed:5"), synthetic(4, prompt="fixed:5", shared_prefix_len=7)
    prefix = shared.requests[0].prompt_ids[:7]
    assert all(r.prompt_ids[:7] == prefix and r.prompt_len == 12 for r in shared.requests)
    assert [r.prompt_ids[7:] for r in shared.requests] == [r.prompt_ids for r in plain.requests]
    assert not any(r.prompt_ids[:7] == prefix for r in shared.warmup)
    assert shared.description["shared_prefix_len"] == 7


def test_the_timeline_keeps_the_window_and_tells_prefill_from_decode(tmp_path):
    from tandem.bench.timeline import plot_timeline, read_timeline

    ms = 1_000_000
    log = tmp_path / "steps-0.jsonl"
    steps = [(0, 5, 64, 0), (10, 30, 96, 0), (30, 50, 0, 8), (50, 70, 16, 4), (120, 130, 0, 8)]
    cpu = [5, 20, 14, 16, 10]  # ms each step's thread ran: 10 of the 60 in the window went to others
    log.write_text("".join(json.dumps({"step": i, "start_ns": a * ms, "end_ns": b * ms, "cpu_ns": c * ms,
                                       "prefill_tokens": p, "decode_rows": d}) + "\n"
                           for i, ((a, b, p, d), c) in enumerate(zip(steps, cpu))))
    t = read_timeline([log], (10 * ms, 110 * ms))  # the first and the last step fall outside
    (stage,) = t["stages"]
    assert [k for *_, k in stage["steps"]] == ["prefill", "decode", "mixed"]
    assert stage["steps"][0][:2] == [0.0, 0.02]
    assert abs(stage["busy"] - 0.6) < 1e-9 and abs(t["window_s"] - 0.1) < 1e-12
    assert stage["kinds"] == {"prefill": 1, "decode": 1, "mixed": 1}
    assert abs(stage["preempted"] - 10 / 60) < 1e-9
    plot_timeline(t, tmp_path / "t.png", "a run")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stages_log_their_steps_for_the_timeline(checkpoint, tmp_path):
    from tandem.client import TandemClient
    from tandem.launcher import Launcher

    launcher = Launcher(workdir=str(tmp_path))
    try:
        endpoint = launcher.up(str(checkpoint("llama")), 2, 1, port=0, step_logs=True)
        with TandemClient(endpoint) as client:
            client.generate(prompt_ids=[5, 6, 7, 8], max_tokens=4, ignore_eos=True, temperature=0.0)
    finally:
        launcher.stop()
    assert len(launcher.step_logs) == 2
    for path in launcher.step_logs:
        steps = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(s["prefill_tokens"], s["decode_rows"]) for s in steps] == [(4, 0), (0, 1), (0, 1), (0, 1)]
        assert all(s["start_ns"] <= s["end_ns"] for s in steps)
        assert all(isinstance(s["cpu_ns"], int) and s["cpu_ns"] > 0 for s in steps)  # its thread's CPU time
