"""The tiny model's corpus and tokenizer: the Python standard library's own source, every 20th
file held out, files separated by `<|endoftext|>`; a ByteLevel BPE trained on it; the files as
one stream of token ids.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOT = "<|endoftext|>"
# Tests, data tables, GUI and deprecated packages: little of the Python we want it to write.
SKIPPED_DIRS = {
    "site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data",
    "idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip",
}


def read_corpus(max_chars: int, max_file_chars: int) -> tuple[list[str], list[str]]:
    """Stdlib modules, sorted by path, each cut at a line end to `max_file_chars`, until
    `max_chars` in all; returns (train, held-out) texts, every 20th file held out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    num_chars = 0
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in SKIPPED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):  # build settings of this machine
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > max_file_chars:
            text = text[: text.rfind("\n", 0, max_file_chars) + 1]
        if num_chars + len(text) > max_chars:
            break
        texts.append(text)
        num_chars += len(text)
    train = [t for i, t in enumerate(texts) if i % 20 != 19]
    held_out = [t for i, t in enumerate(texts) if i % 20 == 19]
    return train, held_out


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """ByteLevel BPE; `encode` prepends `<|endoftext|>` as BOS (files were separated by it)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eot_id = eot_id_of(tok)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, eot_id)]
    )
    return tok


def eot_id_of(tok: Tokenizer) -> int:
    eot_id = tok.token_to_id(EOT)
    assert eot_id is not None, f"{EOT} is a special token of every tokenizer trained here"
    return eot_id


def tokenize_files(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """One long id stream: EOT file EOT file ... EOT."""
    eot_id = eot_id_of(tok)
    ids = [eot_id]
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.long)
