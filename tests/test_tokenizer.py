"""Tokenizer and IncrementalDetokenizer, on tokenizers trained here, offline, in the test.

Three kinds: ByteLevel BPE (GPT-2 style), BPE with a Metaspace pre-tokenizer and byte
fallback (Llama-2 style decoder: Replace, ByteFallback, Fuse, Strip) and Unigram with a
Metaspace decoder (T5 style). The incremental detokenizer must give, token by token, the
same text as one full decode.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tandem.core.errors import InvalidArgumentError, ModelLoadError
from tandem.core.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, Tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, the café serves crème brûlée and a smörgåsbord; naïve façade.",
    "Ça coûte très cher à Zürich, señor. Größe über alles?",
    "日本語のテキストです。東京は大きな都市です。",
    "中文文本也很重要。我们喜欢学习新的语言。",
    "emoji time 😀 🎉 👍 and a rocket 🚀 to the moon 🌕!",
    "def add(x, y):\n    return x + y  # two  spaces\n",
    "Numbers 12345 and symbols: @#$%^&*() [] {} <> | \\ / ~",
]
# Characters the trainers never see: they reach the byte-level / byte-fallback paths.
RARE_TEXT = "rare ŝĝĥ 龍鳳 🦀🦉 Ω≈ç end"
SPECIALS = ["<unk>", "<s>", "</s>"]


def make_corpus() -> list[str]:
    rng = random.Random(0)
    corpus = []
    for _ in range(300):
        words = " ".join(SENTENCES).split(" ")
        rng.shuffle(words)
        corpus.append(" ".join(words[: rng.randint(5, 30)]))
    return corpus + SENTENCES * 10


def train_byte_level(corpus: list[str]) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def train_metaspace_bpe(corpus: list[str]) -> HFTokenizer:
    """Llama-2 style: Metaspace pieces, bytes <0x00>..<0xFF> for characters not in the vocab."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, limit_alphabet=60, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    first_byte_id = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = first_byte_id + byte
    spec["model"]["byte_fallback"] = True
    return HFTokenizer.from_str(json.dumps(spec))


def train_metaspace_unigram(corpus: list[str]) -> HFTokenizer:
    tok = HFTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


TRAINERS = {
    "byte_level": train_byte_level,
    "metaspace_bpe": train_metaspace_bpe,
    "metaspace_unigram": train_metaspace_unigram,
}


@pytest.fixture(scope="module", params=sorted(TRAINERS))
def kind_and_tokenizer(request, tmp_path_factory) -> tuple[str, Tokenizer]:
    model_dir = tmp_path_factory.mktemp(request.param)
    TRAINERS[request.param](make_corpus()).save(str(model_dir / "tokenizer.json"))
    return request.param, Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def tokenizer(kind_and_tokenizer) -> Tokenizer:
    return kind_and_tokenizer[1]


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids] + [detok.flush()]


def byte_token_ids(tok: Tokenizer) -> set[int]:
    return {i for i in range(tok.vocab_size) if tok.id_to_token(i).startswith("<0x")}


def random_sequences(kind: str, tok: Tokenizer, num: int, seed: int) -> list[list[int]]:
    """Random ids (any id; for byte fallback, no lone byte tokens) mixed with text pieces."""
    rng = random.Random(seed)
    texts = SENTENCES + [RARE_TEXT]
    excluded = byte_token_ids(tok) if kind == "metaspace_bpe" else set()
    pool = [i for i in range(tok.vocab_size) if i not in excluded]
    sequences = []
    for _ in range(num):
        ids: list[int] = []
        while len(ids) < rng.randint(1, 60):
            if rng.random() < 0.5:
                ids.extend(rng.choices(pool, k=rng.randint(1, 6)))
            else:
                piece = tok.encode(rng.choice(texts), add_special_tokens=False)
                if kind != "metaspace_bpe":  # cut anywhere, even inside a character
                    start = rng.randrange(len(piece))
                    piece = piece[start : start + rng.randint(1, 12)]
                ids.extend(piece)
        sequences.append(ids)
    return sequences


def test_from_dir_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value)


