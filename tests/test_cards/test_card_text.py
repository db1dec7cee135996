"""The card as a new user reads it (issue 11): a summary that is a sentence, headings and tables set off by blank
lines, export commands that work on a Hub repo, a size section that says what the source was stored as and never
blames a module without tensors, the measured loss of a 2:4 model stated plainly, and every problem of a card."""

from __future__ import annotations

import re
import shlex
from importlib.metadata import distribution
from pathlib import Path

import pytest
from click.testing import CliRunner

import qformat
from qformat.cards import check_card, render_card
from qformat.cards.facts import ORIGINAL_START
from qformat.cli.main import cli


@pytest.fixture(scope="module")
def kept_ckpt(tiny_models, tmp_path_factory) -> Path:
    """Llama with one module kept by the user (its tensors stay in full precision) and no base model recorded."""
    return qformat.convert(tiny_models["llama"], tmp_path_factory.mktemp("text") / "llama", scheme="w8a8-int8",
                           ignore=["model.layers.1.self_attn.q_proj"]).output


def _summary(card: str) -> str:
    """The paragraph after the title."""
    return card.split("\n# ", 1)[1].split("\n\n")[1]


def test_summary_is_a_sentence_with_and_without_a_base_model(kept_ckpt, tmp_path, records):
    text = render_card(kept_ckpt)
    assert _summary(text) == ("This model has 11 of its 15 Linear modules quantized to INT8 by qformat and is stored "
                              "as a qformat v1 checkpoint.")
    based = records.with_records(kept_ckpt, tmp_path / "based", source={"base_model": "org/tiny-llama"})
    assert _summary(render_card(based)) == ("This is `org/tiny-llama` with 11 of its 15 Linear modules quantized to "
                                            "INT8 by qformat, stored as a qformat v1 checkpoint.")
    assert check_card(based, render_card(based)) == []  # the count in the summary is still checked


def _variants(converted, kept_ckpt, tmp_path, records) -> dict[str, str]:
    """Cards of every shape: evaluated or not, with a fallback search (met or not), 2:4, with an original card."""
    sparse = converted("llama", "w8a8-int8+2:4")
    large = [records.perplexity(15.0, 1578.0, relative_change=104.2, recovery=0.0095)]
    folders = {
        "plain": kept_ckpt,
        "evaluated": records.with_records(kept_ckpt, tmp_path / "evaluated",
                                          evaluation=[records.perplexity(13.7, 13.91, relative_change=0.0153,
                                                                         recovery=0.985)]),
        "search-met": records.with_records(kept_ckpt, tmp_path / "met", fallback_search=records.search(),
                                           fallback=[records.SENSITIVE]),
        "search-missed": records.with_records(kept_ckpt, tmp_path / "missed", fallback=[records.SENSITIVE],
                                              fallback_search=records.search("unreachable", loss=0.018,
                                                                             kept_units=24, kept_modules=31)),
        "sparse": sparse,
        "sparse-evaluated": records.with_records(sparse, tmp_path / "sparse", evaluation=large),
        "original-card": records.with_records(kept_ckpt, tmp_path / "original", evaluation=large,
                                              readme="---\nlicense: mit\n---\n# Tiny\n\nSome text.\n## Uses\nx\n"),
    }
    return {name: render_card(folder) for name, folder in folders.items()}


def test_every_heading_and_table_follows_a_blank_line(converted, kept_ckpt, tmp_path, records):
    for name, card in _variants(converted, kept_ckpt, tmp_path, records).items():
        lines = card.split("\n")
        own = lines[:lines.index(ORIGINAL_START)] if ORIGINAL_START in lines else lines
        headings = [i for i, line in enumerate(own) if line.startswith("#")]
        assert len(headings) >= 8, name  # the title and the seven sections
        for i in headings:
            assert own[i - 1] == "", (name, own[i - 1], own[i])
            assert own[i + 1] == "", (name, own[i], own[i + 1])
        tables = [i for i, line in enumerate(own) if line.startswith("|") and not own[i - 1].startswith("|")]
        assert tables, name
        for i in tables:
            assert own[i - 1] == "", (name, own[i - 1], own[i])
        assert "\n\n\n" not in "\n".join(own), name  # one blank line, never more
        assert "## Usage" in card and "\n\n## Usage\n\n" in card, name


