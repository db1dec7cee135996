"""Seeded, bounded fuzzing of qformat's readers with mutated checkpoints.

Each case copies one of a few tiny converted checkpoints (`BASES`) and applies one to three mutations (`MUTATIONS`)
drawn by `random.Random` from the case's own seed, so any case can be replayed alone (`--case N`). The case then goes
through the reading APIs (`APIS`): `qformat.verify`, `qformat.inspect`, `qformat.cards.render_card`, and transformers'
`from_pretrained` plus one forward pass on fixed input ids. Cases run in forked worker processes; every call has a
deadline, and a worker past it is killed and replaced (a Python thread cannot be stopped; a process can).

Outcomes of one API on one case (`BAD` holds the ones that are bugs):

- ``ok``: it returned; for ``load``, with finite logits.
- ``qformat``: it raised a `QFormatError`, the intended answer to a bad checkpoint.
- ``foreign``: ``load`` only, on a checkpoint ``verify`` refused: transformers or torch raised with no qformat frame
  on the traceback (transformers reading its own part of config.json), or transformers alone built a model with
  non-finite logits (no qformat module in it: e.g. ``quant_method`` is not "qformat").
- ``error`` (BAD): any other exception; for ``load``, also a foreign one on a checkpoint that ``verify`` accepted.
- ``hang`` (BAD): the call ran past the deadline.
- ``died`` (BAD): the worker process died (a signal such as SIGBUS, or a hard exit).
- ``nonfinite`` (BAD): ``load`` returned a model whose logits are not all finite, without an error.

Notes that are counted but are not failures: ``lenient`` (``load`` gave finite logits, equal to the unmutated base's,
for a checkpoint ``verify`` refused), ``wrong`` (the same, but the logits differ from the base's: a silently wrong
model), ``card_raw`` (an injected ``<script>QFUZZ`` string reached the rendered card unescaped, outside code),
``card_lost`` (an odd source card's last line is missing once the card is rendered, written and rendered again).

A ``foreign`` load error is not counted as BAD because qformat never had control: transformers parsed config.json or
the index on its own before calling qformat. ``verify`` must refuse such a checkpoint, else it is an ``error``.

Run: ``python -m qformat.testing.fuzz --cases 1000 --seed 0 --jobs 2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

__all__ = [
    "APIS",
    "BAD",
    "BASES",
    "MUTATIONS",
    "Base",
    "CaseResult",
    "FuzzReport",
    "main",
    "make_bases",
    "mutate_case",
    "run_apis",
    "run_fuzz",
]

APIS = ("verify", "inspect", "card", "load")
BAD = frozenset({"error", "hang", "died", "nonfinite"})
INPUT_IDS = [[5, 17, 42, 99, 3, 200, 31, 7, 64, 8]]
PAYLOAD = "<script>QFUZZ</script>"
TAIL = "QFUZZ-ORIGINAL-TAIL"  # ends each odd source card: a card rendered from it, and rendered again, keeps it


@dataclass(frozen=True)
class Base:
    """One unmutated checkpoint: a tiny model of `arch` converted with `scheme`."""

    arch: str
    scheme: str
    auto_class: str = "AutoModelForCausalLM"
    max_shard_size: str = "5GB"

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.scheme}"


BASES = (
    Base("llama", "w8a8-int8", max_shard_size="100KB"),  # sharded: an index to tamper with
    Base("opt", "w8a16-int8"),
    Base("llama", "fp8-dynamic"),
    Base("xlm-roberta", "w8a8-int8", auto_class="AutoModelForSequenceClassification"),
    Base("llama", "fp8-dynamic+2:4"),
)


def make_bases(root: Path) -> dict[str, Path]:
    """Save and convert every base under `root` (once per run); returns base name -> checkpoint folder."""
    import qformat
    from qformat.testing import save_tiny_model

    out: dict[str, Path] = {}
    for base in BASES:
        source = root / "source" / base.arch
        if not source.exists():
            save_tiny_model(base.arch, source)
        out[base.name] = qformat.convert(source, root / base.name, scheme=base.scheme,
                                         max_shard_size=base.max_shard_size).output
    return out


# --- JSON with values json.dumps cannot write --------------------------------------------------------------------


class Raw(str):
    """A JSON fragment written verbatim: a 5000-digit integer, NaN, 1e400, deep nesting."""


def dumps(obj: Any) -> str:
    """json.dumps, except that `Raw` values are spliced in as they are."""
    raws: list[Raw] = []

    def sub(o: Any) -> Any:
        if isinstance(o, Raw):
            raws.append(o)
            return f"\x00RAW{len(raws) - 1}\x00"
        if isinstance(o, dict):
            return {k: sub(v) for k, v in o.items()}
        if isinstance(o, list):
            return [sub(v) for v in o]
        return o

    text = json.dumps(sub(obj))
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00RAW{i}\x00"), raw, 1)
    return text


_GENERIC: tuple[Callable[[], Any], ...] = (
    lambda: "x", lambda: "", lambda: True, lambda: False, lambda: None, lambda: 0, lambda: -1, lambda: 1.5,
    lambda: [], lambda: ["x"], lambda: [1, [2]], lambda: {}, lambda: {"x": 1}, lambda: 2**63, lambda: 10**30,
    lambda: Raw("1" + "0" * 5000), lambda: Raw("NaN"), lambda: Raw("Infinity"), lambda: Raw("-Infinity"),
    lambda: Raw("1e400"), lambda: Raw("[" * 100_000 + "]" * 100_000), lambda: Raw('{"a":' * 5000 + "1" + "}" * 5000),
    lambda: "\ud800", lambda: "a" * 100_000, lambda: "true", lambda: "false", lambda: "re:(a|aa)+$", lambda: PAYLOAD,
)


def hostile(rng: random.Random, like: Any = None) -> Any:
    """A wrong value: half the time a near miss for `like`'s type, otherwise anything from `_GENERIC`."""
    if rng.random() < 0.5:
        if isinstance(like, bool):
            return rng.choice(["false", "true", 0, 1, None])
        if isinstance(like, int):
            return rng.choice([0, -1, -(2**31), 2**31, 10**12, like * 1000 + 1, like - 1, float(like), str(like)])
        if isinstance(like, float):
            return rng.choice([Raw("NaN"), Raw("-Infinity"), -like, 0.0, str(like)])
        if isinstance(like, str):
            return rng.choice([like.upper(), like + "x", "", [like], {"v": like}, like * 2, PAYLOAD])
        if isinstance(like, list) and like:
            return rng.choice([like[0], like + like, like[::-1], [like], {"0": like[0]}])
    return rng.choice(_GENERIC)()


