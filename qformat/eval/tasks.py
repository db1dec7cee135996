"""What to measure for each kind of model, on a model in memory: causal LMs, encoders and seq2seq models.

A `Task` is built once from a tokenizer and a text (tokenized into fixed windows or paragraphs, deterministic), then
measures any number of models against the source's outputs (`reference`, computed once): the fallback search
measures a dozen variants of one model on the same task. Every task also defines the objective whose gradient the
sensitivity estimate uses (`fisher_objective`, see `qformat.search.sensitivity`).

- causal LM ("text-generation"): perplexity over non-overlapping windows; against the source, the mean KL divergence
  of next-token distributions and top-1 agreement;
- encoder ("feature-extraction"): pooled sentence embeddings (mean pooling, or CLS where the sentence-transformers
  pooling config says so); against the source, mean and worst cosine similarity and the Spearman agreement of all
  pairwise similarities (the ranking a semantic search returns);
- seq2seq ("text2text-generation"): teacher-forced token loss on reconstructing each paragraph; against the source,
  ROUGE-L of greedy outputs to the source's greedy outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qformat.errors import UnsupportedModelError
from qformat.eval.data import EvalText, paragraphs
from qformat.eval.metrics import rouge_l, spearman

__all__ = ["Z_95", "CausalLMTask", "EncoderTask", "Reference", "Seq2SeqTask", "Task", "model_kind", "make_task"]

#: Longest window (causal) or paragraph (encoder, seq2seq) in tokens; the model's own limit wins when smaller.
MAX_WINDOW = 512
MAX_PARAGRAPH = 128
#: Characters of a text tokenized for a causal LM (64 MiB of text would take minutes to tokenize for nothing).
MAX_TEXT_CHARS = 4_000_000
#: Paragraphs per batch for encoders and seq2seq models.
BATCH = 16
#: Paragraphs a seq2seq model generates for (greedy, `GENERATE_TOKENS` new tokens each).
GENERATE_INPUTS = 16
GENERATE_TOKENS = 32


def _spread(count: int, wanted: int) -> list[int]:
    """`wanted` indices out of range(count), evenly spaced from the first to the last (all of them if fewer)."""
    if wanted >= count:
        return list(range(count))
    return [round(i * (count - 1) / max(wanted - 1, 1)) for i in range(wanted)]


def _spread_windows(ids: torch.Tensor, window: int, max_tokens: int) -> list[torch.Tensor]:
    """Non-overlapping windows of `window` tokens, `max_tokens` in all, spread evenly over the whole text rather
    than its first tokens: the start of a text is rarely typical of it (a search tuned on an easy first page
    misjudges the rest)."""
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    wanted = -(-max_tokens // window)
    full = [w for w in windows if len(w) == window]
    if len(full) >= wanted:  # the text's short tail window only when it is needed
        windows = full
    chosen = [windows[i] for i in _spread(len(windows), wanted)]
    overshoot = sum(len(w) for w in chosen) - max_tokens
    if overshoot > 0 and chosen:
        chosen[-1] = chosen[-1][: max(len(chosen[-1]) - overshoot, 0)]
    return chosen


def model_kind(config: Any) -> str:
    """"causal-lm", "encoder" or "seq2seq" for a transformers config; refuses what qformat cannot evaluate."""
    architectures = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    if any(a.endswith("ForConditionalGeneration") for a in architectures) or hasattr(config, "vision_config"):
        raise UnsupportedModelError(
            f"qformat eval measures causal LMs, encoders and seq2seq models; {architectures[0]} takes images too: "
            "evaluate it with lm-evaluation-harness or your own script")
    return "encoder"


def _max_positions(model: nn.Module, default: int) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None) or getattr(getattr(config, "text_config", None), key, None)
        if isinstance(value, int) and value > 0:
            return min(default, value)
    return default


def _bar(items: list[Any], desc: str, progress: bool) -> Iterator[Any]:
    if not progress:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, unit="batch", leave=False))


@dataclass
class Reference:
    """The source model's outputs on a task: its own metric values (`values`, e.g. its perplexity) and whatever the
    comparisons need (`outputs`, one per window or batch: next-token log-probabilities, embeddings, greedy texts).
    `compute` recomputes one output on demand instead of caching it (for large vocabularies)."""

    values: dict[str, float]
    outputs: list[Any] = field(default_factory=list)
    compute: Callable[[int], Any] | None = None
    #: The source's loss on every scored token (causal LMs), for paired confidence bounds (`Task.upper`).
    token_losses: torch.Tensor | None = None

    @property
    def has_outputs(self) -> bool:
        """Whether comparisons (KL, agreement) can be computed: outputs cached or computable."""
        return bool(self.outputs) or self.compute is not None

    def output(self, i: int) -> Any:
        return self.compute(i) if self.compute is not None else self.outputs[i]


#: One-sided 95 % normal quantile: a trial meets a budget only if the loss's upper bound does (`Task.upper`).
Z_95 = 1.6449


class Task:
    """Base class: subclasses set `kind`, `hub_task`, `default_metric`, build `batches` and implement `_run`."""

    kind: str = ""
    hub_task: str = ""
    default_metric: str = ""
    #: Metrics measured against a reference; those not in this tuple need only the model itself.
    comparison_metrics: tuple[str, ...] = ()

    def __init__(self, tokenizer: Any, text: EvalText, *, max_tokens: int, progress: bool = False) -> None:
        #: After `measure` with a reference: metric -> the one-sided 95 % upper bound of the model's value where the
        #: task can estimate one (perplexity, from the paired per-token loss differences with the source). A
        #: bisection that accepts the first k whose *measured* loss fits the budget picks lucky draws (the winner's
        #: curse: on SmolLM2 fp8 a set that met 1 % on the search text lost 1.8 % on held-out text); the bound is
        #: what the search compares with the budget.
        self.upper: dict[str, float] = {}
        self.tokenizer = tokenizer
        self.text = text
        self.max_tokens = max_tokens
        self.progress = progress
        self.batches: list[dict[str, torch.Tensor]] = []
        self.tokens = 0

    def identity(self) -> dict[str, Any]:
        """The text's record: label, content hash and tokens used."""
        return self.text.identity(self.tokens)

    def reference(self, model: nn.Module, *, cache: bool = True) -> Reference:
        """Run the source model once. With `cache=False` the per-batch outputs are recomputed from `model` when
        needed (lockstep evaluation: nothing the size of the logits is kept)."""
        raise NotImplementedError

    def measure(self, model: nn.Module, reference: Reference | None = None) -> dict[str, float]:
        """The model's metric values; with a reference, the comparisons too."""
        raise NotImplementedError

    def fisher_objective(self, model: nn.Module, batch: dict[str, torch.Tensor],
                         generator: torch.Generator) -> torch.Tensor:
        """A scalar whose gradient g with respect to a module's output makes E[(g . dy)^2] the increase of the
        task's loss (KL from the source, or 1 - cosine) to second order when that output moves by dy: the
        log-likelihood of labels sampled from the model's own predictions (Fisher information), or a random
        projection of the normalized embedding orthogonal to itself."""
        raise NotImplementedError


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


