"""Every input `make fuzz` ever found failing (tests/fuzz/corpus/<target>/) now passes its target:
it raises nothing but InvalidArgumentError and keeps the target's other promises."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tandem.tools.fuzz_targets import TARGETS

CORPUS = Path(__file__).parent / "fuzz" / "corpus"
INPUTS = sorted(p for p in CORPUS.glob("*/*") if p.is_file())


def test_every_corpus_folder_names_a_target():
    assert {p.parent.name for p in INPUTS} <= TARGETS.keys()


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: f"{p.parent.name}/{p.name[:20]}")
def test_corpus_input_passes(path: Path, caplog):
    caplog.set_level(logging.ERROR)
    target = TARGETS[path.parent.name]
    target.setup()
    target.one_input(path.read_bytes())


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_takes_garbage_and_an_empty_message(name: str):
    TARGETS[name].setup()
    for data in (b"", b"\xff" * 11):
        TARGETS[name].one_input(data)