def _random_path(node: Any, rng: random.Random) -> list[Any]:
    """Keys from `node` down to a random descendant: first step always, each further step with probability 0.6."""
    path: list[Any] = []
    while isinstance(node, (dict, list)) and node and (not path or rng.random() < 0.6):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        node = node[key]
    return path


def _get(node: Any, path: list[Any]) -> Any:
    for key in path:
        node = node[key]
    return node


# --- checkpoint files --------------------------------------------------------------------------------------------


class Skip(Exception):
    """This mutation does not apply to the case as it stands (e.g. no fp8 tensor, config already unreadable)."""


def _load_config(folder: Path) -> dict[str, Any]:
    if not (folder / "config.json").is_file():  # gone, a directory, or a link to /dev/zero (never ends)
        raise Skip
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise Skip from None
    if not isinstance(config, dict) or not isinstance(config.get("quantization_config"), dict):
        raise Skip
    return config


def _save_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / "config.json").write_text(dumps(config), encoding="utf-8")


def _shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def _read_st(path: Path) -> tuple[dict[str, Any], bytes]:
    """The header (as a dict) and data bytes of a safetensors file; `Skip` if a previous mutation broke it."""
    blob = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + n])
    except (struct.error, ValueError, RecursionError):
        raise Skip from None
    if not isinstance(header, dict) or 8 + n > len(blob):
        raise Skip
    return header, blob[8 + n :]


def _write_st(path: Path, header: dict[str, Any] | str, data: bytes) -> None:
    text = (header if isinstance(header, str) else dumps(header)).encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _tensors(folder: Path, pred: Callable[[str, dict[str, Any]], bool]) -> list[tuple[Path, str]]:
    """(shard, tensor name) for every well-formed entry that `pred` accepts, over all readable shards."""
    found = []
    for shard in _shards(folder):
        try:
            header, _ = _read_st(shard)
        except Skip:
            continue
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict) and pred(name, entry):
                found.append((shard, name))
    return found


def _patch_bytes(folder: Path, rng: random.Random, pred: Callable[[str, dict[str, Any]], bool],
                 make: Callable[[dict[str, Any], int], bytes]) -> str:
    """Overwrite one or all elements of a random tensor accepted by `pred` with `make(entry, element_size)`."""
    choices = _tensors(folder, pred)
    if not choices:
        raise Skip
    shard, name = rng.choice(choices)
    header, data = _read_st(shard)
    entry = header[name]
    try:
        start, end = (int(v) for v in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise Skip from None
    size = _ITEMSIZE.get(entry.get("dtype"), 1)
    count = (end - start) // size
    if count <= 0 or end > len(data):
        raise Skip
    buf = bytearray(data)
    where = range(count) if rng.random() < 0.2 else [rng.randrange(count) for _ in range(rng.choice([1, 1, 3]))]
    for i in where:
        chunk = make(entry, size)
        buf[start + i * size : start + (i + 1) * size] = chunk[:size].ljust(size, b"\0")
    _write_st(shard, header, bytes(buf))
    return f"{shard.name}:{name}" + (" (all)" if len(where) == count else f" x{len(where)}")


_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "zero": 0.0, "negative": -0.25,
           "subnormal": 1e-44, "huge": 3e38}


def _float_bytes(value: float, dtype: str) -> bytes:
    if dtype == "F64":
        return struct.pack("<d", value)
    if dtype == "F16":
        return struct.pack("<e", max(min(value, 65504.0), -65504.0) if math.isfinite(value) else value)
    packed = struct.pack("<f", value)
    return packed[2:] if dtype == "BF16" else packed


# --- mutations: each takes (folder, rng), changes the checkpoint in place, returns what it did --------------------


def m_config_replace(folder: Path, rng: random.Random) -> str:
    """Replace a random node of quantization_config with a wrong value."""
    config = _load_config(folder)
    path = ["quantization_config", *_random_path(config["quantization_config"], rng)]
    parent, key = _get(config, path[:-1]), path[-1]
    parent[key] = value = hostile(rng, parent[key])
    _save_config(folder, config)
    return f"{'.'.join(map(str, path))} = {_short(value)}"


def m_config_delete(folder: Path, rng: random.Random) -> str:
    """Delete a random node of quantization_config."""
    config = _load_config(folder)
    path = ["quantization_config", *_random_path(config["quantization_config"], rng)]
    del _get(config, path[:-1])[path[-1]]
    _save_config(folder, config)
    return f"del {'.'.join(map(str, path))}"


_MODEL_KEYS = ("architectures", "model_type", "num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size",
               "num_attention_heads", "tie_word_embeddings", "torch_dtype", "dtype", "max_position_embeddings")


def m_config_model(folder: Path, rng: random.Random) -> str:
    """Change or delete a model key transformers reads (sizes, model_type, architectures, num_hidden_layers)."""
    config = _load_config(folder)
    key = rng.choice([k for k in _MODEL_KEYS if k in config] or list(config))
    roll = rng.random()
    if roll < 0.15:
        del config[key]
        _save_config(folder, config)
        return f"del {key}"
    if key == "num_hidden_layers" and roll < 0.5:
        value: Any = rng.choice([100_000, 10**9, 3, 1])
    elif key in ("model_type", "architectures") and roll < 0.6:
        value = rng.choice(["nope", ["NopeForCausalLM"], "bert", ["BertModel"], "opt", "llama"])
        value = value if key == "architectures" or isinstance(value, str) else value[0]
    else:
        value = hostile(rng, config[key])
    config[key] = value
    _save_config(folder, config)
    return f"{key} = {_short(value)}"


