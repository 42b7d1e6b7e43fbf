"""Tokenisers that need no downloads: characters of a corpus, or the 256 byte values.

Both turn text into a list of ints and back, and serialise to plain data (`to_dict`) that is
saved with a checkpoint and read back with `tokenizer_from_dict`.

* `CharTokenizer`: one id per Unicode code point seen in the corpus (nanoGPT's
  shakespeare_char). Small vocabulary, but text with characters outside it cannot be encoded.
* `ByteTokenizer`: one id per UTF-8 byte, so any text (emoji included) can be encoded; decoding
  replaces byte sequences that are not valid UTF-8 (a sampler can produce them) with U+FFFD.
"""

from __future__ import annotations

from typing import Any

from gen_core.errors import UserError


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: list[str]):
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("a character vocabulary is a list of distinct single characters")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of every distinct character in `text`, sorted by code point."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            shown = ", ".join(repr(c) for c in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise UserError(
                f"{len(unknown)} character(s) not in the {self.vocab_size}-character vocabulary "
                f"of the training text: {shown} (use only those characters, or tokenizer=byte)"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": list(self.chars)}


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


Tokenizer = CharTokenizer | ByteTokenizer


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokeniser from what its `to_dict` returned."""
    kind = data.get("kind")
    if kind == "char":
        return CharTokenizer(list(data["chars"]))
    if kind == "byte":
        return ByteTokenizer()
    raise UserError(f"unknown tokenizer kind {kind!r} (expected 'char' or 'byte')")
