"""lm-evaluation-harness tasks on a model folder (`qformat eval DIR --tasks ...`), recorded like qformat's own metrics.

The harness (EleutherAI's `lm-eval` package, an optional dependency: `pip install 'qformat-hf[harness]'`) is what
published quantized-model cards report (HellaSwag, ARC, MMLU accuracy). qformat loads the model itself, through
`qformat.eval.api.load_model`, so a qformat checkpoint runs on qformat's kernels exactly as a user's would, and hands
the loaded model to the harness's Python API (`HFLM(pretrained=model)`, `simple_evaluate`) with the harness's fixed
seeds. With a source (`against`), the source is evaluated the same way, one model in memory at a time.

Local tasks: `include_path` is a folder of task YAML files. A local task's relative `data_files` / `data_dir` are
read relative to its YAML file (the harness alone reads them relative to the working directory), and a run whose
tasks are all local skips indexing the harness's thousands of built-in tasks. The harness downloads a built-in
task's dataset from the Hub on first use (set HF_DATASETS_OFFLINE=1 to use only the local cache); a local task reads
only its files.

Each (task, metric) becomes one `quantization_config.evaluation` entry with the keys of
`qformat.eval.metrics.result_record`: task is the harness task name, dataset the dataset's label (a local file's name,
never its path; a Hub dataset's id and configuration), text_sha256 the data file's hash (null for a Hub dataset),
tokens null and `samples` the number of documents scored, plus `harness` (lm-eval version, task version, shots and the
standard error the harness reports).
"""

from __future__ import annotations

import hashlib
import math
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qformat.errors import OptionError, SourceError
from qformat.eval.api import _source_label, load_model, load_tokenizer
from qformat.eval.tasks import model_kind

__all__ = ["HARNESS_MISSING", "run_harness"]

#: The one-line error when lm-eval is not installed.
HARNESS_MISSING = "lm-evaluation-harness tasks need the lm-eval package: pip install 'qformat-hf[harness]'"

#: Largest local data file hashed for `text_sha256` (a larger one is recorded with a null hash).
MAX_HASHED_BYTES = 2**30


def _lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (fails where torch/transformers extras are absent)
    except ImportError:
        raise OptionError(HARNESS_MISSING) from None
    return lm_eval


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------------- task loading


def _resolve_files(value: Any, base: Path) -> Any:
    """`data_files` (a path, a list of them or a dict of split -> either) with relative local paths made absolute
    against `base`; URLs (`hf://`, `https://`) and absolute paths stay as they are."""
    if isinstance(value, dict):
        return {k: _resolve_files(v, base) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve_files(v, base) for v in value]
    if isinstance(value, str) and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
        return str(base / value)
    return value


def _local_config(yaml_path: Path) -> dict[str, Any] | None:
    """The full config of the task defined in `yaml_path` (includes merged, `!function`s imported), with its
    relative data paths resolved against the file's folder; None where this lm-eval cannot read it for us."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval >= 0.4.10; the task manager's own reader
    except ImportError:
        return None
    config = load_yaml(yaml_path, resolve_func=True)
    kwargs = dict(config.get("dataset_kwargs") or {})
    for key in ("data_files", "data_dir"):
        if key in kwargs:
            kwargs[key] = _resolve_files(kwargs[key], yaml_path.parent)
    if kwargs:
        config["dataset_kwargs"] = kwargs
    return config


def _task_specs(names: list[str], include_path: Path | None) -> tuple[Any, list[str | dict[str, Any]]]:
    """A harness TaskManager that knows `names`, and what to pass it for each: the resolved config of a task defined
    under `include_path`, else the name. Only the local folder is indexed when it defines every name (seconds
    saved on 2 cores: the built-in index has ~15,000 entries)."""
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f"neither built in nor defined under {include_path}" if include_path else "not built in"
        raise OptionError(f"unknown lm-evaluation-harness task {', '.join(map(repr, unknown))} ({where}); "
                          "give --include-path DIR for tasks defined in local YAML files")
    specs: list[str | dict[str, Any]] = []
    for name in names:
        entry = manager.task_index.get(name) if hasattr(manager, "task_index") else None
        yaml_path = getattr(entry, "yaml_path", None)
        is_local = (include_path is not None and yaml_path is not None and getattr(entry, "cfg", None) is not None
                    and "task" in entry.cfg and Path(yaml_path).resolve().is_relative_to(include_path.resolve()))
        config = _local_config(Path(yaml_path)) if is_local else None
        specs.append(config if config is not None else name)
    return manager, specs


# ---------------------------------------------------------------------------------------------------- one model


def _run(folder: Path, tokenizer_folders: list[Path], kind: str, manager: Any, specs: list[str | dict[str, Any]], *,
         limit: int | None, batch_size: int, num_fewshot: int | None) -> dict[str, Any]:
    """The harness's results dict for the model in `folder` (loaded by qformat, evaluated by the harness)."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    model = load_model(folder, kind)
    tokenizer = load_tokenizer(*tokenizer_folders)
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise SourceError(f"the tokenizer of {folder} has neither a BOS nor an EOS token; lm-evaluation-harness "
                          "scores each answer after one of them: give the tokenizer an eos_token")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="seq2seq" if kind == "seq2seq" else "causal",
              batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False)
    if not results:
        raise SourceError("lm-evaluation-harness returned no results (a distributed run's non-zero rank?)")
    return results