HOSTILE_PATTERNS = (
    "re:(a|aa)+$", r"re:(?:\w|[a-z_.0-9])+!", r"re:(?:[a-z._0-9]+)+!", r"re:(.*)*!", "re:[", "re:(", "re:",
    "re:(?P<x>", "re:\\", "re:" + "a" * 10_000, r"re:(?:(?:\w+)+)+!", "re:.*", "",
)


def m_config_pattern(folder: Path, rng: random.Random) -> str:
    """Put a hostile pattern (catastrophic backtracking, invalid regex) into overrides or fallback."""
    config = _load_config(folder)
    q = config["quantization_config"]
    pattern = rng.choice(HOSTILE_PATTERNS)
    if rng.random() < 0.7 and isinstance(q.get("overrides"), list):
        scheme = rng.choice([q.get("default_scheme"), "none", "nope"])
        q["overrides"].insert(rng.randrange(len(q["overrides"]) + 1), {"pattern": pattern, "scheme": scheme})
        where = f"overrides[{pattern[:30]!r} -> {scheme!r}]"
    elif isinstance(q.get("fallback"), list) and q["fallback"]:
        rng.choice(q["fallback"])["module"] = pattern
        where = f"fallback.module = {pattern[:30]!r}"
    else:
        raise Skip
    _save_config(folder, config)
    return where


_CARD_STRINGS = (
    ("quantization_config", "provenance", "source", "base_model"),
    ("quantization_config", "provenance", "command"),
    ("quantization_config", "provenance", "qformat_version"),
    ("quantization_config", "provenance", "environment", "transformers"),
    ("quantization_config", "fallback", 0, "detail"),
    ("quantization_config", "fallback", 0, "module"),
    ("quantization_config", "default_scheme"),
    ("architectures", 0),
)


def m_config_strings(folder: Path, rng: random.Random) -> str:
    """Put Markdown/HTML/template syntax into a string the card shows (base_model, command, fallback detail...)."""
    from qformat.cards.facts import MARKER, ORIGINAL_END

    config = _load_config(folder)
    path = list(rng.choice(_CARD_STRINGS))
    value = rng.choice([f"-->\n{PAYLOAD}", f"x\n\n# {PAYLOAD}\n", f"`{PAYLOAD}`", f"x\n```\n{PAYLOAD}\n```\n",
                        "{{ x }}{% raw %}", ORIGINAL_END,
                        MARKER, "a | b\n|---|", "](javascript:alert(1))", "---\nlicense: evil\n---"])
    try:
        _get(config, path[:-1])[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        raise Skip from None
    _save_config(folder, config)
    return f"{'.'.join(map(str, path))} = {value!r}"


def m_config_syntax(folder: Path, rng: random.Random) -> str:
    """Make config.json unreadable as a JSON object (truncated, not an object, bad UTF-8, deep, duplicate keys)."""
    path = folder / "config.json"
    if not path.is_file():
        raise Skip
    text = path.read_bytes()
    choice = rng.randrange(7)
    data = [text[: rng.randrange(len(text) or 1)], b"[]", b"null", b"\xff\xfe" + text, b"[" * 200_000,
            text.rstrip()[:-1] + b',"quantization_config": 5}', b""][choice]
    path.write_bytes(data)
    return ["truncated", "list", "null", "bad utf-8", "deep", "duplicate key", "empty"][choice]


def m_header_entry(folder: Path, rng: random.Random) -> str:
    """Change dtype, shape or data_offsets of one header entry."""
    choices = _tensors(folder, lambda n, e: True)
    if not choices:
        raise Skip
    shard, name = rng.choice(choices)
    header, data = _read_st(shard)
    entry = header[name]
    key = rng.choice(["dtype", "shape", "data_offsets"])
    old = entry.get(key)
    if key == "dtype" and old in _ITEMSIZE and rng.random() < 0.5:  # same size: the header stays consistent
        value: Any = rng.choice([d for d, size in _ITEMSIZE.items() if size == _ITEMSIZE[old] and d != old])
    elif key == "dtype" and rng.random() < 0.6:
        value = rng.choice([*_ITEMSIZE, "F8_E8M0", "f32", "", ["F32"], 5])
    elif key == "shape" and isinstance(old, list) and rng.random() < 0.7:
        value = rng.choice([[], [0], [-1], old[::-1], [*old, 1], [x * 2 for x in old], [10**20, 0], [1.5],
                            [True], str(old), [old[0]], [2**63]])
    elif key == "data_offsets" and isinstance(old, list) and len(old) == 2 and rng.random() < 0.7:
        s, e = old
        value = rng.choice([[e, s], [s, e + 1], [s, e - 1], [0, len(data)], [-1, e], [s], [str(s), str(e)],
                            [s, 2**64], [s + 1, e + 1], [0, 0]])
    else:
        value = hostile(rng, old)
    entry[key] = value
    _write_st(shard, header, data)
    return f"{shard.name}:{name}.{key} = {_short(value)}"


def m_header_name(folder: Path, rng: random.Random) -> str:
    """Rename, drop or duplicate a header entry."""
    choices = _tensors(folder, lambda n, e: True)
    if not choices:
        raise Skip
    shard, name = rng.choice(choices)
    header, data = _read_st(shard)
    action = rng.choice(["rename", "drop", "duplicate", "duplicate-moved"])
    entry = header.pop(name)
    if action == "rename":
        new = rng.choice(["\ud800", "", "../x", name + ".extra", name.rsplit(".", 1)[0], name.upper(),
                          rng.choice(list(header))])
        header[new] = entry
        _write_st(shard, header, data)
        return f"{shard.name}: rename {name} -> {new!r}"
    if action == "drop":
        _write_st(shard, header, data)
        return f"{shard.name}: drop {name}"
    text = dumps(header)
    other = dict(entry, data_offsets=[0, entry["data_offsets"][1] - entry["data_offsets"][0]]) \
        if action == "duplicate-moved" and isinstance(entry.get("data_offsets"), list) else entry
    dup = f"{json.dumps(name)}: {dumps(entry)}, {json.dumps(name)}: {dumps(other)}"
    _write_st(shard, "{" + dup + ", " + text[1:] if len(text) > 2 else "{" + dup + "}", data)
    return f"{shard.name}: {action} {name}"


def m_header_flood(folder: Path, rng: random.Random) -> str:
    """Add 1,000 or (one time in ten: each reader parses it, ~0.3 s) 70,000 zero-size tensors to a header, past
    `MAX_TENSORS_PER_FILE`. The last mutation of a case, since re-reading such a header is slow."""
    choices = _tensors(folder, lambda n, e: True)
    if not choices:
        raise Skip
    shard, name = rng.choice(choices)
    header, data = _read_st(shard)
    count = 70_000 if rng.random() < 0.1 else 1000
    prefix = json.dumps(name)[:-1]
    flood = "".join(f', {prefix}.flood{i}": {{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
                    for i in range(count))
    _write_st(shard, dumps(header)[:-1] + flood + "}", data)
    return f"{shard.name}: {count} zero-size tensors"


def m_header_metadata(folder: Path, rng: random.Random) -> str:
    """Make __metadata__ something safetensors refuses or does not expect."""
    shards = _shards(folder)
    if not shards:
        raise Skip
    shard = rng.choice(shards)
    header, data = _read_st(shard)
    value = rng.choice([[], "x", {"format": 1}, {"format": "tf"}, None, {"a": "b" * 1_000_000}, {"format": ["pt"]}])
    header["__metadata__"] = value
    _write_st(shard, header, data)
    return f"{shard.name}: __metadata__ = {_short(value)}"


def m_header_length(folder: Path, rng: random.Random) -> str:
    """Corrupt the 8-byte header length or the header text itself."""
    shards = _shards(folder)
    if not shards:
        raise Skip
    shard = rng.choice(shards)
    blob = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8]) if len(blob) >= 8 else (0,)
    choice = rng.randrange(8)
    if choice >= 5 and not 2 < n <= len(blob) - 8:
        raise Skip  # the header text itself is only edited while the length field is sane
    if choice < 5:
        value = [0, 1, 2**63, len(blob), n + rng.choice([-1, 1, 8])][choice]
        blob[:8] = struct.pack("<Q", value % 2**64)
        what = f"length = {value}"
    elif choice == 5:
        blob[8 + rng.randrange(n)] = rng.randrange(256)
        what = "flip a header byte"
    elif choice == 6:
        blob[8 : 8 + n] = b"[" + b" " * (n - 2) + b"]"
        what = "header is a JSON list"
    else:
        text = bytes(blob[8 : 8 + n]).rstrip(b" ") + b" x"
        blob[: 8 + n] = struct.pack("<Q", len(text)) + text
        what = "trailing garbage in header"
    shard.write_bytes(bytes(blob))
    return f"{shard.name}: {what}"


