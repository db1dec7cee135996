"""The accuracy-driven fallback search: ranking, fused units, bisection budget, stop rules, recording."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import qformat
from qformat.cli.main import cli
from qformat.errors import OptionError
from qformat.eval import load_model, make_task, load_text
from qformat.models.structure import structure_of
from qformat.plan.recipe import QuantRecipe
from qformat.plan.rules import plan_conversion
from qformat.search import FallbackBudget
from qformat.search.sensitivity import fisher_sensitivity
from qformat.search.units import units_of
from qformat.search.variants import QuantizedVariants

from qformat.testing.tiny_models import save_fragile_llama as damaged_llama

SMALL = {"max_tokens": 128}


def _ranking(folder: Path, scheme: str = "w8a8-int8") -> list[str]:
    from transformers import AutoTokenizer

    model = load_model(folder)
    plan = plan_conversion(structure_of(model), QuantRecipe(scheme=scheme))
    units = units_of(plan)
    variants = QuantizedVariants(model, plan, units)
    task = make_task(model, AutoTokenizer.from_pretrained(folder), load_text("calibration"), max_tokens=128)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    scores = fisher_sensitivity(variants, task)
    variants.restore()
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # model left as it was
    assert all(type(m).__name__ != "QuantLinear" for m in model.modules())
    return sorted(scores, key=lambda n: -scores[n])


@pytest.mark.slow
@pytest.mark.parametrize("module", ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"])
def test_sensitivity_ranks_a_damaged_module_first(tmp_path, module):
    ranking = _ranking(damaged_llama(tmp_path / "damaged", module))
    assert ranking[0] == module  # q_proj heads its fused q/k/v unit
    assert len(ranking) == 8  # 2 layers x (q/k/v, o, gate/up, down); lm_head is kept by default


@pytest.mark.slow
def test_a_fused_group_falls_back_as_a_whole_and_is_recorded(tmp_path):
    source = damaged_llama(tmp_path / "damaged", "model.layers.0.mlp.gate_proj")
    out = tmp_path / "q"
    result = qformat.convert(source, out, scheme="w8a8-int8",
                             auto_fallback=FallbackBudget(max_loss=1e-4, metric="kl", **SMALL))
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    kept = {e["module"]: e for e in block["fallback"] if e["reason"] == "sensitivity"}
    group = {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"}  # up_proj is not damaged
    assert group <= set(kept)
    assert kept["model.layers.0.mlp.up_proj"]["measured"]["rank"] == 1
    assert all("fused group of 2" in kept[n]["detail"] for n in group)
    search = block["fallback_search"]
    assert search["result"]["status"] == "met" and search["result"]["loss"] <= 1e-4
    assert search["trials"][0]["loss"] > 1e-4  # quantizing everything misses the budget: the search had work
    units = search["sensitivity"]["units"]
    assert search["evaluations"] <= math.ceil(math.log2(units + 1)) + 2
    assert [t["kept_units"] for t in search["trials"]][0] == 0 and not search["trials"][0]["met"]
    assert block["evaluation"] and {r["metric"] for r in block["evaluation"]} == {
        "perplexity", "kl_divergence", "top1_agreement"}
    assert search["criterion"]["metric"] == "kl_divergence" and search["heldout_text"]["tokens"] == 256
    assert block["evaluation"][0]["dataset"] == "pydoc-topics/heldout"
    assert result.search is not None and result.search.status == "met"
    assert "--auto-fallback --max-loss 0.01% --metric kl_divergence --search-tokens 128" in \
        block["provenance"]["command"]
    qformat.verify(out)
    # the checkpoint loads as recorded: the kept modules are plain Linear, the rest QuantLinear
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.get_submodule("model.layers.0.mlp.up_proj")).__name__ == "Linear"
    assert type(model.get_submodule("model.layers.1.mlp.up_proj")).__name__ == "QuantLinear"


@pytest.mark.slow
def test_an_unreachable_budget_stops_and_reports_the_best(tmp_path):
    runner = CliRunner()
    out = tmp_path / "q"
    source = damaged_llama(tmp_path / "damaged", "model.layers.0.mlp.gate_proj")
    result = runner.invoke(cli, ["convert", str(source), str(out), "--scheme", "w8a8-int8", "--auto-fallback",
                                 "--metric", "kl", "--max-loss", "0", "--max-fallback", "2", "--search-tokens", "128"])
    assert result.exit_code == 0, result.output
    assert "unreachable within --max-fallback" in result.output and "the best reached keeps 2 of 8 units" in \
        result.output
    search = json.loads((out / "config.json").read_text())["quantization_config"]["fallback_search"]
    assert search["result"]["status"] == "unreachable" and search["result"]["kept_units"] == 2
    assert [t["kept_units"] for t in search["trials"]] == [0, 2]  # f(0), then f(cap): nothing more to try
    card = runner.invoke(cli, ["card", str(out)])
    assert card.exit_code == 0, card.output
    assert "not met" in (out / "README.md").read_text().lower()


@pytest.mark.slow
def test_max_evals_stops_the_search(tmp_path):
    out = tmp_path / "q"
    source = damaged_llama(tmp_path / "damaged", "model.layers.0.mlp.gate_proj")
    result = qformat.convert(source, out, scheme="w8a8-int8",
                             auto_fallback={"max_loss": 0, "metric": "kl", "max_evals": 3, **SMALL})
    search = result.search.record
    assert search["evaluations"] == 3 and len(search["trials"]) == 2
    assert search["result"]["status"] == "max_evals"
    assert "not met within --max-evals" in result.search.summary()


def test_search_options_are_checked_before_anything_runs(readable, tmp_path):
    runner = CliRunner()
    lone = runner.invoke(cli, ["convert", str(readable("llama")), str(tmp_path / "a"), "--max-loss", "1%"])
    assert lone.exit_code == 2 and "--max-loss only applies with --auto-fallback" in lone.output
    same = runner.invoke(cli, ["convert", str(readable("llama")), str(tmp_path / "b"), "--auto-fallback",
                               "--eval-text", "heldout"])
    assert same.exit_code == 2 and "must differ" in same.output
    for bad, message in ((["--max-loss", "abc"], "not a number"), (["--max-evals", "1"], "at least 2"),
                         (["--metric", "bleu"], "unknown metric"), (["--metric", "cosine"], "does not apply")):
        result = runner.invoke(cli, ["convert", str(readable("llama")), str(tmp_path / "c"), "--auto-fallback",
                                     "--search-tokens", "64", *bad])
        assert result.exit_code == 2 and message in result.output, (bad, result.output)
        assert not (tmp_path / "c").exists()
    with pytest.raises(OptionError, match="auto_fallback"):
        QuantRecipe(auto_fallback="yes")


def test_budget_records_no_paths():
    budget = FallbackBudget(max_loss="0.5%", calib="/home/me/secret/calib.txt", max_fallback="10%")
    assert budget.to_record()["calib"] == "calib.txt"
    args = QuantRecipe(scheme="fp8-dynamic", auto_fallback=budget).command_args()
    assert args[2:] == ["--auto-fallback", "--max-loss", "0.5%", "--calib", "calib.txt", "--max-fallback", "10%"]
    assert budget.unit_cap(120) == 12
