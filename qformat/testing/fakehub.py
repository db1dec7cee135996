"""A Hugging Face Hub-compatible HTTP server for tests: the real `huggingface_hub` client talks to it on 127.0.0.1.

Why: publishing and downloading must be tested offline, with the client code that users run (preupload, LFS batch,
NDJSON commit, resolve with ETag/X-Repo-Commit, the real cache layout), not with mocks of `HfApi`. The Hub has no
offline test server, so this is one: standard library plus PyYAML (a huggingface_hub dependency). Checked against
huggingface_hub 1.33 and 2.4.

    with FakeHub({"tok-alice": "alice"}) as hub:
        api = HfApi(endpoint=hub.url, token="tok-alice")   # plus HF_HUB_DISABLE_XET=1, see below
        api.create_repo("alice/model")

    python -m qformat.testing.fakehub --port 0 --user tok-alice:alice   # prints "FAKEHUB_READY <url>"

Clients must run with Xet disabled (`HF_HUB_DISABLE_XET=1` in the environment before huggingface_hub is imported, or
`huggingface_hub.constants.HF_HUB_DISABLE_XET = True`): with hf_xet installed, huggingface_hub >= 1.0 sends every
"lfs" file to Xet storage, with no fallback. `HF_ENDPOINT` is read at import too; in-process, pass `endpoint=`.
`ModelCard.validate` in huggingface_hub < 2 posts to huggingface.co whatever the endpoint: use `HfApi` calls instead.

Protocol subset implemented (model and dataset repos, branch "main" plus any commit id for reads):
- Auth: `Authorization: Bearer <token>`; tokens map to users. An unknown token gets 401 "Invalid credentials in
  Authorization header" on every route; no token is anonymous. `GET /api/whoami-v2`.
- Repos: `POST /api/repos/create` (own namespace only: 403 otherwise; 409 if it exists; `private` or `visibility`),
  `DELETE|POST /api/repos/delete`. A new repo gets the Hub's "initial commit" by "system" with a `.gitattributes`
  listing the usual LFS patterns.
- Reads: `GET /api/{models,datasets}/{repo}[/revision/{rev}]` (repo info with siblings, cardData, `?blobs=1`
  for sizes and LFS info), `.../tree/{rev}[/{path}]?recursive=&expand=`, `POST .../paths-info/{rev}` (form or JSON),
  `.../refs`, `.../commits/{rev}`; `GET|HEAD /[datasets/]{repo}/resolve/{rev}/{path}` with Range, a quoted ETag
  (git blob sha1 for regular files, sha256 for LFS files), X-Repo-Commit, X-Linked-Etag/X-Linked-Size for LFS files.
  Private repos are readable by their owner only (401/404 with X-Error-Code RepoNotFound, as the Hub does).
  Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound), `X-Error-Message` and a
  JSON `{"error": ...}` body, so the client raises its specific exceptions.
- Writes (owner only: 401 anonymous, 403 other users, 404 for another user's private repo):
  `POST .../preupload/main` ("lfs" for files over 10 MB, binary samples or `.gitattributes` LFS patterns; the existing
  oid, so unchanged files are skipped by the client as on the Hub); LFS batch API
  `POST /[datasets/]{repo}.git/info/lfs/objects/batch` (basic transfer; no upload action for objects the repo
  already has), a signed `PUT` upload URL on this server (sha256 and size checked), `POST .../objects/verify`;
  `POST .../commit/main` NDJSON (header with `parentCommit` -> 412 on mismatch; file, lfsFile (rejected unless its
  object was uploaded), deletedFile, deletedFolder) -> `{"commitOid", "commitUrl", "pullRequestUrl"}`.
- `POST /api/validate-yaml`: 400 with `{"errors": [{"message"}], "warnings": [...]}` when invalid (what makes the
  client raise), 200 otherwise; a commit writing an invalid README.md is refused with 400 too. Rules: see
  `validate_readme`.
- Xet token routes answer 501 with a message to set HF_HUB_DISABLE_XET=1 (hf_xet fetches the token itself, so the
  client's exception shows only "501 Not Implemented" and the xet-write-token URL); branches, tags, PRs and other
  known but unsupported routes answer 501; anything else 404 JSON (including `/api/agent-harnesses`, which 2.x clients fetch).

Known gaps vs the real Hub:
- No Xet storage (uploads or downloads); no multipart LFS (`chunk_size`), no LFS download operation; files are
  served directly, with no redirect to a CDN.
- No branches, tags, pull requests (`create_pr`), spaces, organizations, gated repos, rate limits, or repo renames.
- Metadata validation covers a subset of the Hub's rules (`validate_readme`): no license-id list, no check that a
  base model exists, no dataset-card schema.
- `.gitignore` is not applied (`shouldIgnore` is always false); revision names containing "/" are not supported;
  repo ids are case-sensitive.
- State lives in memory; file contents live in `root` (content-addressed by sha256).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import fnmatch
import hashlib
import hmac
import itertools
import json
import mimetypes
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import traceback
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import yaml

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["LFS_SIZE_THRESHOLD", "FakeHub", "main", "validate_readme"]

#: Files larger than this are uploaded through LFS whatever their name (the Hub's threshold).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl",
    "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
    "*.xz", "*.zip", "*.zst", "*tfevents*",
)
_GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in _LFS_PATTERNS).encode()

_URL_PREFIX = {"model": "", "dataset": "datasets/"}
_API_TYPES = {"models": "model", "datasets": "dataset"}
_BASE_MODEL = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_RELATIONS = ("adapter", "merge", "quantized", "finetune")
_COMMIT_OID = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO_NAME = re.compile(r"^[A-Za-z0-9]([\w.-]{0,94}[A-Za-z0-9_])?$")
_MAX_BODY = 4 * 1024**3
_CHUNK = 1 << 20
_XET_MESSAGE = ("Xet storage is not implemented by this fake Hub: set HF_HUB_DISABLE_XET=1 (or "
                "huggingface_hub.constants.HF_HUB_DISABLE_XET = True) so that large files go through classic LFS.")


# --------------------------------------------------------------------------------------------------------------------
# Card metadata validation


def validate_readme(content: str, repo_type: str = "model") -> tuple[list[str], list[str]]:
    """Check the YAML front matter of a README.md the way the Hub's /api/validate-yaml does (a subset of its rules).

    Returns `(errors, warnings)`. Rules: the front matter must parse to a mapping; for model repos `base_model` is a
    repo id or a list of them (a URL is an error), `base_model_relation` is one of adapter/merge/quantized/finetune,
    `library_name` and `pipeline_tag` are strings, `model-index` is a list of named results with task, dataset and
    metrics; for every repo type `tags` is a list of strings and `license` a string. A README without metadata only
    gets a warning, as on the Hub.
    """
    block = _front_matter(content)
    if block is None:
        return [], ["Empty or missing yaml metadata in repo card (https://huggingface.co/docs/hub/model-cards)"]
    try:
        metadata = yaml.safe_load(block)
    except yaml.YAMLError as exc:
        return [f"Invalid YAML in README.md metadata: {exc}".replace("\n", " ")], []
    if metadata is None:
        return [], ["Empty or missing yaml metadata in repo card (https://huggingface.co/docs/hub/model-cards)"]
    if not isinstance(metadata, dict):
        return [f"YAML metadata must be a mapping of keys to values, got {type(metadata).__name__}"], []
    errors = _check_common_fields(metadata)
    if repo_type == "model":
        errors += _check_model_fields(metadata)
    return errors, []


def _front_matter(content: str) -> str | None:
    """The YAML text between the leading `---` line and the next `---` line, or None when there is none."""
    lines = content.lstrip("\ufeff").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip()), None)
    if start is None or lines[start].rstrip() != "---":
        return None
    for end in range(start + 1, len(lines)):
        if lines[end].rstrip() == "---":
            return "\n".join(lines[start + 1:end])
    return None


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check_common_fields(metadata: dict) -> list[str]:
    """Rules that hold for every repo type."""
    errors = []
    if "tags" in metadata and not _is_str_list(metadata["tags"]):
        errors.append('"tags" must be an array of strings')
    if "license" in metadata and not isinstance(metadata["license"], str):
        errors.append('"license" must be a string')
    return errors


def _check_model_fields(metadata: dict) -> list[str]:
    """Rules of the model card schema: base model, relation, library, pipeline tag, model-index."""
    errors = []
    if "base_model" in metadata:
        value = metadata["base_model"]
        ids = value if isinstance(value, list) else [value]
        for item in ids:
            if not isinstance(item, str) or not _BASE_MODEL.match(item):
                errors.append(f'"base_model" with value "{item}" is not valid. Use a model id from '
                              "https://hf.co/models (owner/name), not a URL or a path")
    if "base_model_relation" in metadata and metadata["base_model_relation"] not in _RELATIONS:
        errors.append(f'"base_model_relation" must be one of [{", ".join(_RELATIONS)}], '
                      f'got "{metadata["base_model_relation"]}"')
    for key in ("library_name", "pipeline_tag"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string')
    if "model-index" in metadata:
        errors += _check_model_index(metadata["model-index"])
    return errors


def _check_model_index(value: Any) -> list[str]:
    """`model-index`: [{"name", "results": [{"task": {"type"}, "dataset": {"name", "type"}, "metrics": [...]}]}]."""
    if not isinstance(value, list):
        return ['"model-index" must be an array']
    errors = []
    for i, entry in enumerate(value):
        where = f'"model-index[{i}]"'
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append(f'{where} must have a string "name"')
            continue
        results = entry.get("results")
        if not isinstance(results, list):
            errors.append(f'{where}.results must be an array')
            continue
        for j, result in enumerate(results):
            errors += _check_eval_result(result, f"{where}.results[{j}]")
    return errors


def _check_eval_result(result: Any, where: str) -> list[str]:
    """One entry of a model-index `results` list."""
    if not isinstance(result, dict):
        return [f"{where} must be an object"]
    errors = []
    task = result.get("task")
    if not isinstance(task, dict) or not isinstance(task.get("type"), str):
        errors.append(f'{where}.task must have a string "type"')
    dataset = result.get("dataset")
    if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("name", "type")):
        errors.append(f'{where}.dataset must have string "name" and "type"')
    metrics = result.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        errors.append(f"{where}.metrics must be a non-empty array")
    else:
        for k, metric in enumerate(metrics):
            if not isinstance(metric, dict) or not isinstance(metric.get("type"), str) or "value" not in metric:
                errors.append(f'{where}.metrics[{k}] must have a string "type" and a "value"')
    return errors


# --------------------------------------------------------------------------------------------------------------------
# State


def _now() -> str:
    """The current time in the Hub's format ("2024-05-01T12:00:00.000Z")."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: sha1 over "blob <size>\\0" and the bytes (what the Hub sends as ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class _Blob:
    """One file of a commit. `git_oid` is the git blob id (of the pointer file, for LFS files)."""

    size: int
    sha256: str
    git_oid: str
    lfs: bool
    commit: str  # the last commit that wrote this path

    def upload_oid(self) -> str:
        """The oid the preupload endpoint reports: sha256 for LFS files, the git blob sha1 otherwise."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class _Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    author: str
    date: str
    files: dict[str, _Blob]
    added: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    lfs: list[str] = field(default_factory=list)


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created: str
    commits: list[_Commit] = field(default_factory=list)
    lfs_objects: set[str] = field(default_factory=set)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/", 1)[0]

    @property
    def head(self) -> _Commit:
        return self.commits[-1]

    def url_path(self) -> str:
        """`[datasets/]owner/name`, the repo's path under the endpoint."""
        return _URL_PREFIX[self.repo_type] + self.repo_id


