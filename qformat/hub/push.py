"""`qformat push`: verify a checkpoint, attach its generated card, upload it to the Hub in one commit.

The checkpoint folder is never modified: the card is rendered in memory and uploaded as README.md, unless the folder
already has a README that passes `qformat card --check` (or the user says `--keep-card`). Everything goes in a single
`create_commit` (`upload_folder` may split a large folder into several commits), so a push is atomic on the Hub; files
the Hub already has with the same content are skipped by the client, so pushing an unchanged folder makes no commit.
Only regular files that lie inside the folder are uploaded: a symlink (wherever it points) or a special file in it
is refused, naming it, before anything is read or sent. Remote files are never deleted unless `delete_extra` is
given. The token is whatever huggingface_hub resolves (`token=`, HF_TOKEN, the stored login) and never appears in
output or errors.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from qformat._version import __version__
from qformat.cards import check_card, render_card
from qformat.checkpoint.verify import verify
from qformat.errors import FormatError, OptionError, QFormatError

__all__ = ["HubError", "PushResult", "push"]

_ATTEMPTS = 3
_SKIP_DIRS = {".git", ".cache", ".huggingface"}


class HubError(QFormatError, RuntimeError):
    """Talking to the Hub failed (authentication, permissions, missing revision, network)."""


@dataclass(frozen=True)
class PushResult:
    """Where the checkpoint went. `commit` is None when the Hub already had every file (no commit was made)."""

    url: str
    repo_id: str
    commit: str | None
    card: str  # "generated" or "kept"


def _explain(exc: BaseException, repo_id: str, revision: str | None, endpoint: str) -> HubError:
    """One line that says what went wrong and what to do; never contains the token."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
        details = [line.strip("- ").strip() for line in str(exc).splitlines()[1:] if line.strip()]
        reason = f": {details[0]}" if details else ""
        return HubError(f"the Hub refused the card's metadata{reason}; fix README.md or push without --keep-card")
    if isinstance(exc, LocalTokenNotFoundError):
        return HubError("not logged in to the Hub: run `hf auth login`, set HF_TOKEN, or pass --token")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"branch {revision!r} does not exist in {repo_id}; create it first or leave out --revision")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return HubError(f"the Hub rejected the credentials (401) for {repo_id}: log in again (`hf auth login`) or "
                        "pass a valid --token")
    if status == 403 or (isinstance(exc, RepositoryNotFoundError) and status in (None, 404)):
        return HubError(f"you cannot write to {repo_id} ({status or 404}): it belongs to another user or organization "
                        "you have no write access to, or your token is read-only; push to your own namespace")
    if isinstance(exc, HfHubHTTPError):
        message = (getattr(exc, "server_message", None) or str(exc)).splitlines()[0][:200]
        return HubError(f"the Hub refused the push ({status}): {message}")
    if _is_network_error(exc):
        return HubError(f"cannot reach the Hub at {endpoint} ({type(exc).__name__}, tried {_ATTEMPTS} times); check "
                        "your network or --endpoint and try again")
    return HubError(f"the push to {repo_id} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")


#: Transport-level failures (httpx / httpx2 class names): the request never got an HTTP answer.
_NETWORK_ERRORS = {"TransportError", "NetworkError", "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException",
                   "RemoteProtocolError", "ConnectionError"}


