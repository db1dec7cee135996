"""Model cards from an untrusted checkpoint: config strings cannot change the card's structure, and a carried
original card survives any number of re-renders intact, whatever markers it contains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt

import qformat
from qformat.cards import check_card, render_card
from qformat.cards.facts import MARKER, ORIGINAL_END, ORIGINAL_START
from qformat.cli.main import cli

#: Everything a string can do to Markdown, YAML front matter and HTML comments, in one value.
HOSTILE = ("a|b `c` ```d int4 W4A16 3 of 9 Linear modules\n# Heading\r\nline\u2028<script>x</script> --> --!> "
           "<!-- [l](javascript:alert(1)) ![i](https://e.invalid/i.png) *e* _u_ \\ &amp; \n---\nkey: v\n---\n"
           f"{ORIGINAL_START}\ninjected\n{ORIGINAL_END}\n{MARKER} -->")


def _flat(value: str) -> str:
    """A value as a table cell or inline text shows it: every line break becomes a space."""
    return " ".join(value.splitlines())


FLAT = _flat(HOSTILE)

OWN_HEADINGS = ["Overview", "Modules kept in full precision", "Size", "Evaluation", "Usage", "How it was made",
                "Limitations"]


def _markdown() -> MarkdownIt:
    return MarkdownIt("commonmark").enable("table")


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_models, tmp_path_factory) -> Path:
    return qformat.convert(tiny_models["llama"], tmp_path_factory.mktemp("escape") / "llama", scheme="fp8-dynamic",
                           ignore=["model.layers.1.self_attn.q_proj"], overrides=["re:.*mlp.*=w8a8-int8"]).output


@pytest.fixture
def hostile_ckpt(tiny_ckpt, tmp_path) -> Path:
    """The tiny checkpoint with HOSTILE in every config string a card shows."""
    folder = Path(shutil.copytree(tiny_ckpt, tmp_path / "hostile"))
    config = json.loads((folder / "config.json").read_text())
    q = config["quantization_config"]
    config["architectures"] = [f"Evil{HOSTILE}ForCausalLM"]
    p = q["provenance"]
    p["source"]["base_model"] = HOSTILE
    p["command"] = f"qformat convert SRC OUT\n{HOSTILE}"
    p["qformat_version"] = HOSTILE
    p["environment"] = {f"torch{HOSTILE}": HOSTILE}
    scheme = f"w8a8{HOSTILE}"
    q["schemes"][scheme] = q["schemes"].pop("w8a8-int8")
    q["overrides"] = [{"pattern": "re:.*mlp.*", "scheme": scheme}]
    q["fallback"][0]["detail"] = HOSTILE
    q["fallback"].append({"module": f"evil{HOSTILE}", "reason": "user", "detail": HOSTILE})
    q["statistics"]["modules"]["model.layers.0.mlp.down_proj"]["observer"] = HOSTILE
    q["evaluation"] = [{"task": HOSTILE, "dataset": HOSTILE, "metric": HOSTILE, "baseline": 1.0, "quantized": 0.5}]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _own_tokens(text: str) -> list:
    """Markdown tokens of the card body, up to the carried original card."""
    body = text.split("\n---\n", 1)[1] if text.startswith("---\n") else text
    tokens = _markdown().parse(body)
    for i, t in enumerate(tokens):
        if t.type == "html_block" and t.content.startswith(ORIGINAL_START):
            return tokens[:i]
    return tokens


def _tables(tokens: list) -> list[list[list[str]]]:
    """Every table as rows of cell texts (inline content as Markdown source after escapes)."""
    tables: list[list[list[str]]] = []
    cells: list[str] | None = None
    for t in tokens:
        if t.type == "table_open":
            tables.append([])
        elif t.type == "tr_open":
            cells = []
        elif t.type == "tr_close":
            tables[-1].append(cells)
            cells = None
        elif t.type == "inline" and cells is not None:
            cells.append(_plain(t))
    return tables


def _plain(inline) -> str:
    """What a reader sees in an inline token: its text and code, with markup removed."""
    return "".join(c.content for c in inline.children or [] if c.type in ("text", "code_inline", "softbreak"))


def test_hostile_config_strings_do_not_change_the_card_structure(hostile_ckpt):
    text = render_card(hostile_ckpt)
    tokens = _own_tokens(text)
    headings = [_plain(tokens[i + 1]) for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == [_flat(HOSTILE.split("/")[-1]) + " — FP8/INT8 (qformat)"] + OWN_HEADINGS  # none injected
    html = [t.content for t in tokens if t.type in ("html_block", "html_inline")]
    assert len(html) == 1 and html[0].startswith(MARKER)  # our own comment, and no other HTML
    assert html[0].count("-->") == 1 and "--!>" not in html[0] and html[0].count("<!--") == 1
    inline = [c for t in tokens if t.type == "inline" for c in t.children or []]
    links = [c.attrGet("href") for c in inline if c.type == "link_open"]
    assert links == ["https://github.com/huggingface/transformers"]  # nothing injected; a non-repo id is not linked
    assert not [c for c in inline if c.type == "image"]
    overview, fallback, size, evaluation = _tables(tokens)
    assert [len(r) for r in overview] == [2] * 5 and overview[1][1] == f"Evil{FLAT}ForCausalLM (model_type llama)"
    assert overview[2][1] == f"{FLAT} (not a Hub repo id)"
    assert [len(r) for r in fallback] == [3] * 6  # header + 5 entries, 3 columns each
    assert fallback[1][2] == FLAT and fallback[5] == [f"evil{FLAT}", "user", FLAT]
    assert [len(r) for r in size] == [4, 4]
    # the recorded change and recovery are shown, never computed from quantized / baseline: "-" where not recorded
    assert evaluation == [["Metric", "Text", "Source", "Quantized", "Change", "Recovery"],
                          [FLAT, FLAT, "1", "0.5", "-", "-"]]
    command = [t for t in tokens if t.type == "fence"][-1]
    assert command.content == "\n".join(f"qformat convert SRC OUT\n{HOSTILE}".splitlines()) + "\n"  # verbatim lines
    data = yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))
    assert set(data) == {"library_name", "tags", "pipeline_tag", "model-index"}  # base_model: not a repo id, left out
    assert f"w8a8{HOSTILE}" in data["tags"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["type"] == HOSTILE
    assert ModelCard(text).text.lstrip("\n").startswith(MARKER)  # the body starts where it should


def test_hostile_card_passes_its_own_check_and_renders_stably(hostile_ckpt):
    text = render_card(hostile_ckpt)
    assert check_card(hostile_ckpt, text) == []
    (hostile_ckpt / "README.md").write_text(text, encoding="utf-8")
    assert render_card(hostile_ckpt) == text  # no original card appears from config strings that look like one
    runner = CliRunner()
    written = runner.invoke(cli, ["card", str(hostile_ckpt)])
    assert written.exit_code == 0, written.output
    assert (hostile_ckpt / "README.md").read_text(encoding="utf-8") == text
    checked = runner.invoke(cli, ["card", "--check", str(hostile_ckpt)])
    assert checked.exit_code == 0 and "ok:" in checked.output, checked.output


def test_valid_base_model_is_linked_and_in_the_metadata(hostile_ckpt):
    config = json.loads((hostile_ckpt / "config.json").read_text())
    config["quantization_config"]["provenance"]["source"]["base_model"] = "org/int4.model"
    (hostile_ckpt / "config.json").write_text(json.dumps(config))
    text = render_card(hostile_ckpt)
    links = [c.attrGet("href") for t in _own_tokens(text) if t.type == "inline" for c in t.children or []
             if c.type == "link_open"]
    assert "https://huggingface.co/org/int4.model" in links
    assert ModelCard(text).data.base_model == "org/int4.model"
    assert check_card(hostile_ckpt, text) == []  # "int4" in the base model's name is data, not a claim


SOURCE_BODY = f"""# Source model

