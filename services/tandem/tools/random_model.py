"""Write a random-weight Llama checkpoint of any size, for benchmarks that sweep model size.

Weights are random (seeded), so the text is noise, but the compute per token is that of a real
model of these dimensions. The tokenizer is a word-level one with exactly one word per id
(`<|endoftext|>` is id 0), so that every id the model can produce decodes.

    python -m tandem.tools.random_model OUT --hidden 1024 --layers 8 --vocab 32000
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def write(out: Path, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
          max_positions: int, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tandem.cli import bundled_model_dir

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=0,
                         tie_word_embeddings=False, initializer_range=0.02)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    shutil.copy(bundled_model_dir() / "tokenizer_config.json", out / "tokenizer_config.json")
    write_tokenizer(out, vocab)
    return out


def write_tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(out / "tokenizer.json"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="directory to write")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size")
    p.add_argument("--layers", type=int, default=8, help="decoder layers")
    p.add_argument("--heads", type=int, default=16, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    p.add_argument("--intermediate", type=int, default=0, help="MLP size; 0: 2.75 x hidden, rounded to 64")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--max-positions", type=int, default=2048, help="longest sequence")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    a = p.parse_args(argv)
    intermediate = a.intermediate or int(2.75 * a.hidden) // 64 * 64
    path = write(a.out, a.hidden, a.layers, a.heads, a.kv_heads, intermediate, a.vocab, a.max_positions, a.seed)
    params = sum(f.stat().st_size for f in path.glob("*.safetensors")) // 4
    print(f"wrote {path}: ~{params / 1e6:.1f}M parameters (hidden {a.hidden}, {a.layers} layers, vocab {a.vocab})")


if __name__ == "__main__":
    main()
