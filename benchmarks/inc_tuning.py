"""Intel Neural Compressor's own accuracy-driven tuning on an fp32 causal LM, as one Markdown table row.

    PEER_PYTHON benchmarks/inc_tuning.py MODEL_DIR [--max-tokens 512] [--max-trials N] [--max-rss-gb 12]
        [--api 2|3] [--header] [--json FILE]

Issue 11 compares qformat's auto-fallback (a ranked bisection, about log2 M full evaluations) with INC's tuning loop
(about N + k evaluations, a default cap of 100 trials, and "no model" when the cap is reached first). This script
measures the INC side on the same model and budget instead of quoting it: eval_fn is the perplexity of MODEL_DIR on
the first --max-tokens tokens of the tuning text, the budget is 1% relative perplexity loss, and the row reports the
evaluations INC called (baseline included), the Linear modules it left in fp32, the relative perplexity change on the
tuning text and on held-out text (the next tokens; not seen by INC), its wall time, and whether the budget was met.

Two INC APIs, because they tune differently:
- `--api 2` (default): neural-compressor 2.6, the last release with `quantization.fit` and its op-wise fallback
  strategies: PyTorch int8 dynamic quantization of Linear modules, `PostTrainingQuantConfig(approach="dynamic")`,
  `AccuracyCriterion(criterion="relative", tolerable_loss=0.01, higher_is_better=False)`, the default strategy
  (quant_level "auto": the default config, then "conservative", then "basic": blocks of ops back to fp32 one more
  at a time, then each op alone, then ops accumulated in order of their single-op result). This is the loop the
  issue describes. The int8 modules are torch's eager dynamic Linear, whose forward quantizes each input per tensor
  to 7 bits (reduce_range=True): on SmolLM2-135M that alone costs about +200% perplexity before any fallback, so
  the row measures INC's search on a harder starting point than qformat's per-token W8A8.
  2.6 pins numpy<2 and imports cv2, sklearn and pycocotools at import time, so it lives in its own --target folder
  next to the peer venv (see INC2_PACKAGES; `--install` creates it), put first on sys.path only for `--api 2`.
- `--api 3`: neural-compressor-pt 3.x, `torch.quantization.autotune` over `DynamicQuantConfig`'s tuning set (PT2E,
  needs torch.export of the model). It tries whole-model configs in turn and keeps no module in fp32.

The tuning runs in a child process watched by this one: INC 2.6 holds on to memory trial after trial (about 1.5x
the fp32 model per trial on SmolLM2-135M, not returned by gc or malloc_trim), so a run past --max-rss-gb is stopped
and reported with the evaluations it used and its best trial, instead of being OOM-killed without a row.

Not a qformat dependency; runs under the peer venv (`bench-data/peer-venv/bin/python`). Whatever fails (install,
import, tracing, tuning, memory) becomes the row's status, so a benchmark table always gets its row.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

__all__ = ["HEADER", "INC2_PACKAGES", "IncRow", "main", "perplexity", "run_inc2", "run_inc3"]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_INC2_SITE = REPO / "bench-data" / "inc2-site"
# neural-compressor 2.6 and what its import chain needs, installed with --no-deps into their own folder so that its
# numpy<2 pin cannot downgrade the peer venv (numpy 2 works for the PyTorch path).
INC2_PACKAGES = ("neural-compressor==2.6", "setuptools<80", "deprecated", "wrapt", "schema", "six", "pillow",
                 "opencv-python-headless", "scikit-learn", "scipy", "joblib", "threadpoolctl", "cloudpickle",
                 "narwhals", "pycocotools", "pandas", "python-dateutil", "tzdata", "requests", "urllib3",
                 "certifi", "charset-normalizer", "idna")
HEADER = ("| tool | version | strategy | full evaluations | Linear kept fp32 | Δppl tuning text | Δppl held-out "
          "| seconds | status |\n|---|---|---|---|---|---|---|---|---|")


@dataclass
class IncRow:
    """One measured INC run; `status` is met / not met / no model / a one-line failure reason."""

    tool: str
    version: str = "-"
    strategy: str = "-"
    evaluations: Optional[int] = None
    kept: Optional[int] = None
    total: Optional[int] = None
    tuning_change: Optional[float] = None
    heldout_change: Optional[float] = None
    seconds: Optional[float] = None
    status: str = "not run"
    trials: list = field(default_factory=list)

    def markdown(self) -> str:
        def pct(x: Optional[float]) -> str:
            return "-" if x is None else f"{100 * x:+.2f}%"

        cells = [self.tool, self.version, self.strategy,
                 "-" if self.evaluations is None else str(self.evaluations),
                 "-" if self.kept is None else f"{self.kept}/{self.total}",
                 pct(self.tuning_change), pct(self.heldout_change),
                 "-" if self.seconds is None else f"{self.seconds:.0f}",
                 self.status.replace("|", "/").replace("\n", " ")]
        return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------- text and perplexity


def default_texts(tokenizer, max_tokens: int) -> tuple[list[int], list[int]]:
    """Tuning and held-out token ids: consecutive spans of CPython's pydoc_data.topics, in sorted topic order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text[: max_tokens * 40], add_special_tokens=False)["input_ids"]
    if len(ids) < 2 * max_tokens:
        raise SystemExit(f"pydoc topics gave {len(ids)} tokens, fewer than 2 x --max-tokens {max_tokens}")
    return ids[:max_tokens], ids[max_tokens: 2 * max_tokens]


