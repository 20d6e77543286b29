"""The bundled tiny model: a valid Hugging Face Llama directory that writes Python-ish text."""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402 - a test dependency, always installed
from safetensors import safe_open

from tandem.core.tokenizer import Tokenizer

TINY_DIR = Path(str(importlib.resources.files("tandem.assets") / "tiny"))
MAX_SIZE_BYTES = 20 * 1000 * 1000
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(TINY_DIR)


@pytest.fixture(scope="module")
def model():
    model = transformers.LlamaForCausalLM.from_pretrained(TINY_DIR)
    return model.eval()


def test_files_exist() -> None:
    names = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    for name in names + ["README.md"]:
        assert (TINY_DIR / name).is_file(), name


def test_directory_is_small() -> None:
    num_bytes = sum(p.stat().st_size for p in TINY_DIR.rglob("*") if p.is_file())
    assert num_bytes < MAX_SIZE_BYTES


def test_config_is_llama_with_gqa(tokenizer: Tokenizer) -> None:
    config = json.loads((TINY_DIR / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    num_heads, num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    assert num_kv_heads < num_heads and num_heads % num_kv_heads == 0
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == tokenizer.vocab_size


def test_bos_and_eos_are_endoftext(tokenizer: Tokenizer) -> None:
    eot_id = tokenizer.token_to_id(EOT)
    assert eot_id is not None
    generation = json.loads((TINY_DIR / "generation_config.json").read_text())
    assert generation["bos_token_id"] == eot_id and generation["eos_token_id"] == eot_id
    assert tokenizer.encode("x = 1")[0] == eot_id  # encode prepends BOS, as in training
    assert tokenizer.decode(tokenizer.encode("x = 1")) == "x = 1"


def test_weights_are_float32_and_tied() -> None:
    config = json.loads((TINY_DIR / "config.json").read_text())
    with safe_open(str(TINY_DIR / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"F32"}
        embed = f.get_slice("model.embed_tokens.weight").get_shape()
    assert "lm_head.weight" not in names  # tied to the embeddings
    assert embed == [config["vocab_size"], config["hidden_size"]]
    num_layers = config["num_hidden_layers"]
    assert f"model.layers.{num_layers - 1}.self_attn.k_proj.weight" in names


@pytest.mark.parametrize("prompt", ["def ", "import os\n", "class Foo:\n    def __init__(self"])
def test_greedy_generation_is_python_like(model, tokenizer: Tokenizer, prompt: str) -> None:
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
    new_ids = out[0, len(ids) :].tolist()
    text = tokenizer.decode(new_ids)
    assert len(new_ids) == 20 or new_ids[-1] == tokenizer.token_to_id(EOT)
    assert len(set(new_ids)) >= 3, text  # not one token (or two) repeated
    assert re.search(r"[A-Za-z_][A-Za-z_0-9]{2,}", text), text  # some identifier
    detok = tokenizer.detokenizer(prompt_ids=ids)
    streamed = "".join(detok.add(i) for i in new_ids) + detok.flush()
    assert prompt + streamed == tokenizer.decode(ids + new_ids)


def test_tandem_pipeline_generates_like_transformers(model, tokenizer: Tokenizer) -> None:
    """Tandem's own stages, split in two, load the bundled model and generate what transformers does."""
    from tandem.core.modeling.pipeline import LocalPipeline

    prompt = tokenizer.encode("def parse_args(")
    # BOS and pad share id 0 here, so the attention mask must be given, not inferred from pads.
    ids = torch.tensor([prompt])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    pipe = LocalPipeline(TINY_DIR, num_stages=2, block_size=16, num_blocks=16)
    got = pipe.generate([prompt], 24, stop_token_ids=()).output_ids[0]
    assert got == want
    assert "(" in tokenizer.decode(prompt + got)
