"""How the CLI reports failures: one line on stderr, no traceback, a non-zero exit code.

Exit codes: 2 for bad input (any `QFormatError`, and click's usage errors), 130 for Ctrl-C / SIGTERM, 1 for an
unexpected internal error. Set QFORMAT_DEBUG=1 to get the traceback of an internal error.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import click

from qformat.errors import QFormatError

__all__ = ["EXIT_INPUT", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "install_signal_handlers", "reported_errors"]

EXIT_INPUT = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


def _die(message: str, code: int) -> NoReturn:
    click.echo(f"qformat: error: {message}", err=True)
    sys.exit(code)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """SIGTERM unwinds like Ctrl-C (so temporary output is removed); SIGXFSZ (file-size limit) becomes an OSError
    from write() instead of killing the process without a word."""
    signal.signal(signal.SIGTERM, _terminate)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@contextmanager
def reported_errors(what: str) -> Iterator[None]:
    """Run a command body, turning every failure into one line on stderr and an exit code."""
    try:
        yield
    except QFormatError as exc:
        _die(str(exc), EXIT_INPUT)
    except KeyboardInterrupt:
        _die(f"interrupted; {what}", EXIT_INTERRUPTED)
    except MemoryError:
        _die("out of memory; close other programs or use a machine with more RAM", EXIT_INTERNAL)
    except (click.exceptions.Exit, click.ClickException, SystemExit):
        raise
    except Exception as exc:  # the CLI's last line of defence: one line, no traceback
        if os.environ.get("QFORMAT_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        _die(f"internal error ({type(exc).__name__}: {first}); rerun with QFORMAT_DEBUG=1 and report it", EXIT_INTERNAL)