class _HubError(Exception):
    """An error answer: HTTP status, message, and the Hub's X-Error-Code when the client keys on one."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 body: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


def _repo_not_found(repo_id: str, status: int = 404) -> _HubError:
    return _HubError(status, f"Repository not found: {repo_id}", "RepoNotFound")


def _entry_not_found(path: str, commit: _Commit, what: str = "Entry not found") -> _HubError:
    return _HubError(404, f"{what}: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})


class _BlobStore:
    """File contents on disk, content-addressed by sha256: shared by repos, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "incoming").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def put_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.path(sha256).exists():
            with tempfile.NamedTemporaryFile(dir=self.root / "incoming", delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, self.path(sha256))
        return sha256

    def put_stream(self, chunks: Iterator[bytes]) -> tuple[str, int, Path]:
        """Write `chunks` to a temporary file; returns (sha256, size, temporary path) for the caller to check."""
        digest, size = hashlib.sha256(), 0
        with tempfile.NamedTemporaryFile(dir=self.root / "incoming", delete=False) as tmp:
            try:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    tmp.write(chunk)
            except BaseException:
                tmp.close()
                os.unlink(tmp.name)
                raise
        return digest.hexdigest(), size, Path(tmp.name)

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


class _State:
    """Users, repos, commits and LFS objects, with the Hub's rules; every method is safe to call from any thread."""

    def __init__(self, users: dict[str, str], root: Path) -> None:
        self.users = dict(users)
        self.store = _BlobStore(root)
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lock = threading.RLock()
        self.secret = os.urandom(32)
        self.counter = itertools.count()
        self.started = _now()
        self.lfs_events: list[tuple[str, str, str]] = []
        self.requests: list[tuple[str, str]] = []

    # -- access -----------------------------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> str | None:
        """The user behind an Authorization header; None for anonymous; 401 for a token nobody holds."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        user = self.users.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            message = "Invalid credentials in Authorization header"
            raise _HubError(401, message, headers={"X-Error-Message": message})
        return user

    def repo_for_read(self, repo_type: str, repo_id: str, user: str | None) -> _Repo:
        """The repo if `user` may read it; a private repo is "not found" for anyone but its owner (401 if anonymous)."""
        with self.lock:
            repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            raise _repo_not_found(repo_id, 401 if user is None else 404)
        return repo

    def repo_for_write(self, repo_type: str, repo_id: str, user: str | None) -> _Repo:
        """The repo if `user` owns it: 401 anonymous, 404 missing or someone else's private repo, 403 otherwise."""
        if user is None:
            raise _HubError(401, "You must be authenticated (Authorization: Bearer <token>) to write to a repo")
        repo = self.repo_for_read(repo_type, repo_id, user)
        if user != repo.owner:
            raise _HubError(403, f"You don't have the rights to write to {repo_type} repo {repo_id} "
                                 f"(only {repo.owner} has)")
        return repo

    @staticmethod
    def commit_at(repo: _Repo, revision: str) -> _Commit:
        """The commit for `main` or for a full commit id of the repo; RevisionNotFound otherwise."""
        if revision == "main":
            return repo.head
        if _COMMIT_OID.match(revision):
            for commit in repo.commits:
                if commit.oid == revision:
                    return commit
        raise _HubError(404, f"Invalid rev id: {revision} (this fake Hub has only the main branch)",
                        "RevisionNotFound")

    @staticmethod
    def require_main(revision: str) -> None:
        """Writes go to `main` only: no other branch exists here."""
        if revision != "main":
            raise _HubError(404, f"Invalid rev id: {revision} (this fake Hub only writes to main)", "RevisionNotFound")

    # -- repos ------------------------------------------------------------------------------------------------------

    def whoami(self, user: str | None) -> dict:
        if user is None:
            raise _HubError(401, "You must be authenticated to call whoami")
        token = {"displayName": f"fakehub-{user}", "role": "write", "createdAt": self.started}
        return {"type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user, "fullname": user,
                "email": None, "emailVerified": False, "canPay": False, "isPro": False, "periodEnd": None,
                "avatarUrl": "", "orgs": [], "auth": {"type": "access_token", "accessToken": token}}

    def create_repo(self, user: str | None, payload: dict, base_url: str) -> dict:
        """Create `namespace/name` for its owner, with the Hub's initial commit holding `.gitattributes`."""
        if user is None:
            raise _HubError(401, "You must be authenticated to create a repo")
        repo_type, repo_id = _repo_from_payload(payload, user)
        if repo_id.split("/")[0] != user:
            raise _HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace '
                                 f'"{repo_id.split("/")[0]}"')
        private = payload.get("private") is True or payload.get("visibility") == "private"
        url = f"{base_url}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise _HubError(409, f"You already created this {repo_type} repo: {repo_id}", body={
                    "error": f"You already created this {repo_type} repo", "url": url})
            repo = _Repo(repo_type, repo_id, private, _now())
            sha256 = self.store.put_bytes(_GITATTRIBUTES)
            oid = self._new_oid(repo, None, "initial commit")
            blob = _Blob(len(_GITATTRIBUTES), sha256, _git_blob_oid(_GITATTRIBUTES), False, oid)
            repo.commits.append(_Commit(oid, None, "initial commit", "", "system", repo.created,
                                        {".gitattributes": blob}, added=[".gitattributes"]))
            self.repos[(repo_type, repo_id)] = repo
        return {"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]}

    def delete_repo(self, user: str | None, payload: dict) -> None:
        if user is None:
            raise _HubError(401, "You must be authenticated to delete a repo")
        repo_type, repo_id = _repo_from_payload(payload, user)
        with self.lock:
            repo = self.repo_for_write(repo_type, repo_id, user)
            del self.repos[(repo.repo_type, repo.repo_id)]

    def _new_oid(self, repo: _Repo, parent: str | None, summary: str) -> str:
        seed = f"{repo.repo_type}\n{repo.repo_id}\n{parent}\n{summary}\n{_now()}\n{next(self.counter)}\n{self.secret.hex()}"
        return hashlib.sha1(seed.encode()).hexdigest()

    # -- reads ------------------------------------------------------------------------------------------------------

    def repo_info(self, repo: _Repo, commit: _Commit, blobs: bool) -> dict:
        """The repo info document (`ModelInfo`/`DatasetInfo` fields) at `commit`."""
        card = self._card_data(commit)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.url_path().encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": repo.owner, "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": list(card["tags"]) if _is_str_list(card.get("tags")) else [],
            "siblings": [self._sibling(path, blob, blobs) for path, blob in sorted(commit.files.items())],
            "usedStorage": sum(blob.size for blob in commit.files.values()),
        }
        if card:
            info["cardData"] = card
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            for key in ("library_name", "pipeline_tag"):
                if isinstance(card.get(key), str):
                    info[key] = card[key]
        return info

    def _card_data(self, commit: _Commit) -> dict:
        """README.md front matter at `commit` as a mapping ({} when absent or invalid)."""
        blob = commit.files.get("README.md")
        if blob is None:
            return {}
        block = _front_matter(self.store.read(blob.sha256).decode("utf-8", "replace"))
        try:
            card = yaml.safe_load(block) if block is not None else None
        except yaml.YAMLError:
            return {}
        return card if isinstance(card, dict) else {}

    @staticmethod
    def _sibling(path: str, blob: _Blob, blobs: bool) -> dict:
        sibling: dict[str, Any] = {"rfilename": path}
        if blobs:
            sibling.update(size=blob.size, blobId=blob.git_oid)
            if blob.lfs:
                sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size,
                                  "pointerSize": len(_lfs_pointer(blob.sha256, blob.size))}
        return sibling

    def tree(self, repo: _Repo, commit: _Commit, path: str, recursive: bool, expand: bool) -> list[dict]:
        """The entries under folder `path` ("" for the root): directories first, then files, each sorted."""
        path = path.strip("/")
        if path in commit.files:
            raise _HubError(400, f"{path} is a file, not a folder")
        prefix = f"{path}/" if path else ""
        below = [p for p in commit.files if p.startswith(prefix)]
        if path and not below:
            raise _entry_not_found(path, commit)
        folders, files = set(), []
        for file_path in below:
            parts = file_path[len(prefix):].split("/")
            if recursive:
                folders.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
                files.append(file_path)
            elif len(parts) == 1:
                files.append(file_path)
            else:
                folders.add(prefix + parts[0])
        return ([self._folder_entry(repo, commit, p, expand) for p in sorted(folders)]
                + [self._file_entry(repo, p, commit.files[p], expand) for p in sorted(files)])

    def paths_info(self, repo: _Repo, commit: _Commit, paths: list[str], expand: bool) -> list[dict]:
        """Entries for the given paths that exist (files or folders); the others are left out, as on the Hub."""
        entries = []
        for path in dict.fromkeys(p.strip("/") for p in paths):
            if path in commit.files:
                entries.append(self._file_entry(repo, path, commit.files[path], expand))
            elif path and any(p.startswith(f"{path}/") for p in commit.files):
                entries.append(self._folder_entry(repo, commit, path, expand))
        return entries

    def _file_entry(self, repo: _Repo, path: str, blob: _Blob, expand: bool) -> dict:
        entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size,
                            "pointerSize": len(_lfs_pointer(blob.sha256, blob.size))}
        if expand:
            entry["lastCommit"] = self._last_commit(repo, [blob.commit])
        return entry

    def _folder_entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict:
        below = sorted((p, b) for p, b in commit.files.items() if p.startswith(f"{path}/"))
        tree_oid = hashlib.sha1("".join(f"{p}\0{b.git_oid}\n" for p, b in below).encode()).hexdigest()
        entry: dict[str, Any] = {"type": "directory", "oid": tree_oid, "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = self._last_commit(repo, [b.commit for _, b in below])
        return entry

    @staticmethod
    def _last_commit(repo: _Repo, oids: list[str]) -> dict:
        """The newest of the commits `oids`, in the tree endpoint's `lastCommit` form."""
        wanted = set(oids)
        latest = next(c for c in reversed(repo.commits) if c.oid in wanted)
        return {"id": latest.oid, "title": latest.summary, "date": latest.date}

    @staticmethod
    def refs(repo: _Repo) -> dict:
        main = {"name": "main", "ref": "refs/heads/main", "targetCommit": repo.head.oid}
        return {"branches": [main], "converts": [], "tags": [], "pullRequests": []}

    @staticmethod
    def commit_list(repo: _Repo, commit: _Commit) -> list[dict]:
        """`commit` and its ancestors, newest first, as the commits endpoint lists them."""
        by_oid = {c.oid: c for c in repo.commits}
        out, current = [], commit
        while current is not None:
            out.append({"id": current.oid, "title": current.summary, "message": current.description,
                        "authors": [{"user": current.author, "avatar": None}], "date": current.date})
            current = by_oid.get(current.parent) if current.parent else None
        return out

    # -- preupload and LFS ------------------------------------------------------------------------------------------

    def preupload(self, repo: _Repo, payload: Any) -> dict:
        """Upload mode and existing oid for each file the client is about to commit."""
        files = payload.get("files") if isinstance(payload, dict) else None
        if not isinstance(files, list):
            raise _HubError(400, 'preupload expects {"files": [{"path", "sample", "size"}, ...]}')
        head = repo.head
        patterns = self._lfs_patterns(head)
        answers = []
        for item in files:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not isinstance(
                    item.get("size"), int):
                raise _HubError(400, f"preupload: malformed file entry {item!r}")
            sample = _b64decode(item.get("sample") or "", f"preupload sample of {item['path']}")
            mode = "lfs" if _wants_lfs(item["path"], item["size"], sample, patterns) else "regular"
            existing = head.files.get(item["path"])
            answers.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False,
                            "oid": existing.upload_oid() if existing is not None else None})
        return {"files": answers, "commitOid": head.oid}

    def _lfs_patterns(self, commit: _Commit) -> list[str]:
        """Patterns marked `filter=lfs` in the commit's .gitattributes."""
        blob = commit.files.get(".gitattributes")
        if blob is None:
            return []
        patterns = []
        for line in self.store.read(blob.sha256).decode("utf-8", "replace").splitlines():
            fields = line.split()
            if len(fields) > 1 and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
                patterns.append(fields[0])
        return patterns

    def lfs_batch(self, repo: _Repo, payload: Any, base_url: str) -> dict:
        """Basic-transfer upload actions for the objects this repo does not have yet."""
        if not isinstance(payload, dict) or not isinstance(payload.get("objects"), list):
            raise _HubError(400, 'LFS batch expects {"operation": "upload", "objects": [{"oid", "size"}, ...]}')
        if payload.get("operation") != "upload":
            raise _HubError(501, "this fake Hub's LFS batch API only supports the upload operation")
        objects = []
        for item in payload["objects"]:
            oid, size = (item.get("oid"), item.get("size")) if isinstance(item, dict) else (None, None)
            if not isinstance(oid, str) or not _SHA256.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "oid must be a sha256 hex digest, size an int"}})
                continue
            self.lfs_events.append(("batch", repo.repo_id, oid))
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs_objects:
                entry["actions"] = self._lfs_actions(repo, oid, size, base_url)
            objects.append(entry)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _lfs_actions(self, repo: _Repo, oid: str, size: int, base_url: str) -> dict:
        """A signed PUT URL on this server (the client sends no token there, as to S3) and the verify URL."""
        query = {"repo_type": repo.repo_type, "repo_id": repo.repo_id, "oid": oid, "size": str(size)}
        query["sig"] = self._sign(query)
        return {"upload": {"href": f"{base_url}/__fakehub/lfs-upload?{urlencode(query)}", "expires_in": 3600},
                "verify": {"href": f"{base_url}/{repo.url_path()}.git/info/lfs/objects/verify", "header": {},
                           "expires_in": 3600}}

    def _sign(self, query: dict[str, str]) -> str:
        message = "\n".join(query[k] for k in ("repo_type", "repo_id", "oid", "size")).encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def lfs_upload(self, query: dict[str, str], chunks: Iterator[bytes]) -> None:
        """Store the PUT body of a signed upload URL after checking its sha256 and size."""
        if not hmac.compare_digest(query.get("sig", ""), self._sign({k: query.get(k, "") for k in (
                "repo_type", "repo_id", "oid", "size")})):
            raise _HubError(403, "LFS upload URL signature is invalid")
        repo_id, oid, size = query["repo_id"], query["oid"], int(query["size"])
        sha256, got_size, tmp = self.store.put_stream(chunks)
        try:
            if got_size != size or sha256 != oid:
                raise _HubError(400, f"LFS upload does not match the batch request: expected sha256 {oid} and "
                                     f"{size} bytes, got sha256 {sha256} and {got_size} bytes")
            os.replace(tmp, self.store.path(oid))
        finally:
            tmp.unlink(missing_ok=True)
        with self.lock:
            repo = self.repos.get((query["repo_type"], repo_id))
            if repo is None:
                raise _repo_not_found(repo_id)
            repo.lfs_objects.add(oid)
        self.lfs_events.append(("upload", repo_id, oid))

    def lfs_verify(self, repo: _Repo, payload: Any) -> dict:
        """Confirm that an uploaded object is stored with the expected size."""
        if not isinstance(payload, dict) or not isinstance(payload.get("oid"), str):
            raise _HubError(400, 'LFS verify expects {"oid": ..., "size": ...}')
        oid = payload["oid"]
        if oid not in repo.lfs_objects:
            raise _HubError(404, f"LFS object {oid} was not uploaded to {repo.repo_id}")
        if payload.get("size") != self.store.path(oid).stat().st_size:
            raise _HubError(422, f"LFS object {oid} has size {self.store.path(oid).stat().st_size}, "
                                 f"not {payload.get('size')}")
        self.lfs_events.append(("verify", repo.repo_id, oid))
        return {"success": True}

    # -- commits ----------------------------------------------------------------------------------------------------

    def commit(self, repo: _Repo, user: str, body: bytes, base_url: str) -> dict:
        """Apply an NDJSON commit to main; returns the commit endpoint's answer."""
        header, operations = _parse_ndjson(body)
        staged = [(op, value, self.store.put_bytes(value["data"]) if op == "file" else None)
                  for op, value in operations]
        with self.lock:
            if self.repos.get((repo.repo_type, repo.repo_id)) is not repo:
                raise _repo_not_found(repo.repo_id)
            head = repo.head
            parent = header.get("parentCommit")
            if parent is not None and parent != head.oid:
                raise _HubError(412, f"A commit has happened since {parent}: the head of main is {head.oid}. "
                                     "Please refresh and try again.")
            commit = _Commit(self._new_oid(repo, head.oid, header["summary"]), head.oid, header["summary"],
                             header.get("description") or "", user, _now(), dict(head.files))
            for op, value, sha256 in staged:
                self._apply(repo, commit, op, value, sha256)
            _check_no_file_folder_clash(commit.files)
            if "README.md" in commit.added:
                self._check_readme(repo, commit)
            repo.commits.append(commit)
        url = f"{base_url}/{repo.url_path()}/commit/{commit.oid}"
        return {"success": True, "commitOid": commit.oid, "commitUrl": url, "commitMessage": commit.summary,
                "pullRequestUrl": None}

    def _apply(self, repo: _Repo, commit: _Commit, op: str, value: dict, sha256: str | None) -> None:
        """Apply one NDJSON operation to the commit being built."""
        path = value["path"]
        if op == "file":
            data = value["data"]
            commit.files[path] = _Blob(len(data), sha256 or "", _git_blob_oid(data), False, commit.oid)
            commit.added.append(path)
        elif op == "lfsFile":
            oid = value.get("oid")
            if not isinstance(oid, str) or oid not in repo.lfs_objects:
                raise _HubError(400, f"lfsFile {path}: LFS object {oid} was not uploaded to {repo.repo_id}; "
                                     "upload it through the LFS batch API before committing")
            size = self.store.path(oid).stat().st_size
            if value.get("size") not in (None, size):
                raise _HubError(400, f"lfsFile {path}: size {value.get('size')} does not match the object ({size})")
            commit.files[path] = _Blob(size, oid, _git_blob_oid(_lfs_pointer(oid, size)), True, commit.oid)
            commit.added.append(path)
            commit.lfs.append(path)
        elif op == "deletedFile":
            if commit.files.pop(path, None) is None:
                raise _entry_not_found(path, commit, "A file with this name doesn't exist")
            commit.deleted.append(path)
        else:  # deletedFolder
            below = [p for p in commit.files if p.startswith(path.rstrip("/") + "/")]
            if not below:
                raise _entry_not_found(path, commit, "A folder with this name doesn't exist")
            for p in below:
                del commit.files[p]
            commit.deleted.extend(below)

    def _check_readme(self, repo: _Repo, commit: _Commit) -> None:
        """Refuse a commit whose README.md metadata the validate-yaml rules reject (the Hub does the same)."""
        text = self.store.read(commit.files["README.md"].sha256).decode("utf-8", "replace")
        errors, _ = validate_readme(text, repo.repo_type)
        if errors:
            raise _HubError(400, "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))

    # -- records ----------------------------------------------------------------------------------------------------

    def find(self, repo_type: str, repo_id: str) -> _Repo:
        with self.lock:
            repo = self.repos.get((repo_type, repo_id))
            if repo is None:
                known = sorted(f"{t}:{i}" for t, i in self.repos)
                raise KeyError(f"no {repo_type} repo {repo_id!r} on this fake Hub (repos: {known})")
            return repo


def _repo_from_payload(payload: Any, user: str) -> tuple[str, str]:
    """(repo_type, "namespace/name") from a create/delete body: {name, organization?, type?}."""
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        raise _HubError(400, 'expected a JSON body {"name": ..., "organization": ..., "type": ...}')
    repo_type = payload.get("type") or "model"
    if repo_type not in _URL_PREFIX:
        raise _HubError(400, f"repo type {repo_type!r} is not supported by this fake Hub (model or dataset)")
    name, organization = payload["name"], payload.get("organization") or user
    if "/" in name:
        organization, name = name.split("/", 1)
    if not _REPO_NAME.match(name) or "--" in name or ".." in name or not isinstance(organization, str):
        raise _HubError(400, f"invalid repo name {name!r}: letters, digits, '-', '_' and '.', at most 96")
    return repo_type, f"{organization}/{name}"


def _b64decode(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise _HubError(400, f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _HubError(400, f"{what} is not valid base64: {exc}") from None


def _wants_lfs(path: str, size: int, sample: bytes, patterns: list[str]) -> bool:
    """Whether the Hub asks for LFS: large files, binary content, or a `.gitattributes` LFS pattern."""
    if size > LFS_SIZE_THRESHOLD or b"\0" in sample:
        return True
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in pattern else name, pattern) for pattern in patterns)


def _check_path(path: Any) -> str:
    """A file path a commit may write: relative, no empty, "." or ".." part, nothing under .git/."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise _HubError(400, f"invalid path in repo: {path!r}")
    parts = path.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts) or parts[0] == ".git":
        raise _HubError(400, f"invalid path in repo: {path!r}")
    return path


def _parse_ndjson(body: bytes) -> tuple[dict, list[tuple[str, dict]]]:
    """The header and the operations of a commit body; file contents are decoded into value["data"]."""
    try:
        items = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _HubError(400, f"commit body is not NDJSON: {exc}") from None
    if not items or not isinstance(items[0], dict) or items[0].get("key") != "header":
        raise _HubError(400, 'commit body must start with {"key": "header", "value": {"summary": ...}}')
    header = items[0].get("value")
    if not isinstance(header, dict) or not isinstance(header.get("summary"), str) or not header["summary"].strip():
        raise _HubError(400, "commit header needs a non-empty summary")
    operations = []
    for item in items[1:]:
        key, value = (item.get("key"), item.get("value")) if isinstance(item, dict) else (None, None)
        if key not in ("file", "lfsFile", "deletedFile", "deletedFolder") or not isinstance(value, dict):
            raise _HubError(400, f"unsupported commit operation: {item!r:.200}")
        value = dict(value, path=_check_path(value.get("path")))
        if key == "file":
            value["data"] = _decode_file(value)
        operations.append((key, value))
    return header, operations


def _decode_file(value: dict) -> bytes:
    content = value.get("content")
    if value.get("encoding", "utf-8") == "base64":
        return _b64decode(content, f"content of {value['path']}")
    if not isinstance(content, str):
        raise _HubError(400, f"content of {value['path']} must be a string")
    return content.encode()


def _check_no_file_folder_clash(files: dict[str, _Blob]) -> None:
    folders = {path.rsplit("/", 1)[0] for path in files if "/" in path}
    folders |= {f.rsplit("/", i)[0] for f in folders for i in range(1, f.count("/") + 1)}
    clash = sorted(folders & files.keys())
    if clash:
        raise _HubError(400, f"{clash[0]} would be both a file and a folder")


# --------------------------------------------------------------------------------------------------------------------
# HTTP


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # streamed instead of `body`: `length` bytes from `offset`
    offset: int = 0
    length: int = 0


def _json(obj: Any, status: int = 200, content_type: str = "application/json") -> _Response:
    return _Response(status, json.dumps(obj, default=str).encode(), content_type)


def _parse_json(raw: bytes) -> Any:
    """A JSON request body (None when empty); 400 when it is not JSON."""
    try:
        return json.loads(raw) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _HubError(400, f"malformed JSON body: {exc}") from None


def _error_response(error: _HubError, accept: str) -> _Response:
    """The Hub's error shape: JSON {"error": message} plus X-Error-Code / X-Error-Message headers."""
    if accept.startswith("text/plain"):
        response = _Response(error.status, error.message.encode(), "text/plain; charset=utf-8")
    else:
        response = _json(error.body or {"error": error.message}, error.status)
    response.headers.update(error.headers)
    if error.code:
        response.headers["X-Error-Code"] = error.code
    message = " ".join(error.message.split()).encode("ascii", "replace").decode()[:1000]
    response.headers.setdefault("X-Error-Message", message)
    return response


class _Body:
    """The request body, read once, with Content-Length or chunked transfer encoding."""

    def __init__(self, rfile: Any, headers: Any) -> None:
        self.rfile = rfile
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        try:
            self.remaining = 0 if self.chunked else int(headers.get("Content-Length") or 0)
        except ValueError:
            self.remaining = 0
            self.started, self.finished = True, False  # unreadable: the connection is closed after answering
            return
        self.started = self.finished = False

    def chunks(self) -> Iterator[bytes]:
        if self.started:
            raise _HubError(500, "request body read twice")
        self.started = True
        yield from (self._chunked() if self.chunked else self._sized())
        self.finished = True

    def _sized(self) -> Iterator[bytes]:
        while self.remaining > 0:
            chunk = self.rfile.read(min(self.remaining, _CHUNK))
            if not chunk:
                raise _HubError(400, "request body ended early")
            self.remaining -= len(chunk)
            yield chunk

    def _chunked(self) -> Iterator[bytes]:
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _HubError(400, "malformed chunked request body") from None
            if size == 0:
                while self.rfile.readline(65537).strip():  # trailers
                    pass
                return
            self.remaining = size
            yield from self._sized()
            self.rfile.readline(65537)

    def read(self, limit: int = _MAX_BODY) -> bytes:
        parts, total = [], 0
        for chunk in self.chunks():
            total += len(chunk)
            if total > limit:
                raise _HubError(413, f"request body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def json(self) -> Any:
        return _parse_json(self.read())

    def drain(self) -> bool:
        """Read what is left so the connection can be reused; False when that is impossible."""
        if not self.started:
            try:
                for _ in self.chunks():
                    pass
            except (_HubError, OSError):
                return False
        return self.finished


_REPO = r"(?P<owner>[^/]+)/(?P<name>[^/]+)"
_API = rf"/api/(?P<types>models|datasets)/{_REPO}"
_GIT = r"/(?:(?P<prefix>datasets)/)?(?P<owner>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects"
_ROUTES: list[tuple[tuple[str, ...], re.Pattern, str]] = [
    (("GET",), re.compile(r"/api/whoami-v2"), "whoami"),
    (("POST",), re.compile(r"/api/repos/create"), "create"),
    (("DELETE", "POST"), re.compile(r"/api/repos/delete"), "delete"),
    (("POST",), re.compile(r"/api/validate-yaml"), "validate_yaml"),
    (("GET",), re.compile(rf"{_API}(?:/revision/(?P<rev>[^/]+))?"), "info"),
    (("GET",), re.compile(rf"{_API}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "tree"),
    (("POST",), re.compile(rf"{_API}/paths-info/(?P<rev>[^/]+)"), "paths_info"),
    (("GET",), re.compile(rf"{_API}/refs"), "refs"),
    (("GET",), re.compile(rf"{_API}/commits/(?P<rev>[^/]+)"), "commits"),
    (("POST",), re.compile(rf"{_API}/preupload/(?P<rev>[^/]+)"), "preupload"),
    (("POST",), re.compile(rf"{_API}/commit/(?P<rev>[^/]+)"), "commit"),
    (("GET", "POST"), re.compile(rf"{_API}/xet-(?:read|write)-token/.*"), "xet"),
    (("GET", "POST", "PUT", "DELETE"), re.compile(
        rf"{_API}/(?:branch|tag|discussions|settings|super-squash|lfs-files|duplicate)(?:/.*)?"), "unsupported"),
    (("GET",), re.compile(r"/api/(?:models|datasets)/(?P<owner>[^/]+)"), "single_segment"),
    (("POST",), re.compile(rf"{_GIT}/batch"), "lfs_batch"),
    (("POST",), re.compile(rf"{_GIT}/verify"), "lfs_verify"),
    (("PUT",), re.compile(r"/__fakehub/lfs-upload"), "lfs_upload"),
    (("GET", "HEAD"), re.compile(rf"/(?:(?P<prefix>datasets)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
     "resolve"),
]


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that remembers its open connections, so that stop() can close keep-alive ones."""

    daemon_threads = True
    state: _State
    base_url: str
    verbose: bool

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up are normal; anything else is printed (a bug in this server)."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, socket.timeout)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Routes one HTTP/1.1 request to a `_route_*` method; every answer has a Content-Length."""

    protocol_version = "HTTP/1.1"
    server_version = "fakehub/1.0"
    timeout = 120
    server: _Server

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            sys.stderr.write(f"fakehub: {self.address_string()} {format % args}\n")

    def _dispatch(self) -> None:
        state = self.server.state
        state.requests.append((self.command, self.path.split("?", 1)[0]))
        self.body = _Body(self.rfile, self.headers)
        try:
            url = _split_url(self.path)
            self.query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            name, match = self._route(url.path)
            self.user = state.authenticate(self.headers.get("Authorization"))
            response = getattr(self, f"_route_{name}")(match)
        except _HubError as error:
            response = _error_response(error, self.headers.get("Accept", ""))
        except Exception as exc:  # noqa: BLE001 - a bug here: answer 500, print it, keep serving
            traceback.print_exc()
            response = _error_response(_HubError(500, f"fakehub internal error: {exc!r}"), "")
        if not self.body.drain():
            self.close_connection = True
        self._send(response)

    def _route(self, path: str) -> tuple[str, dict[str, str]]:
        allowed = False
        for methods, pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if self.command in methods:
                return name, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            allowed = True
        if allowed:
            raise _HubError(405, f"method {self.command} is not allowed on {path}")
        raise _HubError(404, f"not found on this fake Hub: {self.command} {path}")

    def _send(self, response: _Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        length = response.length if response.file is not None else len(response.body)
        self.send_header("Content-Length", str(length))
        for key, value in response.headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if response.file is None:
            self.wfile.write(response.body)
            return
        with response.file.open("rb") as file:
            file.seek(response.offset)
            left = response.length
            while left > 0:
                chunk = file.read(min(left, _CHUNK))
                if not chunk:
                    raise OSError(f"{response.file} is shorter than expected")
                self.wfile.write(chunk)
                left -= len(chunk)

    # -- helpers ----------------------------------------------------------------------------------------------------

    def _repo(self, m: dict[str, str], write: bool = False) -> _Repo:
        types = m.get("types") or ("datasets" if m.get("prefix") else "models")
        repo_id = f"{m['owner']}/{m['name']}"
        state = self.server.state
        if write:
            return state.repo_for_write(_API_TYPES[types], repo_id, self.user)
        return state.repo_for_read(_API_TYPES[types], repo_id, self.user)

    def _flag(self, name: str) -> bool:
        return self.query.get(name, "").lower() in ("1", "true", "yes")

    def _refuse_pr(self) -> None:
        if self._flag("create_pr"):
            raise _HubError(501, "pull requests (create_pr) are not supported by this fake Hub")

    # -- routes -----------------------------------------------------------------------------------------------------

    def _route_whoami(self, m: dict[str, str]) -> _Response:
        return _json(self.server.state.whoami(self.user))

    def _route_create(self, m: dict[str, str]) -> _Response:
        return _json(self.server.state.create_repo(self.user, self.body.json(), self.server.base_url))

    def _route_delete(self, m: dict[str, str]) -> _Response:
        self.server.state.delete_repo(self.user, self.body.json())
        return _json({})

    def _route_validate_yaml(self, m: dict[str, str]) -> _Response:
        payload = self.body.json()
        if not isinstance(payload, dict) or not isinstance(payload.get("content"), str):
            raise _HubError(400, 'validate-yaml expects {"content": "<README.md text>", "repoType": "model"}')
        errors, warnings = validate_readme(payload["content"], payload.get("repoType") or "model")
        answer = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
        if not errors:
            return _json(answer)
        if self.headers.get("Accept", "").startswith("text/plain"):
            text = "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors)
            return _Response(400, text.encode(), "text/plain; charset=utf-8", {"X-Error-Message": errors[0][:500]})
        return _json(answer, 400)

    def _route_info(self, m: dict[str, str]) -> _Response:
        repo = self._repo(m)
        commit = self.server.state.commit_at(repo, m.get("rev", "main"))
        return _json(self.server.state.repo_info(repo, commit, self._flag("blobs")))

    def _route_tree(self, m: dict[str, str]) -> _Response:
        repo = self._repo(m)
        commit = self.server.state.commit_at(repo, m["rev"])
        return _json(self.server.state.tree(repo, commit, m.get("path", ""), self._flag("recursive"),
                                            self._flag("expand")))

    def _route_paths_info(self, m: dict[str, str]) -> _Response:
        repo = self._repo(m)
        commit = self.server.state.commit_at(repo, m["rev"])
        raw = self.body.read()
        if "json" in self.headers.get("Content-Type", ""):
            payload = _parse_json(raw) or {}
            if not isinstance(payload, dict):
                raise _HubError(400, 'paths-info expects {"paths": [...], "expand": false}')
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", [""])[-1].lower() in ("1", "true")
        if isinstance(paths, str):
            paths = [paths]
        if not _is_str_list(paths):
            raise _HubError(400, "paths-info expects a list of paths")
        return _json(self.server.state.paths_info(repo, commit, paths, expand))

    def _route_refs(self, m: dict[str, str]) -> _Response:
        return _json(self.server.state.refs(self._repo(m)))

    def _route_commits(self, m: dict[str, str]) -> _Response:
        repo = self._repo(m)
        return _json(self.server.state.commit_list(repo, self.server.state.commit_at(repo, m["rev"])))

    def _route_preupload(self, m: dict[str, str]) -> _Response:
        repo = self._repo(m, write=True)
        self.server.state.require_main(m["rev"])
        self._refuse_pr()
        return _json(self.server.state.preupload(repo, self.body.json()))

    def _route_commit(self, m: dict[str, str]) -> _Response:
        repo = self._repo(m, write=True)
        self.server.state.require_main(m["rev"])
        self._refuse_pr()
        body = self.body.read()
        return _json(self.server.state.commit(repo, self.user or "", body, self.server.base_url))

    def _route_xet(self, m: dict[str, str]) -> _Response:
        raise _HubError(501, _XET_MESSAGE)

    def _route_unsupported(self, m: dict[str, str]) -> _Response:
        raise _HubError(501, f"{self.command} {urlsplit(self.path).path}: branches, tags, discussions, settings and "
                             "LFS file management are not supported by this fake Hub")

    def _route_single_segment(self, m: dict[str, str]) -> _Response:
        raise _repo_not_found(m["owner"])

    def _route_lfs_batch(self, m: dict[str, str]) -> _Response:
        repo = self._repo(m, write=True)
        answer = self.server.state.lfs_batch(repo, self.body.json(), self.server.base_url)
        return _json(answer, content_type="application/vnd.git-lfs+json")

    def _route_lfs_verify(self, m: dict[str, str]) -> _Response:
        repo = self._repo(m, write=True)
        return _json(self.server.state.lfs_verify(repo, self.body.json()))

    def _route_lfs_upload(self, m: dict[str, str]) -> _Response:
        if not all(self.query.get(k) for k in ("repo_type", "repo_id", "oid", "size", "sig")):
            raise _HubError(400, "LFS upload URL is missing parameters")
        self.server.state.lfs_upload(self.query, self.body.chunks())
        return _Response(200, b"", "text/plain")

    def _route_resolve(self, m: dict[str, str]) -> _Response:
        repo = self._repo(m)
        commit = self.server.state.commit_at(repo, m["rev"])
        blob = commit.files.get(m["path"])
        if blob is None:
            raise _entry_not_found(m["path"], commit)
        return self._file_response(blob, m["path"], commit)

    def _file_response(self, blob: _Blob, path: str, commit: _Commit) -> _Response:
        """The file, or the byte range asked for, with the headers hf_hub_download reads."""
        etag = blob.sha256 if blob.lfs else blob.git_oid
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        file = self.server.state.store.path(blob.sha256)
        span = _parse_range(self.headers.get("Range"), blob.size)
        if span is None:
            return _Response(200, b"", content_type, headers, file, 0, blob.size)
        start, end = span
        if start > end:
            raise _HubError(416, f"range not satisfiable for {blob.size} bytes",
                            headers={**headers, "Content-Range": f"bytes */{blob.size}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        return _Response(206, b"", content_type, headers, file, start, end - start + 1)


def _split_url(target: str) -> Any:
    """The request target split into path and query; 400 when it cannot be parsed."""
    try:
        return urlsplit(target)
    except ValueError as exc:
        raise _HubError(400, f"malformed request target: {exc}") from None


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range; None to send the whole file (no or unsupported range);
    first > last when the range cannot be satisfied."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        return max(size - int(last), 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    return (start, end) if start < size else (1, 0)


# --------------------------------------------------------------------------------------------------------------------
# Public API


class FakeHub:
    """A Hub-compatible server on 127.0.0.1 with a record of what clients did, for tests to assert on.

    Args:
        users (`dict[str, str]`, *optional*): token -> user name, e.g. `{"tok-alice": "alice"}`.
        root (`str` or `Path`, *optional*): folder for file contents; a temporary folder (removed when this object is
            garbage-collected or at exit) if None.
        verbose (`bool`, *optional*): log each request to stderr.

    Records: `commits(repo_id)`, `files(repo_id)`, `lfs_events` ((event, repo_id, sha256) with event in batch,
    upload, verify) and `requests` ((method, path without the query) of every request, in arrival order).
    """

    def __init__(self, users: dict[str, str] | None = None, root: str | Path | None = None, *,
                 verbose: bool = False) -> None:
        if root is None:
            root = tempfile.mkdtemp(prefix="fakehub-")
            weakref.finalize(self, shutil.rmtree, root, True)
        self._state = _State(users or {}, Path(root))
        self._verbose = verbose
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.lfs_events: list[tuple[str, str, str]] = self._state.lfs_events
        self.requests: list[tuple[str, str]] = self._state.requests

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>`, the endpoint to give the client (HF_ENDPOINT or `endpoint=`)."""
        if self._server is None:
            raise RuntimeError("FakeHub is not started: call start() or use it as a context manager")
        return self._server.base_url

    def start(self, port: int = 0) -> Self:
        """Bind `port` on 127.0.0.1 (0: a free one) and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakeHub is already started")
        server = _Server(("127.0.0.1", port))
        server.state = self._state
        server.base_url = f"http://127.0.0.1:{server.server_address[1]}"
        server.verbose = self._verbose
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fakehub-{server.server_address[1]}", daemon=True)
        self._server = server
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection, so that clients get connection errors from now on."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def commits(self, repo_id: str, repo_type: str = "model") -> list[dict]:
        """The repo's commits, oldest first (the first is the Hub's "initial commit" by "system"): each
        `{"oid", "message", "author", "added", "deleted", "lfs"}`. KeyError if the repo does not exist."""
        repo = self._state.find(repo_type, repo_id)
        with self._state.lock:
            return [{"oid": c.oid, "message": c.summary, "author": c.author, "added": list(c.added),
                     "deleted": list(c.deleted), "lfs": list(c.lfs)} for c in repo.commits]

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """Path -> content of every file at `revision` ("main" or a commit id). KeyError if the repo or the revision
        does not exist."""
        repo = self._state.find(repo_type, repo_id)
        try:
            commit = self._state.commit_at(repo, revision)
        except _HubError:
            raise KeyError(f"no revision {revision!r} in {repo_type} repo {repo_id!r}") from None
        return {path: self._state.store.read(blob.sha256) for path, blob in sorted(commit.files.items())}


def main(argv: list[str] | None = None) -> int:
    """`python -m qformat.testing.fakehub --port 0 --user TOKEN:USER ...`: print `FAKEHUB_READY <url>`, serve until
    killed (SIGTERM or SIGINT)."""
    parser = argparse.ArgumentParser(prog="python -m qformat.testing.fakehub", description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--user", action="append", default=[], metavar="TOKEN:USER", help="a token and its user")
    parser.add_argument("--root", help="folder for file contents (default: a temporary folder)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    users = {}
    for item in args.user:
        token, sep, user = item.partition(":")
        if not sep or not token or not user:
            parser.error(f"--user expects TOKEN:USER, got {item!r}")
        users[token] = user
    hub = FakeHub(users, args.root, verbose=args.verbose)
    hub.start(args.port)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"FAKEHUB_READY {hub.url}", flush=True)
    stop.wait()
    hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
