"""gpu_bench's summary.md: a pure function of what the steps left (the machine's facts, each
step's fate, pytest's counts, the forward pass's and the benches' JSON).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tandem.tools.gpu_bench_steps import Step


def _num(x: float | None, fmt: str = ".1f", scale: float = 1.0, unit: str = "") -> str:
    return "-" if x is None else f"{x * scale:{fmt}}{unit}"


def _run_row(num_stages: int, run: Mapping) -> str:
    busy = " / ".join(_num(s.get("busy_fraction"), ".0f", 100, "%") for s in run.get("stages", [])) or "-"
    failed = f" ({run['num_failed']} failed)" if run.get("num_failed") else ""
    return (f"| {num_stages} | {run['name']}{failed} | {_num(run.get('output_tokens_per_s'))} | "
            f"{_num(run.get('ttft_p50_s'), '.1f', 1e3, ' ms')} | {_num(run.get('tpot_p50_s'), '.2f', 1e3, ' ms')} | "
            f"{busy} | {_num(run.get('fraction_of_peak'), '.2f', 100, '%')} |")


def _bench_lines(benches: Mapping[int, Mapping | None]) -> list[str]:
    done = {n: doc for n, doc in sorted(benches.items()) if doc}
    if not done:
        return ["No bench wrote its figures; see the steps above."]
    lines = ["| stages | baseline tok/s | full tok/s | full/baseline |", "| --- | --- | --- | --- |"]
    for n, doc in done.items():
        by_name = {r["name"]: r for r in doc.get("runs", [])}
        ratio = doc.get("ratios", {}).get("full/baseline", {}).get("output_tokens_per_s")
        lines.append(f"| {n} | {_num(by_name.get('baseline', {}).get('output_tokens_per_s'))} | "
                     f"{_num(by_name.get('full', {}).get('output_tokens_per_s'))} | {_num(ratio, '.2f', unit='x')} |")
    lines += ["", "| stages | run | output tok/s | TTFT p50 | TPOT p50 | stage busy (0 / 1 / ...) | of peak |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [_run_row(n, run) for n, doc in done.items() for run in doc.get("runs", [])]
    first = next(iter(done.values()))
    w, m = first.get("workload", {}), first.get("machine", {})
    lines += ["", f"Workload: {w.get('num_requests', '-')} requests, {w.get('prompt_tokens', '-')} prompt and "
                  f"{w.get('output_tokens', '-')} output tokens, all sent at once, temperature "
                  f"{w.get('temperature', '-')}. Peak: "
                  f"{_num(m.get('peak_flops_per_s'), '.1f', 1e-12, ' TFLOP/s')} ({m.get('peak_dtype', '-')} matmul, "
                  f"{m.get('peak_matrix_size', '-')}x{m.get('peak_matrix_size', '-')}); host {m.get('num_cores', '-')} "
                  f"cores, {m.get('cpu_model') or '-'}."]
    return lines


def _forward_lines(forward: Mapping | None) -> list[str]:
    runs = (forward or {}).get("runs", [])
    if not runs:
        return ["No figures (see the steps above)."]
    lines = ["| dtype | mode | batch | context | step | tok/s | of peak |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['dtype']} | {r['mode']} | {r['batch']} | {r['context']} | {_num(r['step_ms'], '.2f', unit=' ms')} | "
              f"{_num(r['tokens_per_s'], '.0f')} | {_num(r['fraction_of_peak'], '.1f', 100, '%')} |" for r in runs]
    ms = {r["mode"]: r["step_ms"] for r in runs}
    if "eager" in ms and "graphs" in ms:
        lines += ["", f"CUDA graphs: {ms['eager'] / ms['graphs']:.2f}x the eager step."]
    return lines


def format_summary(facts: Mapping[str, str], steps: Sequence[Step], tests: Mapping[str, int] | None,
                   benches: Mapping[int, Mapping | None], forward: Mapping | None = None) -> str:
    """summary.md from the machine's facts, the steps, pytest's counts, the forward pass's JSON and
    each bench's JSON (None: none)."""
    lines = ["# Tandem GPU benchmark", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += ["", "## Steps", "", "| step | status | seconds | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.detail.replace('|', '/')} |" for s in steps]
    lines += ["", "## GPU tests", ""]
    if tests:
        lines.append(", ".join(f"{tests.get(k, 0)} {k}" for k in ("passed", "failed", "skipped")) +
                     f", {tests.get('error', 0)} errors" +
                     f" ({tests.get('deselected', 0)} deselected; details in gpu-tests.txt)")
    else:
        lines.append("No counts (see gpu-tests.txt, if it was written).")
    lines += ["", "## Forward pass alone", "", *_forward_lines(forward)]
    lines += ["", "## Throughput and latency", "", *_bench_lines(benches)]
    return "\n".join(lines) + "\n"
