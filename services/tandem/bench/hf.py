"""The same workload through Hugging Face transformers' `generate`, in this process.

This is what serving the checkpoint without Tandem looks like: static batches. Requests are
sorted by output length (longest first) and cut into batches of `batch_size`, so that a batch
holds requests of similar length. Each batch is left-padded with an attention mask and
generated with max_new_tokens equal to its longest request; a request counts only the tokens
it asked for, so the steps its shorter neighbours wait out are the real cost of static batching.

The run is offline: every request arrives at the start, so a request in a later batch has the
earlier batches in its time to first token, as it would queued behind them on a server.
Arrival times and `max_concurrency` do not apply. Token times come from a streamer that
timestamps every decoding step.

Sampling follows the bench's options where generate has the same parameter (temperature,
top_p, top_k, repetition_penalty; greedy at temperature 0). generate has no frequency or
presence penalty, so a run that asks for one is refused rather than measured on different
sampling. (generate's repetition penalty also sees the left padding as tokens of the prompt.)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext

from tandem.bench.profiling import ProcessWatch
from tandem.bench.runner import Measurement, RequestRecord
from tandem.bench.workload import Request

UNSUPPORTED = ("frequency_penalty", "presence_penalty")  # sampling parameters generate does not have


def plan_batches(requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
    """Requests sorted by output then prompt length, longest first, in batches of `batch_size`."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ordered = sorted(requests, key=lambda r: (r.output_len, r.prompt_len), reverse=True)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


class StepClock:
    """A transformers streamer that records when each decoding step's tokens came out.

    transformers calls `put` once with the prompt, then once per step with that step's tokens;
    times[k] is therefore when output token k (1-based) of every row was ready.
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: object) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_model(model_dir: str, device: str, dtype: str = "auto"):
    """The checkpoint in the dtype Tandem's stages would use on `device` given `dtype` (auto: float32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tandem.core.modeling.model import resolve_dtype
    from tandem.core.modeling.model_config import ModelConfig

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch_dtype = resolve_dtype(dtype, ModelConfig.from_dir(model_dir), torch.device(device))
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()


def generate_options(sampling: Mapping[str, float | int]) -> dict:
    """generate's sampling arguments for the client SDK's sampling parameters (unset ones at
    Tandem's defaults, never the checkpoint's generation config); ValueError naming the option
    for a parameter generate does not have."""
    unsupported = [f"--{name.replace('_', '-')}" for name in UNSUPPORTED if sampling.get(name)]
    if unsupported:
        raise ValueError(f"{' and '.join(unsupported)}: transformers generate has no such penalty, so the "
                         f"transformers run would sample differently; leave transformers out of --compare")
    options = {"do_sample": False, "repetition_penalty": sampling.get("repetition_penalty", 1.0)}
    if sampling.get("temperature", 0.0) > 0:
        top_k = sampling.get("top_k", 0)
        options.update(do_sample=True, temperature=sampling["temperature"], top_p=sampling.get("top_p", 1.0),
                       top_k=top_k if top_k > 0 else None)
    return options


def measure_transformers(model_dir: str, requests: Sequence[Request], warmup: Sequence[Request], *,
                         sampling: Mapping[str, float | int], seed: int = 0, device: str = "cpu",
                         batch_size: int = 16, dtype: str = "auto", label: str = "transformers",
                         watch: ProcessWatch | None = None) -> Measurement:
    """The workload through generate; `watch` covers the measured batches (not loading, not warm-up)."""
    import torch
    from tqdm import tqdm

    options = generate_options(sampling)
    model = load_model(model_dir, device, dtype)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    torch.manual_seed(seed)
    if warmup:
        _generate(model, list(warmup), pad_id, options, device)
    records = {r.index: RequestRecord(r.index, r.prompt_len, r.output_len) for r in requests}
    bar = tqdm(total=len(requests), desc=label, unit="req", file=sys.stderr, dynamic_ncols=True, leave=False)
    with watch or nullcontext():
        start = time.perf_counter()
        for batch in plan_batches(requests, batch_size):
            generated, times = _generate(model, batch, pad_id, options, device)
            for request in batch:
                record = records[request.index]
                record.output_tokens = min(request.output_len, generated)
                record.first_token_s = times[1] - start
                record.done_s = times[record.output_tokens] - start
            bar.update(len(batch))
        wall_s = time.perf_counter() - start
    bar.close()
    return Measurement([records[r.index] for r in requests], wall_s, cpu=watch.cpu if watch else None,
                       profiles=watch.profiles if watch else None)


def _generate(model, batch: Sequence[Request], pad_id: int, options: Mapping, device: str
              ) -> tuple[int, list[float]]:
    """Generate one left-padded batch; return the number of new tokens and the step times."""
    import torch

    width = max(r.prompt_len for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        ids[row, width - r.prompt_len:] = torch.tensor(r.prompt_ids)
        mask[row, width - r.prompt_len:] = 1
    clock = StepClock()
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max(r.output_len for r in batch), eos_token_id=None,
                             pad_token_id=pad_id, streamer=clock, **options)
    return out.shape[1] - width, clock.times
