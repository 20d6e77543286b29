"""What training the tiny model leaves: the Hugging Face model directory (weights, generation
config, tokenizer files) and its README, which records the flags, the figures and greedy samples.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer
from transformers import GenerationConfig, LlamaForCausalLM

from tandem.tools.train_tiny_corpus import EOT

if TYPE_CHECKING:
    from tandem.tools.train_tiny_model import TrainArgs


def save(model: LlamaForCausalLM, tok: Tokenizer, out: Path, eot_id: int) -> None:
    """config.json, model.safetensors, generation_config.json, tokenizer files."""
    model.generation_config = GenerationConfig(
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "model_max_length": model.config.max_position_embeddings,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


@torch.no_grad()
def greedy_sample(model: LlamaForCausalLM, tok: Tokenizer, prompt: str, num_tokens: int) -> str:
    model.eval()
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.generate(ids, max_new_tokens=num_tokens, do_sample=False)  # type: ignore[misc]
    return prompt + tok.decode(out[0, ids.shape[1] :].tolist())


def format_flags(args: TrainArgs) -> str:
    """The command-line flags that reproduce `args` (all but --out)."""
    flags = []
    for key, value in asdict(args).items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        elif key != "out":
            flags.append(f"--{name} {value}")
    return " ".join(flags)


def readme(args: TrainArgs, figures: dict[str, float], samples: str) -> str:
    return f"""# tiny: the bundled demo model

A {figures['num_params'] / 1e6:.2f}M-parameter Llama (grouped-query attention:
{args.num_heads} query heads, {args.num_kv_heads} KV heads; {args.num_layers} layers, hidden
{args.hidden_size}, tied embeddings, float32 weights) with a {args.vocab_size}-entry ByteLevel
BPE tokenizer. `<|endoftext|>` is BOS and EOS, and `encode` prepends it. It writes
Python-looking text and nothing more: it exists so that `tandem up` and the tests have a real
Hugging Face model directory to serve. As with any ByteLevel BPE, end prompts before a space,
not after it ("def", not "def ").

## How it was trained

    PYTHONPATH=services python -m tandem.tools.train_tiny_model --out services/tandem/assets/tiny

Flags in effect: `{format_flags(args)}`.

- Corpus: Python {platform.python_version()}'s standard library modules, sorted by path (tests,
  data tables, GUI and deprecated packages skipped; each file cut at a line end after
  {args.max_file_chars} characters), every 20th file held out, files separated by
  `<|endoftext|>`: {figures['num_train_tokens']} train tokens, {figures['num_held_out_tokens']}
  held-out tokens.
- AdamW (betas 0.9/0.95, weight decay {args.weight_decay}), peak lr {args.lr}, {args.warmup_steps}
  warmup steps then cosine decay to {args.min_lr_ratio}x, batch {args.batch_size} x {args.seq_len}
  tokens, {args.steps} steps, bfloat16 autocast: {args.bf16_autocast}, seed {args.seed},
  {args.threads} CPU thread(s).
- Wall time: {figures['wall_time_s'] / 60:.1f} minutes.
- Final loss (nats/token, {args.num_eval_windows} fixed windows of {args.seq_len} tokens):
  train {figures['train_loss']:.3f}, held-out {figures['held_out_loss']:.3f}.

## Greedy samples (48 new tokens)

```
{samples}
```
"""
