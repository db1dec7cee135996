"""The streaming conversion loop: read a tensor, quantize, cast or pass it through, write it, release it.

The main thread reads and quantizes; one writer thread writes, hashes and releases source pages, so disk writes and
hashing overlap the next tensor's quantization. A bounded queue keeps at most a few converted tensors in flight,
which bounds memory by a small multiple of the largest tensor whatever the shard size. Any error or interrupt stops
the writer, closes every file and propagates; the caller's atomic folder then disappears.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qformat.converter.layout import OutputLayout, SourceJob
from qformat.errors import OptionError
from qformat.io.dtypes import TORCH_DTYPES, tensor_bytes
from qformat.io.source import TensorReader
from qformat.io.writer import ShardWriter
from qformat.plan.execute import quantize_module
from qformat.plan.record import WeightError
from qformat.smooth.fold import apply_edit

__all__ = ["run_pipeline"]

#: How far ahead of the tensor being converted the source is read from disk.
READAHEAD_BYTES = 256 * 2**20
#: Converted bytes allowed to wait for the writer: twice the largest converted module, and at least this.
WRITE_BUDGET_MIN = 32 * 2**20


@dataclass
class _Result:
    hashes: dict[str, str] = field(default_factory=dict)
    stats: dict[str, WeightError] = field(default_factory=dict)


_Work = tuple[int, str, memoryview, Callable[[], None] | None, int]


class _WriterThread(threading.Thread):
    """Writes (shard, name, bytes) items in order; remembers the first error instead of dying silently.

    Converted tensors waiting to be written are memory the process owns, so `put` blocks while more than
    `budget` bytes of them are pending (source views for tensors copied unchanged are file-backed and not counted).
    """

    def __init__(self, writers: list[ShardWriter], hashes: dict[str, str], budget: int) -> None:
        super().__init__(name="qformat-writer", daemon=True)
        self.error: BaseException | None = None
        self._writers = writers
        self._hashes = hashes
        self._budget = budget
        self._pending = 0
        self._items: deque[_Work | None] = deque()
        self._cond = threading.Condition()

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._items.popleft()
            if item is None:
                return
            shard, name, data, after, owned = item
            item = None  # hold the converted bytes only as long as `data` does
            try:
                if self.error is None:
                    sink = self._writers[shard].sink(name)
                    sink.write(data)
                    self._hashes[name] = sink.finish()
                    if after is not None:
                        after()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self.error = exc
            finally:
                del data
                with self._cond:
                    self._pending -= owned
                    self._cond.notify_all()

    def put(self, shard: int, name: str, data: memoryview, *, after: Callable[[], None] | None = None,
            owned: bool = True) -> None:
        size = data.nbytes if owned else 0
        with self._cond:
            while self.error is None and self._pending and self._pending + size > self._budget:
                self._cond.wait(timeout=0.1)
            if self.error is not None:
                raise self.error
            self._pending += size
            self._items.append((shard, name, data, after, size))
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._items.append(None)
            self._cond.notify_all()
        self.join()
        if self.error is not None:
            raise self.error


def _cast(job: SourceJob, source: torch.Tensor, dtype: str) -> torch.Tensor:
    """The source tensor (or its SmoothQuant edit) in `dtype`, as `Tensor.to` casts it (round to nearest even),
    which is what `from_pretrained(..., dtype=...)` does to the same tensor. A cast that turns finite values into
    infinities (float16 holds at most 65504; float64 to float32 or bfloat16 can overflow too) is refused: the
    checkpoint would hold infinities its source does not."""
    cast = source.to(TORCH_DTYPES[dtype])
    if cast.is_floating_point() and not bool(torch.isfinite(cast).all()):
        overflow = torch.isfinite(source) & ~torch.isfinite(cast)
        if not bool(overflow.any()):
            return cast  # the source's own NaN or Inf, copied as transformers would copy it
        largest = source[overflow].abs().max().item()
        name = str(cast.dtype).removeprefix("torch.")
        fix = "convert with --dtype bfloat16 or float32" if dtype == "F16" else "fix those values in the source"
        raise OptionError(f"dtype {name} cannot hold {job.source.name}: it has values up to {largest:.4g}, beyond "
                          f"{name}'s largest ({torch.finfo(cast.dtype).max:.6g}); {fix}")
    return cast


def _convert_job(job: SourceJob, reader: TensorReader, writer: _WriterThread, result: _Result) -> None:
    decision = job.decision
    source = job.source
    if decision is None and job.cast is None and job.edit is None:
        writer.put(job.shard, source.name, reader.raw(source), after=lambda: reader.release(source), owned=False)
        return
    tensor = reader.tensor(source)
    if job.edit is not None:  # SmoothQuant: float32 arithmetic, rounded to the stored dtype below
        tensor = apply_edit(tensor, job.edit)
    if decision is None:
        cast = _cast(job, tensor, job.outputs[0].dtype)
        reader.release(source)
        writer.put(job.shard, source.name, tensor_bytes(cast))
        return
    module = decision.module
    stored, result.stats[module.name] = quantize_module(tensor, decision)
    reader.release(source)
    for suffix, tensor in stored.items():
        writer.put(job.shard, f"{module.name}.{suffix}", tensor_bytes(tensor))


@contextmanager
def _leave_a_core_for_the_writer() -> Iterator[None]:
    """Quantize with one thread fewer than the cores this process may use, so the writer thread (hashing, copying
    into the page cache) runs beside it instead of preempting it (measured: docs/benchmarks.md)."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(before, cores - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_pipeline(layout: OutputLayout, reader: TensorReader, folder: Path, *, progress: bool) -> _Result:
    """Write every shard of `layout` into `folder`; return the tensor hashes and per-module statistics."""
    result = _Result()
    writers: list[ShardWriter] = []
    bar = tqdm(total=sum(job.source.nbytes for job in layout.jobs), unit="B", unit_scale=True,
               desc="convert", disable=not progress, leave=False)
    try:
        for name, shard_layout in zip(layout.shard_names, layout.shard_layouts):
            writers.append(ShardWriter(folder / name, shard_layout))
        largest = max((sum(o.nbytes for o in job.outputs) for job in layout.jobs
                       if job.decision or job.cast or job.edit),
                      default=0)
        writer = _WriterThread(writers, result.hashes, budget=max(WRITE_BUDGET_MIN, 2 * largest))
        writer.start()
        try:
            jobs = layout.jobs
            ahead, ahead_bytes, done_bytes = 0, 0, 0
            with _leave_a_core_for_the_writer():
                for job in jobs:
                    while ahead < len(jobs) and ahead_bytes - done_bytes < READAHEAD_BYTES:
                        reader.prefetch(jobs[ahead].source)
                        ahead_bytes += jobs[ahead].source.nbytes
                        ahead += 1
                    _convert_job(job, reader, writer, result)
                    done_bytes += job.source.nbytes
                    bar.update(job.source.nbytes)
        finally:
            writer.finish()
        for shard in writers:
            shard.close(sync=True)
    finally:
        for shard in writers:
            shard.abort()
        bar.close()
    return result
