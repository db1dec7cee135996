"""`qformat.distill`: the losses fall, the written checkpoint is the student's quantized forward, the record."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qformat
from qformat.eval.api import load_model
from qformat.loaders.inplace import _attach, apply_recipe
from qformat.models.structure import structure_of
from qformat.plan.recipe import QuantRecipe
from qformat.plan.rules import plan_conversion
from qformat.train.fakequant import FakeQuantLinear, attach_fake_quant, detach_fake_quant


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_training_lowers_the_distillation_losses_and_the_quantized_models_kl(distilled):
    result, _ = distilled("long", steps=30, eval_text="heldout", eval_tokens=1024,
                          loss_weights="task=0,output=1,attention=1")
    steps = result.log.steps
    assert [s["step"] for s in steps] == list(range(30))
    assert all({"output", "attention", "total"} <= set(s) and "task" not in s for s in steps)
    for term, factor in (("output", 0.8), ("attention", 0.9)):  # measured: 0.53x and 0.85x
        first, last = _mean([s[term] for s in steps[:5]]), _mean([s[term] for s in steps[-5:]])
        assert last < factor * first, (term, first, last)
    e = result.evaluation
    assert e["metric"] == "perplexity" and e["text"]["dataset"] == "pydoc-topics/heldout"
    # measured with every weight quantized (the checkpoint's forward), on text the training did not read
    assert e["after"]["kl_divergence"] < 0.7 * e["before"]["kl_divergence"], e


def test_each_logged_term_follows_the_weights(distilled):
    result, _ = distilled("default")  # text without labels: task defaults to 0
    assert all({"output", "attention", "total"} == set(s) - {"step"} for s in result.log.steps)
    result, _ = distilled("all-terms", loss_weights="task=1")
    assert all({"task", "output", "attention", "total"} == set(s) - {"step"} for s in result.log.steps)
    s = result.log.steps[-1]
    assert s["total"] == pytest.approx(s["task"] + s["output"] + s["attention"])
    result, _ = distilled("task-only", loss_weights="task=1,output=0,attention=0")
    assert all(set(s) - {"step"} == {"task", "total"} for s in result.log.steps)


def test_the_checkpoint_records_the_run_and_loads_quantized(distilled, peaked_llama):
    result, out = distilled("long", steps=30, eval_text="heldout", eval_tokens=1024,
                            loss_weights="task=0,output=1,attention=1")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    record = qc["provenance"]["distillation"]
    assert record["steps"] == 30 and record["global_batch"] == 4 and record["method"] == "sdq"
    assert record["data"]["dataset"] == "pydoc-topics/calibration" and len(record["data"]["text_sha256"]) == 64
    assert record["final_losses"]["output"] == pytest.approx(result.final_losses["output"], rel=1e-4)
    assert record["options"]["loss_weights"] == {"task": 0.0, "output": 1.0, "attention": 1.0}
    assert record["evaluation"]["after"]["kl_divergence"] == pytest.approx(result.evaluation["after"]["kl_divergence"])
    assert qc["provenance"]["command"].startswith("qformat distill SOURCE OUTPUT --scheme w8a8-int8 --sparsity 2:4")
    assert "--loss-weights task=0,output=1,attention=1" in qc["provenance"]["command"]
    assert {r["metric"] for r in qc["evaluation"]} == {"perplexity", "kl_divergence", "top1_agreement"}
    qformat.verify(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    assert model.model.layers[0].mlp.down_proj.scheme.sparsity is not None
    from qformat.cards.render import render_card

    card = render_card(out)
    line = next(line for line in card.splitlines() if "self-distillation" in line)
    assert "30 steps" in line and "pydoc-topics/calibration" in line and "distilled" in line
    assert "through its outputs and its self-attention outputs, with quantization noise" in line


def test_the_card_names_only_the_terms_that_were_on(distilled):
    from qformat.cards.render import render_card

    def line(name: str, **extra: object) -> str:
        _, out = distilled(name, **extra)
        return next(x for x in render_card(out).splitlines() if "self-distillation" in x)

    assert "through its outputs, with quantization noise" in line("output-only", loss_weights="attention=0")
    task_only = line("task-only", loss_weights="task=1,output=0,attention=0")
    assert "trained on the task loss alone" in task_only and "teaches" not in task_only
    plain = line("plain-qat", loss_weights="task=1", noise_rate=1.0)
    assert "self-attention outputs, plus the task loss, every weight quantized each step" in plain


def test_the_students_evaluation_forward_is_the_written_checkpoints(peaked_llama, tmp_path):
    """FakeQuantLinear in eval mode runs the QuantLinear a checkpoint of its current weights loads: after moving the
    weights (as training does), the student's logits equal those of the saved and reloaded checkpoint exactly; in
    training mode with every block quantized, it computes the same function in float32 (to rounding)."""
    recipe = QuantRecipe(scheme="w8a8-int8", sparsity="2:4")
    student = load_model(peaked_llama)
    fakes = attach_fake_quant(student, plan_conversion(structure_of(student), recipe), noise_rate=1.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for fake in fakes:
            fake.weight.add_(torch.randn(fake.weight.shape, generator=generator) * 0.01)
    ids = torch.randint(0, 256, (2, 24), generator=generator)
    student.eval()
    with torch.no_grad():
        evaluated = student(ids).logits
        for fake in fakes:
            fake.train(True)
        trained_forward = student(ids).logits
    detach_fake_quant(student, fakes)
    _attach(student, apply_recipe(student, recipe).config)
    student.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, evaluated)
    torch.testing.assert_close(trained_forward, evaluated, rtol=1e-4, atol=1e-4)


def test_noise_quantizes_the_given_share_of_blocks_the_same_way_every_time(peaked_llama):
    student = load_model(peaked_llama)
    fakes = attach_fake_quant(student, plan_conversion(structure_of(student), QuantRecipe()), seed=3,
                              noise_rate=0.25, noise_block=8)
    fake: FakeQuantLinear = fakes[0]
    fake.set_step(5)
    mask = fake._mask(torch.zeros(()))
    assert mask.shape == fake.weight.shape
    assert 0.15 < float(mask.mean()) < 0.35
    assert torch.equal(mask[:, ::8].repeat_interleave(8, 1)[:, : fake.in_features], mask)  # whole blocks
    assert torch.equal(fake._mask(torch.zeros(())), mask)  # a function of (seed, step, module)
    fake.set_step(6)
    assert not torch.equal(fake._mask(torch.zeros(())), mask)


def test_resuming_gives_what_the_uninterrupted_run_gives(peaked_llama, tmp_path, monkeypatch):
    from qformat.train.data import TrainData

    options = {"scheme": "w8a8-int8", "data": "calibration", "steps": 6, "lr": 1e-3, "batch_size": 2, "seq_len": 32,
               "save_every": 2}
    whole = qformat.distill(peaked_llama, tmp_path / "whole", state_dir=tmp_path / "state-whole", **options)
    batch = TrainData.batch

    def interrupted(self, step, *args, **kwargs):
        if step == 3:
            raise KeyboardInterrupt  # the machine goes away during step 3: steps 0-1 are saved
        return batch(self, step, *args, **kwargs)

    monkeypatch.setattr(TrainData, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        qformat.distill(peaked_llama, tmp_path / "resumed", state_dir=tmp_path / "state", **options)
    assert not (tmp_path / "resumed").exists()
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["step-0000002"]
    monkeypatch.setattr(TrainData, "batch", batch)
    resumed = qformat.distill(peaked_llama, tmp_path / "resumed", resume=tmp_path / "state", **options)
    assert resumed.log.resumed_from == 2 and len(resumed.log.steps) == 6
    assert resumed.log.steps == whole.log.steps
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_state_from_another_run_is_refused(peaked_llama, tmp_path):
    options = {"scheme": "w8a8-int8", "data": "calibration", "steps": 2, "batch_size": 2, "seq_len": 32}
    qformat.distill(peaked_llama, tmp_path / "a", state_dir=tmp_path / "state", save_every=1, **options)
    with pytest.raises(qformat.OptionError, match="different run .*recipe"):
        qformat.distill(peaked_llama, tmp_path / "b", resume=tmp_path / "state",
                        **{**options, "scheme": "w8a16-int8"})


@pytest.mark.cuda
def test_distill_trains_on_cuda_and_writes_what_the_cpu_run_writes(peaked_llama, tmp_path):
    """With CUDA present the student and teacher train on the GPU (the converter's quantization runs there too); the
    checkpoint loads and matches the CPU run's to float rounding."""
    options = {"scheme": "w8a8-int8", "data": "calibration", "steps": 3, "lr": 1e-3, "batch_size": 2, "seq_len": 32}
    qformat.distill(peaked_llama, tmp_path / "cuda", **options)
    record = json.loads((tmp_path / "cuda" / "config.json").read_text())["quantization_config"]["provenance"]
    assert record["distillation"]["device"] == "cuda"
    qformat.verify(tmp_path / "cuda")
    qformat.distill(peaked_llama, tmp_path / "cpu", device="cpu", **options)
    a, b = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "cuda" / "model.safetensors")
    for name, t in a.items():
        if t.is_floating_point():
            torch.testing.assert_close(b[name], t, rtol=1e-3, atol=1e-4, msg=name)
        elif t.dtype == torch.int8:
            assert int((t.int() - b[name].int()).abs().max()) <= 1, name


