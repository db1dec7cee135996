"""A resumable training state: the student's parameters, the optimizer's moments, the step and the loss log.

Written every `save_every` steps into `STATE_DIR/step-NNNNNNN/` (atomically: aside, then renamed; the previous
step's folder is removed once the new one is in place) as two safetensors files and one JSON file, never pickle: a
state folder is read back with the same care as a checkpoint. `state.json` also records what the run is (options,
recipe, the source's and data's identity), and resuming refuses a state made by a different run.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qformat.errors import FormatError, OptionError
from qformat.io.atomic import atomic_output_dir
from qformat.io.jsonfile import load_json

__all__ = ["ADAMW_STATE", "STATE_FORMAT", "TrainingState", "latest_state", "load_state", "save_state"]

STATE_FORMAT = "qformat-distill-state"
#: The per-parameter tensors of AdamW's state, the only optimizer tensors a state folder may hold.
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")
_STEP_DIR = re.compile(r"^step-(\d{7})$")


@dataclass
class TrainingState:
    """What a resumed run continues from."""

    step: int  # the next step to run
    run: dict[str, Any]  # options, recipe, source and data identity: must equal the resuming run's
    log: list[dict[str, float]]
    parameters: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def save_state(folder: Path, *, step: int, run: dict[str, Any], log: list[dict[str, float]], model: nn.Module,
               optimizer: torch.optim.Optimizer) -> Path:
    """Write the state after `step` steps to `folder/step-NNNNNNN` and remove older ones; return its path."""
    folder = Path(folder)
    target = folder / f"step-{step:07d}"
    params = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}
    opt_tensors, opt_meta = _optimizer_tensors(optimizer.state_dict())
    with atomic_output_dir(target, overwrite=True) as tmp:
        save_file(params, tmp / "student.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({"format": STATE_FORMAT, "version": 1, "step": step, "run": run,
                                                    "log": log, "optimizer": opt_meta}, indent=1))
    for old in folder.iterdir():
        match = _STEP_DIR.match(old.name)
        if match and int(match.group(1)) < step and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_state(folder: Path) -> Path:
    """The newest `step-NNNNNNN` folder in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OptionError(f"--resume {folder}: no such folder; give the --state-dir of an earlier run")
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    if not steps:
        raise OptionError(f"--resume {folder} holds no saved step (step-NNNNNNN folders); give the --state-dir of "
                          "an earlier run that used --save-every")
    return steps[-1][1]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_state(folder: Path, run: dict[str, Any], model: nn.Module) -> TrainingState:
    """Read the newest state in `folder`, refusing one that is malformed, made by another run, or whose tensors do
    not fit `model`."""
    path = latest_state(folder)
    meta = load_json(path / "state.json", error=FormatError)
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or meta.get("version") != 1:
        raise FormatError(f"{path}/state.json is not a qformat distill state (version 1)")
    step, log, opt_meta = meta.get("step"), meta.get("log"), meta.get("optimizer")
    if not isinstance(step, int) or step < 1 or not isinstance(log, list) or not isinstance(opt_meta, dict):
        raise FormatError(f"{path}/state.json is malformed (step, log, optimizer)")
    if not all(isinstance(e, dict) and all(_finite(v) for v in e.values()) for e in log):
        raise FormatError(f"{path}/state.json has a malformed loss log")
    if meta.get("run") != run:
        saved = meta.get("run") if isinstance(meta.get("run"), dict) else {}
        differ = sorted(k for k in set(run) | set(saved) if saved.get(k) != run.get(k))
        raise OptionError(f"--resume {folder}: that state was made by a different run ({', '.join(differ)} differ); "
                          "resume with the same SOURCE, data, scheme and options, or start afresh")
    try:
        params = load_file(path / "student.safetensors")
        opt_tensors = load_file(path / "optimizer.safetensors")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for malformed files
        raise FormatError(f"{path} holds a malformed safetensors file ({str(exc).splitlines()[0]}); start afresh") \
            from None
    expected = dict(model.named_parameters())
    if set(params) != set(expected) or any(params[n].shape != expected[n].shape or params[n].dtype != expected[n].dtype
                                           for n in expected):
        raise FormatError(f"{path}/student.safetensors does not fit the model (names, shapes or dtypes differ)")
    groups = opt_meta.get("param_groups")
    if not isinstance(groups, list):
        raise FormatError(f"{path}/state.json has no optimizer param_groups")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in opt_tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or name not in ADAMW_STATE:
            raise FormatError(f"{path}/optimizer.safetensors holds an unexpected tensor {key!r}")
        state.setdefault(int(index), {})[name] = tensor
    return TrainingState(step, run, log, params, {"state": state, "param_groups": groups})
