"""tandem.tools.gpu_bench on CPU: its options, the commands it runs, and summary.md from fake figures."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from tandem.cli import build_parser
from tandem.tools import gpu_bench, gpu_bench_steps
from tandem.tools.gpu_bench import FULL, QUICK, bench_command, forward_command, parse_pytest_counts
from tandem.tools.gpu_bench_steps import Step
from tandem.tools.gpu_bench_summary import format_summary

REPO = Path(__file__).resolve().parents[1]


def _run(name: str, tok_s: float, busy: list[float], failed: int = 0) -> dict:
    return {"name": name, "num_failed": failed, "output_tokens_per_s": tok_s, "ttft_p50_s": 0.0505,
            "tpot_p50_s": 0.01925, "fraction_of_peak": 0.0123, "requests": [{"index": 0}],
            "stages": [{"index": i, "busy_fraction": b} for i, b in enumerate(busy)]}


def _bench(busy: list[float]) -> dict:
    return {"runs": [_run("baseline", 1000.0, busy), _run("full", 1500.0, busy, failed=2)],
            "ratios": {"full/baseline": {"output_tokens_per_s": 1.5}, "baseline/full": {"output_tokens_per_s": 0.67}},
            "workload": {"num_requests": 128, "prompt_tokens": 16384, "output_tokens": 16384},
            "machine": {"num_cores": 16, "cpu_model": "EPYC", "peak_flops_per_s": 7.5e14, "peak_dtype": "bfloat16",
                        "peak_matrix_size": 8192}}


def test_options():
    args = gpu_bench.parse_args(["--out", "o"])
    assert args.out == Path("o").resolve() and args.model is None and args.size is FULL
    assert gpu_bench.model_dir(args) == Path("o").resolve() / "model-h2048-l16"
    quick = gpu_bench.parse_args(["--out", "o", "--quick", "--model", "m", "--budget-s", "100"])
    assert quick.size is QUICK and quick.budget_s == 100 and gpu_bench.model_dir(quick) == Path("m").resolve()
    with pytest.raises(SystemExit):
        gpu_bench.parse_args([])  # --out is required


@pytest.mark.parametrize("size", [FULL, QUICK])
@pytest.mark.parametrize("num_stages", gpu_bench.STAGE_COUNTS)
def test_bench_command_is_a_valid_tandem_bench(size, num_stages, tmp_path):
    cmd = bench_command(tmp_path / "model", num_stages, tmp_path, size)
    assert cmd[1:4] == ["-m", "tandem.cli", "bench"]
    args = build_parser().parse_args(cmd[3:])
    assert (args.device, args.dtype, args.compare, args.stages, args.samplers) == \
        ("cuda", "bfloat16", ["baseline", "full"], num_stages, 4)
    assert args.json == str(tmp_path / f"bench-{num_stages}stages.json")
    opts = {k: int(v) for k, v in zip(size.bench_args[::2], size.bench_args[1::2])}
    need = opts["--num-requests"] * -(-(opts["--prompt-len"] + opts["--output-len"]) // 16)
    assert args.num_blocks >= need  # every request's 16-token KV blocks at once


def test_random_model_takes_the_options(tmp_path):
    from tandem.tools import random_model

    tiny = {"--hidden": "64", "--layers": "2", "--heads": "4", "--kv-heads": "2", "--vocab": "64"}
    assert set(FULL.model_args[::2]) == set(QUICK.model_args[::2]) == set(tiny)
    random_model.main([str(tmp_path), *(x for kv in tiny.items() for x in kv)])
    assert (tmp_path / "config.json").exists() and (tmp_path / "tokenizer.json").exists()


def test_gpu_test_files_are_the_modules_with_gpu_tests():
    files = gpu_bench.gpu_test_files(REPO / "tests")
    assert {"tests/test_codec.py", "tests/test_model_equivalence.py"} <= set(files)
    assert "tests/test_helm.py" not in files and "tests/test_gpu_bench.py" not in files


def test_parse_pytest_counts():
    out = ("..s.F\nFAILED tests/test_codec.py::test_x - AssertionError\n"
           "3 passed, 1 failed, 1 skipped, 90 deselected, 2 errors, 1 warning in 9.12s\n")
    assert parse_pytest_counts(out) == {"passed": 3, "failed": 1, "skipped": 1, "deselected": 90, "error": 2,
                                        "warning": 1}
    assert parse_pytest_counts("=== 2 passed, 150 deselected in 3.01s ===") == {"passed": 2, "deselected": 150}
    assert parse_pytest_counts("150 deselected in 0.50s") == {"deselected": 150}
    assert parse_pytest_counts("Traceback: ImportError") == {}


def test_summary_of_two_benches():
    steps = [Step("imports", "ok", 1.0, "every module imports"), Step("bench, 4 stages", "timed out", 240.4, "a|b")]
    text = format_summary({"GPU": "NVIDIA H200, 140 GiB (1 visible)", "torch": "2.11.0"}, steps,
                          {"passed": 3, "skipped": 1, "deselected": 90}, {2: _bench([0.5, 0.75]), 4: _bench([0.25] * 4)})
    assert "- GPU: NVIDIA H200, 140 GiB (1 visible)" in text and "- torch: 2.11.0" in text
    assert "| bench, 4 stages | timed out | 240 | a/b |" in text  # a | in a detail does not break the table
    assert "3 passed, 0 failed, 1 skipped, 0 errors (90 deselected" in text
    assert "| 2 | 1000.0 | 1500.0 | 1.50x |" in text and "| 4 | 1000.0 | 1500.0 | 1.50x |" in text
    assert "| 2 | baseline | 1000.0 | 50.5 ms | 19.25 ms | 50% / 75% | 1.23% |" in text
    assert "| 4 | full (2 failed) | 1500.0 | 50.5 ms | 19.25 ms | 25% / 25% / 25% / 25% | 1.23% |" in text
    assert "750.0 TFLOP/s (bfloat16 matmul, 8192x8192); host 16 cores" in text


def test_summary_of_the_forward_pass():
    runs = [{"dtype": "bfloat16", "mode": mode, "batch": 128, "context": 256, "step_ms": ms, "tokens_per_s": 128e3 / ms,
             "fraction_of_peak": 0.01} for mode, ms in (("eager", 3.0), ("graphs", 1.2))]
    text = format_summary({}, [], {}, {2: None}, {"runs": runs})
    assert "| bfloat16 | graphs | 128 | 256 | 1.20 ms | 106667 | 1.0% |" in text
    assert "CUDA graphs: 2.50x the eager step." in text
    assert "## Forward pass alone\n\nNo figures" in format_summary({}, [], {}, {2: None})


def test_forward_command_is_a_valid_bench_forward(tmp_path):
    from tandem.tools import bench_forward

    cmd = forward_command(tmp_path / "model", tmp_path)
    assert cmd[1:3] == ["-m", "tandem.tools.bench_forward"]
    args = bench_forward.parse_args(cmd[3:])
    assert (args.device, args.graphs, args.dtype, args.batch) == ("cuda", True, ["bfloat16"], 128)


def test_summary_without_figures():
    only_baseline = {"runs": [{"name": "baseline", "output_tokens_per_s": None, "stages": []}]}
    text = format_summary({}, [Step("gpu tests", "failed", 3.0, "exit status 1")], None, {2: None, 4: only_baseline})
    assert "No counts" in text
    assert "| 4 | - | - | - |" in text and "| 4 | baseline | - | - | - | - | - |" in text
    assert "No bench wrote its figures" in format_summary({}, [], {}, {2: None, 4: None})


def test_run_command_records_failure_and_stops_a_timed_out_group(tmp_path, monkeypatch):
    env = {"PATH": "/usr/bin:/bin"}
    ok = gpu_bench_steps.run_command("ok", [sys.executable, "-c", "print('hi')"], tmp_path / "ok.txt", 60, env)
    assert ok.status == "ok" and "hi" in (tmp_path / "ok.txt").read_text()
    bad = gpu_bench_steps.run_command("bad", [sys.executable, "-c", "raise SystemExit('boom')"], tmp_path / "bad.txt", 60, env)
    assert bad.status == "failed" and "exit status 1" in bad.detail and "boom" in bad.detail
    assert gpu_bench_steps.run_command("late", ["true"], tmp_path / "late.txt", 5, env).status == "skipped"
    monkeypatch.setattr(gpu_bench_steps, "MIN_STEP_S", 0.5)
    pid_file = tmp_path / "grandchild.pid"
    spawn = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    slow = gpu_bench_steps.run_command("slow", [sys.executable, "-c", spawn], tmp_path / "slow.txt", 2, env)
    assert slow.status == "timed out" and slow.seconds < 30
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")
    deadline = time.monotonic() + 5
    while _running(stat) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(stat)  # the bench's services go with its process group


def _running(stat: Path) -> bool:
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


def test_imports_here():
    step = gpu_bench_steps.check_imports()
    assert step.status == "ok", step.detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
def test_refuses_without_cuda(tmp_path, capsys):
    assert gpu_bench.main(["--out", str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