def file_tokens(tokenizer, path: Path, max_tokens: int) -> list[int]:
    """The first max_tokens token ids of a text file."""
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise SystemExit(f"{path} has fewer than 2 tokens")
    return ids


def perplexity(model, ids: list[int], seq_len: int) -> float:
    """Perplexity of `ids` under `model`, in windows of seq_len tokens, each window's first token unpredicted.

    Works on a transformers model, an fx GraphModule or an exported program's module: whatever returns logits (a
    tensor, a ModelOutput, a tuple or a dict with "logits") for input_ids of shape (1, T).
    """
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            window = torch.tensor([ids[start: start + seq_len]], dtype=torch.long)
            if window.shape[1] < 2:
                break
            logits = _logits(model(window)).float()
            logp = torch.log_softmax(logits[0, :-1], dim=-1)
            target = window[0, 1:]
            nll -= logp.gather(1, target[:, None]).sum().item()
            count += target.numel()
    return math.exp(nll / count)


def _logits(out):
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def linear_counts(model) -> tuple[int, int]:
    """(float nn.Linear modules, int8 dynamic Linear modules) inside a module tree."""
    import torch

    dynamic = ()
    with contextlib.suppress(ImportError):
        import torch.ao.nn.quantized.dynamic as nnqd

        dynamic = (nnqd.Linear,)
    floats = sum(type(m) is torch.nn.Linear for m in model.modules())
    quantized = sum(isinstance(m, dynamic) for m in model.modules()) if dynamic else 0
    return floats, quantized


def rss_gb(pid: Optional[int] = None) -> float:
    """Resident memory of a process and its children, in GB (0 when psutil is missing or the process is gone)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 1e9
    except Exception:  # noqa: BLE001 - a missing psutil or a finished process reads as 0
        return 0.0


def release_memory() -> None:
    """gc.collect() and glibc's malloc_trim(0): hands freed heap back to the OS between INC's trials."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class CountingEval:
    """eval_fn wrapper: counts INC's calls and records each one; `score` maps ppl to the metric INC compares.

    Each call is also appended as a JSON line to `progress` (ppl, seconds, float Linear modules in the model INC
    passed, resident GB), so that the parent process can still report a run that was killed part-way.
    """

    def __init__(self, ids: list[int], seq_len: int, progress: Optional[Path] = None, trim: bool = False,
                 score: Callable[[float], float] = lambda p: p):
        self.ids, self.seq_len, self.progress, self.trim, self.score = ids, seq_len, progress, trim, score
        self.calls: list[dict] = []

    def __call__(self, model) -> float:
        if self.trim:
            release_memory()
        start = time.perf_counter()
        ppl = perplexity(model, self.ids, self.seq_len)
        call = {"event": "eval", "n": len(self.calls) + 1, "ppl": ppl, "seconds": time.perf_counter() - start,
                "kept": linear_counts(model)[0], "rss_gb": round(rss_gb(), 2), "at": time.time()}
        self.calls.append(call)
        log_progress(self.progress, call)
        print(f"[inc_tuning] evaluation {call['n']}: ppl {ppl:.4f}, {call['kept']} float Linear, "
              f"RSS {call['rss_gb']} GB", file=sys.stderr, flush=True)
        return self.score(ppl)


def log_progress(progress: Optional[Path], record: dict) -> None:
    """Append one JSON line to the progress file (no-op without one)."""
    if progress is not None:
        with progress.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- INC 2.x


