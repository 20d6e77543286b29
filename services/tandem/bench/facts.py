"""What a bench run's figures rest on, found before any run starts: the machine (cores, CPU,
versions), the model (from its directory, or asked of a running deployment), the dtype the runs
use, and the machine's dense-matmul peak in it.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from tandem.bench.measure import log
from tandem.core.modeling.model_config import ModelConfig


def machine_info() -> dict:
    """Where the numbers were taken; the bound uses num_cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"num_cores": cores, "cpu_count": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "torch": version("torch"),
            "transformers": version("transformers"), "tandem": version("tandem")}


def model_facts(args: argparse.Namespace, model: str | None
                ) -> tuple[ModelConfig | None, int, int, Callable[[str], list[int]]]:
    """The model's configuration (None when only a deployment knows it), vocabulary size, longest
    prompt + output, and a tokenizer for trace prompts."""
    if model is None:  # --endpoint without --model: ask the deployment
        from tandem.client import TandemClient

        with TandemClient(args.endpoint, timeout_s=30) as client:
            info = client.server_info()

        def tokenize(text: str) -> list[int]:
            with TandemClient(args.endpoint, timeout_s=30) as c:
                return c.tokenize(text, add_special_tokens=False)
        return None, info.vocab_size, info.max_model_len, tokenize
    from tandem.core.tokenizer import Tokenizer

    config = ModelConfig.from_dir(model)
    tokenizer = functools.cache(lambda: Tokenizer.from_dir(model))  # only traces with prompt text need it
    return config, config.vocab_size, config.max_position_embeddings, \
        lambda text: tokenizer().encode(text, add_special_tokens=False)


def run_dtype(args: argparse.Namespace, config: ModelConfig | None) -> str | None:
    """--dtype resolved for the model on --device ("float32", "bfloat16", "float16"); None without a model."""
    if config is None:
        return None
    import torch

    from tandem.core.modeling.model import resolve_dtype

    return str(resolve_dtype(args.dtype, config, torch.device(args.device))).removeprefix("torch.")


def peak_flops(dtype: str | None, device: str, machine: dict) -> float | None:
    """The machine's dense-matmul peak in `dtype` (tandem.bench.flops), also recorded in `machine`."""
    if dtype is None:
        return None
    from tandem.bench.flops import measure_peak

    peak = measure_peak(dtype, device)
    machine.update({f"peak_{key}": value for key, value in peak.as_dict().items()})
    log(f"peak: {peak.flops_per_s / 1e9:.1f} GFLOP/s, {dtype} matmul ({peak.matrix_size}x{peak.matrix_size}) on "
         f"{peak.device}" + (f", {peak.num_threads} threads" if peak.num_threads else ""))
    return peak.flops_per_s
