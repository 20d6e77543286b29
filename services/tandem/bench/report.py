"""Figures of a run (a flat dict, what --json writes) and their text rendering.

`run_figures` turns a Measurement into numbers; the `format_*` functions only print them, so
what is measured and how it looks stay apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tandem.bench import stats
from tandem.bench.cputime import IDLE, cpu_by_process
from tandem.bench.flops import request_flops
from tandem.bench.runner import Measurement, RequestRecord
from tandem.core.modeling.model_config import ModelConfig

# The figures compared between runs, in the order the table shows them.
RATIO_KEYS = ("output_tokens_per_s", "total_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")


def request_figures(r: RequestRecord) -> dict:
    """One request's latencies (seconds; None where they do not apply)."""
    ok = r.error is None and r.first_token_s is not None  # without streaming no first token is seen
    return {
        "index": r.index, "prompt_len": r.prompt_len, "output_len": r.output_len, "output_tokens": r.output_tokens,
        "ttft_s": r.first_token_s - r.sent_s if ok else None,
        "tpot_s": stats.time_per_output_token(r.first_token_s, r.done_s, r.output_tokens) if ok else None,
        "e2e_s": r.done_s - r.sent_s if r.error is None and r.done_s is not None else None,
        "error": r.error,
    }


def latency_figures(requests: Sequence[Mapping]) -> dict:
    """p50, p99 and mean of time to first token, time per output token and end-to-end latency."""
    out = {}
    for key in ("ttft", "tpot", "e2e"):
        values = [r[f"{key}_s"] for r in requests if r[f"{key}_s"] is not None]
        out[f"{key}_p50_s"] = stats.percentile(values, 50)
        out[f"{key}_p99_s"] = stats.percentile(values, 99)
        out[f"{key}_mean_s"] = sum(values) / len(values) if values else None
    return out


def service_figures(m: Measurement, output_tokens: int, num_cores: int) -> dict:
    """Stage shares, sampler time per micro-batch, bytes per hop and the machine bound."""
    if m.counters is None:
        return {}
    stages, samplers = m.counters.stages, m.counters.samplers
    out: dict = {"stages": [], "samplers": [], "hops": []}
    for i, (delta, address) in enumerate(zip(stages, m.stage_addresses)):
        out["stages"].append({"index": i, "address": address, "steps": delta["num_steps_total"],
                              **stats.stage_fractions(delta)})
        to = f"stage{i + 1}" if i + 1 < len(stages) else "samplers"
        out["hops"].append({"hop": f"stage{i}->{to}", **stats.hop_figures(
            delta["wire_bytes_out_total"], delta["tensor_bytes_out_total"], delta["frames_out_total"],
            delta["shm_bytes_out_total"])})
    for i, (delta, address) in enumerate(zip(samplers, m.sampler_addresses)):
        out["samplers"].append({
            "index": i, "address": address, "frames": delta["num_frames_total"], "rows": delta["num_rows_total"],
            "time_per_microbatch_s": stats.ratio(delta["sample_ns_total"] / 1e9, delta["num_frames_total"]),
            "rows_per_microbatch": stats.ratio(delta["num_rows_total"], delta["num_frames_total"]),
            "wire_bytes_in": delta["wire_bytes_in_total"], "shm_bytes_in": delta["shm_bytes_in_total"],
            "tensor_bytes_in": delta["tensor_bytes_in_total"],
        })
    sample_ns = sum(d["sample_ns_total"] for d in samplers)
    out["sampler_time_per_microbatch_s"] = stats.ratio(sample_ns / 1e9, sum(d["num_frames_total"] for d in samplers))
    if stages:  # without the stages the bound would miss most of the compute
        wall_ns = sum(d["compute_ns_total"] for d in stages) + sample_ns
        cpu_ns = sum(d["compute_cpu_ns_total"] for d in stages) + sum(d["sample_cpu_ns_total"] for d in samplers)
        basis = stats.bound_basis(stages, samplers)
        compute_ns = cpu_ns if basis == "cpu" else wall_ns
        out.update(bound_basis=basis, compute_s=compute_ns / 1e9, compute_wall_s=wall_ns / 1e9,
                   compute_cpu_s=cpu_ns / 1e9)
        out["machine_bound_output_tokens_per_s"] = stats.machine_bound(output_tokens, compute_ns, num_cores)
    return out


def process_figures(m: Measurement, num_cores: int) -> dict:
    """CPU time by process over the window and, with --profile, each process's hottest frames."""
    out: dict = {}
    if m.cpu is not None:
        out["cpu_by_process"] = cpu_by_process(m.cpu, num_cores)
        unmeasured = sorted(name for name, cpu in m.cpu.cpu_s.items() if cpu is None)
        if unmeasured:
            out["cpu_note"] = f"CPU time of {', '.join(unmeasured)} could not be read (no /proc, or it exited)"
    if m.profiles is not None:
        out["profile"] = m.profiles
    if m.layout or m.layout_warnings:
        out.update(layout=m.layout, layout_warnings=m.layout_warnings)
    return out