def install_inc2(site: Path) -> None:
    """pip install INC2_PACKAGES --no-deps into `site`, with this interpreter's pip."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), *INC2_PACKAGES],
                   check=True)


def run_inc2(model, tune: CountingEval, tolerable_loss: float, max_trials: Optional[int], site: Path,
             workspace: Path, quantize_embedding: bool = False) -> tuple[IncRow, object]:
    """INC 2.x `quantization.fit`, int8 dynamic, default strategy, relative loss on a lower-is-better metric.

    INC's dynamic path also quantizes nn.Embedding (weight-only int8) unless told not to; by default it is kept in
    fp32 through `op_type_dict`, so that INC, like qformat's schemes, chooses among Linear modules only.
    """
    row = IncRow(tool="INC 2.x fit (int8 dynamic)")
    if not (site / "neural_compressor").is_dir():
        row.status = f"neural-compressor 2.x not installed in {site}: run with --install"
        return row, None
    sys.path.insert(0, str(site))
    try:
        import neural_compressor
        from neural_compressor.config import AccuracyCriterion, PostTrainingQuantConfig, TuningCriterion, options
        from neural_compressor.quantization import fit
    except Exception as error:  # noqa: BLE001 - any import failure becomes the row's status
        row.status = f"import failed: {type(error).__name__}: {error}".splitlines()[0]
        return row, None
    row.version = f"neural-compressor {neural_compressor.__version__}"
    options.workspace = str(workspace)
    tuning = TuningCriterion() if max_trials is None else TuningCriterion(max_trials=max_trials)
    conf = PostTrainingQuantConfig(
        approach="dynamic",
        accuracy_criterion=AccuracyCriterion(criterion="relative", tolerable_loss=tolerable_loss,
                                             higher_is_better=False),
        tuning_criterion=tuning,
        op_type_dict=None if quantize_embedding else
        {"Embedding": {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}}},
    )
    chain = "auto: default config, then conservative, then basic" if conf.quant_level == "auto" else \
        conf.tuning_criterion.strategy
    row.strategy = f"{chain}; max_trials {conf.tuning_criterion.max_trials}" + \
        ("" if quantize_embedding else "; Embedding kept fp32")
    log_progress(tune.progress, {"event": "start", "tool": row.tool, "version": row.version, "strategy": row.strategy})
    start = time.perf_counter()
    try:
        q_model = fit(model, conf, eval_func=tune)
    except Exception as error:  # noqa: BLE001
        row.seconds = time.perf_counter() - start
        row.evaluations = len(tune.calls)
        row.status = f"fit raised {type(error).__name__}: {error}".splitlines()[0][:200]
        traceback.print_exc()
        return row, None
    row.seconds = time.perf_counter() - start
    row.evaluations = len(tune.calls)
    if q_model is None:
        row.status = "no model"
        return row, None
    return row, q_model.model


# ---------------------------------------------------------------- INC 3.x


def run_inc3(model, tune: CountingEval, tolerable_loss: float, max_trials: Optional[int],
             example_ids: list[int]) -> tuple[IncRow, object]:
    """INC 3.x `autotune` over DynamicQuantConfig's tuning set on a torch.export-ed model (PT2E, x86 quantizer).

    3.x's stop rule is higher-is-better only (result >= baseline * (1 - loss)), so eval_fn returns 1/ppl and the
    loss is set to 1 - 1/(1 + tolerable_loss): the same "ppl at most (1 + loss) x baseline" budget.
    """
    import torch

    row = IncRow(tool="INC 3.x autotune (PT2E dynamic)")
    try:
        version = importlib.metadata.version("neural-compressor-pt")
    except importlib.metadata.PackageNotFoundError:
        row.status = "neural-compressor-pt not installed: pip install neural-compressor-pt"
        return row, None
    row.version = f"neural-compressor-pt {version}"
    try:
        from neural_compressor.torch.export import export
        from neural_compressor.torch.quantization import DynamicQuantConfig, TuningConfig, autotune
    except Exception as error:  # noqa: BLE001
        row.status = f"import failed: {type(error).__name__}: {error}".splitlines()[0]
        return row, None
    config_set = DynamicQuantConfig.get_config_set_for_tuning()
    # one config whose list-valued fields (act_sym, act_algo) the config loader expands into trials, in order
    tune_config = TuningConfig(config_set=[config_set], tolerable_loss=1 - 1 / (1 + tolerable_loss),
                               **({} if max_trials is None else {"max_trials": max_trials}))
    tuned = {k: v for k, v in config_set.to_dict().items() if isinstance(v, list) and k != "non_tunable_params"}
    row.strategy = f"default sampler over DynamicQuantConfig {tuned}; max_trials {tune_config.max_trials}"
    tune.score = lambda ppl: 1.0 / ppl  # noqa: E731
    log_progress(tune.progress, {"event": "start", "tool": row.tool, "version": row.version, "strategy": row.strategy})
    start = time.perf_counter()
    try:
        example = (torch.tensor([example_ids[: tune.seq_len]], dtype=torch.long),)
        seq = torch.export.Dim("seq", min=2, max=max(tune.seq_len, 4))
        exported = export(model, example_inputs=example, dynamic_shapes=({1: seq},))
        q_model = autotune(exported, tune_config, eval_fn=tune, example_inputs=example)
    except Exception as error:  # noqa: BLE001
        row.seconds = time.perf_counter() - start
        row.evaluations = len(tune.calls)
        root = error
        while root.__cause__ is not None:
            root = root.__cause__
        cause = "" if root is error else f" (from {type(root).__name__}: {root})"
        row.status = f"autotune raised {type(error).__name__}: {error}{cause}".splitlines()[0][:300]
        traceback.print_exc()
        return row, None
    row.seconds = time.perf_counter() - start
    row.evaluations = len(tune.calls)
    if q_model is None:
        row.status = "no model"
    return row, q_model


# ---------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="fp32 transformers causal LM folder (with its tokenizer)")
    parser.add_argument("--api", choices=("2", "3"), default="2", help="INC 2.x fit (default) or 3.x autotune")
    parser.add_argument("--text", type=Path, help="tuning text file (default: pydoc_data.topics)")
    parser.add_argument("--heldout-text", type=Path, help="held-out text file (default: the tokens after --text's)")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per text (default 512)")
    parser.add_argument("--seq-len", type=int, default=256, help="perplexity window (default 256)")
    parser.add_argument("--max-loss", type=float, default=0.01, help="tolerable relative ppl loss (default 0.01)")
    parser.add_argument("--max-trials", type=int, help="INC's trial cap (default: INC's own, 100)")
    parser.add_argument("--inc2-site", type=Path, default=DEFAULT_INC2_SITE, help="--target folder of INC 2.6")
    parser.add_argument("--install", action="store_true", help="first pip-install INC2_PACKAGES into --inc2-site")
    parser.add_argument("--quantize-embedding", action="store_true",
                        help="2.x: let INC quantize nn.Embedding too (its default); off: Linear modules only")
    parser.add_argument("--header", action="store_true", help="print the table header before the row")
    parser.add_argument("--json", type=Path, help="also write the row and every evaluation (ppl, s) here")
    parser.add_argument("--max-rss-gb", type=float, default=12.0,
                        help="stop INC when its process holds more than this (default 12; 2.6 grows per trial)")
    parser.add_argument("--trim", action="store_true",
                        help="gc.collect() and malloc_trim before each evaluation (memory hygiene, not tuning)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    return parser.parse_args(argv)


def best_trial_note(calls: list[dict], base: float) -> str:
    """' (best trial +x%, k kept)' over INC's quantized trials (the first call is its fp32 baseline)."""
    tried = calls[1:]
    if not tried:
        return ""
    best = min(tried, key=lambda c: c["ppl"])
    return f" (best trial {100 * (best['ppl'] / base - 1):+.1f}% with {best['kept']} kept)"


