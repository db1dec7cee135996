"""Which kernel path ran: recorded only inside `trace_paths()`, so tests can assert that the fast path they meant
to test actually ran (a silent fall-back to the reference must not pass as the fast path)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["record_path", "trace_paths"]

_logs: list[list[tuple[str, str]]] = []


def record_path(op: str, path: str) -> None:
    """Note that `op` ran through `path` (a no-op unless a `trace_paths()` block is active)."""
    if _logs:
        _logs[-1].append((op, path))


@contextmanager
def trace_paths() -> Iterator[list[tuple[str, str]]]:
    """Collect every (op, path) that runs inside the block, in order."""
    log: list[tuple[str, str]] = []
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)