def test_from_dir_unparsable_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{ this is not json")
    with pytest.raises(ModelLoadError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value)


def test_round_trip(tokenizer: Tokenizer) -> None:
    for text in SENTENCES:
        ids = tokenizer.encode(text)
        assert ids and all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text


@pytest.fixture(scope="module", params=["byte_level", "metaspace_bpe"])
def byte_fallback_tokenizer(request, tmp_path_factory) -> Tokenizer:
    """The kinds that spell unseen characters as bytes (the unigram one maps them to <unk>)."""
    model_dir = tmp_path_factory.mktemp(f"{request.param}-bytes")
    TRAINERS[request.param](make_corpus()).save(str(model_dir / "tokenizer.json"))
    return Tokenizer.from_dir(model_dir)


def test_round_trip_of_unseen_characters(byte_fallback_tokenizer) -> None:
    tok = byte_fallback_tokenizer
    assert tok.decode(tok.encode(RARE_TEXT)) == RARE_TEXT


def test_vocab_lookups(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size >= 100
    for token_id in range(0, tokenizer.vocab_size, 7):
        assert tokenizer.token_to_id(tokenizer.id_to_token(token_id)) == token_id
    assert tokenizer.token_to_id("<s>") == 1
    assert tokenizer.token_to_id("no such token, surely") is None


def test_bad_input_is_invalid_argument(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidArgumentError, match="outside"):
        tokenizer.decode([0, tokenizer.vocab_size])
    with pytest.raises(InvalidArgumentError, match="outside"):
        tokenizer.decode([-1])
    with pytest.raises(InvalidArgumentError, match="not an int"):
        tokenizer.decode([1.5])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        tokenizer.id_to_token(tokenizer.vocab_size)
    with pytest.raises(InvalidArgumentError):
        tokenizer.detokenizer().add(tokenizer.vocab_size)


def test_unseen_characters_are_split_across_tokens(byte_fallback_tokenizer) -> None:
    """Guards the tests below: some token boundaries fall inside a character."""
    tok = byte_fallback_tokenizer
    ids = tok.encode(RARE_TEXT)
    prefixes = [tok.decode(ids[:n]) for n in range(1, len(ids) + 1)]
    assert sum(p.endswith(REPLACEMENT_CHAR) for p in prefixes) >= 5


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_full_decode(kind_and_tokenizer, skip_special_tokens: bool) -> None:
    kind, tok = kind_and_tokenizer
    for ids in random_sequences(kind, tok, num=300, seed=1):
        deltas = stream(tok.detokenizer(skip_special_tokens=skip_special_tokens), ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens), ids


def valid_sequences(tok: Tokenizer, num: int, seed: int) -> list[list[int]]:
    """Whole encodings of random multi-byte text and ids that decode to whole characters."""
    rng = random.Random(seed)
    chars = "aé ü ß日本語中文😀🎉🦀🦉龍ŝĝΩ≈ç\n"
    whole = [i for i in range(tok.vocab_size) if REPLACEMENT_CHAR not in tok.decode([i])]
    sequences = []
    for _ in range(num):
        ids: list[int] = []
        while len(ids) < rng.randint(1, 60):
            if rng.random() < 0.3:
                ids.extend(rng.choices(whole, k=rng.randint(1, 4)))
            else:
                text = "".join(rng.choices(chars, k=rng.randint(1, 12)))
                ids.extend(tok.encode(text, add_special_tokens=False))
        sequences.append(ids)
    return sequences


def test_no_delta_breaks_a_character(kind_and_tokenizer) -> None:
    kind, tok = kind_and_tokenizer
    num_held_back = 0
    for ids in valid_sequences(tok, num=300, seed=2):
        full_text = tok.decode(ids)
        assert REPLACEMENT_CHAR not in full_text
        deltas = stream(tok.detokenizer(), ids)
        assert "".join(deltas) == full_text
        for n, delta in enumerate(deltas[:-1]):
            assert REPLACEMENT_CHAR not in delta, ids
            is_split = tok.decode(ids[: n + 1]).endswith(REPLACEMENT_CHAR)
            num_held_back += delta == "" and is_split
    if kind != "metaspace_unigram":
        assert num_held_back >= 50  # the sequences really did split characters


def test_text_streams_word_by_word(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    deltas = [d for d in stream(tokenizer.detokenizer(), ids) if d]
    assert deltas[0].startswith("The") or deltas[0] == "T"
    assert "".join(deltas) == "The quick brown fox jumps over the lazy dog."
    assert len(deltas) >= 5  # not held back until the end


def test_prompt_gives_the_leading_space(tokenizer: Tokenizer) -> None:
    """After a prompt, '▁over' must come out as ' over', not 'over' (the Metaspace pitfall)."""
    full = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    split = next(
        n for n in range(1, len(full)) if tokenizer.decode(full[:n]) == "The quick brown fox jumps"
    )
    deltas = stream(tokenizer.detokenizer(prompt_ids=full[:split]), full[split:])
    assert "".join(deltas) == " over the lazy dog."


def test_prompt_then_random_output(kind_and_tokenizer) -> None:
    kind, tok = kind_and_tokenizer
    for n, ids in enumerate(random_sequences(kind, tok, num=100, seed=3)):
        prompt = tok.encode(SENTENCES[n % len(SENTENCES)])
        full_text, prompt_text = tok.decode(prompt + ids), tok.decode(prompt)
        assert full_text.startswith(prompt_text)
        deltas = stream(tok.detokenizer(prompt_ids=prompt), ids)
        assert "".join(deltas) == full_text[len(prompt_text) :], ids


def test_special_tokens_skipped_or_kept(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("café 😀 ok", add_special_tokens=False)
    eos = tokenizer.token_to_id("</s>")
    assert eos is not None
    ids = ids[:2] + [eos] + ids[2:] + [eos, eos]
    skipped = "".join(stream(tokenizer.detokenizer(), ids))
    kept = "".join(stream(tokenizer.detokenizer(skip_special_tokens=False), ids))
    assert "</s>" not in skipped and kept.count("</s>") == 3
    assert skipped == tokenizer.decode(ids)


def spy_on_window_sizes(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of ids of every decode call the detokenizer makes."""
    window_sizes: list[int] = []
    decode = tokenizer._decode

    def spy(ids: list[int], skip_special_tokens: bool) -> str:
        window_sizes.append(len(ids))
        return decode(ids, skip_special_tokens)

    monkeypatch.setattr(tokenizer, "_decode", spy)
    return window_sizes


def test_decode_window_stays_small(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-token cost is bounded: each decode sees a short window, not the whole sequence."""
    ids = tokenizer.encode(" ".join(SENTENCES * 20) + RARE_TEXT * 10)
    assert len(ids) > 1000
    split = next(
        n for n in range(100, len(ids)) if not tokenizer.decode(ids[:n]).endswith(REPLACEMENT_CHAR)
    )
    expected = tokenizer.decode(ids)[len(tokenizer.decode(ids[:split])) :]
    window_sizes = spy_on_window_sizes(tokenizer, monkeypatch)
    text = "".join(stream(tokenizer.detokenizer(prompt_ids=ids[:split]), ids[split:]))
    assert text == expected
    assert len(window_sizes) >= len(ids) - split and max(window_sizes) <= 16


def test_tokens_without_text_do_not_grow_the_window(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    eos = tokenizer.token_to_id("</s>")
    assert eos is not None
    detok = tokenizer.detokenizer()
    assert "".join(detok.add(i) for i in tokenizer.encode("café")) == "café"
    window_sizes = spy_on_window_sizes(tokenizer, monkeypatch)
    assert all(detok.add(eos) == "" for _ in range(100))
    assert max(window_sizes) <= 16
    assert detok.add(tokenizer.encode("café")[-1]) != ""  # still streams afterwards


def test_a_long_encode_lets_other_threads_run(tokenizer: Tokenizer) -> None:
    """The coordinator tokenizes prompts on worker threads beside the loop serving every call: a
    megabyte of text must not hold the GIL (and so every other thread) while it is encoded."""
    import threading
    import time

    text = " ".join(SENTENCES) * 2500  # about a megabyte
    gaps: list[float] = []
    done = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    start = time.perf_counter()
    ids = tokenizer.encode(text)
    encode_s = time.perf_counter() - start
    done.set()
    ticker.join()
    assert len(ids) > 100_000 and ids[:5] == tokenizer.encode(SENTENCES[0])[:5]
    assert max(gaps) < max(0.1, encode_s / 3), (max(gaps), encode_s)