def main(argv: Optional[list[str]] = None) -> int:
    """Run the measurement in a child process, watching its memory, and print its row whatever happens to it."""
    args = parse_args(argv)
    if args.header:
        print(HEADER, flush=True)
    if args.child is not None:
        return child_main(args)
    with tempfile.TemporaryDirectory(prefix="inc_tuning.") as tmp:
        progress, result = Path(tmp) / "progress.jsonl", Path(tmp) / "row.json"
        argv = list(sys.argv[1:] if argv is None else argv)
        argv = [a for a in argv if a != "--header"]
        child = subprocess.Popen([sys.executable, __file__, *argv, "--child", str(progress), "--json", str(result)],
                                 stdout=subprocess.DEVNULL)
        start, peak, over = time.time(), 0.0, False
        while child.poll() is None:
            peak = max(peak, rss_gb(child.pid))
            if peak > args.max_rss_gb:
                over = True
                child.kill()
                child.wait()
                break
            time.sleep(1.0)
        if result.is_file():
            row = IncRow(**json.loads(result.read_text(encoding="utf-8")))
        else:
            row = row_from_progress(args, progress, time.time() - start)
            row.status = (f"stopped at {args.max_rss_gb:g} GB RSS" if over else
                          f"INC process died (exit {child.returncode})") + row.status
    row.strategy += f"; peak RSS {peak:.1f} GB"
    print(row.markdown(), flush=True)
    if args.json:
        args.json.write_text(json.dumps(asdict(row), indent=1) + "\n", encoding="utf-8")
    return 0