def _export_block(card: str) -> list[str]:
    return card.split("`vllm serve` runs it:\n\n```bash\n", 1)[1].split("\n```", 1)[0].split("\n")


def test_export_commands_work_from_a_hub_repo(kept_ckpt, tmp_path):
    """`qformat export` takes a local folder: for a Hub repo the card downloads it first with the `hf` command that
    the installed huggingface_hub provides, then exports that folder; the commands run as written."""
    card = render_card(kept_ckpt, repo_id="alice/tiny-int8")
    download, export, serve = _export_block(card)
    assert download == "hf download alice/tiny-int8 --local-dir tiny-int8"
    assert export == "qformat export tiny-int8 tiny-int8-vllm --to vllm"
    assert serve == "vllm serve tiny-int8-vllm"
    assert "qformat export alice/" not in card
    scripts = {ep.name for ep in distribution("huggingface_hub").entry_points if ep.group == "console_scripts"}
    assert "hf" in scripts
    assert {"download", "--local-dir"} <= set(shlex.split(download))
    # what `hf download` leaves is the checkpoint folder: the export line runs on it as written
    import shutil

    shutil.copytree(kept_ckpt, tmp_path / "tiny-int8")
    args = shlex.split(export)
    assert args[:2] == ["qformat", "export"]
    result = CliRunner().invoke(cli, ["export", str(tmp_path / args[2]), str(tmp_path / args[3]), *args[4:]])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny-int8-vllm" / "config.json").is_file()


def test_export_commands_for_a_local_checkpoint(kept_ckpt):
    card = render_card(kept_ckpt)
    assert _export_block(card) == ["qformat export path/to/this/checkpoint OUTPUT --to vllm", "vllm serve OUTPUT"]
    assert "hf download" not in card


def _size_section(card: str) -> str:
    return card.split("\n## Size\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("source, words", [
    ({}, "The source stored {p:,} parameters in {b}, 4 bytes per parameter: float32 (its dtype is not recorded"),
    ("half", "The source stored {p:,} parameters in {b}, 2 bytes per parameter: 16-bit floats (bfloat16 or float16)"),
    ("mixed", "bytes per parameter on average: its tensors were stored in more than one dtype"),
    ({"parameters": None}, "The source's dtype and parameter count are not recorded in this checkpoint."),
], ids=["fp32", "bf16", "mixed", "unrecorded"])
def test_size_section_says_what_the_source_was_stored_as(kept_ckpt, tiny_llama_bf16, tmp_path, source, words):
    from qformat.checkpoint.inspect import human_bytes

    if source == "half":
        folder = qformat.convert(tiny_llama_bf16, tmp_path / "bf16", scheme="w8a8-int8").output
    else:
        import json
        import shutil

        folder = Path(shutil.copytree(kept_ckpt, tmp_path / "copy"))
        config = json.loads((folder / "config.json").read_text())
        src = config["quantization_config"]["provenance"]["source"]
        src.update({"parameters": src["parameters"] + 1000} if source == "mixed" else source)
        (folder / "config.json").write_text(json.dumps(config))
    facts = qformat.cards.card_facts(folder)
    size = _size_section(render_card(folder))
    assert words.format(p=facts.parameters or 0, b=human_bytes(facts.source_bytes)) in size


def test_no_sentence_blames_a_module_without_tensors(tiny_models, kept_ckpt, tmp_path):
    """A tied lm_head is kept but stored once, as the embedding: the card says it adds no bytes and puts the size on
    the tensors that hold it; a kept module with tensors is counted with its bytes."""
    tied = _size_section(render_card(qformat.convert(tiny_models["gemma3"], tmp_path / "gemma",
                                                     scheme="w8a16-int8").output))
    sentences = [s.strip() for s in re.split(r"(?<=\.)\s", tied) if "lm_head" in s]
    assert sentences == ["The kept Linear module `lm_head` has no tensors of its own (an output embedding tied to the "
                         "input embeddings is stored once, as the embedding): it adds no bytes to the checkpoint."]
    assert "Linear module(s) kept in full precision" not in tied  # no share of the bytes for modules without any
    assert "Quantization leaves the other tensors as they are, so they limit the size gain" in tied
    kept = _size_section(render_card(kept_ckpt))
    assert re.search(r"\d+ Linear module\(s\) kept in full precision [\d.]+ [KM]B \(\d+ %\)", kept)


