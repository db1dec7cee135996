"""`qformat push DIR REPO_ID`: verify, attach the generated card, upload in one commit."""

from __future__ import annotations

import click

from qformat.cli._errors import install_signal_handlers, reported_errors

__all__ = ["push_command"]


@click.command("push")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to commit to (it must exist).")
@click.option("--commit-message", default=None)
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login). Never printed.")
@click.option("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co).")
@click.option("--keep-card", is_flag=True, help="Upload DIR/README.md as it is instead of the generated card.")
@click.option("--delete-extra", is_flag=True, help="Delete remote files that DIR does not have.")
def push_command(directory: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
                 token: str | None, endpoint: str | None, keep_card: bool, delete_extra: bool) -> None:
    """Upload the qformat checkpoint in DIRECTORY to the Hub repo REPO_ID (created if missing)."""
    install_signal_handlers()
    with reported_errors("the Hub keeps only completed commits; nothing partial was committed"):
        import sys

        from huggingface_hub.utils import disable_progress_bars

        from qformat.hub import push

        if not sys.stderr.isatty():
            disable_progress_bars()  # upload bars only where a person watches

        result = push(directory, repo_id, private=private, revision=revision, commit_message=commit_message,
                      token=token, endpoint=endpoint, keep_card=keep_card, delete_extra=delete_extra)
        state = f"commit {result.commit[:12]}" if result.commit else "no changes, no commit"
        click.echo(f"{result.url} ({state}; {result.card} card)")
