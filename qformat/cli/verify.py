"""`qformat verify DIR`: check a checkpoint against the format spec."""

from __future__ import annotations

import click

from qformat.cli._errors import reported_errors

__all__ = ["verify_command"]


@click.command("verify")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--no-hashes", is_flag=True, help="Skip re-hashing tensor data (structure and values only).")
def verify_command(directory: str, no_hashes: bool) -> None:
    """Check DIRECTORY against docs/FORMAT.md; exit non-zero naming the first problem."""
    with reported_errors("nothing was changed"):
        from qformat.checkpoint.verify import verify

        report = verify(directory, check_hashes=not no_hashes)
        linears = f"{report.linear_modules} Linear modules: " if report.linear_modules is not None else ""
        click.echo(f"ok: {report.folder} follows qformat format v{report.format_version} ({report.tensors} tensors; {linears}"
                   f"{report.quantized_modules} quantized, {report.fallback_modules} in full precision; "
                   f"{report.hashes_checked} hashes checked)")
        if report.structure_note:
            click.echo(f"note: {report.structure_note}")
