"""`qformat.distill(SOURCE, OUTPUT, ...)`: self-distilled quantization (SDQ; O'Neill & Dutta, ACL 2023) that writes
an ordinary qformat checkpoint.

The teacher is SOURCE in float32, frozen. The student is a copy whose planned Linear modules are `FakeQuantLinear`
(the converter's plan and arithmetic: scheme, observer, 2:4 selection, fallback rules), trained with quantization
noise against the teacher's outputs and self-attention outputs (and the task loss where the data has one). The
trained student is then quantized in place by the same code `quantize_` uses, so the written tensors are exactly what
the student's evaluation forward ran, and `from_pretrained(OUTPUT)` reproduces it. Provenance records the recipe,
the training options, the data's identity, the steps and the final losses; with `eval_text`, the post-training
quantization of SOURCE (before) and the distilled model (after) are measured against SOURCE on that text.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qformat.errors import OptionError, UnsupportedModelError
from qformat.plan.recipe import QuantRecipe
from qformat.train.data import TrainData, load_train_data
from qformat.train.distributed import setup_distributed
from qformat.train.fakequant import attach_fake_quant, detach_fake_quant
from qformat.train.loop import Trainee, TrainingLog, train
from qformat.train.losses import attention_heads, attention_outputs
from qformat.train.options import DistillOptions
from qformat.train.state import load_state

__all__ = ["DEFAULT_EVAL_TOKENS", "DistillResult", "distill"]

logger = logging.getLogger(__name__)

#: Tokens of `eval_text` the before/after evaluation reads.
DEFAULT_EVAL_TOKENS = 8192
#: Points of the loss log kept in provenance (every step's values are in the returned log).
LOG_POINTS = 50


@dataclass(frozen=True)
class DistillResult:
    """What `distill` wrote (`output` is None on the processes of a distributed run other than rank 0)."""

    output: Path | None
    log: TrainingLog
    final_losses: dict[str, float]
    evaluation: dict[str, Any] | None
    quantized_modules: int


def _parameters_sha256(model: torch.nn.Module) -> str:
    """The identity of the teacher's weights (names, dtypes, shapes and bytes of its state dict)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _thinned(log: list[dict[str, float]], points: int = LOG_POINTS) -> list[dict[str, float]]:
    if len(log) <= points:
        return [dict(e) for e in log]
    every = len(log) / points
    picked = sorted({min(len(log) - 1, int(i * every)) for i in range(points)} | {len(log) - 1})
    return [dict(log[i]) for i in picked]


def _command(source_label: str, data: TrainData, recipe: QuantRecipe, options: DistillOptions,
             eval_text: str | None) -> str:
    parts = ["qformat", "distill", source_label, "OUTPUT", *recipe.command_args(), "--data", data.label,
             *options.command_args()]
    if eval_text is not None:
        parts += ["--eval-text", Path(str(eval_text)).name]
    return shlex.join(parts)


