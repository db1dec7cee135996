"""`qformat card DIR`: write the model card generated from the checkpoint; `--check` lints an existing one and
reports every problem it finds, one per line, before the error line."""

from __future__ import annotations

import click

from qformat.cli._errors import reported_errors
from qformat.errors import QFormatError

__all__ = ["card_command"]


class CardMismatchError(QFormatError):
    """README.md states something the checkpoint contradicts."""


@click.command("card")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--check", is_flag=True, help="Do not write: check DIR/README.md against the checkpoint.")
@click.option("--repo-id", default=None, help="Repo id for the usage snippet (default: a placeholder path).")
def card_command(directory: str, check: bool, repo_id: str | None) -> None:
    """Write DIR/README.md from the checkpoint's own metadata (the source card is carried over)."""
    with reported_errors("nothing was changed"):
        from qformat.cards import check_card, write_card

        if check:
            problems = check_card(directory)
            for problem in problems:  # every problem on its own line, then the one error line
                click.echo(f"{directory}/README.md: {problem}", err=True)
            if problems:
                count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
                raise CardMismatchError(f"README.md does not match the checkpoint ({count}, listed above); run "
                                        f"`qformat card {directory}` to regenerate it")
            click.echo(f"ok: {directory}/README.md matches the checkpoint")
        else:
            click.echo(f"wrote {write_card(directory, repo_id=repo_id)}")