def run_figures(name: str, m: Measurement, num_cores: int, *, model: ModelConfig | None = None,
                peak_flops_per_s: float | None = None, **about) -> dict:
    """Every figure of one run, flat where it is a single number; `about` says what ran. With the
    `model`'s configuration, its FLOPs per second, and with the machine's peak, the fraction of it."""
    requests = [request_figures(r) for r in m.records]
    done = [r for r in m.records if r.error is None]
    prompt_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    fig = {
        "name": name, **about,
        "num_requests": len(m.records), "num_failed": len(m.records) - len(done),
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "wall_time_s": m.wall_s,
        "output_tokens_per_s": stats.ratio(output_tokens, m.wall_s),
        "total_tokens_per_s": stats.ratio(prompt_tokens + output_tokens, m.wall_s),
        "requests_per_s": stats.ratio(len(done), m.wall_s),
        **latency_figures(requests),
        "num_cores": num_cores,
        **service_figures(m, output_tokens, num_cores),
        **process_figures(m, num_cores),
    }
    fig["fraction_of_bound"] = stats.ratio(fig["output_tokens_per_s"], fig.get("machine_bound_output_tokens_per_s"))
    flops = sum(request_flops(model, r.prompt_len, r.output_tokens) for r in done) if model else None
    fig["model_flops_per_s"] = stats.ratio(flops, m.wall_s)
    fig["fraction_of_peak"] = stats.ratio(fig["model_flops_per_s"], peak_flops_per_s)
    if m.prefix_cache is not None:
        queried, hit = m.prefix_cache
        fig.update(prefix_cache_queries=queried, prefix_cache_hits=hit, prefix_cache_hit_rate=stats.ratio(hit, queried))
    fig["errors"] = sorted({r.error for r in m.records if r.error})[:5]
    fig["requests"] = requests
    return fig


def compare(runs: Sequence[Mapping]) -> dict[str, dict]:
    """Ratios of every run to every other on the headline figures ("full/baseline": {...})."""
    return stats.pairwise_ratios({r["name"]: r for r in runs}, RATIO_KEYS)


# --- text ---------------------------------------------------------------------------------