class CausalLMTask(Task):
    kind = "causal-lm"
    hub_task = "text-generation"
    default_metric = "perplexity"
    comparison_metrics = ("kl_divergence", "top1_agreement")

    def __init__(self, tokenizer: Any, text: EvalText, *, max_tokens: int, window: int = MAX_WINDOW,
                 progress: bool = False) -> None:
        super().__init__(tokenizer, text, max_tokens=max_tokens, progress=progress)
        self.window = window
        ids = tokenizer(text.text[:MAX_TEXT_CHARS], return_tensors="pt", verbose=False)["input_ids"][0]
        self.batches = [{"input_ids": w[None]} for w in _spread_windows(ids, window, max_tokens) if len(w) >= 2]
        self.tokens = sum(b["input_ids"].shape[1] for b in self.batches)

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: Any, text: EvalText, *, max_tokens: int,
                  progress: bool = False) -> CausalLMTask:
        return cls(tokenizer, text, max_tokens=max_tokens, window=_max_positions(model, MAX_WINDOW),
                   progress=progress)

    def _logprobs(self, model: nn.Module, i: int) -> torch.Tensor:
        batch = _to(self.batches[i], _device(model))
        with torch.inference_mode():
            logits = model(**batch, use_cache=False).logits[0, :-1]
        return F.log_softmax(logits.float(), dim=-1).cpu()

    def _targets(self, i: int) -> torch.Tensor:
        return self.batches[i]["input_ids"][0, 1:]

    def reference(self, model: nn.Module, *, cache: bool | None = True) -> Reference:
        """`cache=None`: keep only the source's perplexity and per-token losses (no comparisons later)."""
        losses, outputs = [], []
        for i in _bar(list(range(len(self.batches))), "source", self.progress):
            logp = self._logprobs(model, i)
            losses.append(-logp.gather(-1, self._targets(i)[:, None])[:, 0].double())
            if cache:
                outputs.append(logp)
        tokens = torch.cat(losses)
        values = {"perplexity": math.exp(float(tokens.mean())), "kl_divergence": 0.0, "top1_agreement": 1.0}
        compute = (lambda i: self._logprobs(model, i)) if cache is False else None
        return Reference(values, outputs, compute, token_losses=tokens)

    def measure(self, model: nn.Module, reference: Reference | None = None) -> dict[str, float]:
        kl, agree, losses = 0.0, 0, []
        compare = reference is not None and reference.has_outputs
        for i in _bar(list(range(len(self.batches))), "quantized", self.progress):
            logp = self._logprobs(model, i)
            losses.append(-logp.gather(-1, self._targets(i)[:, None])[:, 0].double())
            if compare:
                ref = reference.output(i)
                kl += float((ref.exp() * (ref - logp)).sum())
                agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
        tokens = torch.cat(losses)
        count = max(len(tokens), 1)
        values = {"perplexity": math.exp(float(tokens.mean()))}
        self.upper = {}
        if reference is not None and reference.token_losses is not None and len(tokens) > 1:
            diff = tokens - reference.token_losses
            bound = float(diff.mean()) + Z_95 * float(diff.std()) / math.sqrt(len(diff))
            self.upper["perplexity"] = reference.values["perplexity"] * math.exp(bound)
        if compare:
            values["kl_divergence"] = kl / count
            values["top1_agreement"] = agree / count
        return values

    def fisher_objective(self, model: nn.Module, batch: dict[str, torch.Tensor],
                         generator: torch.Generator) -> torch.Tensor:
        logits = model(**_to(batch, _device(model)), use_cache=False).logits[0, :-1].float()
        logp = F.log_softmax(logits, dim=-1)
        sampled = torch.multinomial(logp.detach().exp().cpu(), 1, generator=generator).to(logp.device)
        return logp.gather(-1, sampled).sum()


