"""lm-evaluation-harness tasks through its Python API (`qformat.eval.harness`), offline, on a task defined on a local
file (tests/fixtures/harness: 8 multiple-choice questions) and a tiny random Llama converted to W8A8."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest
import torch

import qformat
from qformat.errors import OptionError
from qformat.eval.api import load_model
from qformat.eval.record import record_evaluation
from qformat.testing.tiny_models import save_byte_tokenizer, save_tiny_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "harness"
DATA = FIXTURES / "questions.jsonl"
TASK = "qformat_tiny_quiz"
RECORD_KEYS = {"task", "dataset", "text_sha256", "tokens", "metric", "higher_is_better", "baseline", "quantized",
               "relative_change", "recovery", "command", "samples", "harness"}

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (the optional `harness` extra: pip install 'qformat-hf[harness]')")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source, W8A8 checkpoint): the tiny Llama with a byte tokenizer whose EOS is byte 0 (the harness scores an
    answer after BOS or EOS; a real LM's tokenizer has one)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("harness")
    source = save_byte_tokenizer(save_tiny_model("llama", root / "source"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.eos_token = tokenizer.pad_token
    tokenizer.save_pretrained(source)
    out = qformat.convert(source, root / "w8a8", scheme="w8a8-int8").output
    return source, out


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's matrices are too small to share between threads; on a busy 2-core machine a second thread
    only waits (one forward pass took 0.25 s with two threads, 7 ms with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _expected_scores(folder: Path) -> dict[str, float]:
    """acc and acc_norm of the model in `folder` on the fixture, computed here without the harness: each answer's
    summed log-probability after "Question: ...\\nAnswer:" (the byte tokenizer makes bytes tokens), argmax against
    the gold index; acc_norm divides by the answer's length in characters."""
    model = load_model(folder)
    hits = {"acc": 0, "acc_norm": 0}
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        context = list(f"Question: {row['question']}\nAnswer:".encode())
        lls = []
        for choice in row["choices"]:
            ids = torch.tensor(context + list(f" {choice}".encode()))
            with torch.no_grad():
                logprobs = model(ids[None, :-1]).logits[0].log_softmax(-1)
            targets = ids[len(context):]
            lls.append(logprobs[len(context) - 1:].gather(1, targets[:, None]).sum().item())
        hits["acc"] += max(range(len(lls)), key=lls.__getitem__) == row["answer"]
        normed = [ll / len(c) for ll, c in zip(lls, row["choices"])]
        hits["acc_norm"] += max(range(len(normed)), key=normed.__getitem__) == row["answer"]
    return {k: v / len(rows) for k, v in hits.items()}


def test_missing_lm_eval_is_a_one_line_option_error(models, monkeypatch):
    from qformat.eval.harness import run_harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(OptionError) as info:
        run_harness(models[1], [TASK], include_path=FIXTURES)
    assert str(info.value) == ("lm-evaluation-harness tasks need the lm-eval package: "
                               "pip install 'qformat-hf[harness]'")


@needs_lm_eval
def test_bad_options_are_refused_before_any_work(models, tmp_path):
    from qformat.eval.harness import run_harness

    with pytest.raises(OptionError, match="at least one"):
        run_harness(models[1], [" ", ""])
    with pytest.raises(OptionError, match="--limit must be at least 1"):
        run_harness(models[1], [TASK], limit=0)
    with pytest.raises(OptionError, match="not a folder of task YAML files"):
        run_harness(models[1], [TASK], include_path=tmp_path / "missing")
    encoder = save_tiny_model("xlm-roberta", tmp_path / "encoder")
    with pytest.raises(OptionError, match="causal LMs and seq2seq"):
        run_harness(encoder, [TASK], include_path=FIXTURES)


