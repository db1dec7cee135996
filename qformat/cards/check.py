"""`qformat card --check`: find what an existing README claims that the checkpoint contradicts.

The checks target the mistakes seen on published quantized cards: a dtype word that does not match the weights
("INT4" on an FP8 model), Linear counts that do not match the fallback list, a size table that went stale, and
metadata without `base_model` (the Hub then cannot link the model to its base). The carried-over original card is
not checked: it describes the source model. Nor is what the card shows as data (code spans and blocks, link
targets, HTML comments, and config strings such as fallback details and versions shown as text): a checkpoint's
names and strings may contain any word without the card claiming it.
"""

from __future__ import annotations

import re
from pathlib import Path

from qformat.cards.accuracy import change_phrase, large_losses
from qformat.cards.facts import CardFacts, card_facts, original_start, split_source_card
from qformat.cards.markdown import fenced
from qformat.cards.render import card_tags, free_text, weight_words
from qformat.checkpoint.inspect import human_bytes
from qformat.io.jsonfile import read_text

__all__ = ["check_card"]

_DTYPE_WORD = re.compile(r"(?<![\w-])(int2|int3|int4|int8|fp4|nf4|fp6|fp8|mxfp4|nvfp4|w4a16|w4a8|w8a8|w8a16|[2-8]-bit)(?![\w-])",
                         re.IGNORECASE)
_COUNT = re.compile(r"(\d+)\s+of\s+(?:its\s+)?(\d+)\s+Linear modules", re.IGNORECASE)
_SIZE_ROW = re.compile(r"^\|\s*Weights\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|", re.MULTILINE)
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`).*?(?<!`)\1(?!`)")
_LINK_TARGET = re.compile(r"(?<=\])\([^()\s]*\)")
_COMMENT = re.compile(r"<!--.*?-->")
_EVAL_TABLE = re.compile(r"^\|\s*Metric\s*\|\s*Text\s*\|", re.MULTILINE)
#: What a card says where a measured loss is large (qformat.cards.render.summary).
_LARGE_LOSS = "Measured accuracy loss is large"
#: What a card says where a fallback search missed its budget (qformat.cards.accuracy.search_summary).
_SEARCH_MISSED = ("did not meet its budget", "but not on held-out text")


def _allowed_words(f: CardFacts) -> set[str]:
    words = set()
    if "int" in f.weight_types:
        words |= {"int8", "8-bit", "w8a8", "w8a16"}
    if "float" in f.weight_types:
        words |= {"fp8", "8-bit"}
    return words


def _own_text(readme: str) -> str:
    """The README without its metadata and without the original card it carries."""
    body = re.sub(r"^---\s*\n.*?\n---\s*\n", "", readme, count=1, flags=re.DOTALL)
    lines = body.split("\n")
    start = original_start(lines)
    return "\n".join(lines if start is None else lines[:start])


def _prose(own: str, data: list[str]) -> str:
    """`own` without what is data, not claims: code (fenced blocks, code spans), link targets, HTML comments and the
    checkpoint's own strings shown as text (`data`)."""
    lines = own.split("\n")
    kept = [line for line, code in zip(lines, fenced(lines)) if not code]
    prose = "\n".join(kept)
    for value in sorted(data, key=len, reverse=True):  # first: an escaped string may look like code or a link
        prose = prose.replace(value, " ")
    return _COMMENT.sub("", _LINK_TARGET.sub("", _CODE_SPAN.sub("", prose)))


def _shown(value: object) -> str:
    """A metadata value as the one-line message shows it: a short repr of a scalar, the type of anything else (a
    stranger's YAML may nest deeply or alias itself into something huge)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return f"a {type(value).__name__}"


def check_card(folder: str | Path, text: str | None = None) -> list[str]:
    """Problems of `text` (default: `folder`/README.md) against the checkpoint in `folder`; empty if none."""
    folder = Path(folder)
    f = card_facts(folder)
    if text is None:
        path = folder / "README.md"
        if not path.is_file() and not path.is_symlink():
            return ["there is no README.md"]
        text = read_text(path)
    problems: list[str] = []
    meta = split_source_card(text).metadata
    if f.base_model_id and meta.get("base_model") != f.base_model_id:
        found = meta.get("base_model")
        problems.append(f"base_model is {_shown(found)}, the checkpoint's base model is {f.base_model_id!r}" if found
                        else f"base_model is missing from the metadata (the checkpoint records {f.base_model_id!r})")
    if f.base_model_id and meta.get("base_model_relation") != "quantized":
        problems.append(f"base_model_relation is {_shown(meta.get('base_model_relation'))}, not 'quantized'")
    tags = meta.get("tags") if isinstance(meta.get("tags"), list) else []
    missing_tags = [t for t in card_tags(f) if t not in tags]
    if missing_tags:
        problems.append(f"tags lack {', '.join(missing_tags)}")
    own = _own_text(text)
    prose = _prose(own, free_text(f))
    allowed = _allowed_words(f)
    for word in dict.fromkeys(m.group(1).lower() for m in _DTYPE_WORD.finditer(prose)):
        if word not in allowed:
            problems.append(f"says {word.upper()}, but the weights are {weight_words(f)}")
    valid_counts = {(f.quantized_modules, f.linear_modules), (len(f.fallback), f.linear_modules)}
    for match in _COUNT.finditer(prose):
        pair = (int(match.group(1)), int(match.group(2)))
        if pair not in valid_counts:
            problems.append(f"says '{match.group(0)}', but {f.quantized_modules} of {f.linear_modules} Linear "
                            f"modules are quantized and {len(f.fallback)} kept in full precision")
    expected_sizes = (human_bytes(f.source_bytes), human_bytes(f.checkpoint_bytes))
    for match in _SIZE_ROW.finditer(own):
        if (match.group(1), match.group(2)) != expected_sizes:
            problems.append(f"size table says {match.group(1)} -> {match.group(2)}, the checkpoint is "
                            f"{expected_sizes[0]} -> {expected_sizes[1]}")
    problems += _accuracy_problems(f, own, prose)
    return problems


def _accuracy_problems(f: CardFacts, own: str, prose: str) -> list[str]:
    """What the card says about accuracy against what is recorded: an evaluation it denies or invents, a large
    measured loss or a missed fallback budget it does not state."""
    problems = []
    if f.evaluation and "Not evaluated" in prose:
        problems.append(f"says 'Not evaluated', but {len(f.evaluation)} evaluation result(s) are recorded")
    if not f.evaluation and _EVAL_TABLE.search(own):
        problems.append("has an evaluation table, but no evaluation results are recorded")
    large = [change_phrase(m) for m in large_losses(f.evaluation) if change_phrase(m)]
    if large and _LARGE_LOSS not in own:
        problems.append(f"does not state the large measured loss ({large[0]})")
    search = f.fallback_search
    if search is not None and not search.met and not any(words in own for words in _SEARCH_MISSED):
        problems.append("does not say that the automatic fallback search missed its budget")
    return problems