def m_data_scale(folder: Path, rng: random.Random) -> str:
    """Set scale elements to NaN, Inf, 0, negative, subnormal or huge."""
    kind = rng.choice(list(_FLOATS))
    what = _patch_bytes(folder, rng, lambda n, e: n.endswith("_scale") and e.get("dtype") in ("F32", "F16", "BF16"),
                        lambda entry, size: _float_bytes(_FLOATS[kind], str(entry.get("dtype"))))
    return f"{what} = {kind}"


def m_data_fp8(folder: Path, rng: random.Random) -> str:
    """Put NaN codes (0x7f, 0xff) or random bytes into an fp8 weight."""
    code = rng.choice([0x7F, 0xFF, None])
    what = _patch_bytes(folder, rng, lambda n, e: e.get("dtype") == "F8_E4M3",
                        lambda entry, size: bytes([rng.randrange(256) if code is None else code]))
    return f"{what} = {code}"


def m_data_bitmask(folder: Path, rng: random.Random) -> str:
    """Change 2:4 bitmask bytes, so groups keep 0, 1, 3 or 4 values."""
    byte = rng.choice([0x00, 0xFF, 0x01, 0x07, 0x0F, None])
    what = _patch_bytes(folder, rng, lambda n, e: n.endswith(".bitmask"),
                        lambda entry, size: bytes([rng.randrange(256) if byte is None else byte]))
    return f"{what} = {byte}"


def m_data_int8(folder: Path, rng: random.Random) -> str:
    """Put -128 or random bytes into an int8 weight."""
    what = _patch_bytes(folder, rng, lambda n, e: e.get("dtype") == "I8",
                        lambda entry, size: bytes([rng.choice([0x80, rng.randrange(256)])]))
    return what


def m_data_other(folder: Path, rng: random.Random) -> str:
    """Change a compressed shape (I64) tensor, or put random bytes into a quantized module's tensor."""
    if rng.random() < 0.5:
        value = rng.choice([0, -1, 2**40, 7, 1])
        return _patch_bytes(folder, rng, lambda n, e: n.endswith(".shape") and e.get("dtype") == "I64",
                            lambda entry, size: struct.pack("<q", value)) + f" = {value}"
    return _patch_bytes(folder, rng, _quantized_tensor, lambda entry, size: bytes(rng.randrange(256)
                                                                                  for _ in range(size)))


def _quantized_tensor(name: str, entry: dict[str, Any]) -> bool:
    """A tensor qformat wrote for a quantized module (not a full-precision one, whose NaN is no reader's fault)."""
    return entry.get("dtype") not in ("F32", "F16", "BF16", "F64") or name.endswith("_scale")