def _pooling_mode(folder: Any) -> str:
    """"cls" where the sentence-transformers pooling config of `folder` asks for the CLS token, else "mean"."""
    if folder is None:
        return "mean"
    from pathlib import Path

    from qformat.errors import FormatError
    from qformat.io.jsonfile import load_json

    path = Path(folder) / "1_Pooling" / "config.json"
    if not path.is_file():
        return "mean"
    try:
        config = load_json(path, error=FormatError)
    except FormatError:
        return "mean"
    return "cls" if isinstance(config, dict) and config.get("pooling_mode_cls_token") else "mean"


class _ParagraphTask(Task):
    """Shared preparation: paragraphs tokenized (truncated to the model's limit), batched with padding, until
    `max_tokens` tokens are taken."""

    def __init__(self, tokenizer: Any, text: EvalText, *, max_tokens: int, max_length: int = MAX_PARAGRAPH,
                 progress: bool = False) -> None:
        super().__init__(tokenizer, text, max_tokens=max_tokens, progress=progress)
        chosen, total = [], 0
        every = paragraphs(text)
        for paragraph in every[:: _stride(every, max_tokens)]:  # spread over the whole text
            n = len(tokenizer(paragraph, truncation=True, max_length=max_length)["input_ids"])
            if total + n > max_tokens and chosen:
                break
            chosen.append(paragraph)
            total += n
        if len(chosen) < 2:
            raise UnsupportedModelError(f"{text.label} has fewer than 2 paragraphs of 4+ words; give a longer text")
        self.paragraphs = chosen
        self.tokens = total
        self.batches = [dict(tokenizer(chosen[i:i + BATCH], truncation=True, max_length=max_length, padding=True,
                                       return_tensors="pt")) for i in range(0, len(chosen), BATCH)]