# ---------------------------------------------------------------------------------------------------- records


def _local_files(data_files: Any, split: str | None) -> list[Path] | None:
    """The local files a task's evaluation split reads (all of them where `data_files` is not per split), or None
    where any of them is not a local file (a URL, a Hub path, a glob)."""
    if isinstance(data_files, dict):
        data_files = data_files.get(split) if split in data_files else None
    if data_files is None:
        return None
    paths = [data_files] if isinstance(data_files, str) else list(data_files)
    files = [Path(os.path.expanduser(p)) for p in paths if isinstance(p, str) and "://" not in p]
    if len(files) != len(paths) or not files or not all(f.is_file() for f in files):
        return None
    return files


def _sha256(files: list[Path]) -> str | None:
    """The hash of the files' bytes, concatenated in order (for one file, what `sha256sum` prints)."""
    if sum(f.stat().st_size for f in files) > MAX_HASHED_BYTES:
        return None
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(2**20), b""):
                digest.update(block)
    return digest.hexdigest()


def _identity(config: dict[str, Any] | None, name: str) -> tuple[str, str | None]:
    """(dataset label, text_sha256) of a task's data: a local file's name and hash, or a Hub dataset's id (and
    configuration) with no hash; a group's own name."""
    if not config:
        return name, None
    kwargs = config.get("dataset_kwargs") or {}
    split = config.get("test_split") or config.get("validation_split")
    files = _local_files(kwargs.get("data_files"), split) if isinstance(kwargs, dict) else None
    if files:
        return ",".join(f.name for f in files), _sha256(files)
    path = str(config.get("dataset_path") or name)
    if os.path.isabs(os.path.expanduser(path)) or path.startswith("."):
        path = Path(path).name  # a local dataset folder: its name, never its path
    dataset_name = config.get("dataset_name")
    return (f"{path}:{dataset_name}" if dataset_name else path), None