def m_file(folder: Path, rng: random.Random) -> str:
    """Truncate, extend or delete a weight file (or config.json), or replace it by a directory or a device link."""
    files = _shards(folder)
    target = rng.choice(files) if files and rng.random() < 0.9 else folder / "config.json"
    if not target.is_file():
        raise Skip
    size = target.stat().st_size
    action = rng.choice(["truncate", "truncate", "extend", "delete", "directory", "device"])
    if action == "truncate":
        cut = rng.choice([0, 4, 8, rng.randrange(size or 1), max(size - 1, 0)])
        with target.open("r+b") as fh:
            fh.truncate(cut)
        return f"truncate {target.name} to {cut}"
    if action == "extend":
        with target.open("ab") as fh:
            fh.write(bytes(rng.choice([1, 7, 4096])))
        return f"extend {target.name}"
    target.unlink()
    if action == "directory":
        target.mkdir()
    elif action == "device":
        device = rng.choice(["/dev/zero", "/dev/urandom", "/dev/null"])
        target.symlink_to(device)
        return f"{target.name} -> {device}"
    return f"{action} {target.name}"


def m_index(folder: Path, rng: random.Random) -> str:
    """Tamper with model.safetensors.index.json (or add a bogus one to a single-file checkpoint)."""
    path = folder / "model.safetensors.index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except (OSError, ValueError):
        raise Skip from None
    if index is None:
        names = [n for _, n in _tensors(folder, lambda n, e: True)]
        index = {"metadata": {"total_size": 1}, "weight_map": {n: "model.safetensors" for n in names}}
        created = "create index; "
    else:
        created = ""
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise Skip
    name = rng.choice(list(wmap))
    choice = rng.randrange(6)
    if choice == 0:
        wmap[name] = value = rng.choice(["../model.safetensors", "/etc/passwd", "missing.safetensors", 5, None, "",
                                         "config.json", "."])
        what = f"weight_map[{name}] = {value!r}"
    elif choice == 1:
        del wmap[name]
        what = f"drop {name}"
    elif choice == 2:
        wmap[name + ".extra"] = wmap[name]
        what = f"add {name}.extra"
    elif choice == 3:
        index["weight_map"] = value = hostile(rng)
        what = f"weight_map = {_short(value)}"
    elif choice == 4:
        index["metadata"] = value = hostile(rng)
        what = f"metadata = {_short(value)}"
    else:
        path.write_text(json.dumps(index)[:-3])
        return created + "truncated index"
    path.write_text(dumps(index))
    return created + what


def m_readme(folder: Path, rng: random.Random) -> str:
    """Give the checkpoint an odd README.md (the source card): markers, broken front matter, bad bytes."""
    from qformat.cards.facts import MARKER, ORIGINAL_END, ORIGINAL_START

    texts = {
        "end marker": f"# Model\n{ORIGINAL_END}\nafter {TAIL}\n",
        "all markers": f"{MARKER} -->\n{ORIGINAL_START}\nx\n{ORIGINAL_END}\n{ORIGINAL_END}\n{TAIL}\n",
        "fenced marker": f"# Model\n```\n{ORIGINAL_START}\n{ORIGINAL_END}\n```\n{TAIL}\n",
        "broken yaml": f"---\nbase_model: [\n---\nbody {TAIL}\n",
        "yaml list": f"---\n- a\n- b\n---\nbody {TAIL}\n",
        "yaml tag": f"---\nx: !!python/object/apply:os.system ['true']\n---\n{TAIL}\n",
        "yaml deep": "---\nx: " + "[" * 5000 + "]" * 5000 + f"\n---\n{TAIL}\n",
        "only dashes": "---\n",
        "bad utf-8": None,
        "directory": None,
        "payload": f"---\nbase_model: '{PAYLOAD}'\nlicense: '-->'\n---\n# Model\n{TAIL}\n",  # a body is kept as is
    }
    kind = rng.choice(list(texts))
    readme = folder / "README.md"
    if readme.is_dir():
        raise Skip
    if kind == "bad utf-8":
        readme.write_bytes(b"# \xff\xfe model\n")
    elif kind == "directory":
        readme.mkdir()
    else:
        readme.write_text(texts[kind], encoding="utf-8")
    return kind


MUTATIONS: dict[str, Callable[[Path, random.Random], str]] = {
    "config.replace": m_config_replace,
    "config.delete": m_config_delete,
    "config.model": m_config_model,
    "config.pattern": m_config_pattern,
    "config.strings": m_config_strings,
    "config.syntax": m_config_syntax,
    "header.entry": m_header_entry,
    "header.name": m_header_name,
    "header.flood": m_header_flood,
    "header.metadata": m_header_metadata,
    "header.length": m_header_length,
    "data.scale": m_data_scale,
    "data.fp8": m_data_fp8,
    "data.bitmask": m_data_bitmask,
    "data.int8": m_data_int8,
    "data.other": m_data_other,
    "file": m_file,
    "index": m_index,
    "readme": m_readme,
}


def _rehash(folder: Path) -> None:
    """Record the tampered bytes' hashes, so verify must find data problems by checking content, not hashes."""
    config = _load_config(folder)
    hashes = config["quantization_config"].get("provenance", {}).get("tensor_hashes")
    if not isinstance(hashes, dict):
        raise Skip
    for shard in _shards(folder):
        header, data = _read_st(shard)
        for name, entry in header.items():
            if name in hashes and isinstance(entry, dict):
                start, end = entry["data_offsets"]
                hashes[name] = "sha256:" + hashlib.sha256(data[start:end]).hexdigest()
    _save_config(folder, config)


def case_rng(seed: int, index: int) -> random.Random:
    """The random source of case `index` of a run with `seed` (independent of job count and of other cases)."""
    return random.Random(f"qformat-fuzz/{seed}/{index}")


