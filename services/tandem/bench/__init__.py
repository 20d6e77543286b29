"""`tandem bench`: throughput and latency of Tandem on a synthetic or recorded workload.

It starts a deployment of its own (`--preset`, `--stages`, `--samplers`, `--model`), or talks to
a running one (`--endpoint`), sends every request with ignore_eos and max_tokens equal to its
output length (greedy unless `--temperature`; `--top-p`, `--top-k`, `--repetition-penalty`,
`--frequency-penalty` and `--presence-penalty` go on every request when given), all at once
(offline throughput) or as Poisson arrivals at `--request-rate` per second, and reports:

- output and total (prompt + output) tokens per second over the measured window;
- time to first token (TTFT) and time per output token after the first (TPOT), p50 and p99;
- per stage: busy and idle share of the window (from the stages' own counters);
- per sampler: time per micro-batch;
- per hop (stage i -> i+1, last stage -> samplers): bytes on the wire and through shared
  memory against raw tensor bytes;
- the machine bound: output tokens/s if this machine's cores did only the measured forward
  passes and sampling, spread evenly, with no idle time and no overhead; and the measured
  throughput as a share of it. The compute is the services' CPU time where they count it
  (bound_basis "cpu"), else their wall-clock compute time ("wall");
- a physical bound beside it, for every run: the model's FLOPs per second (2 per matmul
  parameter per token, plus attention, from the model's config and the requests' lengths) as a
  fraction of the machine's peak, measured with a few seconds of dense matmul in the run's
  dtype (`--dtype`) on the cores this process may use ("of peak"; tandem.bench.flops);
- for the runs it starts itself: the CPU time of every process over the measured window (each
  service, "bench" for this process, which is the client or, in the transformers run, generate
  itself) as a share of the machine's cores, and the idle rest, from /proc;
- with `--profile DIR`: each of those processes sampled with py-spy over the window, and its
  hottest functions by self and by inclusive samples (tandem.bench.profiling).

A few warm-up requests (fresh prompts, not measured) run first. `--compare baseline,full,transformers`
runs each in turn on the same requests (each preset on a deployment of its own, stopped before
the next; `transformers` is Hugging Face `generate` in static, left-padded batches, see
tandem.bench.hf) and prints every run's ratio to every other. Presets are `full`, `baseline`,
`full-SWITCH` (one technique off) and `baseline+SWITCH` (one on), see tandem.presets. generate
has no frequency or presence penalty, so with either the transformers run is refused.

`--repeats N` measures every run N times, alternating (A,B,C,A,B,C,... on the same requests,
each on a deployment of its own), as throughput moves from run to run on a shared machine; each
run's figures and the ratios are then medians over its repeats, beside the spread of its output
tokens/s (tandem.bench.repeats).

`vllm` and `vllm-ppN` in --compare run the real vLLM on the same requests (same token ids,
lengths with ignore_eos, sampling parameters and seeds): its OpenAI server from a virtualenv of
its own (`make peer-vllm`, or `--peer-python`), one engine on every core, or N pipeline stages
with the cores split between them (tandem.bench.peer). `--peer-endpoint URL` measures any running
OpenAI-compatible server the same way, through streamed /v1/completions with token-id prompts,
output tokens taken from the usage chunk (tandem.bench.openai_api).

Prompt and output lengths (`--prompt-len`, `--output-len`) take N, fixed:N, uniform:LO,HI or
lognormal:MEAN,SIGMA[,MAX]; MEAN is the mean length in tokens, SIGMA the sigma of the
underlying normal, MAX (default 4*MEAN) a clip. `--dataset FILE.jsonl` reads a trace instead:
one object per line with prompt_len, output_len and optionally prompt (text). Details in
tandem.bench.workload.

"""
