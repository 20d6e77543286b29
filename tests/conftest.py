"""Shared fixtures: small random-weight checkpoints written offline with transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Odd sizes on purpose: nothing here is a power of two.
COMMON = dict(
    vocab_size=331,
    hidden_size=72,
    intermediate_size=100,
    num_hidden_layers=5,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 50000.0}
    return LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=rope))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**{**COMMON, "num_key_value_heads": 3}, tie_word_embeddings=True))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    # A short window so that prompts in the tests cross it.
    return MistralForCausalLM(MistralConfig(**{**COMMON, "num_hidden_layers": 4}, sliding_window=12, head_dim=14))


BUILDERS = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral}


CORPUS = (
    "def main(argv):\n    return parse(argv)\n"
    "Pipeline parallelism splits layers into stages; sampling runs on the CPU. "
    "Café, naïve, 東京, emoji 🙂. The quick brown fox jumps over the lazy dog.\n"
) * 20


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens (id 1 BOS, id 2 EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(path / "tokenizer.json"))


def make_checkpoint(arch: str, path: Path, seed: int = 0, **save_kwargs) -> Path:
    """Write a random-weight checkpoint of `arch` (with a tokenizer) to `path` and return it."""
    torch.manual_seed(seed)
    model = BUILDERS[arch]().eval()
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    write_tokenizer(path, model.config.vocab_size)
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch) -> directory of a cached random checkpoint of that architecture."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_checkpoint(arch, tmp_path_factory.mktemp(arch))
        return made[arch]

    return get


@pytest.fixture(scope="session")
def reference_model():
    """reference_model(path) -> the transformers model loaded from that directory (cached)."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def get(path: Path):
        if path not in loaded:
            loaded[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return loaded[path]

    return get
