"""Untrusted strings into a Markdown card, and the line structure of Markdown that cards rely on.

Everything a card shows from a checkpoint (base model, module and scheme names, fallback details, the recorded
command, versions, evaluation names) comes from a config.json that a stranger may have written. Each context here
takes any string and shows it as it is, while nothing in it can end the context it is in: no new line, table cell,
heading, link, image, raw HTML or HTML comment end, and no line of its own that looks like a card marker.
"""

from __future__ import annotations

import re

__all__ = ["code", "comment", "demote_headings", "fence", "fenced", "one_line", "promote_headings", "text"]

#: C0 controls that are not line breaks, and lone surrogates (which cannot be written as UTF-8)
_UNPRINTABLE = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f\ud800-\udfff]")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_PUNCTUATION = re.compile(r"([\\`*\[\]|#!~])")  # what opens code, emphasis, links, images, tables, headings, strikes
_EDGE_UNDERSCORE = re.compile(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")  # intraword `_` never emphasizes: left as is
_BLOCK_START = re.compile(r"^(?:([-+=]+)|(\d+)([.)]))(?=\s|$)")  # a list item or setext underline if it began a line
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_HEADING_LEVELS = 2


def one_line(value: str) -> str:
    """`value` on one line: every line break (as `str.splitlines` knows them) becomes a space, and control
    characters and lone surrogates (which cannot be written as UTF-8) become U+FFFD."""
    return " ".join(_UNPRINTABLE.sub("\ufffd", value).splitlines())


def text(value: str) -> str:
    """`value` as inline Markdown text (a paragraph, list item or table cell) that renders as exactly its characters."""
    escaped = re.sub("[&<>]", lambda m: _ENTITIES[m.group(0)], one_line(value))
    escaped = _PUNCTUATION.sub(r"\\\1", escaped)
    escaped = _EDGE_UNDERSCORE.sub(r"\\_", escaped)
    return _BLOCK_START.sub(lambda m: "\\" + m.group(0) if m.group(1) else f"{m.group(2)}\\{m.group(3)}", escaped)


def code(value: str, *, table: bool = False) -> str:
    """`value` as an inline code span (in a table cell when `table`: its pipes are escaped, as GFM requires there)."""
    content = one_line(value)
    if not content:
        return ""
    ticks = "`" * (max((len(run) for run in re.findall("`+", content)), default=0) + 1)
    pad = " " if content[0] in "` " or content[-1] in "` " else ""  # CommonMark strips one space from each side
    if table:
        content = content.replace("|", "\\|")
    return f"{ticks}{pad}{content}{pad}{ticks}"


def fence(value: str, info: str = "") -> str:
    """`value` as a fenced code block, line by line, with a fence longer than any backtick run inside it."""
    lines = _UNPRINTABLE.sub("\ufffd", value).splitlines() or [""]
    longest = max((len(run) for run in re.findall("`+", value)), default=0)
    ticks = "`" * max(3, longest + 1)
    return "\n".join([ticks + info, *lines, ticks])


def comment(value: str) -> str:
    """`value` inside an HTML comment: on one line and without `--`, so it can neither end the comment nor open one."""
    return re.sub("-(?=-)", "- ", one_line(value))


def fenced(lines: list[str]) -> list[bool]:
    """For each line, whether it belongs to a fenced code block (its fences included), as CommonMark decides."""
    inside: list[bool] = []
    opening: tuple[str, int] | None = None
    for line in lines:
        match = _FENCE.match(line)
        if opening is None:
            if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
                opening = (match.group(1)[0], len(match.group(1)))
            inside.append(opening is not None)
        else:
            inside.append(True)
            char, length = opening
            if match and match.group(1)[0] == char and len(match.group(1)) >= length and not match.group(2).strip():
                opening = None
    return inside


def demote_headings(body: str, levels: int = _HEADING_LEVELS) -> str:
    """Push every Markdown heading (outside fenced code) `levels` deeper, so a carried card nests under ours."""
    lines = body.split("\n")
    return "\n".join(line if code_line or not line.startswith("#") else "#" * levels + line
                     for line, code_line in zip(lines, fenced(lines)))


def promote_headings(body: str, levels: int = _HEADING_LEVELS) -> str:
    """Undo `demote_headings`: every line it pushed down (outside fenced code) loses the `levels` marks again."""
    lines = body.split("\n")
    deeper = "#" * (levels + 1)
    return "\n".join(line[levels:] if not code_line and line.startswith(deeper) else line
                     for line, code_line in zip(lines, fenced(lines)))
