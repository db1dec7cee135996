"""Options that several commands share, declared once so their names, choices and help cannot drift apart."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from qformat.quantize.observers import OBSERVERS
from qformat.spec.schemes import scheme_names

__all__ = ["recipe_options"]

F = TypeVar("F", bound=Callable[..., object])

_RECIPE = (
    click.option("--scheme", default="w8a8-int8", show_default=True, metavar="SCHEME",
                 help=f"Default scheme: {', '.join(scheme_names())}."),
    click.option("--ignore", "ignore", multiple=True, metavar="PATTERN",
                 help="Keep matching modules in full precision (module name or 're:<regex>'). Repeatable."),
    click.option("--override", "overrides", multiple=True, metavar="PATTERN=SCHEME",
                 help="Use SCHEME (or 'none' = full precision) for matching modules. Repeatable; exact names win, "
                      "then the first matching 're:' pattern."),
    click.option("--observer", type=click.Choice(OBSERVERS), default=None,
                 help="Scale observer. Default: mse for fp8 schemes, absmax for int8."),
    click.option("--sparsity", type=click.Choice(["2:4"]), default=None, help="Prune every quantized module to 2:4."),
)


def recipe_options(command: F) -> F:
    """--scheme, --ignore, --override, --observer and --sparsity: what the quantization recipe is built from (the
    keyword arguments scheme, ignore, overrides, observer, sparsity)."""
    for option in reversed(_RECIPE):
        command = option(command)
    return command