def _sig(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")


def _scores(results: dict[str, Any], name: str) -> dict[str, tuple[float | None, float | None]]:
    """metric -> (value, stderr) of task or group `name`; a metric with a filter other than "none" is named
    `metric,filter` as the harness names it."""
    scores: dict[str, tuple[float | None, float | None]] = {}
    row = results.get("results", {}).get(name, {})
    for key, value in row.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or metric.endswith("_stderr") or isinstance(value, bool) \
                or not isinstance(value, (int, float)):
            continue
        stderr = row.get(f"{metric}_stderr,{filter_name}")
        label = metric if filter_name == "none" else f"{metric},{filter_name}"
        scores[label] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return scores


def _reported(results: dict[str, Any], requested: list[str]) -> list[str]:
    """The tasks and groups to record: each requested group's aggregate (not its members, one line per group as
    the harness's own table shows), every other task the run evaluated (a requested tag's tasks), in order."""
    members = results.get("group_subtasks", {})
    groups = [n for n in requested if n in members and n in results.get("results", {})]
    covered: set[str] = set()
    pending = list(groups)
    while pending:
        for child in members.get(pending.pop(), []):
            if child not in covered:
                covered.add(child)
                pending.append(child)
    leaves = [n for n in results.get("configs", {}) if n not in covered and n not in groups]
    return groups + [n for n in leaves if n in results.get("results", {})]


def _samples(results: dict[str, Any], name: str) -> int | None:
    counts = results.get("n-samples", {})
    if name in counts:
        return int(counts[name].get("effective", counts[name].get("original", 0)))
    members = results.get("group_subtasks", {}).get(name)
    if not members:
        return None
    parts = [_samples(results, m) for m in members]
    return sum(p for p in parts if p is not None)


def _record(name: str, metric: str, results: dict[str, Any], baseline: float | None, command: str,
            version: str) -> dict[str, Any]:
    value, stderr = _scores(results, name)[metric]
    higher = results.get("higher_is_better", {}).get(name, {}).get(metric.partition(",")[0])
    higher = higher if isinstance(higher, bool) else None
    dataset, sha = _identity(results.get("configs", {}).get(name), name)
    change = (value - baseline) / abs(baseline) if baseline not in (None, 0) and value is not None else None
    recovery = None
    if higher is not None and baseline not in (None, 0) and value not in (None, 0):
        recovery = value / baseline if higher else baseline / value
    shots = results.get("n-shot", {}).get(name)
    return {
        "task": name,
        "dataset": dataset,
        "text_sha256": sha,
        "tokens": None,
        "metric": metric,
        "higher_is_better": higher,
        "baseline": _sig(baseline),
        "quantized": _sig(value),
        "relative_change": _sig(change),
        "recovery": _sig(recovery),
        "command": command,
        "samples": _samples(results, name),
        "harness": {"lm_eval": version, "task_version": _task_version(results, name),
                    "num_fewshot": shots if isinstance(shots, int) else None, "stderr": _sig(stderr)},
    }


def _task_version(results: dict[str, Any], name: str) -> str | None:
    version = results.get("versions", {}).get(name)
    return None if version is None else str(version)


def _command(folder: Path, against: str | None, tasks: list[str], include_path: Path | None, limit: int | None,
             num_fewshot: int | None) -> str:
    args = ["qformat", "eval", "OUTPUT"]
    if against is not None:
        args += ["--against", _source_label(folder)]
    args += ["--tasks", ",".join(tasks)]
    if include_path is not None:
        args += ["--include-path", include_path.resolve().name]  # a folder's name, never a local path
    if limit is not None:
        args += ["--limit", str(limit)]
    if num_fewshot is not None:
        args += ["--num-fewshot", str(num_fewshot)]
    return shlex.join(args)


# ---------------------------------------------------------------------------------------------------- entry point


def run_harness(model_folder: str | os.PathLike[str], tasks: Sequence[str], *,
                include_path: str | os.PathLike[str] | None = None, limit: int | None = None,
                against: str | os.PathLike[str] | None = None, batch_size: int = 1,
                num_fewshot: int | None = None) -> list[dict[str, Any]]:
    """Run lm-evaluation-harness `tasks` on the model in `model_folder` (and on the source `against`, a folder or
    Hub repo id, for the baseline); returns one `quantization_config.evaluation` entry per task and metric.

    Args:
        model_folder: a causal LM or seq2seq model folder (a qformat checkpoint, or any transformers model).
        tasks: harness task, group or tag names (e.g. "hellaswag", "arc_easy"), or tasks defined under
            `include_path`.
        include_path: a folder of task YAML files; relative data paths in them are read relative to each file.
        limit: score only the first `limit` documents of each task (for a quick look: not comparable with
            published figures).
        against: the full-precision source, evaluated the same way for `baseline`.
        batch_size: documents per forward pass.
        num_fewshot: few-shot examples per prompt; default: each task's own (0 where it sets none).

    Raises:
        OptionError: lm-eval is not installed; an unknown task; a bad limit, batch size or folder.
        SourceError, UnsupportedModelError: a model the harness cannot score (an encoder, no BOS/EOS token).
    """
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise OptionError("give at least one lm-evaluation-harness task, e.g. --tasks hellaswag,arc_easy")
    names = list(dict.fromkeys(names))
    if limit is not None and limit < 1:
        raise OptionError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise OptionError(f"--num-fewshot must be at least 0, got {num_fewshot}")
    include = None if include_path is None else Path(include_path)
    if include is not None and not include.is_dir():
        raise OptionError(f"--include-path {include} is not a folder of task YAML files")
    folder = Path(model_folder)
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder} is not a model folder (no config.json)")
    _lm_eval()
    import transformers

    kind = model_kind(transformers.AutoConfig.from_pretrained(folder))
    if kind not in ("causal-lm", "seq2seq"):
        raise OptionError(f"lm-evaluation-harness tasks score causal LMs and seq2seq models; {folder} is an "
                          f"{kind}: evaluate it with `qformat eval --against SOURCE`")
    source_path = None
    if against is not None:
        from qformat.io.resolve import resolve_source

        source_path = resolve_source(against).path
    manager, specs = _task_specs(names, include)
    options: dict[str, Any] = {"limit": limit, "batch_size": batch_size, "num_fewshot": num_fewshot}
    tokenizer_folders = [folder, *([source_path] if source_path is not None else [])]
    quantized = _run(folder, tokenizer_folders, kind, manager, specs, **options)
    source = None
    if source_path is not None:  # after the quantized model is freed: one model in memory at a time
        source = _run(source_path, [source_path, folder], kind, manager, specs, **options)
    command = _command(folder, None if against is None else str(against), names, include, limit, num_fewshot)
    version = _version()
    records = []
    for name in _reported(quantized, names):
        base_scores = _scores(source, name) if source is not None else {}
        for metric in _scores(quantized, name):
            baseline = base_scores.get(metric, (None, None))[0]
            records.append(_record(name, metric, quantized, baseline, command, version))
    if not records:
        raise SourceError(f"lm-evaluation-harness measured nothing for {', '.join(names)} (no metric in its results)")
    return records