def row_from_progress(args: argparse.Namespace, progress: Path, seconds: float) -> IncRow:
    """The row of a run that did not finish: evaluations so far, and the best trial in the status."""
    records = [json.loads(line) for line in progress.read_text(encoding="utf-8").splitlines()] \
        if progress.is_file() else []
    baseline = next((r for r in records if r["event"] == "baseline"), None)
    calls = [r for r in records if r["event"] == "eval"]
    started = next((r for r in records if r["event"] == "start"), {})
    row = IncRow(tool=started.get("tool", f"INC {args.api}.x"), version=started.get("version", "-"),
                 strategy=started.get("strategy", "-"), evaluations=len(calls),
                 total=baseline["total"] if baseline else None, status="")
    if baseline:
        row.seconds = (calls[-1]["at"] if calls else time.time()) - baseline["at"]
        row.status = f" after {len(calls)} evaluations" + best_trial_note(calls, baseline["ppl"])
    row.trials = calls
    return row


def child_main(args: argparse.Namespace) -> int:
    """The measurement itself: writes its row to --json (and stdout)."""
    row = IncRow(tool=f"INC {args.api}.x")
    try:
        row = measure(args)
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001 - the row says what went wrong
        traceback.print_exc()
        row.status = f"{type(error).__name__}: {error}".splitlines()[0][:200]
    print(row.markdown(), flush=True)
    if args.json:
        args.json.write_text(json.dumps(asdict(row), indent=1) + "\n", encoding="utf-8")
    return 0


def measure(args: argparse.Namespace) -> IncRow:
    """Load the model and texts, run INC, and measure what it returned against the fp32 baseline."""
    if args.api == "2" and args.install:
        install_inc2(args.inc2_site)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if args.text:
        tune_ids = file_tokens(tokenizer, args.text, args.max_tokens)
        heldout_ids = file_tokens(tokenizer, args.heldout_text, args.max_tokens) if args.heldout_text else None
    else:
        tune_ids, heldout_ids = default_texts(tokenizer, args.max_tokens)
        if args.heldout_text:
            heldout_ids = file_tokens(tokenizer, args.heldout_text, args.max_tokens)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False
    total = linear_counts(model)[0]
    base_tune = perplexity(model, tune_ids, args.seq_len)
    base_held = perplexity(model, heldout_ids, args.seq_len) if heldout_ids else None
    print(f"[inc_tuning] fp32 ppl: tuning {base_tune:.4f}, held-out {base_held}, {total} Linear modules",
          file=sys.stderr, flush=True)

    log_progress(args.child, {"event": "baseline", "ppl": base_tune, "total": total, "at": time.time()})
    tune = CountingEval(tune_ids, args.seq_len, args.child, args.trim)
    workspace = REPO / "bench-data" / "inc-workspace"
    if args.api == "2":
        row, q_model = run_inc2(model, tune, args.max_loss, args.max_trials, args.inc2_site, workspace,
                                  args.quantize_embedding)
    else:
        row, q_model = run_inc3(model, tune, args.max_loss, args.max_trials, tune_ids)
    row.trials = tune.calls
    row.total = total
    if q_model is None:
        if row.status == "no model":
            row.status += best_trial_note(tune.calls, base_tune)
        return row
    floats, quantized = linear_counts(q_model)
    if args.api == "2":
        row.kept = floats
        if floats + quantized != total:
            print(f"[inc_tuning] warning: {floats} float + {quantized} int8 Linear != {total}", file=sys.stderr)
    else:
        row.kept = 0  # 3.x tunes whole-model configs; it has no per-module fallback
    row.tuning_change = perplexity(q_model, tune_ids, args.seq_len) / base_tune - 1
    if heldout_ids:
        row.heldout_change = perplexity(q_model, heldout_ids, args.seq_len) / base_held - 1
    row.status = "met" if row.tuning_change <= args.max_loss else "not met"
    return row


if __name__ == "__main__":
    sys.exit(main())
