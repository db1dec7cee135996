"""The card tests' checkpoints with evaluation and fallback-search records written into config.json, as `qformat eval
--record` and `--auto-fallback` write them (shapes: docs/FORMAT.md section 11.4): the `records` fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

SHA = "ab" * 32


def perplexity(baseline: float | None, quantized: float | None, *, dataset: str = "pydoc-topics/heldout",
               tokens: int = 2048, relative_change: float | None = None, recovery: float | None = None,
               task: str = "text-generation") -> dict[str, Any]:
    """A perplexity result as recorded; relative_change/recovery as given (the card must not recompute them)."""
    return {"task": task, "dataset": dataset, "text_sha256": SHA, "tokens": tokens, "metric": "perplexity",
            "higher_is_better": False, "baseline": baseline, "quantized": quantized,
            "relative_change": relative_change, "recovery": recovery,
            "command": f"qformat eval OUT --against SRC --max-tokens {tokens}"}


def search(status: str = "met", *, loss: float = 0.0093, heldout_loss: float = 0.0081, heldout_met: bool = True,
           kept_units: int = 5, kept_modules: int = 7, max_evals: int | None = 12,
           max_fallback: int | None = 24, units: int = 120, evaluations: int = 9) -> dict[str, Any]:
    """A `fallback_search` log: two trials, the result, the texts and the time."""
    return {
        "criterion": {"metric": "perplexity", "loss": "relative_increase", "max_loss": 0.01, "max_evals": max_evals,
                      "max_fallback": max_fallback},
        "sensitivity": {"method": "fisher", "units": units, "seconds": 21.3,
                        "text": {"dataset": "pydoc-topics/calibration", "text_sha256": SHA, "tokens": 512}},
        "search_text": {"dataset": "pydoc-topics/search", "text_sha256": SHA, "tokens": 1024},
        "heldout_text": {"dataset": "pydoc-topics/heldout", "text_sha256": SHA, "tokens": 2048},
        "baseline": 13.7,
        "trials": [{"kept_units": 0, "kept_modules": 0, "metric": 14.04, "loss": 0.025, "met": False, "seconds": 11.2,
                    "fallback": []},
                   {"kept_units": kept_units, "kept_modules": kept_modules, "metric": 13.83, "loss": loss,
                    "met": status == "met", "seconds": 11.4, "fallback": ["model.layers.0.mlp.down_proj"]}],
        "evaluations": evaluations,
        "result": {"status": status, "kept_units": kept_units, "kept_modules": kept_modules, "loss": loss,
                   "heldout_loss": heldout_loss, "heldout_met": heldout_met},
        "seconds": 140.2,
    }


SENSITIVE = {"module": "model.layers.0.mlp.down_proj", "reason": "sensitivity",
             "detail": "sensitivity rank 3 of 120 units (Fisher score 1.2e-03)",
             "measured": {"score": 0.0012, "rank": 3, "units": 120}}


def with_records(checkpoint: Path, folder: Path, *, evaluation: Any = None, fallback_search: Any = None,
                 fallback: list[dict[str, Any]] = (), source: dict[str, Any] | None = None,
                 readme: str | None = None) -> Path:
    """A copy of `checkpoint` at `folder` whose quantization_config has these records (and extra fallback entries,
    provenance.source keys, a source card)."""
    folder = Path(shutil.copytree(checkpoint, folder))
    config = json.loads((folder / "config.json").read_text())
    q = config["quantization_config"]
    q["evaluation"] = evaluation
    q["fallback_search"] = fallback_search
    q["fallback"] = [*q["fallback"], *fallback]
    q["provenance"]["source"].update(source or {})
    (folder / "config.json").write_text(json.dumps(config))
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder


@pytest.fixture(scope="session")
def records() -> SimpleNamespace:
    """perplexity(...) and search(...) build records; with_records(checkpoint, folder, ...) writes them into a copy;
    SENSITIVE is a fallback entry chosen by a search."""
    return SimpleNamespace(perplexity=perplexity, search=search, with_records=with_records, SENSITIVE=SENSITIVE)
