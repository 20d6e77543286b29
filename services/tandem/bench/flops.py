"""A physical bound beside the CPU-time one: model FLOPs per second against the machine's measured peak.

Model FLOPs are the arithmetic the model itself needs for a request, whatever the implementation
does on top (padding, recomputation, sampling): 2 FLOPs per parameter of every matmul, that is

- the decoder layers' linear layers (q, k, v, o, gate, up, down) for every token that goes through
  the model: the prompt's, then every output token but the last, fed back to get the next one;
- the LM head once per output token (only the last position's logits are needed);
- attention, 4 x context x heads x head_dim per token and layer (scores q.k and the weighted sum
  of v), the context of the i-th token being i tokens (the sliding window's at most).

Embedding lookups, norms, rotary embeddings and softmax are left out (a few per cent at most).

The peak is measured, not taken from a data sheet: dense matmuls in the run's dtype on square
matrices of a few cache-friendly sizes, through torch.mm and (on CPU) through the oneDNN kernel
the stages' projections use (core/linear.py), whichever is faster, with every core of this
process's affinity mask (or `num_threads` of them; or on the CUDA device), the best rate over
short repeated windows, a few seconds in all, once per dtype and device in a process. "of peak" is a run's
model FLOPs per second as a fraction of it.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass

from tandem.core.modeling.model_config import ModelConfig

CPU_SIZES = (256, 512, 1024)
CUDA_SIZES = (4096, 8192)
PEAK_BUDGET_S = 3.0
WINDOWS_PER_SIZE = 4


def matmul_parameters(config: ModelConfig) -> tuple[int, int]:
    """(parameters of every decoder layer's linear layers together, parameters of the LM head)."""
    c = config
    q_and_o = 2 * c.hidden_size * c.num_attention_heads * c.head_dim
    k_and_v = 2 * c.hidden_size * c.num_key_value_heads * c.head_dim
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (q_and_o + k_and_v + mlp), c.hidden_size * c.vocab_size


def context_sum(num_tokens: int, window: int | None) -> int:
    """Sum over tokens 1..num_tokens of the context each attends to: i, or `window` at most."""
    if window is None or num_tokens <= window:
        return num_tokens * (num_tokens + 1) // 2
    return window * (window + 1) // 2 + (num_tokens - window) * window


def request_flops(config: ModelConfig, prompt_len: int, output_tokens: int) -> int:
    """Model FLOPs of one request that read `prompt_len` tokens and wrote `output_tokens`."""
    if output_tokens < 1:
        return 0
    layers, head = matmul_parameters(config)
    num_tokens = prompt_len + output_tokens - 1
    attention = 4 * config.num_attention_heads * config.head_dim * config.num_hidden_layers
    return 2 * layers * num_tokens + 2 * head * output_tokens + \
        attention * context_sum(num_tokens, config.sliding_window)


@dataclass(frozen=True)
class Peak:
    """The best dense-matmul rate measured on this machine."""

    flops_per_s: float
    dtype: str
    device: str
    num_threads: int  # torch threads on CPU; 0 on CUDA
    matrix_size: int  # side of the square matrices that gave it

    def as_dict(self) -> dict:
        return asdict(self)


@functools.cache
def measure_peak(dtype: str, device: str = "cpu", budget_s: float = PEAK_BUDGET_S, num_threads: int = 0) -> Peak:
    """Dense matmul FLOPs per second in `dtype` ("float32", "bfloat16", "float16") on `device`, with
    `num_threads` torch threads on CPU (0: one per core of the affinity mask)."""
    import torch

    on_cuda = torch.device(device).type == "cuda"
    threads = 0 if on_cuda else num_threads or len(os.sched_getaffinity(0))
    previous = torch.get_num_threads()
    if not on_cuda:
        torch.set_num_threads(threads)
    try:
        sizes = CUDA_SIZES if on_cuda else CPU_SIZES
        rates = {n: _best_rate(n, getattr(torch, dtype), device, budget_s / len(sizes)) for n in sizes}
    finally:
        torch.set_num_threads(previous)
    size = max(rates, key=rates.__getitem__)
    return Peak(rates[size], dtype, str(device), threads, size)


def _best_rate(n: int, dtype, device: str, budget_s: float) -> float:
    """The best FLOPs per second of n x n matmuls over WINDOWS_PER_SIZE windows within `budget_s`."""
    import torch

    from tandem.core.modeling.linear import PackedLinear

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if out.is_cuda else (lambda: None)
    kernels = [lambda: torch.mm(a, b, out=out)]
    if not out.is_cuda:
        linear = torch.nn.Linear(n, n, bias=False, dtype=dtype)
        linear.weight.data = b.t()
        kernels.append(functools.partial(PackedLinear([linear]), a))
    best = 0.0
    for kernel in kernels:
        kernel()  # first call: allocation and kernel selection
        sync()
        window_s, deadline = budget_s / WINDOWS_PER_SIZE / len(kernels), time.perf_counter() + budget_s / len(kernels)
        while time.perf_counter() < deadline:
            calls, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < window_s:
                kernel()
                sync()
                calls += 1
            best = max(best, 2 * n ** 3 * calls / elapsed)
    return best