def _evaluate(teacher: Any, student: Any, tokenizer: Any, recipe: QuantRecipe, eval_text: str, folder: Path,
              max_tokens: int, command: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """SOURCE's post-training quantization (before) and the distilled student (after), measured against SOURCE on
    `eval_text`: ({"before": values, "after": values, "text": identity, "metric": name}, evaluation records)."""
    from qformat.eval import load_text, make_task, result_record
    from qformat.loaders.inplace import apply_recipe

    task = make_task(teacher, tokenizer, load_text(eval_text), max_tokens=max_tokens, folder=folder)
    with torch.inference_mode():
        reference = task.reference(teacher, cache=True)
    ptq = copy.deepcopy(teacher)
    apply_recipe(ptq, recipe)
    with torch.inference_mode():
        before = task.measure(ptq, reference)
        after = task.measure(student, reference)
    del ptq
    records = [result_record(name, task=task.hub_task, text=task.identity(), baseline=reference.values.get(name),
                             quantized=value, command=command) for name, value in after.items()]
    summary = {"text": task.identity(), "metric": task.default_metric, "source": reference.values,
               "before": before, "after": after}
    return summary, records


def distill(source: str | os.PathLike[str], output: str | os.PathLike[str], *, data: str | os.PathLike[str],
            scheme: str = "w8a8-int8", ignore: tuple[str, ...] | list[str] = (), overrides: Any = (),
            observer: str | None = None, sparsity: str | None = None, dtype: str = "auto",
            options: DistillOptions | None = None, eval_text: str | os.PathLike[str] | None = None,
            eval_tokens: int = DEFAULT_EVAL_TOKENS, state_dir: str | os.PathLike[str] | None = None,
            resume: str | os.PathLike[str] | None = None, strategy: str = "ddp", device: str | None = None,
            revision: str | None = None,
            overwrite: bool = False, progress: bool = False, **training: Any) -> DistillResult:
    """Distill SOURCE into a quantized student and write it as a qformat checkpoint at OUTPUT.

    `options` (or its fields as keywords: `steps=`, `lr=`, `noise_rate=`, `loss_weights="task=1,output=1,
    attention=0"`, ...) is the training run; the recipe keywords are `qformat convert`'s. `state_dir` with
    `save_every` saves a resumable state; `resume` (a state folder) continues one. Under `torchrun`, every process
    calls this; rank 0 writes OUTPUT. `device` ("cpu", "cuda", "cuda:1") defaults to CUDA device LOCAL_RANK where
    CUDA is available, else the CPU.

    Raises:
        OptionError: a bad option, data file or state folder.
        UnsupportedModelError: SOURCE is already quantized, or a kind of model distill does not train.
        SourceError: SOURCE cannot be found or loaded.
    """
    from transformers import AutoTokenizer

    from qformat.eval.api import load_model
    from qformat.eval.tasks import model_kind
    from qformat.io.resolve import resolve_source_for
    from qformat.models.structure import source_config, structure_of
    from qformat.plan.rules import plan_conversion

    if options is None:
        options = DistillOptions(**training)
    elif training:
        raise OptionError("pass either options=DistillOptions(...) or training keywords to distill, not both")
    if options.save_every and state_dir is None and resume is None:
        raise OptionError("--save-every needs --state-dir (where the resumable state is written)")
    recipe = QuantRecipe(scheme=scheme, ignore=tuple(ignore), overrides=overrides, observer=observer,
                         sparsity=sparsity, dtype=dtype)
    out = Path(output)
    src = resolve_source_for(source, out, revision=revision, overwrite=overwrite)
    config = source_config(src.path)  # refuses an already quantized SOURCE
    kind = model_kind(config)
    if kind not in ("causal-lm", "encoder"):
        raise UnsupportedModelError(f"qformat distill trains causal LMs and encoders; {kind} models are not "
                                    "supported yet: quantize them with qformat convert")
    dist = setup_distributed(strategy, device)
    try:
        teacher = load_model(src.path, kind).to(dist.device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(src.path)
        student = copy.deepcopy(teacher)
        for p in student.parameters():
            p.requires_grad_(True)
        plan = plan_conversion(structure_of(student), recipe)
        if not plan.quantized:
            raise OptionError("the recipe quantizes no module of SOURCE (everything is ignored); nothing to train")
        fakes = attach_fake_quant(student, plan, seed=options.seed, noise_rate=options.noise_rate,
                                  noise_block=options.noise_block)
        paths = attention_outputs(student) if options.loss_weights.attention else []
        if options.loss_weights.attention and not paths:
            raise UnsupportedModelError(f"qformat does not know where {type(student).__name__}'s self-attention "
                                        "outputs are; run with --loss-weights attention=0")
        heads = attention_heads(config) if paths else 0
        num_labels = getattr(config, "num_labels", None) if any(
            a.endswith("ForSequenceClassification") for a in (config.architectures or [])) else None
        data = load_train_data(data, tokenizer, kind=kind, seq_len=options.seq_len, batch_size=options.batch_size,
                               num_labels=num_labels)
        if dist.strategy == "fsdp" and dist.active and (options.save_every or resume is not None):
            raise OptionError("resumable states are saved and resumed with --strategy ddp; FSDP runs cannot save "
                              "one yet: drop --save-every/--resume or use --strategy ddp")
        weights = options.loss_weights.resolved(data.has_labels)
        if weights != options.loss_weights:
            options = dataclasses.replace(options, loss_weights=weights)
        if not (weights.task or weights.output or weights.attention):
            raise OptionError("every loss weight is 0 for this data (it has no labels, so task defaults to 0); "
                              "give output or attention a weight")
        if options.batch_size % dist.world:
            raise OptionError(f"--batch-size {options.batch_size} must be a multiple of the number of processes "
                              f"({dist.world})")
        run, state = None, None
        if options.save_every or resume is not None:  # the identity a saved state carries (hashes every weight)
            run = {"source": _parameters_sha256(teacher), "data": data.sha256, "recipe": recipe.to_record(),
                   "options": {k: v for k, v in options.to_record().items() if k != "save_every"}}
            if resume is not None:
                state = load_state(Path(resume), run, student)
        blocks = [m for m in student.modules() if type(m).__name__.endswith(("DecoderLayer", "Layer", "Block"))
                  and m is not student]
        trainee = Trainee(teacher, student, kind, fakes, paths, heads, blocks)
        log = train(trainee, data, options, dist=dist, state_dir=Path(state_dir or resume) if (
            state_dir or resume) else None, resume=state, run=run, progress=progress)
        final = log.final()
        result = DistillResult(None, log, final, None, len(plan.quantized))
        if dist.active and dist.strategy == "fsdp":  # gather the shards into a plain copy of the model
            full = dist.full_state_dict(student)
            if dist.is_main:
                student, fakes = copy.deepcopy(teacher).cpu(), []
                student.load_state_dict(full)
        if dist.is_main:
            result = _write(src, out, teacher, student, fakes, tokenizer, recipe, options, data, log, dist,
                            eval_text=eval_text, eval_tokens=eval_tokens, overwrite=overwrite,
                            quantized=len(plan.quantized))
        dist.barrier()
        return result
    finally:
        dist.close()


def _write(src: Any, out: Path, teacher: Any, student: Any, fakes: list[Any], tokenizer: Any, recipe: QuantRecipe,
           options: DistillOptions, data: TrainData, log: TrainingLog, dist: Any, *, eval_text: Any,
           eval_tokens: int, overwrite: bool, quantized: int) -> DistillResult:
    """Quantize the trained student in place (as `quantize_` does), evaluate, and write OUTPUT atomically."""
    from qformat.checkpoint.verify import verify
    from qformat.io.atomic import atomic_output_dir
    from qformat.io.support_files import copy_support_files
    from qformat.loaders.inplace import _attach, apply_recipe
    from qformat.loaders.record import source_record

    detach_fake_quant(student, fakes)
    student.eval()
    label = src.repo_id or "SOURCE"
    command = _command(label, data, recipe, options, str(eval_text) if eval_text is not None else None)
    record: dict[str, Any] = {
        "method": "sdq",
        "reference": "O'Neill & Dutta, Self-Distilled Quantization, ACL 2023 (arXiv 2307.05972)",
        "teacher": "SOURCE in float32, frozen",
        "data": data.identity(),
        "options": options.to_record(),
        "steps": options.steps,
        "global_batch": options.batch_size,
        "processes": dist.world,
        "device": dist.device.type,
        "strategy": dist.strategy if dist.world > 1 else None,
        "resumed_from_step": log.resumed_from,
        "seconds": round(log.seconds, 1),
        "final_losses": {k: round(v, 6) for k, v in log.final().items()},
        "loss_log": [{k: round(v, 6) for k, v in e.items()} for e in _thinned(log.steps)],
    }
    source = source_record(teacher)
    source.update({"repo_id": src.repo_id, "revision": src.revision, "base_model": src.repo_id})
    evaluation_records = None
    summary = None
    if eval_text is not None:
        with torch.no_grad():
            probe = copy.deepcopy(student)
            apply_recipe(probe, recipe)
        summary, evaluation_records = _evaluate(teacher, probe, tokenizer, recipe, str(eval_text), src.path,
                                                eval_tokens, command)
        record["evaluation"] = summary
        del probe
    result = apply_recipe(student, recipe, source=source, distillation=record, command=command,
                          evaluation=evaluation_records)
    _attach(student, result.config)
    student.to("cpu")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        copy_support_files(src.path, tmp)
        student.save_pretrained(tmp)
        verify(tmp)
    logger.info("wrote %s", out)
    return DistillResult(out, log, log.final(), summary, quantized)
