"""How a card explains the checkpoint's size: what the source was stored as, and where the checkpoint's bytes are.

The size gain of a quantized checkpoint is limited by what quantization does not touch (embeddings, norms, biases,
kept modules). The card names what actually holds the bytes: an fp32 tied embedding, not the one kept lm_head
(which has no tensors of its own), is what keeps an fp32 Gemma 3 270M large. The source's dtype is not recorded in
the checkpoint; the card derives what its size implies (bytes per parameter) and says that it is derived.
"""

from __future__ import annotations

from qformat.cards.facts import CardFacts
from qformat.cards.markdown import code
from qformat.checkpoint.inspect import human_bytes

__all__ = ["size_lines", "source_sentence"]

#: What a whole number of bytes per parameter means.
_BYTES_PER_PARAMETER = {8: "float64", 4: "float32", 2: "16-bit floats (bfloat16 or float16)", 1: "8-bit values"}
#: Full-precision dtypes that `qformat convert --dtype bfloat16` would halve.
_WIDE_DTYPES = {"F32": "float32", "F64": "float64"}
#: Kept modules without tensors named in the sentence about them (the rest are counted).
_NAMED = 3


def source_sentence(f: CardFacts) -> str:
    """"The source stored 107,136 parameters in 428.5 KB, 4 bytes per parameter: float32 ..."; "" where the
    source's size is not recorded."""
    if not f.source_bytes:
        return ""
    if not f.parameters:
        return "The source's dtype and parameter count are not recorded in this checkpoint."
    per = f.source_bytes / f.parameters
    stored = f"The source stored {f.parameters:,} parameters in {human_bytes(f.source_bytes)}"
    if per.is_integer() and int(per) in _BYTES_PER_PARAMETER:
        return (f"{stored}, {per:g} byte{'s' if per != 1 else ''} per parameter: {_BYTES_PER_PARAMETER[int(per)]} "
                "(its dtype is not recorded in this checkpoint; this is what its size implies).")
    return (f"{stored}, {per:.2f} bytes per parameter on average: its tensors were stored in more than one dtype "
            "(which ones is not recorded in this checkpoint).")


def _part(n: int, total: int) -> str:
    return f"{human_bytes(n)} ({100 * n / total:.0f} %)"


def _tensorless(f: CardFacts, names: tuple[str, ...]) -> str:
    shown = ", ".join(code(n) for n in names[:_NAMED]) + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED
                                                           else "")
    one = len(names) == 1
    return (f"{'The' if one else 'These'} kept Linear module{'' if one else 's'} {shown} "
            f"{'has' if one else 'have'} no tensors of {'its' if one else 'their'} own (an output embedding tied to "
            f"the input embeddings is stored once, as the embedding): {'it adds' if one else 'they add'} no bytes "
            "to the checkpoint.")


def size_lines(f: CardFacts) -> list[str]:
    """The Size section's paragraphs: the source's storage, where the checkpoint's bytes are, and what limits the
    gain (with the `--dtype bfloat16` hint where float32/float64 tensors are a large share)."""
    lines = [s for s in (source_sentence(f),) if s]
    size = f.size
    if size is None or not size.total:
        return lines
    pieces = [f"quantized Linear modules {_part(size.quantized, size.total)}"]
    kept_with_tensors = len(f.fallback) - len(size.kept_without_tensors)
    if kept_with_tensors > 0:
        pieces.append(f"{kept_with_tensors} Linear module(s) kept in full precision "
                      f"{_part(size.kept_linear, size.total)}")
    stored = ", ".join(size.other_dtypes)
    pieces.append(f"other tensors (embeddings, norms, biases) {_part(size.other, size.total)}"
                  + (f", stored as {stored}" if stored else ""))
    lines.append(f"Where the checkpoint's {human_bytes(size.total)} are: " + "; ".join(pieces) + ".")
    if size.kept_without_tensors:
        lines.append(_tensorless(f, size.kept_without_tensors))
    if size.other >= size.total / 5:
        limit = "Quantization leaves the other tensors as they are, so they limit the size gain"
        wide = [_WIDE_DTYPES[d] for d in size.other_dtypes if d in _WIDE_DTYPES]
        if wide:
            limit += (f"; those stored as {' and '.join(wide)} would take half the space with "
                      "`qformat convert --dtype bfloat16`")
        lines.append(limit + ".")
    return lines
