"""What a self-distilled quantization run does, as frozen, validated options: the training schedule, the noise and
the loss weights. Recorded in the checkpoint's `provenance.distillation` and turned back into `qformat distill`
arguments for the card's reproduce command.

Defaults, where the SDQ paper (O'Neill & Dutta 2023) leaves a value open, are qformat's choices:

- `noise_rate` 0.5: each step, half of each weight's blocks of `noise_block` input columns are fake-quantized
  (Quant-Noise, Fan et al. 2020, with the error applied through a straight-through estimator); 1.0 quantizes every
  weight every step (plain QAT). Evaluation and the written checkpoint always quantize everything.
- loss weights output 1, attention 1, and task 1 where the data has labels (else 0: see `LossWeights`);
  temperature 1 (the student matches the teacher's distribution itself).
- AdamW at lr 1e-5 without weight decay, linear warmup over the first 5 % of steps, then linear decay to 0.
- dropout off in the student: quantization noise is the regularizer, and a run is then a deterministic function of
  its seed (which resuming and the multi-process run rely on).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qformat.errors import OptionError

__all__ = ["LOSS_TERMS", "DistillOptions", "LossWeights"]

#: The loss terms, in the order they are logged.
LOSS_TERMS = ("task", "output", "attention")


@dataclass(frozen=True)
class LossWeights:
    """Weight of each loss term: `task` (the model's own loss on the data: cross-entropy on the labels of a
    classifier's .jsonl data, or next-token cross-entropy on a causal LM's text), `output` (KL from the teacher's
    output distribution; 1 - cosine of the last hidden states for an encoder without a head) and `attention` (KL
    between the teacher's and student's self-attention output relations, per layer and head). 0 turns a term off.

    `task=None` (the default) means 1 where the data has labels and 0 otherwise: a causal LM's next-token loss on the
    training text would fit the student to that text (its perplexity there falls below the teacher's while it moves
    away from the teacher), which is fine-tuning, not recovering the teacher; ask for it with task=1."""

    task: float | None = None
    output: float = 1.0
    attention: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "task" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
                raise OptionError(f"loss weight {f.name} must be a number >= 0, got {value!r}")
            object.__setattr__(self, f.name, float(value))
        if not (self.output or self.attention or self.task or self.task is None):
            raise OptionError("every loss weight is 0: give at least one of task, output, attention a weight")

    def resolved(self, has_labels: bool) -> LossWeights:
        """These weights with `task=None` decided for data that has (or lacks) labels."""
        if self.task is not None:
            return self
        return LossWeights(task=1.0 if has_labels else 0.0, output=self.output, attention=self.attention)

    @classmethod
    def parse(cls, text: str) -> LossWeights:
        """"task=1,output=1,attention=0.5" (terms not named keep their default)."""
        values: dict[str, float] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in LOSS_TERMS:
                raise OptionError(f"--loss-weights takes TERM=WEIGHT pairs with TERM one of {', '.join(LOSS_TERMS)}"
                                  f" (e.g. task=1,output=1,attention=0), got {part!r}")
            try:
                values[name] = float(value)
            except ValueError:
                raise OptionError(f"--loss-weights: {name}={value!r} is not a number") from None
        return cls(**values)

    def text(self) -> str:
        return ",".join(f"{name}={getattr(self, name):g}" for name in LOSS_TERMS if getattr(self, name) is not None)


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class DistillOptions:
    """The training run. `batch_size` is the global batch (sequences per step, split across processes);
    `seq_len` the tokens per sequence (causal LMs: windows of the data; encoders: paragraphs truncated to it);
    `save_every` writes a resumable state every N steps (0: never)."""

    steps: int = 200
    lr: float = 1e-5
    batch_size: int = 4
    seq_len: int = 256
    noise_rate: float = 0.5
    noise_block: int = 8
    loss_weights: LossWeights = field(default_factory=LossWeights)
    temperature: float = 1.0
    warmup: float = 0.05
    seed: int = 0
    save_every: int = 0

    def __post_init__(self) -> None:
        _positive_int("--steps", self.steps)
        _positive_int("--batch-size", self.batch_size)
        _positive_int("--seq-len", self.seq_len, 8)
        _positive_int("--noise-block", self.noise_block)
        _positive_int("--save-every", self.save_every, 0)
        _positive_int("--seed", self.seed, 0)
        if self.noise_block % 4:
            raise OptionError(f"--noise-block must be a multiple of 4 (2:4 groups are never split), got "
                              f"{self.noise_block}")
        for name, value, low, high in (("--lr", self.lr, 0.0, 1.0), ("--noise-rate", self.noise_rate, 0.0, 1.0),
                                       ("--temperature", self.temperature, 0.0, 100.0),
                                       ("--warmup", self.warmup, -1e-12, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise OptionError(f"{name} must be a number in ({max(low, 0):g}, {high:g}], got {value!r}")
        if isinstance(self.loss_weights, str):
            object.__setattr__(self, "loss_weights", LossWeights.parse(self.loss_weights))
        elif isinstance(self.loss_weights, dict):
            object.__setattr__(self, "loss_weights", LossWeights(**self.loss_weights))
        elif not isinstance(self.loss_weights, LossWeights):
            raise OptionError("loss_weights must be a LossWeights, a dict or 'task=1,output=1,attention=1'")

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): linear warmup, then linear decay to 0 at `steps`."""
        warm = max(1, round(self.warmup * self.steps))
        if step < warm:
            return self.lr * (step + 1) / warm
        return self.lr * max(0.0, (self.steps - step) / max(1, self.steps - warm))

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["loss_weights"] = asdict(self.loss_weights)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DistillOptions:
        try:
            return cls(**record)
        except TypeError as exc:
            raise OptionError(f"the saved distillation options do not fit this qformat ({exc})") from None

    def command_args(self) -> list[str]:
        """These options as `qformat distill` arguments (defaults left out)."""
        default = DistillOptions()
        parts: list[str] = []
        for f in fields(self):
            value, base = getattr(self, f.name), getattr(default, f.name)
            if value == base:
                continue
            flag = "--" + f.name.replace("_", "-")
            parts += [flag, value.text() if isinstance(value, LossWeights) else f"{value:g}"
                      if isinstance(value, float) else str(value)]
        return parts
