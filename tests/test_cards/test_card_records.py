"""Evaluation results and the automatic fallback search, from config.json into the card: the table shows the
recorded change and recovery (never recomputed), `model-index` round-trips through huggingface_hub, the search log
states its budget, evaluations and result (plainly when the budget was missed), records written by a stranger
cannot crash or reshape the card, and `card --check` accepts every such card and catches a stale one."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from markdown_it import MarkdownIt

import qformat
from qformat.cards import check_card, render_card
from qformat.cards.records import MAX_RESULTS, MAX_TRIALS


@pytest.fixture(scope="module")
def ckpt(tiny_models, tmp_path_factory) -> Path:
    return qformat.convert(tiny_models["llama"], tmp_path_factory.mktemp("records") / "llama", scheme="w8a8-int8",
                           base_model="qformat-test/tiny-llama").output


def _kl(value: float) -> dict:
    return {"task": "text-generation", "dataset": "pydoc-topics/heldout", "text_sha256": "ab" * 32, "tokens": 2048,
            "metric": "kl_divergence", "higher_is_better": False, "baseline": 0.0, "quantized": value,
            "relative_change": None, "recovery": None, "command": "qformat eval OUT --against SRC --max-tokens 2048"}


def _section(card: str, heading: str) -> str:
    return card.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_evaluation_table_shows_the_recorded_change_and_recovery(ckpt, tmp_path, records):
    folder = records.with_records(ckpt, tmp_path / "evaluated", evaluation=[
        records.perplexity(13.7, 13.91, relative_change=0.0153, recovery=0.985), _kl(0.0123),
        records.perplexity(None, 14.2, dataset="notes.txt", tokens=512),  # no source given
        {"task": "text-generation", "dataset": "old.txt", "metric": "perplexity", "baseline": 10.0, "quantized": 11.0},
        records.perplexity(13.7, None, dataset="overflow.txt")])  # a perplexity that was not finite
    card = render_card(folder)
    table = _section(card, "Evaluation")
    assert "| Metric | Text | Source | Quantized | Change | Recovery |" in table
    assert "| perplexity | pydoc-topics/heldout (2,048 tokens) | 13.7 | 13.91 | +1.5 % | 98.5 % |" in table
    assert "101.5" not in card  # quantized / baseline, wrong for perplexity, is never computed
    assert "| kl_divergence | pydoc-topics/heldout (2,048 tokens) | 0 | 0.0123 | - | - |" in table
    assert "| perplexity | notes.txt (512 tokens) | - | 14.2 | - | - |" in table
    assert "| perplexity | old.txt | 10 | 11 | - | - |" in table  # an old-style entry: nothing computed
    assert "| perplexity | overflow.txt (2,048 tokens) | 13.7 | not finite | - | - |" in table
    assert "qformat eval OUT --against SRC --max-tokens 2048\nqformat eval OUT --against SRC --max-tokens 512" in card
    assert "Not evaluated" not in card
    assert check_card(folder, card) == []


def test_model_index_round_trips_through_huggingface_hub(ckpt, tmp_path, records):
    recorded = [records.perplexity(13.7, 13.91, relative_change=0.0153, recovery=0.985), _kl(0.0123),
                records.perplexity(13.7, None, dataset="overflow.txt"),  # no value: not in model-index
                {"dataset": "untasked.txt", "metric": "perplexity", "quantized": 3.0}]  # no task: table only
    folder = records.with_records(ckpt, tmp_path / "indexed", evaluation=recorded)
    (folder / "README.md").write_text(render_card(folder, repo_id="alice/tiny-int8"))
    metadata = metadata_load(folder / "README.md")
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "alice/tiny-int8"
    assert [(r.task_type, r.dataset_type, r.dataset_name, r.metric_type, r.metric_value) for r in results] == [
        (e["task"], e["dataset"], e["dataset"], e["metric"], e["quantized"]) for e in recorded[:2]]
    card = ModelCard.load(folder / "README.md")
    assert [r.metric_value for r in card.data.eval_results] == [13.91, 0.0123]
    assert card.data.base_model == "qformat-test/tiny-llama"


def _search_section(card: str) -> str:
    return _section(card, "Modules kept in full precision")


def test_a_met_search_is_logged_with_its_budget_and_evaluations(ckpt, tmp_path, records):
    folder = records.with_records(ckpt, tmp_path / "met", fallback_search=records.search(),
                                  fallback=[records.SENSITIVE])
    card = render_card(folder)
    section = _search_section(card)
    assert ("| `model.layers.0.mlp.down_proj` | sensitivity | sensitivity rank 3 of 120 units (Fisher score "
            "1.2e-03) |") in section
    for row in ["| Budget | perplexity may rise at most 1 % over the source's, searched on pydoc-topics/search "
                "(1,024 tokens); the source's value there: 13.7 |",
                "| Sensitivity | `fisher` scores of 120 units on pydoc-topics/calibration (512 tokens), measured once "
                "and ranked, 21.3 s |",
                "| Result | met: +0.93 % on the search text with 5 units (7 Linear modules) kept |",
                "| Held-out check | +0.81 % on pydoc-topics/heldout (2,048 tokens), text the search did not see: "
                "within the budget |",
                "| Full evaluations | 9 for 120 units (the trials and the held-out check) |",
                "| Time | 140.2 s |",
                "| 1 | 0 | 0 | 14.04 | +2.5 % | no | 11.2 |",
                "| 2 | 5 | 7 | 13.83 | +0.93 % | yes | 11.4 |"]:
        assert row in section, row
    assert "did not meet" not in card and "not on held-out text" not in card
    assert check_card(folder, card) == []
    import shutil

    moved = Path(shutil.copytree(folder, tmp_path / "elsewhere" / "copy"))
    assert render_card(moved) == card and str(tmp_path) not in card  # deterministic, no local paths


@pytest.mark.parametrize("kwargs, summary", [
    ({"status": "unreachable", "loss": 0.018, "kept_units": 24, "kept_modules": 31},
     "**The automatic fallback search did not meet its budget** (perplexity may rise at most 1 % over the source's): "
     "the best reached was +1.8 % with 24 units (31 Linear modules) kept (the --max-fallback limit)."),
    ({"status": "unreachable", "loss": 0.05, "kept_units": 120, "kept_modules": 150, "max_fallback": None},
     "the best reached was +5.0 % with 120 units (150 Linear modules) kept (every unit kept)."),
    ({"status": "max_evals", "loss": 0.012, "evaluations": 12},
     "did not meet its budget** (perplexity may rise at most 1 % over the source's): the search stopped at its "
     "limit of 12 full evaluations (--max-evals); the best reached was +1.2 % with 5 units (7 Linear modules) kept."),
    ({"heldout_loss": 0.013, "heldout_met": False},
     "**The automatic fallback search met its budget (perplexity may rise at most 1 % over the source's) on the text "
     "it searched on, but not on held-out text**: +1.3 % on pydoc-topics/heldout (2,048 tokens), text the search did "
     "not see: over the budget."),
], ids=["max-fallback", "everything-kept", "max-evals", "heldout-missed"])
def test_a_missed_budget_is_said_plainly_at_the_top(ckpt, tmp_path, records, kwargs, summary):
    folder = records.with_records(ckpt, tmp_path / "missed", fallback_search=records.search(**kwargs),
                                  fallback=[records.SENSITIVE])
    card = render_card(folder)
    top = card.split("\n## Overview\n", 1)[0]
    assert summary in top
    if kwargs.get("status") != "met" and "status" in kwargs:
        assert "| Result | not met: " in _search_section(card)
    assert check_card(folder, card) == []


def test_check_catches_a_card_older_than_its_records(ckpt, tmp_path, records):
    """A card written before `eval --record` or a search: it denies the evaluation, hides a large loss and a missed
    budget; every one is reported."""
    folder = records.with_records(ckpt, tmp_path / "stale", readme=None)
    stale = render_card(folder)
    records_folder = records.with_records(folder, tmp_path / "recorded", readme=stale, fallback=[records.SENSITIVE],
                                          evaluation=[records.perplexity(15.0, 19.5, relative_change=0.3,
                                                                         recovery=0.769)],
                                          fallback_search=records.search("unreachable", loss=0.3))
    problems = check_card(records_folder)
    assert any("says 'Not evaluated', but 1 evaluation result(s) are recorded" in p for p in problems), problems
    assert any("does not state the large measured loss (perplexity rose from 15 to 19.5" in p for p in problems)
    assert any("does not say that the automatic fallback search missed its budget" in p for p in problems)
    assert check_card(records_folder, render_card(records_folder)) == []
    fresh = render_card(records_folder)
    assert any("has an evaluation table, but no evaluation results are recorded" in p
               for p in check_card(folder, fresh))


WRONG_RESULTS = [  # entries that are not objects are refused by the format itself (qformat.spec.config)
    {"metric": 5, "dataset": "a", "quantized": 1.0},  # metric not a string
    {"metric": "perplexity", "dataset": "a"},  # no quantized
    {"metric": "perplexity", "dataset": "a", "quantized": "1.0"},
    {"metric": "perplexity", "dataset": "a", "quantized": 1.0, "baseline": True},
    {"metric": "perplexity", "dataset": "a", "quantized": 1.0, "tokens": -1},
    {"metric": "perplexity", "dataset": ["a"], "quantized": 1.0},
    {"metric": "perplexity", "dataset": "a", "quantized": 1.0, "recovery": {"x": 1}},
    {"metric": "perplexity", "dataset": "a", "quantized": 1.0, "higher_is_better": "no"},
    {"metric": "", "dataset": "a", "quantized": 1.0},
]


def test_unreadable_results_are_skipped_and_counted(ckpt, tmp_path, records):
    good = records.perplexity(13.7, 13.91, relative_change=0.0153, recovery=0.985)
    folder = records.with_records(ckpt, tmp_path / "wrong", evaluation=[*WRONG_RESULTS, good])
    card = render_card(folder)
    table = _section(card, "Evaluation")
    assert table.count("\n| ") == 2  # the header and the one readable result
    assert f"{len(WRONG_RESULTS)} more recorded results are not shown (unreadable, or past the first 64)." in table
    assert len(ModelCard(card).data.eval_results) == 1
    assert check_card(folder, card) == []


def test_huge_record_lists_are_bounded(ckpt, tmp_path, records):
    many = [records.perplexity(13.7, 13.7 + i / 1000, relative_change=i / 13700, recovery=13.7 / (13.7 + i / 1000))
            for i in range(1000)]
    log = records.search()
    log["trials"] = log["trials"] * 500
    folder = records.with_records(ckpt, tmp_path / "huge", evaluation=many, fallback_search=log)
    card = render_card(folder)
    assert _section(card, "Evaluation").count("\n| perplexity |") == MAX_RESULTS
    assert f"{1000 - MAX_RESULTS} more recorded results are not shown" in card
    trials = [line for line in _search_section(card).split("\n") if line.startswith("| ") and line[2].isdigit()]
    assert len(trials) == MAX_TRIALS
    assert f"{1000 - MAX_TRIALS} more recorded trial(s) are in config.json and not shown here." in card
    assert len(card) < 60_000


@pytest.mark.parametrize("log", [
    {},
    {"criterion": "1%", "sensitivity": [], "result": None, "trials": "x", "evaluations": -3, "seconds": "fast"},
    {"criterion": {"metric": 3, "loss": None, "max_loss": "1%"}, "trials": [None, {"kept_units": "5"}, 7],
     "result": {"status": 9, "kept_units": 1.5, "heldout_met": "yes"}, "search_text": {"dataset": 4}},
    {"criterion": {"metric": "mean_cosine", "loss": "one_minus", "max_loss": 0.01},
     "result": {"status": "met", "loss": 0.004, "kept_units": 1, "kept_modules": 1}},
    {"criterion": {"metric": "kl_divergence", "loss": "value", "max_loss": 0.05},
     "result": {"status": "someday", "loss": 0.08}},
], ids=["empty", "wrong-containers", "wrong-fields", "cosine", "kl-unknown-status"])
def test_a_strangers_search_log_never_crashes_the_card(ckpt, tmp_path, records, log):
    folder = records.with_records(ckpt, tmp_path / "log", fallback_search=log)
    card = render_card(folder)
    assert "| Budget | " in card and "| Result | " in card
    assert check_card(folder, card) == []
    criterion = log.get("criterion") if isinstance(log.get("criterion"), dict) else {}
    if criterion.get("loss") == "one_minus":
        assert "mean_cosine must stay at 0.99 or above" in card and "met: mean_cosine 0.996 on the search" in card
    if criterion.get("loss") == "value":
        assert "kl_divergence may be at most 0.05" in card
        assert "not met: the result is recorded as someday; the best reached was kl_divergence 0.08" in card


def _row_widths(tokens: list) -> list[list[int]]:
    """For every table, the number of cells of each row."""
    tables: list[list[int]] = []
    for t in tokens:
        if t.type == "table_open":
            tables.append([])
        elif t.type == "tr_open":
            tables[-1].append(0)
        elif t.type in ("th_open", "td_open"):
            tables[-1][-1] += 1
    return tables


HOSTILE = "a|b `c` int4 3 of 9 Linear modules\n# Heading\n<script>x</script> --> [l](javascript:x) *e*"


def test_hostile_record_strings_stay_data(ckpt, tmp_path, records):
    """Strings from records render as text, cannot add headings, links, HTML or table cells, and are not read as
    claims of the card by `card --check`."""
    result = records.perplexity(13.7, 13.91, dataset=HOSTILE, relative_change=0.0153, recovery=0.985,
                                task=HOSTILE)
    result["metric"] = HOSTILE
    log = records.search()
    log["criterion"]["metric"] = HOSTILE
    log["sensitivity"]["method"] = HOSTILE
    log["sensitivity"]["text"]["dataset"] = HOSTILE
    log["search_text"]["dataset"] = HOSTILE
    log["heldout_text"]["dataset"] = HOSTILE
    log["result"]["status"] = HOSTILE
    hostile = dict(records.SENSITIVE, detail=HOSTILE)
    folder = records.with_records(ckpt, tmp_path / "hostile", evaluation=[result], fallback_search=log,
                                  fallback=[hostile])
    card = render_card(folder)
    tokens = MarkdownIt("commonmark").enable("table").parse(card.split("\n---\n", 1)[1])
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings[1:] == ["Overview", "Modules kept in full precision", "Size", "Evaluation", "Usage",
                            "How it was made", "Limitations"]
    assert [t.content for t in tokens if t.type in ("html_block", "html_inline")][1:] == []  # only our marker
    links = [c.attrGet("href") for t in tokens if t.type == "inline" for c in t.children or [] if c.type == "link_open"]
    assert all(link.startswith("https://") for link in links)
    widths = _row_widths(tokens)  # overview, fallback, search, trials, size, evaluation: no cell added or lost
    assert [(len(t), set(t)) for t in widths] == [(5, {2}), (3, {3}), (7, {2}), (3, {7}), (2, {4}), (2, {6})]
    assert HOSTILE.split("\n")[0] not in card.split("\n---\n", 1)[1]  # never verbatim in the body: escaped
    assert check_card(folder, card) == []
    assert render_card(folder) == card


def test_a_sensitivity_entry_without_detail_shows_its_measured_rank(ckpt, tmp_path, records):
    bare = dict(records.SENSITIVE, detail="")
    broken = {"module": "model.layers.1.mlp.up_proj", "reason": "sensitivity", "detail": "",
              "measured": {"score": "high", "rank": 1}}  # not numbers: nothing is derived
    folder = records.with_records(ckpt, tmp_path / "bare", fallback=[bare, broken], fallback_search=records.search())
    section = _search_section(render_card(folder))
    assert "| `model.layers.0.mlp.down_proj` | sensitivity | sensitivity rank 3 of 120 units (score 0.0012) |" in section
    assert "| `model.layers.1.mlp.up_proj` | sensitivity |  |" in section
