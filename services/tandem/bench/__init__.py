"""`tandem bench`: throughput and latency of Tandem on a synthetic or recorded workload.

It starts a deployment of its own (`--preset`, `--stages`, `--samplers`, `--model`), or talks to
a running one (`--endpoint`), sends every request with ignore_eos and max_tokens equal to its
output length (greedy unless `--temperature`), all at once (offline throughput) or as Poisson
arrivals at `--request-rate` per second, and reports:

- output and total (prompt + output) tokens per second over the measured window;
- time to first token (TTFT) and time per output token after the first (TPOT), p50 and p99;
- per stage: busy and idle share of the window (from the stages' own counters);
- per sampler: time per micro-batch;
- per hop (stage i -> i+1, last stage -> samplers): bytes on the wire against raw tensor bytes;
- the machine bound: output tokens/s if this machine's cores did only the measured forward
  passes and sampling, spread evenly, with no idle time and no overhead; and the measured
  throughput as a share of it.

A few warm-up requests (fresh prompts, not measured) run first. `--compare baseline,full,transformers`
runs each in turn on the same requests (each preset on a deployment of its own, stopped before
the next; `transformers` is Hugging Face `generate` in static, left-padded batches, see
tandem.bench.hf) and prints every run's ratio to every other.

Prompt and output lengths (`--prompt-len`, `--output-len`) take N, fixed:N, uniform:LO,HI or
lognormal:MEAN,SIGMA[,MAX]; MEAN is the mean length in tokens, SIGMA the sigma of the
underlying normal, MAX (default 4*MEAN) a clip. `--dataset FILE.jsonl` reads a trace instead:
one object per line with prompt_len, output_len and optionally prompt (text). Details in
tandem.bench.workload.

"""