def mutate_case(folder: Path, rng: random.Random) -> list[tuple[str, str]]:
    """Apply one to three random mutations to the checkpoint in `folder`; returns (kind, what it did) pairs."""
    done: list[tuple[str, str]] = []
    wanted = rng.choice([1, 1, 2, 3])
    for _attempt in range(30):
        if len(done) == wanted:
            break
        kind = rng.choice(list(MUTATIONS))
        try:
            done.append((kind, MUTATIONS[kind](folder, rng)))
        except Skip:
            continue
        except (LookupError, TypeError, ValueError, AttributeError, RecursionError, OSError, MemoryError):
            if not done:  # on an unmutated base this is a bug in the mutation itself
                raise
            continue
        if kind == "header.flood":
            break
    if any(kind.startswith("data.") for kind, _ in done) and rng.random() < 0.5:
        try:
            _rehash(folder)
            done.append(("rehash", "tensor_hashes updated"))
        except (Skip, LookupError, TypeError, ValueError, AttributeError):
            pass
    return done


def _short(value: Any) -> str:
    text = value if isinstance(value, Raw) else repr(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)} chars)"


# --- running one case --------------------------------------------------------------------------------------------


def _has_qformat_frame(exc: BaseException) -> bool:
    """Whether qformat code was on the stack when `exc` (or an exception it chains) was raised."""
    root = str(Path(__file__).resolve().parent.parent) + os.sep
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            if filename.startswith(root) and not filename.endswith(f"testing{os.sep}fuzz.py"):
                return True
            tb = tb.tb_next
        stack += [e.__cause__, e.__context__]
    return False


def _has_quant_linear(model: Any) -> bool:
    """Whether qformat's loader built any of `model`'s modules."""
    from qformat.nn import QuantLinear

    return any(isinstance(module, QuantLinear) for module in model.modules())


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {lines[0][:160] if lines else ''}"


class _Runner:
    """The APIs on one checkpoint folder, in this process; keeps each base's logits to compare with."""

    def __init__(self, bases: dict[str, Path], *, verbose: bool = False) -> None:
        self.bases = bases
        self.verbose = verbose
        self.base_logits: dict[str, Any] = {}

    def _forward(self, folder: Path, base: Base) -> tuple[Any, bool]:
        """Load `folder` with transformers and run INPUT_IDS: (logits, whether qformat's loader built modules)."""
        import torch
        import transformers

        model = getattr(transformers, base.auto_class).from_pretrained(folder)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(INPUT_IDS)).logits
        return logits, _has_quant_linear(model)

    def call(self, api: str, folder: Path, base: Base, verified: bool) -> tuple[str, str]:
        """Run `api` on `folder`; returns (outcome, detail) as described in the module docstring."""
        import qformat

        try:
            if api == "verify":
                qformat.verify(folder)
            elif api == "inspect":
                qformat.inspect(folder).to_text()
            elif api == "card":
                return self._judge_card(folder)
            else:
                return self._judge_load(*self._forward(folder, base), base, verified)
        except qformat.QFormatError as exc:
            return "qformat", _first_line(exc)
        except Exception as exc:  # noqa: BLE001 - the point is to classify everything
            if self.verbose:
                traceback.print_exc()
            if api == "load" and not verified and not _has_qformat_frame(exc):
                return "foreign", _first_line(exc)
            return "error", _first_line(exc)
        return "ok", ""

    @staticmethod
    def _judge_card(folder: Path) -> tuple[str, str]:
        """Render the card, write it as README.md and render again (then put README.md back as it was): notes a raw
        payload or a lost original card."""
        from qformat.cards import render_card

        readme = folder / "README.md"
        saved = readme.read_bytes() if readme.is_file() else None
        first = render_card(folder)
        if PAYLOAD in _outside_code(first):
            return "ok", "card_raw"
        if saved is None or TAIL.encode() not in saved:  # only the odd source cards of `m_readme` are re-rendered
            return "ok", ""
        try:
            readme.write_text(first, encoding="utf-8")
            lost = TAIL not in render_card(folder)
        finally:
            readme.write_bytes(saved)
        return "ok", "card_lost" if lost else ""

    def _judge_load(self, logits: Any, by_qformat: bool, base: Base, verified: bool) -> tuple[str, str]:
        import torch

        if not bool(torch.isfinite(logits).all()):
            detail = f"{int((~torch.isfinite(logits)).sum())} of {logits.numel()} logits not finite"
            if not verified and not by_qformat:  # e.g. quant_method is not "qformat": transformers loaded it alone
                return "foreign", f"{detail}, from a model without qformat modules"
            return "nonfinite", detail
        if verified:
            return "ok", ""
        if base.name not in self.base_logits:
            self.base_logits[base.name] = self._forward(self.bases[base.name], base)[0]
        reference = self.base_logits[base.name]
        same = reference.shape == logits.shape and torch.allclose(reference, logits, rtol=1e-4, atol=1e-4)
        return "ok", "lenient" if same else "wrong"


def _outside_code(markdown: str) -> str:
    """The Markdown outside fenced blocks, inline code spans and HTML comments: where HTML would be rendered.
    Fences are tracked as CommonMark does (a longer fence is not closed by a shorter one), by the cards' own rule."""
    from qformat.cards.markdown import fenced

    lines = markdown.splitlines()
    prose = "\n".join(re.sub(r"(`+).*?\1", "", line) for line, code in zip(lines, fenced(lines)) if not code)
    return re.sub(r"<!--.*?-->", "", prose, flags=re.DOTALL)  # an HTML comment's content is not rendered either


def run_apis(folder: Path, base: Base, bases: dict[str, Path], *, load: bool = True,
             runner: _Runner | None = None) -> dict[str, tuple[str, str]]:
    """Each API's (outcome, detail) on the checkpoint in `folder`, made from `base` (in this process, no deadline)."""
    runner = runner or _Runner(bases)
    outcomes: dict[str, tuple[str, str]] = {}
    for api in APIS if load else APIS[:-1]:
        outcomes[api] = runner.call(api, folder, base, outcomes.get("verify", ("",))[0] == "ok")
    return outcomes