Docs that quote qformat's markers: {ORIGINAL_END} and {ORIGINAL_START} inline.

{ORIGINAL_END}

```
{ORIGINAL_START}
# not a heading
```

{MARKER} (a line that looks like a qformat card's first line) -->
## Section
tail\x0cwith a form feed\u2028and a line separator"""


@pytest.mark.parametrize("source", [
    SOURCE_BODY,
    f"---\nlicense: mit\n---\n{SOURCE_BODY}",
    f"{MARKER} -->\n{ORIGINAL_START}\nx\n{ORIGINAL_END}\n{ORIGINAL_END}\ntail after the last end marker",
], ids=["plain", "with-metadata", "starts-like-a-generated-card"])
def test_carried_original_card_with_markers_loses_nothing(tiny_ckpt, tmp_path, source):
    folder = Path(shutil.copytree(tiny_ckpt, tmp_path / "with-card"))
    (folder / "README.md").write_text(source, encoding="utf-8")
    body = source.removeprefix("---\nlicense: mit\n---\n")
    first = render_card(folder)
    assert f"\n{ORIGINAL_START}\n" in first and first.endswith(f"\n{ORIGINAL_END}\n")
    start = first.index(f"\n{ORIGINAL_START}\n") + len(ORIGINAL_START) + 2
    carried = first[start:].removesuffix(f"\n{ORIGINAL_END}\n")
    assert _promote(carried) == body  # every byte of the source card, its headings two levels deeper
    for _ in range(2):
        (folder / "README.md").write_text(render_card(folder), encoding="utf-8")
        assert render_card(folder) == first  # stable: nothing is lost or doubled on each re-render


def _promote(carried: str) -> str:
    """The carried body with the two heading levels the card added taken off again (outside code fences)."""
    out, fenced = [], False
    for line in carried.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        out.append(line[2:] if not fenced and line.startswith("###") else line)
    return "\n".join(out)


def test_source_card_with_hostile_yaml_metadata_renders(tmp_path):
    """A source card whose front matter nests past Python's recursion limit is a card without metadata (not a
    RecursionError), and `card --check` names a metadata value that aliases itself into a huge list by its type
    instead of printing it."""
    from qformat.cards.facts import split_source_card

    deep = "---\nx: " + "[" * 5000 + "]" * 5000 + "\n---\n# Model\n"
    assert split_source_card(deep).metadata == {} and split_source_card(deep).body == "# Model"
    laughs = "---\n" + "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
    ) + "base_model: *i\n---\n# Model\n"
    meta = split_source_card(laughs).metadata
    assert isinstance(meta["base_model"], list)
    from qformat.cards.check import _shown

    assert _shown(meta["base_model"]) == "a list"
