"""The texts qformat evaluates and calibrates on, with their identity (a content hash) recorded beside each result.

Built-in texts come from CPython's own documentation (`pydoc_data.topics`, shipped with every CPython, so they work
offline): its paragraphs are dealt round-robin into three splits, repeated paragraphs dropped, so the splits share no
paragraph and are alike in kind, so calibration, the fallback
search and the held-out confirmation never read the same text. The text differs between Python versions; the
recorded `text_sha256` says exactly which text a figure was measured on. Any UTF-8 file can be used instead.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from qformat.errors import OptionError
from qformat.io.jsonfile import read_text

__all__ = ["BUILTIN_SPLITS", "EvalText", "builtin_text", "load_text", "paragraphs"]

#: Names of the built-in splits of CPython's pydoc topics, in the order topics are dealt into them.
BUILTIN_SPLITS = ("calibration", "search", "heldout")
_BUILTIN_PREFIX = "pydoc-topics/"
#: Largest text file read for evaluation or calibration.
MAX_TEXT_BYTES = 64 * 2**20


@dataclass(frozen=True)
class EvalText:
    """A text with a label (what the card shows) and the SHA-256 of its UTF-8 bytes (what identifies it)."""

    label: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def identity(self, tokens: int) -> dict[str, object]:
        """The record of this text in config.json: label, content hash and the number of tokens used."""
        return {"dataset": self.label, "text_sha256": self.sha256, "tokens": tokens}


def builtin_text(split: str) -> EvalText:
    """One of the disjoint built-in splits ("calibration", "search", "heldout") of CPython's pydoc topics."""
    if split not in BUILTIN_SPLITS:
        raise OptionError(f"unknown built-in text {split!r}; choose one of: {', '.join(BUILTIN_SPLITS)}")
    return EvalText(_BUILTIN_PREFIX + split, _builtin_splits()[BUILTIN_SPLITS.index(split)])


@functools.cache
def _builtin_splits() -> tuple[str, ...]:
    """The paragraphs of all topics (sorted by name) dealt round-robin, a paragraph already dealt dropped (several
    topics repeat whole paragraphs of others): no paragraph is in two splits, and every split mixes prose, grammar
    and code examples in the same proportions. Dealing whole topics instead made the splits differ in kind: on
    SmolLM2 the same fp8 model lost under 1 % of perplexity on one split and 2.8 % on another, so a search tuned on
    one said nothing about the other."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    splits: list[list[str]] = [[] for _ in BUILTIN_SPLITS]
    dealt = 0
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name].strip()):
            key = " ".join(block.split())
            if key and key not in seen:
                seen.add(key)
                splits[dealt % len(BUILTIN_SPLITS)].append(block.strip("\n"))
                dealt += 1
    return tuple("\n\n".join(blocks) for blocks in splits)


def load_text(spec: str | Path) -> EvalText:
    """A text named on the command line: "pydoc-topics/<split>" or "<split>" for a built-in one, else a UTF-8 file
    (regular file, at most 64 MiB, not through a symlink). The label of a file is its name, never its path."""
    name = str(spec)
    if name.startswith(_BUILTIN_PREFIX):
        return builtin_text(name[len(_BUILTIN_PREFIX):])
    path = Path(name).expanduser()
    if name in BUILTIN_SPLITS and not path.exists():
        return builtin_text(name)
    text = read_text(path, error=OptionError, max_bytes=MAX_TEXT_BYTES, follow_symlinks=True,
                     what="give a UTF-8 text file")
    if not text.strip():
        raise OptionError(f"{name} is empty; give a text file with some prose in it")
    return EvalText(path.name, text)


def paragraphs(text: EvalText, *, min_words: int = 4) -> list[str]:
    """The text's paragraphs (blank-line separated), whitespace collapsed, those of fewer than `min_words` dropped:
    the units an encoder embeds and a seq2seq model reads."""
    out = []
    for block in re.split(r"\n\s*\n", text.text):
        words = block.split()
        if len(words) >= min_words:
            out.append(" ".join(words))
    return out