def _is_network_error(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        return False  # the Hub answered; retrying will not change its answer
    return isinstance(exc, ConnectionError) or bool({c.__name__ for c in type(exc).__mro__} & _NETWORK_ERRORS)


def _retrying(call):
    """Run `call()`, retrying network errors (not HTTP answers) with a short backoff."""
    for attempt in range(_ATTEMPTS - 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - only network errors are retried
            if not _is_network_error(exc):
                raise
            time.sleep(0.5 * 2**attempt)
    return call()


def _local_files(folder: Path) -> list[str]:
    """The files to upload (relative, sorted): every regular file under `folder`, without following links.

    Raises:
        FormatError: a symlink (to a file or a folder, wherever it points) or a file that is not a regular file,
            named in the message. Nothing is skipped silently except the tool folders in `_SKIP_DIRS`.
    """
    files: list[str] = []
    for root, dirs, names in os.walk(folder):  # followlinks=False: a linked folder is listed, never entered
        rel_root = Path(root).relative_to(folder)
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in dirs + sorted(n for n in names if n not in _SKIP_DIRS):
            mode = os.lstat(os.path.join(root, name)).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                what = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
                raise FormatError(f"refusing to push: {(rel_root / name).as_posix()} in {folder} is {what}; a push "
                                  "uploads only regular files that lie inside the folder: replace it with the file "
                                  "itself or remove it")
            if stat.S_ISREG(mode):
                files.append((rel_root / name).as_posix())
    return sorted(files)


def _check_endpoint(endpoint: str | None) -> None:
    """Refuse an endpoint that is not an http(s) URL with a host (`--endpoint`, else HF_ENDPOINT) before any request."""
    from huggingface_hub import constants

    url, where = (endpoint, "--endpoint") if endpoint is not None else (constants.ENDPOINT, "HF_ENDPOINT")
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # an unclosed IPv6 bracket, a port that is not a number or out of range
        valid = False
    if not valid or any(c.isspace() or not c.isprintable() for c in url):
        raise OptionError(f"{where} {url!r} is not a Hub URL; give one such as https://huggingface.co "
                          "(http or https, with a host name)")


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, endpoint: str | None = None,
         keep_card: bool = False, delete_extra: bool = False) -> PushResult:
    """Upload the checkpoint in `folder` to the Hub repo `repo_id` (created if missing) in one commit.

    Raises:
        OptionError: the endpoint is not an http(s) URL with a host.
        FormatError: the folder holds a symlink or a special file, or the checkpoint fails `qformat verify` (nothing
            is uploaded).
        HubError: authentication, permission, revision or network problems, each with what to do.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HFValidationError

    _check_endpoint(endpoint)
    folder = Path(folder)
    files = _local_files(folder)
    try:
        verify(folder)
    except FormatError as exc:
        raise FormatError(f"refusing to push a checkpoint that fails verification: {exc}") from None
    if "README.md" in files and (keep_card or not check_card(folder)):
        card, card_kind = (folder / "README.md").read_bytes(), "kept"
    else:
        card, card_kind = render_card(folder, repo_id=repo_id).encode("utf-8"), "generated"
    from huggingface_hub import get_token

    if token is None and get_token() is None:
        raise HubError("not logged in to the Hub: run `hf auth login`, set HF_TOKEN, or pass --token")
    api = HfApi(endpoint=endpoint, token=token, library_name="qformat", library_version=__version__)
    target = api.endpoint
    try:
        url = _retrying(lambda: api.create_repo(repo_id, private=private, exist_ok=True))
        before = _retrying(lambda: api.repo_info(repo_id, revision=revision).sha)
        operations: list = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
                            for rel in files if rel != "README.md"]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
        if delete_extra:
            local = {op.path_in_repo for op in operations}
            remote = _retrying(lambda: api.list_repo_files(repo_id, revision=revision))
            operations += [CommitOperationDelete(path_in_repo=p) for p in remote
                           if p not in local and p != ".gitattributes"]
        message = commit_message or f"Upload qformat checkpoint ({len(operations)} files)"
        info = _retrying(lambda: api.create_commit(repo_id, operations, commit_message=message, revision=revision))
    except HFValidationError:
        raise HubError(f"{repo_id!r} is not a valid repo id; use owner/name (letters, digits, '-', '_', '.')") \
            from None
    except QFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
        raise _explain(exc, repo_id, revision, target) from None
    commit = info.oid if info.oid != before else None
    return PushResult(url=str(url), repo_id=repo_id, commit=commit, card=card_kind)
