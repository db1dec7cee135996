"""Evaluation: texts with their identity (`data`), metrics and what "loss" means for each (`metrics`), what to
measure per kind of model on a model in memory (`tasks`), `evaluate` on folders (`api`) and recording results into a
checkpoint (`record`); lm-evaluation-harness tasks (`harness`; lm-eval is optional: the `harness` extra)."""

from qformat.eval.api import DEFAULT_MAX_TOKENS, EvaluationReport, evaluate, load_model
from qformat.eval.data import BUILTIN_SPLITS, EvalText, builtin_text, load_text
from qformat.eval.harness import HARNESS_MISSING, run_harness
from qformat.eval.metrics import METRICS, Metric, loss_of, metric, result_record
from qformat.eval.record import record_evaluation
from qformat.eval.tasks import CausalLMTask, EncoderTask, Reference, Seq2SeqTask, Task, make_task, model_kind

__all__ = [
    "BUILTIN_SPLITS",
    "CausalLMTask",
    "DEFAULT_MAX_TOKENS",
    "EncoderTask",
    "EvalText",
    "EvaluationReport",
    "HARNESS_MISSING",
    "METRICS",
    "Metric",
    "Reference",
    "Seq2SeqTask",
    "Task",
    "builtin_text",
    "evaluate",
    "load_model",
    "load_text",
    "loss_of",
    "make_task",
    "metric",
    "model_kind",
    "record_evaluation",
    "result_record",
    "run_harness",
]
