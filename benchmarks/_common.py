"""Shared pieces of the benchmark scripts: test checkpoints, cold caches, and memory sampling of a child process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LLAMA_2G", "ProcessStats", "cold_copy", "drop_cache", "fresh", "human", "make_llama_checkpoint",
           "measure_process"]

#: A TinyLlama-shaped model: 1.1B parameters, about 2.2 GB in bf16.
LLAMA_2G = {
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False,
}  # fmt: skip


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    raise AssertionError


def make_llama_checkpoint(folder: Path, *, max_shard_bytes: int | None, shape: dict | None = None, seed: int = 0) -> Path:
    """Write a random bf16 Llama-shaped checkpoint (once; an existing folder is reused)."""
    import torch
    from transformers import LlamaConfig

    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**(shape or LLAMA_2G), dtype="bfloat16", architectures=["LlamaForCausalLM"])
    config.save_pretrained(tmp)
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        meta = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shp in shapes.items():
        t = torch.empty(shp, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0, 0.02, generator=gen)
        nbytes = t.numel() * 2
        if max_shard_bytes and size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    from safetensors.torch import save_file

    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, tmp / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if n > 1:
        total = sum(t.numel() * 2 for s in shards for t in s.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    tmp.rename(folder)
    return folder


def drop_cache(folder: Path) -> None:
    """Evict `folder`'s files from the page cache (no root needed: fadvise DONTNEED on clean pages)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def fresh(path: Path) -> None:
    """Remove an earlier run's output and flush the removal, so the next run starts from the same disk state."""
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["sync"], check=True)


def cold_copy(src: Path, out: Path) -> dict:
    """`cp -r` + `sync` of `src` with a cold page cache: the floor for anything that writes the checkpoint's bytes."""
    fresh(out)
    drop_cache(src)
    start = time.perf_counter()
    stats = measure_process(["cp", "-r", str(src), str(out)])
    subprocess.run(["sync"], check=True)
    return {"seconds": time.perf_counter() - start, "rss": stats.peak_rss, "anon": stats.peak_anon,
            "file": stats.peak_file}


@dataclass
class ProcessStats:
    seconds: float
    peak_rss: int  # VmHWM, bytes
    peak_anon: int  # highest RssAnon sampled, bytes
    baseline_anon: int  # RssAnon when the child printed its READY line (after imports), bytes
    peak_file: int  # highest RssFile sampled (mapped file pages, source pages included), bytes
    stdout: str


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile", "VmRSS"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def measure_process(cmd: list[str], *, env: dict | None = None, ready_marker: str = "READY") -> ProcessStats:
    """Run `cmd`, sampling its RssAnon every 5 ms. Time counts from the child's `ready_marker` line on stdout
    (printed after its imports) to its exit, or from start if it never prints one."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"anon": 0, "hwm": 0, "file": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            st = _status(proc.pid)
            peak["anon"] = max(peak["anon"], st.get("RssAnon", 0))
            peak["hwm"] = max(peak["hwm"], st.get("VmHWM", 0))
            peak["file"] = max(peak["file"], st.get("RssFile", 0))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    baseline = 0
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(ready_marker):
            start = time.perf_counter()
            baseline = _status(proc.pid).get("RssAnon", 0)
            peak["anon"] = baseline
    proc.wait()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        sys.stderr.write(err)
        raise RuntimeError(f"{cmd[:3]} failed with exit code {proc.returncode}")
    return ProcessStats(seconds, peak["hwm"], peak["anon"], baseline, peak["file"], "".join(lines))
