"""Module-name patterns from a checkpoint are untrusted: matching stays bounded and means what `re.match` means."""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import qformat
from qformat.errors import QFormatError
from qformat.spec.fused import DEFAULT_FUSED_GROUPS
from qformat.spec.patterns import (
    MAX_PATTERN_LENGTH,
    MAX_REGEX_PATTERNS,
    PatternSet,
    RuleSet,
    first_match,
    pattern_matches,
    validate_pattern,
)

#: Seconds a call may run before the test calls it a hang (the old code ran for minutes per module name).
GUARD_S = 20

HOSTILE = [r"re:(a|aa)+$", r"re:(\w|\w\w|_|\.)+$x", r"re:(\w+\.?)*x$", r"re:(.*a){20}$", r"re:((m|mo)+)+z",
           r"re:(([a-z.0-9_]+)*)*!$"]


def _guarded(call: Callable[[], Any]) -> Any:
    """Run `call` in a thread; fail the test (instead of hanging the suite) if it runs past GUARD_S."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(GUARD_S)
    if thread.is_alive():
        pytest.fail(f"still running after {GUARD_S} s: pattern matching is not bounded")
    if "error" in box:
        raise box["error"]
    return box.get("value")


NAMES = [
    "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
    "model.layers.0.self_attn.o_proj", "model.layers.11.mlp.gate_proj", "model.layers.11.mlp.up_proj",
    "model.layers.11.mlp.down_proj", "lm_head", "model.decoder.layers.3.fc1", "model.encoder.layers.0.fc2",
    "roberta.encoder.layer.2.attention.self.query", "roberta.encoder.layer.2.attention.self.key",
    "roberta.encoder.layer.2.attention.self.value", "classifier.dense", "mlp", "mlp.down_proj", "",
    "model.layers.0.block_sparse_moe.experts.7.w1", "vision_tower.blocks.3.attn.proj", "down_proj\n",
    "MODEL.LAYERS.0.MLP.DOWN_PROJ", "model.layers.9.mlp.down_proj_extra", "ä.layers.0.ß",
]
PATTERNS = [
    r".*down_proj", r"model\.layers\.\d+\.mlp\..*", r".*\.(q|k|v)_proj$", r".*(q_proj|k_proj|v_proj)",
    r"mlp", r".*mlp\.down_proj$", r"lm_head$", r"model\.layers\.[0-9]+\.self_attn\.[qkv]_proj", r".*[^a-z]fc\d",
    r"(?i)model\.LAYERS.*", r".*experts\.\d{1,2}\.w[13]", r"^model", r"model\.layers\.(?:0|11)\.", r"\w+\.\w+",
    r".*attention\.self\.(query|key|value)$", r".*(?<!o)_proj$", r".*(?=down).*", r"down_proj$", r".*\bfc1\b",
    r"[^.]+\.layers\.\d+\.mlp\.(gate|up)_proj", r".*", r"", r"model\.layers\.\d{2}\.", r"(?s).*\n$", r".*ß$",
    r"classifier\.dense|lm_head", r"(vision_tower|multi_modal_projector).*", r"model\.layers\.0\.self_attn\.[a-z]_proj",
    r".{5,}", r"[\]a-z.]+$", r"[{]", r".*proj\Z", r"(?x) model \. layers # comment",
] + [rf".*\.{leaf}$" for group in DEFAULT_FUSED_GROUPS for leaf in group]


@pytest.mark.parametrize("expression", PATTERNS)
def test_matching_agrees_with_re_match(expression):
    for name in NAMES:
        assert pattern_matches("re:" + expression, name) == (re.match(expression, name) is not None), name


@pytest.mark.parametrize("pattern", HOSTILE)
def test_backtracking_patterns_finish_or_are_refused_quickly(pattern):
    """`re` takes minutes on each of these; the bounded matcher either answers (regex avoids some blow-ups) or
    refuses the pattern, and a refused pattern stays refused without another timeout."""
    names = [f"model.layers.{i}.self_attn.q_proj_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" for i in range(50)]
    names += ["a" * 40 + "b", "m" + "o" * 40, "x" * 40 + "!", "model." * 8 + "q_proj"]

    def match_all() -> None:
        for name in names:
            pattern_matches(pattern, name)

    try:
        _guarded(match_all)
    except QFormatError as exc:
        assert "backtracks catastrophically" in str(exc) and "simplify it" in str(exc)
        with pytest.raises(QFormatError, match="backtracks catastrophically"):
            _guarded(lambda: pattern_matches(pattern, "short"))


def test_a_pattern_that_times_out_is_refused():
    with pytest.raises(QFormatError, match=r"pattern 're:\(a\|aa\)\+\$' backtracks catastrophically"):
        _guarded(lambda: [pattern_matches(r"re:(a|aa)+$", "a" * n + "b") for n in range(30, 60)])


@pytest.mark.parametrize("expression", [r"[[:alpha:]]+", r"a{e<=1}", r"[a--b]", r"[a&&b]", r"x{}", r"q{1,2"])
def test_constructs_regex_reads_differently_from_re_are_refused(expression):
    with pytest.raises(QFormatError):
        validate_pattern("re:" + expression)


def test_pattern_length_and_count_are_capped():
    with pytest.raises(QFormatError, match="characters long"):
        validate_pattern("re:" + "a" * MAX_PATTERN_LENGTH)
    many = [f"re:.*layer{i}$" for i in range(MAX_REGEX_PATTERNS + 1)]
    with pytest.raises(QFormatError, match="at most"):
        PatternSet(many)
    with pytest.raises(QFormatError, match="at most"):
        RuleSet([(p, "x") for p in many])
    assert PatternSet([f"model.layers.{i}.mlp.up_proj" for i in range(10 * MAX_REGEX_PATTERNS)]).matches(
        "model.layers.7.mlp.up_proj")


def test_rule_set_keeps_first_match_precedence():
    rules = [("re:.*proj", "a"), ("model.layers.0.mlp.up_proj", "b"), ("re:model.*", "c"), ("lm_head", "d")]
    table = RuleSet(rules)
    for name in NAMES:
        assert table.first(name) == first_match(rules, name), name


# -- through the public entry points, with the pattern planted in a converted checkpoint's config.json ----------


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("patterns") / "ckpt"
    qformat.convert(tiny_models["llama"], out, scheme="w8a16-int8")
    return out


def _with_override(converted: Path, tmp_path: Path, pattern: str) -> Path:
    folder = tmp_path / "hostile"
    shutil.copytree(converted, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["overrides"] = [{"pattern": pattern, "scheme": "w8a16-int8"}]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("entry", ["verify", "inspect", "card", "load"])
def test_a_hostile_override_in_a_checkpoint_is_one_error(converted, tmp_path, entry):
    folder = _with_override(converted, tmp_path, r"re:(\w|\w\w|_|\.)+$x")
    calls: dict[str, Callable[[], Any]] = {
        "verify": lambda: qformat.verify(folder, check_hashes=False),
        "inspect": lambda: qformat.inspect(folder),
        "card": lambda: __import__("qformat.cards.facts", fromlist=["card_facts"]).card_facts(folder),
        "load": lambda: __import__("transformers").AutoModelForCausalLM.from_pretrained(folder),
    }
    with pytest.raises(QFormatError, match="backtracks catastrophically"):
        _guarded(calls[entry])


def test_pattern_set_answers_like_the_list_it_compiles():
    patterns = ["re:.*up_proj", "model.layers.0.mlp.up_proj", "lm_head", "re:model\\.layers\\.\\d+\\.mlp\\..*"]
    table = PatternSet(patterns)
    for name in NAMES:
        assert table.matching(name) == next((p for p in patterns if pattern_matches(p, name)), None), name