def _num(x: float | None, fmt: str = ".1f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{unit}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_run(f: Mapping, num_repeats: int = 1) -> str:
    """A run's figures as an indented block of text; with several repeats, its title names f["repeat"]."""
    title = f["name"] + (f", repeat {f['repeat']} of {num_repeats}" if num_repeats > 1 else "")
    lines = [f"== {title} ({f.get('description', f.get('kind', ''))}) ==",
             (f"  requests     {f['num_requests'] - f['num_failed']} done, {f['num_failed']} failed; "
              f"{f['prompt_tokens']} prompt + {f['output_tokens']} output tokens in {f['wall_time_s']:.2f} s"),
             (f"  throughput   {_num(f['output_tokens_per_s'])} output tok/s, {_num(f['total_tokens_per_s'])} "
              f"total tok/s, {_num(f['requests_per_s'], '.2f')} req/s"),
             f"  TTFT         p50 {_ms(f['ttft_p50_s'])}, p99 {_ms(f['ttft_p99_s'])}",
             f"  TPOT         p50 {_ms(f['tpot_p50_s'])}, p99 {_ms(f['tpot_p99_s'])}",
             f"  end-to-end   p50 {_ms(f['e2e_p50_s'])}, p99 {_ms(f['e2e_p99_s'])}"]
    if f.get("prefix_cache_queries") is not None:
        lines.append(f"  prefix cache {_pct(f['prefix_cache_hit_rate'])} of {f['prefix_cache_queries']} prompt tokens "
                     "looked up were cached (warm-up included)")
    lines += [f"  layout       {line}" for line in f.get("layout", [])]
    lines += [f"  WARNING      {line}" for line in f.get("layout_warnings", [])]
    for s in f.get("stages", []):
        lines.append(f"  stage {s['index']}      busy {_pct(s['busy_fraction'])}, idle {_pct(s['idle_fraction'])} "
                     f"(waiting for activations {_pct(s['wait_fraction'])}, forward pass "
                     f"{_pct(s['compute_fraction'])}); {s['steps']} steps over {s['window_s']:.2f} s")
    for s in f.get("samplers", []):
        lines.append(f"  sampler {s['index']}    {_ms(s['time_per_microbatch_s'])} per micro-batch "
                     f"({s['frames']} micro-batches, {_num(s['rows_per_microbatch'])} rows each)")
    for h in f.get("hops", []):
        shm = f", {_bytes(h['shm_bytes'])} through shared memory" if h["shm_bytes"] else ""
        lines.append(f"  hop {h['hop']:<17} {_bytes(h['wire_bytes'])} on the wire{shm}, {_bytes(h['tensor_bytes'])} "
                     f"of tensors: wire/tensor {_num(h['wire_to_tensor_ratio'], '.3f')} ({h['frames']} frames)")
    if f.get("machine_bound_output_tokens_per_s") is not None:
        if f["bound_basis"] == "cpu":
            basis, other = "CPU", f"wall-clock {f['compute_wall_s']:.2f} s"
        else:
            basis = "wall-clock"
            other = f"CPU time {f['compute_cpu_s']:.2f} s, not counted by every service" if f["compute_cpu_s"] \
                else "the services count no CPU time"
        lines.append(f"  machine bound {_num(f['machine_bound_output_tokens_per_s'])} output tok/s "
                     f"({f['compute_s']:.2f} s of {basis} compute time on {f['num_cores']} cores; {other}); "
                     f"measured is {_pct(f['fraction_of_bound'])} of it")
    if f.get("model_flops_per_s") is not None:
        of_peak = "" if f.get("fraction_of_peak") is None else \
            f", {_pct(f['fraction_of_peak'])} of the machine's matmul peak" + \
            (" (above it: other load on the cores slowed the peak's measurement)" if f["fraction_of_peak"] > 1 else "")
        lines.append(f"  model FLOPs  {f['model_flops_per_s'] / 1e9:.2f} GFLOP/s{of_peak}")
    lines += _format_cpu(f) + _format_profiles(f)
    for error in f.get("errors", []):
        lines.append(f"  error        {error}")
    return "\n".join(lines)


def _format_cpu(f: Mapping) -> list[str]:
    if "cpu_by_process" not in f:
        return []
    lines = [f"  CPU time over the window, share of {f['num_cores']} cores:"]
    for name, c in f["cpu_by_process"].items():
        lines.append(f"    {name:<20} {_num(c['cpu_s'], '.2f', ' s'):>10} {_pct(c['share']):>7}")
    if f.get("cpu_note"):
        lines.append(f"    ({f['cpu_note']}; {IDLE} unknown)")
    return lines


def _format_profiles(f: Mapping) -> list[str]:
    lines = []
    for name, p in f.get("profile", {}).items():
        if "error" in p:
            lines.append(f"  profile {name}: {p['error']}")
            continue
        lines.append(f"  profile {name}: {p['samples']} samples ({p['file']})")
        for title, key in (("self", "top_self"), ("inclusive", "top_inclusive")):
            lines += [f"    {title:<9} {_pct(share):>6}  {frame}" for frame, share in p[key]]
    return lines


def format_comparison(runs: Sequence[Mapping], ratios: Mapping[str, Mapping]) -> str:
    """One row per run, then the output tokens/s ratio of every run (row) to every other (column); with
    repeats (tandem.bench.repeats), the rows and ratios are of medians, and the spread of each run follows."""
    names = [r["name"] for r in runs]
    width = max(12, *(len(n) for n in names)) + 2
    head = ("output tok/s", "total tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "bound", "of bound",
            "of peak")
    lines = ["run".ljust(width) + "".join(h.rjust(14) for h in head)]
    for r in runs:
        cells = (_num(r["output_tokens_per_s"]), _num(r["total_tokens_per_s"]), _ms(r["ttft_p50_s"]),
                 _ms(r["ttft_p99_s"]), _ms(r["tpot_p50_s"]), _ms(r["tpot_p99_s"]),
                 _num(r.get("machine_bound_output_tokens_per_s")), _pct(r.get("fraction_of_bound")),
                 _pct(r.get("fraction_of_peak")))
        lines.append(r["name"].ljust(width) + "".join(c.rjust(14) for c in cells))
    lines += _format_spread(runs, width)
    if len(runs) > 1:
        lines += ["", "output tokens/s, row / column:", " " * width + "".join(n.rjust(width) for n in names)]
        for a in names:
            ratio_cells = ("-" if a == b else _num(ratios[f"{a}/{b}"]["output_tokens_per_s"], ".2f", "x") for b in names)
            lines.append(a.ljust(width) + "".join(c.rjust(width) for c in ratio_cells))
    return "\n".join(lines)


def _format_spread(runs: Sequence[Mapping], width: int) -> list[str]:
    """Min..max and every repeat's output tokens/s, for runs measured more than once."""
    repeated = [r for r in runs if r.get("num_repeats", 1) > 1]
    if not repeated:
        return []
    lines = ["", f"medians of {repeated[0]['num_repeats']} alternating repeats; output tok/s min..max, then each "
                 "repeat's in order:"]
    for r in repeated:
        values = [v for v in r["output_tokens_per_s_all"] if v is not None]
        spread = f"{_num(min(values))}..{_num(max(values))}" if values else "-"
        each = ", ".join(_num(v) for v in r["output_tokens_per_s_all"])
        lines.append(r["name"].ljust(width) + spread.rjust(14) + f"   {each}")
    return lines
