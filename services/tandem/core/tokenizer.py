"""Tokenizer and incremental detokenizer, on top of the Hugging Face `tokenizers` library.

The coordinator owns both: it encodes prompts with `Tokenizer.encode` and turns each
committed token into a text delta with an `IncrementalDetokenizer`, one per sequence.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import tokenizers

from tandem.core.errors import InvalidArgumentError, ModelLoadError

TOKENIZER_FILE = "tokenizer.json"
REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for bytes that are not (yet) valid UTF-8
# Prompt tokens decoded as context in front of the first output token: enough to give the
# decoder the left context it needs (leading-space rules, a character split across tokens).
NUM_PROMPT_CONTEXT_TOKENS = 5
# Bounds the decode window. A split character needs at most 4 byte tokens, so a tail still
# ending in U+FFFD after this many held tokens is taken as invalid text and emitted; held
# tokens that add no text at all (skipped special tokens) are dropped after this many.
MAX_NUM_HELD_TOKENS = 8


class Tokenizer:
    """A loaded `tokenizer.json`: text to token ids and back."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._tok = tokenizer
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> Tokenizer:
        """Load `<model_dir>/tokenizer.json`; ModelLoadError names the file if it can't."""
        path = Path(model_dir) / TOKENIZER_FILE
        if not path.is_file():
            raise ModelLoadError(f"tokenizer file not found: {path}")
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as exc:  # the library raises plain Exception on a bad file
            raise ModelLoadError(f"cannot parse tokenizer file {path}: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included; valid ids are [0, vocab_size)."""
        return self._vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. BOS)."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text to encode must be str, got {type(text).__name__}")
        # encode_batch gives the same ids as encode but lets go of the GIL while it works (encode
        # holds it: a megabyte of text would stall every other thread of the process for a second).
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; every id must be in [0, vocab_size)."""
        return self._decode(self.check_ids(ids), skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of `token_id` (e.g. 'Ġdef'); InvalidArgumentError if invalid."""
        self.check_ids((token_id,))
        token = self._tok.id_to_token(token_id)
        if token is None:  # a hole in the vocabulary
            raise InvalidArgumentError(f"token id {token_id} is not in the vocabulary")
        return token

    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary string `token`, or None if there is no such token."""
        return self._tok.token_to_id(token)

    def detokenizer(
        self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one sequence that continues `prompt_ids`."""
        return IncrementalDetokenizer(self, self.check_ids(prompt_ids), skip_special_tokens)

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        """`ids` as a list, or InvalidArgumentError naming the first id that is not valid."""
        ids = list(ids)
        for i, token_id in enumerate(ids):
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise InvalidArgumentError(f"token id #{i} is not an int: {token_id!r}")
            if not 0 <= token_id < self._vocab_size:
                raise InvalidArgumentError(
                    f"token id #{i} is {token_id}, outside [0, {self._vocab_size})"
                )
        return ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas, one sequence at a time.

    Each call decodes only a short window of ids: context ids whose text was already
    emitted (the previous delta's ids, or the prompt's last few), then the ids not yet
    emitted. The delta is the window's text minus the context's text, so decoder rules that
    depend on position (a Metaspace decoder drops the space before the first token) cancel
    out. Text is held back while it ends in U+FFFD: a multi-byte character split across
    tokens comes out whole, once its last byte arrives.

    Without prompt ids, the deltas plus `flush()` concatenate to exactly
    `tokenizer.decode(output_ids)`; with prompt ids (ending on a character boundary, as any
    encoded text does), to the text the output adds after the prompt's: a first output
    token '▁world' gives ' world'. The exception is output that stays invalid UTF-8 for
    more than MAX_NUM_HELD_TOKENS tokens: its U+FFFD is emitted then.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The window: ids[:read_offset] are context (already emitted), the rest are held.
        self._ids = self._prompt_context(prompt_ids)
        self._read_offset = len(self._ids)
        self._context_text = self._decode(self._ids)

    def add(self, token_id: int) -> str:
        """Take one new output token id; return the text it completes (often '' or one word)."""
        self._tokenizer.check_ids((token_id,))
        self._ids.append(token_id)
        text = self._decode(self._ids)
        num_held = len(self._ids) - self._read_offset
        if len(text) <= len(self._context_text):
            if num_held > MAX_NUM_HELD_TOKENS:  # they add no text: forget them
                del self._ids[self._read_offset :]
            return ""
        if text.endswith(REPLACEMENT_CHAR) and num_held <= MAX_NUM_HELD_TOKENS:
            return ""  # a multi-byte character is still incomplete
        return self._advance(text)

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character comes out as U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        text = self._decode(self._ids)
        if len(text) <= len(self._context_text):
            return ""
        return self._advance(text)

    def _prompt_context(self, prompt_ids: list[int]) -> list[int]:
        """The last few prompt ids, starting on a character boundary.

        A window that starts inside a character decodes it as U+FFFD (with byte fallback,
        a whole run of byte tokens), so step back until the context text starts cleanly.
        """
        start = max(0, len(prompt_ids) - NUM_PROMPT_CONTEXT_TOKENS)
        for _ in range(MAX_NUM_HELD_TOKENS):
            if start == 0 or not self._decode(prompt_ids[start:]).startswith(REPLACEMENT_CHAR):
                break
            start -= 1
        return prompt_ids[start:]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer._decode(ids, self._skip_special_tokens)

    def _advance(self, text: str) -> str:
        """Emit the window's new text; the ids just emitted become the next context."""
        delta = text[len(self._context_text) :]
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._context_text = self._decode(self._ids)
        return delta
