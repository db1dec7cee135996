"""Training data for `qformat distill`: a text file (or a built-in text) cut into examples, and the deterministic
batch of every step.

- a causal LM reads the text as one token stream cut into windows of `seq_len` tokens (its labels are the text);
- an encoder reads paragraphs (blank-line separated, truncated to `seq_len` tokens);
- a `.jsonl` file gives one example per line, `{"text": "...", "label": 3}`; the label (an integer class) is the task
  loss's target for a sequence-classification model.

Step `s` takes examples `s*B .. s*B+B-1` of an endless stream of shuffled passes over the examples (pass `e`
shuffled with seed `(seed, e)`), and process `r` of `w` takes every `w`-th of them from the `r`-th: the global batch
is the same whatever the number of processes, and a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from qformat.errors import OptionError
from qformat.eval.data import MAX_TEXT_BYTES, EvalText, load_text, paragraphs
from qformat.io.jsonfile import read_text

__all__ = ["TrainData", "load_train_data"]

#: Characters of a text tokenized for training (as much as evaluation reads).
MAX_CHARS = 16_000_000


@dataclass(frozen=True)
class TrainData:
    """Tokenized examples (`input_ids`, and `label` where given) and the data's identity (label, hash, counts)."""

    examples: tuple[dict[str, Any], ...]
    label: str
    sha256: str
    pad_id: int

    @property
    def tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)

    @property
    def has_labels(self) -> bool:
        return all("label" in e for e in self.examples)

    def identity(self) -> dict[str, Any]:
        return {"dataset": self.label, "text_sha256": self.sha256, "examples": len(self.examples),
                "tokens": self.tokens}

    def global_indices(self, step: int, batch_size: int, seed: int) -> list[int]:
        """The example indices of step `step`'s global batch."""
        n = len(self.examples)
        out = []
        for position in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(position, n)
            out.append(_epoch_order(n, seed, epoch)[offset])
        return out

    def batch(self, step: int, batch_size: int, seed: int, *, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """This process's share of step `step`'s global batch, padded on the right, with its attention mask."""
        chosen = [self.examples[i] for i in self.global_indices(step, batch_size, seed)[rank::world]]
        length = max(len(e["input_ids"]) for e in chosen)
        ids = torch.full((len(chosen), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), length), dtype=torch.long)
        for row, example in enumerate(chosen):
            ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
            mask[row, : len(example["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if all("label" in e for e in chosen):
            batch["labels"] = torch.tensor([e["label"] for e in chosen], dtype=torch.long)
        return batch


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The shuffled order of `n` examples in one epoch: a function of (seed, epoch) only, so every process and a
    resumed run draw the same batches; cached because each step reads a handful of positions from it."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist())


def _jsonl(path: Path) -> tuple[list[dict[str, Any]], str]:
    raw = read_text(path, error=OptionError, max_bytes=MAX_TEXT_BYTES, follow_symlinks=True,
                    what="give a UTF-8 .jsonl file with one {\"text\": ...} object per line")
    records = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise OptionError(f"{path.name} line {number} is not JSON ({exc.msg}); give one {{\"text\": ...}} "
                              "object per line") from None
        text, label = (record.get("text"), record.get("label")) if isinstance(record, dict) else (None, None)
        if not isinstance(text, str) or not text.strip():
            raise OptionError(f"{path.name} line {number} has no \"text\" string; give one {{\"text\": ...}} "
                              "object per line")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
            raise OptionError(f"{path.name} line {number}: \"label\" must be a class index (an integer >= 0)")
        records.append({"text": text} if label is None else {"text": text, "label": label})
    if not records:
        raise OptionError(f"{path.name} holds no examples; give one {{\"text\": ...}} object per line")
    return records, hashlib.sha256(raw.encode("utf-8")).hexdigest()


def load_train_data(spec: str | Path, tokenizer: Any, *, kind: str, seq_len: int, batch_size: int,
                    num_labels: int | None = None) -> TrainData:
    """Tokenize the training data named by `spec` (a file, or a built-in text name) for a model of `kind`
    ("causal-lm" or "encoder"). Refuses data with fewer examples than one global batch, and labels a classifier
    does not have."""
    path = Path(str(spec)).expanduser()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if path.suffix == ".jsonl" and path.exists():
        records, sha = _jsonl(path)
        label = path.name
        examples = []
        for record in records:
            ids = tokenizer(record["text"], truncation=True, max_length=seq_len)["input_ids"]
            examples.append({"input_ids": ids, **({"label": record["label"]} if "label" in record else {})})
        labels = [e["label"] for e in examples if "label" in e]
        if labels and num_labels is not None and max(labels) >= num_labels:
            raise OptionError(f"{path.name} has label {max(labels)}, and the model has {num_labels} classes; "
                              f"give labels 0..{num_labels - 1}")
    else:
        text: EvalText = load_text(spec)
        label, sha = text.label, text.sha256
        if kind == "causal-lm":
            ids = tokenizer(text.text[:MAX_CHARS], return_tensors="pt", verbose=False)["input_ids"][0].tolist()
            examples = [{"input_ids": ids[i:i + seq_len]} for i in range(0, len(ids) - seq_len + 1, seq_len)]
        else:
            examples = [{"input_ids": tokenizer(p, truncation=True, max_length=seq_len)["input_ids"]}
                        for p in paragraphs(text)]
    if len(examples) < batch_size:
        unit = f"windows of {seq_len} tokens" if kind == "causal-lm" and path.suffix != ".jsonl" else "examples"
        raise OptionError(f"{label} gives {len(examples)} {unit}, fewer than one batch ({batch_size}); give more "
                          "text or a smaller --batch-size / --seq-len")
    return TrainData(tuple(examples), label, sha, int(pad_id))