def _quiet() -> None:
    """No warnings, log lines or progress bars: the outcome table is the output."""
    import logging
    import warnings

    import transformers

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _quiet_worker(memory_gb: float) -> None:
    """Quiet, single-threaded torch, and a cap on the address space of this worker process."""
    import resource

    import torch

    _quiet()
    torch.set_num_threads(1)
    limit = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))


def _worker_main(conn: Connection, bases: dict[str, Path], root: Path, seed: int, apis: tuple[str, ...],
                 load_every: int, memory_gb: float) -> None:
    """Worker loop: receive a case index, build and mutate the case, report each API as it starts and ends."""
    _quiet_worker(memory_gb)
    runner = _Runner(bases)
    while (index := conn.recv()) is not None:
        rng = case_rng(seed, index)
        base = rng.choice(BASES)
        folder = root / f"case-{index}"
        shutil.copytree(bases[base.name], folder)
        try:
            conn.send(("case", base.name, mutate_case(folder, rng)))
            verified = False
            for api in apis:
                if api == "load" and index % load_every:
                    continue
                conn.send(("start", api))
                outcome = runner.call(api, folder, base, verified)
                if api == "verify":
                    verified = outcome[0] == "ok"
                conn.send(("done", api, outcome))
        except Exception:  # noqa: BLE001 - a fuzzer bug must be reported, not hang the run
            conn.send(("fuzzer", traceback.format_exc(limit=3)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        conn.send(("end",))


# --- the pool and the report -------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """What happened to one case: its base, mutations, and (outcome, detail) per API that ran."""

    index: int
    base: str = ""
    mutations: list[tuple[str, str]] = field(default_factory=list)
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def bad(self) -> list[str]:
        return [api for api, (outcome, _) in self.outcomes.items() if outcome in BAD]

    def describe(self) -> str:
        muts = "; ".join(f"{k}: {w}" for k, w in self.mutations) or "(none)"
        return f"case {self.index} [{self.base}] {muts}"


class _Worker:
    """One forked worker process and the case it is running."""

    def __init__(self, ctx: Any, args: tuple[Any, ...]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()
        self.case: CaseResult | None = None
        self.api = "mutate"
        self.deadline = math.inf

    def start(self, index: int, timeout: float) -> None:
        self.case, self.api, self.deadline = CaseResult(index), "mutate", time.monotonic() + timeout
        self.conn.send(index)

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


@dataclass
class FuzzReport:
    """All case results of a run, with the tables `main` prints."""

    cases: list[CaseResult]
    seconds: float

    @property
    def bad(self) -> list[CaseResult]:
        return [c for c in self.cases if c.bad]

    def by_api(self) -> str:
        """Outcome counts per API."""
        names = ["ok", "qformat", "foreign", *sorted(BAD), "lenient", "wrong", "card_raw", "card_lost", "fuzzer"]
        counts = {api: Counter() for api in (*APIS, "mutate")}
        for case in self.cases:
            for api, (outcome, detail) in case.outcomes.items():
                counts[api][outcome] += 1
                if detail in ("lenient", "wrong", "card_raw", "card_lost"):
                    counts[api][detail] += 1
        rows = [["api", *names]] + [[api, *(str(c[n]) for n in names)] for api, c in counts.items() if c]
        return _table(rows)

    def by_kind(self) -> str:
        """Per mutation kind: cases, BAD outcomes per API, and lenient loads."""
        counts: dict[str, Counter] = {}
        for case in self.cases:
            for kind in {k for k, _ in case.mutations} or {"(none)"}:
                c = counts.setdefault(kind, Counter())
                c["cases"] += 1
                for api in case.bad:
                    c[api] += 1
                c["lenient"] += case.outcomes.get("load", ("", ""))[1] in ("lenient", "wrong")
        cols = ["cases", *APIS, "lenient"]
        rows = [["kind", *cols]] + [[k, *(str(counts[k][c]) for c in cols)] for k in sorted(counts)]
        return _table(rows)

    def bad_classes(self) -> str:
        """Distinct BAD classes (API, outcome, exception type), with counts, kinds and the simplest example."""
        groups: dict[str, list[tuple[CaseResult, str]]] = {}
        for case in self.cases:
            for api in case.bad:
                outcome, detail = case.outcomes[api]
                groups.setdefault(f"{api} {outcome} {detail.split(':', 1)[0]}", []).append((case, detail))
        return _listing(groups)

    def notes(self) -> str:
        """Per note (lenient, wrong, card_raw, card_lost, and foreign by type): count, kinds, the simplest example."""
        groups: dict[str, list[tuple[CaseResult, str]]] = {}
        for case in self.cases:
            for api, (outcome, detail) in case.outcomes.items():
                if outcome == "ok" and detail:
                    groups.setdefault(f"{api} {detail}", []).append((case, ""))
                elif outcome == "foreign":
                    groups.setdefault(f"{api} foreign {detail.split(':', 1)[0]}", []).append((case, detail))
        return _listing(groups)

    def summary(self) -> str:
        return (f"{len(self.cases)} cases in {self.seconds:.1f} s, {len(self.bad)} with a BAD outcome\n\n"
                f"{self.by_api()}\n\n{self.by_kind()}\n\nBAD classes:\n{self.bad_classes()}\n\n"
                f"Notes (not failures):\n{self.notes()}")


def _listing(groups: dict[str, list[tuple[CaseResult, str]]]) -> str:
    """One entry per group, largest first: count, commonest mutation kinds, the simplest example and its detail."""
    lines = []
    for label, hits in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        kinds = Counter(kind for case, _ in hits for kind in {k for k, _ in case.mutations})
        case, detail = min(hits, key=lambda hit: (len(hit[0].mutations), hit[0].index))
        lines.append(f"- {label} x{len(hits)}; kinds: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common(4)))
        lines.append(f"    e.g. {case.describe()}")
        if detail:
            lines.append(f"    -> {detail[:200]}")
    return "\n".join(lines) or "(none)"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def run_fuzz(cases: int, seed: int, *, jobs: int = 2, timeout: float = 10.0, load_every: int = 1,
             apis: tuple[str, ...] = APIS, workdir: Path | None = None, bases: dict[str, Path] | None = None,
             memory_gb: float = 4.0, progress: bool = False) -> FuzzReport:
    """Run cases 0..`cases`-1 of `seed` in `jobs` forked workers; a call past `timeout` seconds is a hang.

    `load_every`: load with transformers only every n-th case (the slowest API). `workdir`: where cases (and bases,
    unless `bases` from `make_bases` is given) go, in a temporary folder removed afterwards. `memory_gb`: the
    address-space cap of each worker.
    """
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qformat-fuzz-", dir=workdir) as tmp:
        root = Path(tmp)
        bases = bases or make_bases(root / "bases")
        (root / "cases").mkdir()
        _preload(bases)
        ctx = multiprocessing.get_context("fork")
        args = (bases, root / "cases", seed, apis, load_every, memory_gb)
        results = list(_pool(ctx, args, range(cases), jobs, timeout, progress))
    return FuzzReport(sorted(results, key=lambda c: c.index), time.monotonic() - started)


def _preload(bases: dict[str, Path]) -> None:
    """Run every API on every base once before forking, so that no worker pays for lazy imports inside a deadline."""
    runner = _Runner(bases)
    for base in BASES:
        run_apis(bases[base.name], base, bases, runner=runner)


def _pool(ctx: Any, args: tuple[Any, ...], indices: range, jobs: int, timeout: float,
          progress: bool) -> Iterator[CaseResult]:
    """Feed `indices` to workers; yield each finished case; replace a worker that hangs or dies."""
    pending = iter(indices)
    workers = [_Worker(ctx, args) for _ in range(max(1, min(jobs, len(indices))))]
    done = 0
    try:
        for w in workers:
            _next(w, pending, timeout)
        while any(w.case for w in workers):
            busy = {w.conn: w for w in workers if w.case}
            ready = wait(list(busy), timeout=max(0.0, min(w.deadline for w in busy.values()) - time.monotonic()))
            for conn in ready:
                w = busy[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    w.proc.join(1)
                    yield _finish(w, "died", f"worker exit code {w.proc.exitcode}")
                    workers[workers.index(w)] = w = _Worker(ctx, args)
                    _next(w, pending, timeout)
                    continue
                if msg[0] == "case":
                    w.case.base, w.case.mutations = msg[1], msg[2]
                elif msg[0] == "start":
                    w.api, w.deadline = msg[1], time.monotonic() + timeout
                elif msg[0] == "done":
                    late = time.monotonic() > w.deadline
                    w.case.outcomes[msg[1]] = ("hang", f"answered after more than {timeout:g} s") if late else msg[2]
                elif msg[0] == "fuzzer":
                    w.case.outcomes["mutate"] = ("fuzzer", msg[1])
                elif msg[0] == "end":
                    case, w.case = w.case, None
                    yield case
                    done += 1
                    _next(w, pending, timeout)
                    if progress and done % 500 == 0:
                        print(f"... {done} cases", file=sys.stderr, flush=True)
            for i, w in enumerate(workers):
                if w.case and time.monotonic() > w.deadline and w.conn not in ready:
                    w.proc.kill()
                    w.proc.join()
                    yield _finish(w, "hang", f"no answer in {timeout:g} s")
                    workers[i] = w = _Worker(ctx, args)
                    _next(w, pending, timeout)
    finally:
        for w in workers:
            w.stop()


def _finish(w: _Worker, outcome: str, detail: str) -> CaseResult:
    assert w.case is not None
    w.case.outcomes[w.api] = (outcome, detail)
    case, w.case = w.case, None
    return case


def _next(w: _Worker, pending: Iterator[int], timeout: float) -> None:
    index = next(pending, None)
    if index is not None:
        w.start(index, timeout)


def _replay(seed: int, index: int, workdir: Path | None) -> None:
    """Run one case in this process and print its mutations and each API's outcome with a traceback."""
    with tempfile.TemporaryDirectory(prefix="qformat-fuzz-", dir=workdir) as tmp:
        bases = make_bases(Path(tmp) / "bases")
        rng = case_rng(seed, index)
        base = rng.choice(BASES)
        folder = Path(tmp) / "case"
        shutil.copytree(bases[base.name], folder)
        for kind, what in mutate_case(folder, rng):
            print(f"{kind}: {what}")
        for api, (outcome, detail) in run_apis(folder, base, bases, runner=_Runner(bases, verbose=True)).items():
            print(f"{api}: {outcome} {detail}", flush=True)
        print(f"(case folder kept at {shutil.copytree(folder, Path(tempfile.mkdtemp(prefix='qformat-case-')) / 'c')})")


def main(argv: list[str] | None = None) -> int:
    """Command line: run a fuzz and print the outcome tables; exit 1 if any case had a BAD outcome."""
    parser = argparse.ArgumentParser(prog="python -m qformat.testing.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call before it counts as a hang")
    parser.add_argument("--load-every", type=int, default=1, help="load with transformers every n-th case only")
    parser.add_argument("--case", type=int, help="replay this one case in-process, with tracebacks")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, help="also write every case's mutations and outcomes here")
    args = parser.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(key, "1")
    _quiet()
    if args.case is not None:
        _replay(args.seed, args.case, args.workdir)
        return 0
    report = run_fuzz(args.cases, args.seed, jobs=args.jobs, timeout=args.timeout, load_every=args.load_every,
                      workdir=args.workdir, progress=True)
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(case) for case in report.cases], indent=1))
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