@needs_lm_eval
@pytest.mark.slow
def test_local_task_against_source_offline_from_any_directory(models, no_network, monkeypatch, tmp_path):
    from importlib.metadata import version

    from qformat.eval import harness
    from qformat.nn.linear import QuantLinear

    source, out = models
    loaded = []

    def spy(folder, kind=None):
        loaded.append(model := load_model(folder, kind))
        return model

    monkeypatch.setattr(harness, "load_model", spy)
    monkeypatch.chdir(tmp_path)  # the task's data_files is relative to its YAML, not to the working directory
    records = harness.run_harness(out, [TASK], include_path=FIXTURES, against=source)

    # the checkpoint ran on qformat's kernels, the source in full precision, in that order
    assert [any(isinstance(m, QuantLinear) for m in model.modules()) for model in loaded] == [True, False]

    assert [r["metric"] for r in records] == ["acc", "acc_norm"]
    sha = hashlib.sha256(DATA.read_bytes()).hexdigest()
    expected_q, expected_s = _expected_scores(out), _expected_scores(source)
    for r in records:
        assert set(r) == RECORD_KEYS
        assert r["task"] == TASK and r["dataset"] == "questions.jsonl" and r["text_sha256"] == sha
        assert r["tokens"] is None and r["samples"] == 8 and r["higher_is_better"] is True
        assert 0.0 <= r["quantized"] <= 1.0 and 0.0 <= r["baseline"] <= 1.0
        # the harness scored the loaded models (the checkpoint on qformat's kernels, then the source)
        assert r["quantized"] == pytest.approx(expected_q[r["metric"]])
        assert r["baseline"] == pytest.approx(expected_s[r["metric"]])
        if r["baseline"]:
            assert r["relative_change"] == pytest.approx((r["quantized"] - r["baseline"]) / r["baseline"], abs=1e-5)
        assert r["command"] == f"qformat eval OUTPUT --against SOURCE --tasks {TASK} --include-path harness"
        assert r["harness"]["lm_eval"] == version("lm-eval") and r["harness"]["num_fewshot"] == 0
        assert r["harness"]["task_version"] == "1.0" and r["harness"]["stderr"] >= 0
        assert str(tmp_path) not in json.dumps(r) and str(FIXTURES) not in json.dumps(r)  # no local paths


@needs_lm_eval
@pytest.mark.slow
def test_limit_without_source_and_record_round_trip(models, no_network, tmp_path):
    import shutil

    from qformat.eval.harness import run_harness

    out = Path(shutil.copytree(models[1], tmp_path / "w8a8"))
    records = run_harness(out, [TASK], include_path=FIXTURES, limit=3)
    assert {r["samples"] for r in records} == {3}
    assert all(r["baseline"] is None and r["relative_change"] is None and r["recovery"] is None for r in records)
    assert records[0]["command"] == f"qformat eval OUTPUT --tasks {TASK} --include-path harness --limit 3"

    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "config.json"}
    record_evaluation(out, records)
    stored = json.loads((out / "config.json").read_text())["quantization_config"]["evaluation"]
    assert stored == records
    record_evaluation(out, records)  # the same task, dataset and metric: replaced, not added
    assert json.loads((out / "config.json").read_text())["quantization_config"]["evaluation"] == records
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "config.json"} == before
    from qformat.cards.records import parse_evaluation

    shown, hidden = parse_evaluation(stored)
    assert hidden == 0 and [m.metric for m in shown] == ["acc", "acc_norm"] and shown[0].dataset == "questions.jsonl"


@needs_lm_eval
@pytest.mark.slow
def test_cli_tasks_print_and_record_only_harness_results(models, no_network, tmp_path):
    import shutil

    from click.testing import CliRunner

    from qformat.cli.main import cli

    out = Path(shutil.copytree(models[1], tmp_path / "w8a8"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "config.json"}
    args = ["eval", str(out), "--tasks", TASK, "--include-path", str(FIXTURES), "--limit", "4"]
    result = CliRunner().invoke(cli, [*args, "--record", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert [(r["task"], r["metric"], r["samples"]) for r in printed] == [(TASK, "acc", 4), (TASK, "acc_norm", 4)]
    stored = json.loads((out / "config.json").read_text())["quantization_config"]["evaluation"]
    assert stored == printed  # only the harness's results: --tasks runs nothing else
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "config.json"} == before
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0 and f"| {TASK}: questions.jsonl | 4 samples | acc |" in table.stdout


def test_cli_harness_options_do_not_mix_with_perplexity_options(models):
    from click.testing import CliRunner

    from qformat.cli.main import cli

    runner = CliRunner()
    mixed = runner.invoke(cli, ["eval", str(models[1]), "--tasks", TASK, "--text", "heldout"])
    assert mixed.exit_code == 2 and "run them separately" in mixed.output and "Traceback" not in mixed.output
    alone = runner.invoke(cli, ["eval", str(models[1]), "--limit", "3"])
    assert alone.exit_code == 2 and "give --tasks too" in alone.output
    empty = runner.invoke(cli, ["eval", str(models[1]), "--tasks", " , "])
    assert empty.exit_code == 2 and "--tasks needs task names" in empty.output