def _limitations(card: str) -> list[str]:
    return card.split("\n## Limitations\n\n", 1)[1].split("\n\n")[0].split("\n")


def test_a_2_4_model_with_a_large_measured_loss_says_so(converted, tmp_path, records):
    sparse = records.with_records(converted("llama", "w8a8-int8+2:4"), tmp_path / "sparse",
                                  evaluation=[records.perplexity(15.0, 1578.0, relative_change=104.2,
                                                                 recovery=0.0095)])
    card = render_card(sparse)
    phrase = "perplexity rose from 15 to 1578 (+10,420 %) on pydoc-topics/heldout"
    lines = _limitations(card)
    assert lines[1] == ("- 2:4 sparsity was applied by magnitude pruning without retraining, and it cost accuracy "
                        f"here: {phrase}. That is more than 10 % relative: this model is not usable without retraining "
                        "(sparse fine-tuning of the source). CPUs decode it to the dense quantized weight at load")
    assert phrase in lines[0] and "A change of more than 10 % relative against the metric's direction is a large " \
                                  "loss" in lines[0]
    assert f"**Measured accuracy loss is large** (more than 10 % relative): {phrase}." in card.split("## Overview")[0]
    assert "costs accuracy unless" not in card and "changes the model's outputs slightly" not in card
    assert check_card(sparse, card) == []


def test_a_small_measured_loss_is_given_as_measured(converted, kept_ckpt, tmp_path, records):
    small = [records.perplexity(15.0, 15.3, relative_change=0.02, recovery=0.98)]
    card = render_card(records.with_records(converted("llama", "w8a8-int8+2:4"), tmp_path / "sparse",
                                            evaluation=small))
    phrase = "perplexity rose from 15 to 15.3 (+2.0 %) on pydoc-topics/heldout"
    assert _limitations(card)[1].startswith(f"- 2:4 sparsity was applied by magnitude pruning without retraining; "
                                            f"measured here: {phrase} (below the 10 % relative loss this card "
                                            "calls large)")
    assert "not usable" not in card and "Measured accuracy loss is large" not in card
    dense = render_card(records.with_records(kept_ckpt, tmp_path / "dense", evaluation=[
        records.perplexity(15.0, 19.5, relative_change=0.3, recovery=0.769)]))
    assert "this model is not a drop-in replacement for the source" in _limitations(dense)[0]
    assert "not usable without retraining" not in dense  # retraining is the 2:4 remedy, not int8's


def test_check_reports_every_problem(kept_ckpt, tmp_path, records):
    card = render_card(kept_ckpt)
    bad = (card.replace("— INT8 (qformat)", "— INT4 (qformat)").replace("11 of its 15", "12 of its 15")
           .replace("| Weights | ", "| Weights | 9.9 GB | 1.1 GB | x |", 1))
    problems = check_card(kept_ckpt, bad)
    assert len(problems) == 3, problems
    assert [p.split(",")[0].split(" ")[0:2] for p in problems] == [["says", "INT4"], ["says", "'12"],
                                                                     ["size", "table"]]
    result = CliRunner().invoke(cli, ["card", "--check", str(_write(tmp_path, kept_ckpt, bad))])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert [line for p in problems for line in lines if line.endswith(p)] == lines[:3]
    assert "(3 problems, listed above)" in lines[3]


def _write(tmp_path: Path, checkpoint: Path, card: str) -> Path:
    import shutil

    folder = Path(shutil.copytree(checkpoint, tmp_path / "written"))
    (folder / "README.md").write_text(card)
    return folder


def test_closeness_to_the_source_is_reported_but_not_called_a_loss(kept_ckpt, tmp_path, records):
    """A metric the source scores perfectly against itself (top-1 agreement 0.85 here) is shown, but the loss is
    judged by the model's own quality (perplexity +2 % here)."""
    agreement = dict(records.perplexity(1.0, 0.85, relative_change=-0.15, recovery=0.85), metric="top1_agreement",
                     higher_is_better=True)
    card = render_card(records.with_records(kept_ckpt, tmp_path / "agree", evaluation=[
        records.perplexity(15.0, 15.3, relative_change=0.02, recovery=0.98), agreement]))
    assert "top1_agreement fell from 1 to 0.85 (-15.0 %) on pydoc-topics/heldout" in _limitations(card)[0]
    assert "large" not in card.split("## Usage")[0] and "drop-in" not in card