def test_a_classifier_with_labeled_data_gets_the_task_loss(readable, tmp_path):
    """A sequence classifier trained on .jsonl data with labels: the task term (class cross-entropy) is on by
    default and logged; its output term is the KL over the classes; labels the head does not have are refused."""
    source = readable("xlm-roberta")  # XLMRobertaForSequenceClassification, 3 classes
    data = tmp_path / "train.jsonl"
    lines = [json.dumps({"text": f"sentence number {i} says {'yes' if i % 3 else 'no'} loudly", "label": i % 3})
             for i in range(12)]
    data.write_text("\n".join(lines) + "\n")
    result = qformat.distill(source, tmp_path / "out", data=data, scheme="w8a8-int8", steps=3, batch_size=4,
                             seq_len=32, lr=1e-3)
    assert all(set(s) - {"step"} == {"task", "output", "attention", "total"} for s in result.log.steps)
    assert result.log.steps[0]["task"] == pytest.approx(1.0986, abs=0.3)  # about ln 3 for a random 3-way head
    record = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["provenance"]
    assert record["distillation"]["options"]["loss_weights"]["task"] == 1.0
    assert record["distillation"]["data"]["dataset"] == "train.jsonl"
    data.write_text(json.dumps({"text": "a sentence with a label the head lacks", "label": 7}) + "\n")
    with pytest.raises(qformat.OptionError, match="label 7, and the model has 3 classes"):
        qformat.distill(source, tmp_path / "bad", data=data, scheme="w8a8-int8", steps=1, batch_size=1)
