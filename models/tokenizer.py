"""Tokenizers: a Hugging Face `tokenizer.json` through the `tokenizers` library, or UTF-8 bytes.

Random presets have no tokenizer; `ByteTokenizer` gives them one (token id = byte value) so that
text prompts work everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A `tokenizer.json` (any model the `tokenizers` library reads). No special tokens are
    added on encode and none are dropped on decode, so ids round-trip exactly."""

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer as _Tokenizer

        self.json = tokenizer_json
        self._tokenizer = _Tokenizer.from_str(tokenizer_json)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        return cls(Path(path).read_text(encoding="utf-8"))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


class ByteTokenizer:
    """Token id = UTF-8 byte value. Ids >= 256 (a model's vocab may be larger) decode to
    `placeholder`; invalid UTF-8 decodes with U+FFFD replacement characters. With a vocab
    smaller than 256, text whose bytes do not fit is refused on encode."""

    def __init__(self, vocab_size: int = 256, placeholder: str = "\ufffd"):
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size, self.placeholder = vocab_size, placeholder

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        if ids and max(ids) >= self.vocab_size:
            raise ValueError(
                f"byte {max(ids)} of {text!r} is not a token of a {self.vocab_size}-id vocab"
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            out.append(self.placeholder)
            run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


def load_tokenizer(directory: str | os.PathLike | None, vocab_size: int) -> Tokenizer:
    """The directory's tokenizer.json if it has one, else a byte tokenizer.

    vocab_size is the model's; a tokenizer.json with more ids than the model, or one that does
    not parse, is refused with a ValueError naming the file.
    """
    path = None if directory is None else Path(directory) / TOKENIZER_FILE
    if path is not None and path.exists():
        try:
            tokenizer = HFTokenizer.from_file(path)
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error.reason})") from None
        except Exception as error:  # the tokenizers library raises its own Exception types
            reason = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(
                f"{path}: not a tokenizer the tokenizers library reads ({reason})"
            ) from None
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(
                f"{path}: {tokenizer.vocab_size} token ids, but the model's vocab_size is "
                f"{vocab_size}"
            )
        return tokenizer
    return ByteTokenizer(vocab_size)