def _stride(paragraphs_: list[str], max_tokens: int) -> int:
    """Take every n-th paragraph so that the chosen ones span the whole text (about 4 characters per token)."""
    total_chars = sum(len(p) for p in paragraphs_)
    return max(1, total_chars // max(4 * max_tokens, 1))


class EncoderTask(_ParagraphTask):
    kind = "encoder"
    hub_task = "feature-extraction"
    default_metric = "mean_cosine"
    comparison_metrics = ("mean_cosine", "min_cosine", "rank_agreement")

    def __init__(self, tokenizer: Any, text: EvalText, *, max_tokens: int, max_length: int = MAX_PARAGRAPH,
                 pooling: str = "mean", progress: bool = False) -> None:
        super().__init__(tokenizer, text, max_tokens=max_tokens, max_length=max_length, progress=progress)
        self.pooling = pooling

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: Any, text: EvalText, *, max_tokens: int,
                  progress: bool = False, folder: Any = None) -> EncoderTask:
        return cls(tokenizer, text, max_tokens=max_tokens, max_length=_max_positions(model, MAX_PARAGRAPH),
                   pooling=_pooling_mode(folder), progress=progress)

    def _pooled(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = _to(batch, _device(model))
        out = model(**batch, output_hidden_states=True)  # a task head's model (e.g. a classifier) has no
        hidden = getattr(out, "last_hidden_state", None)   # last_hidden_state: its encoder's output is the last
        hidden = (hidden if hidden is not None else out.hidden_states[-1]).float()  # of hidden_states
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def _embeddings(self, model: nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            pooled = [self._pooled(model, b).cpu() for b in _bar(self.batches, "embed", self.progress)]
        return F.normalize(torch.cat(pooled), dim=-1)

    def reference(self, model: nn.Module, *, cache: bool = True) -> Reference:
        return Reference({"mean_cosine": 1.0, "min_cosine": 1.0, "rank_agreement": 1.0}, [self._embeddings(model)])

    def measure(self, model: nn.Module, reference: Reference | None = None) -> dict[str, float]:
        got = self._embeddings(model)
        if reference is None:
            return {}
        ref = reference.output(0)
        cosine = (got * ref).sum(-1)
        upper = torch.triu_indices(len(got), len(got), offset=1)
        sim_got = (got @ got.T)[upper[0], upper[1]]
        sim_ref = (ref @ ref.T)[upper[0], upper[1]]
        return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
                "rank_agreement": spearman(sim_ref, sim_got)}

    def fisher_objective(self, model: nn.Module, batch: dict[str, torch.Tensor],
                         generator: torch.Generator) -> torch.Tensor:
        pooled = self._pooled(model, batch)
        unit = F.normalize(pooled.detach(), dim=-1)
        r = torch.randn(pooled.shape, generator=generator).to(pooled.device)
        r = r - (r * unit).sum(-1, keepdim=True) * unit  # moving along the embedding itself changes no cosine
        return ((r * pooled).sum(-1) / pooled.detach().norm(dim=-1).clamp(min=1e-12)).sum()


class Seq2SeqTask(_ParagraphTask):
    kind = "seq2seq"
    hub_task = "text2text-generation"
    default_metric = "loss"
    comparison_metrics = ("rougeL",)

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: Any, text: EvalText, *, max_tokens: int,
                  progress: bool = False) -> Seq2SeqTask:
        return cls(tokenizer, text, max_tokens=max_tokens, max_length=_max_positions(model, MAX_PARAGRAPH),
                   progress=progress)

    def _labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def _logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self._labels(batch)
        device = _device(model)
        out = model(**_to(batch, device), labels=labels.to(device), use_cache=False)
        return out.logits.float(), labels.to(device)

    def _loss(self, model: nn.Module) -> float:
        nll, count = 0.0, 0
        with torch.inference_mode():
            for batch in _bar(self.batches, "loss", self.progress):
                logits, labels = self._logits(model, batch)
                keep = labels != -100
                logp = F.log_softmax(logits, dim=-1)
                nll -= float(logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep].sum())
                count += int(keep.sum())
        return nll / max(count, 1)

    def _greedy(self, model: nn.Module) -> list[str]:
        inputs = self.paragraphs[:GENERATE_INPUTS]
        batch = _to(dict(self.tokenizer(inputs, truncation=True, max_length=MAX_PARAGRAPH, padding=True,
                                        return_tensors="pt")), _device(model))
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=GENERATE_TOKENS, do_sample=False, num_beams=1)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def reference(self, model: nn.Module, *, cache: bool = True) -> Reference:
        return Reference({"loss": self._loss(model), "rougeL": 1.0}, [self._greedy(model)])

    def measure(self, model: nn.Module, reference: Reference | None = None) -> dict[str, float]:
        values = {"loss": self._loss(model)}
        if reference is not None:
            values["rougeL"] = rouge_l(reference.output(0), self._greedy(model))
        return values

    def fisher_objective(self, model: nn.Module, batch: dict[str, torch.Tensor],
                         generator: torch.Generator) -> torch.Tensor:
        logits, labels = self._logits(model, batch)
        logp = F.log_softmax(logits, dim=-1)
        sampled = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]).cpu(), 1, generator=generator)
        sampled = sampled.reshape(labels.shape).to(logp.device)
        return logp.gather(-1, sampled[..., None])[..., 0][labels != -100].sum()


def make_task(model: nn.Module, tokenizer: Any, text: EvalText, *, max_tokens: int, progress: bool = False,
              folder: Any = None) -> Task:
    """The task for `model`'s kind, on `text` (at most `max_tokens` tokens). `folder` is where the model came from
    (its sentence-transformers pooling config picks the encoder's pooling)."""
    kind = model_kind(model.config)
    if kind == "causal-lm":
        return CausalLMTask.for_model(model, tokenizer, text, max_tokens=max_tokens, progress=progress)
    if kind == "seq2seq":
        return Seq2SeqTask.for_model(model, tokenizer, text, max_tokens=max_tokens, progress=progress)
    return EncoderTask.for_model(model, tokenizer, text, max_tokens=max_tokens, progress=progress, folder=folder)
