"""The fake Hub (qformat.testing.fakehub) driven by the real huggingface_hub client, as qformat's Hub tests use it.

The conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported; the `hub` fixture switches offline mode off
and Xet off (classic LFS) in `huggingface_hub.constants`, where the client reads them at each call, and every client
call gets `endpoint=hub.url`. Subprocesses get HF_ENDPOINT, HF_HUB_OFFLINE=0 and HF_HUB_DISABLE_XET=1 instead.
Runs with huggingface_hub 1.33 and 2.4.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import random
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from qformat.testing.fakehub import FakeHub

USERS = {"tok-alice": "alice", "tok-bob": "bob"}
GOOD_CARD = """---
base_model: meta-llama/Llama-3.2-1B
base_model_relation: quantized
library_name: transformers
license: apache-2.0
tags:
- qformat
- int8
---
# A quantized model
"""
URL_BASE_MODEL_CARD = GOOD_CARD.replace("meta-llama/Llama-3.2-1B", "https://huggingface.co/meta-llama/Llama-3.2-1B")
BAD_RELATION_CARD = GOOD_CARD.replace("relation: quantized", "relation: quantised")
CONFIG = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64, "vocab_size": 128}
HUB_MAJOR = int(huggingface_hub.__version__.split(".")[0])


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub(USERS, root=tmp_path / "hub-root") as server:
        yield server


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12 MB .safetensors file (LFS by name and by size), config.json and a README.md with valid metadata."""
    folder = tmp_path_factory.mktemp("model")
    (folder / "model.safetensors").write_bytes(random.Random(0).randbytes(12 * 1024 * 1024))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "README.md").write_text(GOOD_CARD)
    return folder


@pytest.fixture
def uploaded(hub: FakeHub, model_folder: Path) -> str:
    client = client_for(hub)
    client.create_repo("alice/tiny")
    client.upload_folder(repo_id="alice/tiny", folder_path=model_folder)
    return "alice/tiny"


def client_for(hub: FakeHub, token: str | bool = "tok-alice") -> HfApi:
    return HfApi(endpoint=hub.url, token=token)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw(hub: FakeHub, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
        conn: http.client.HTTPConnection | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request outside huggingface_hub, to check the wire format; on `conn` if given (to check that the
    connection stays usable), else on a connection of its own."""
    own = conn is None
    conn = connect(hub) if conn is None else conn
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        if own:
            conn.close()


def connect(hub: FakeHub) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(urlsplit(hub.url).netloc, timeout=10)


def ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


# --------------------------------------------------------------------------------------------------------------------


def test_whoami_names_each_token_owner_and_rejects_unknown_tokens(hub: FakeHub) -> None:
    assert client_for(hub, "tok-alice").whoami()["name"] == "alice"
    me = client_for(hub, "tok-bob").whoami()
    assert (me["name"], me["type"], me["auth"]["accessToken"]["role"]) == ("bob", "user", "write")
    with pytest.raises(HfHubHTTPError) as excinfo:
        client_for(hub, "tok-mallory").whoami()
    assert excinfo.value.response.status_code == 401


def test_create_repo_public_private_exist_ok_and_namespaces(hub: FakeHub) -> None:
    alice = client_for(hub)
    url = alice.create_repo("alice/public")
    assert (url.repo_id, url.endpoint) == ("alice/public", hub.url)
    alice.create_repo("alice/secret", private=True)
    assert alice.model_info("alice/public").private is False
    assert alice.model_info("alice/secret").private is True
    assert alice.create_repo("alice/public", exist_ok=True).repo_id == "alice/public"
    with pytest.raises(HfHubHTTPError) as conflict:
        alice.create_repo("alice/public")
    assert conflict.value.response.status_code == 409
    with pytest.raises(HfHubHTTPError) as forbidden:
        alice.create_repo("bob/by-alice")
    assert forbidden.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as anonymous:
        client_for(hub, False).create_repo("alice/anonymous")
    assert anonymous.value.response.status_code == 401
    assert alice.create_repo("alice/data", repo_type="dataset").repo_type == "dataset"
    assert not alice.repo_exists("bob/by-alice")
    assert [c["message"] for c in hub.commits("alice/public")] == ["initial commit"]


def test_upload_folder_sends_the_large_file_through_lfs_and_downloads_are_identical(
        hub: FakeHub, uploaded: str, model_folder: Path, tmp_path: Path) -> None:
    client = client_for(hub)
    assert set(client.list_repo_files(uploaded)) == {".gitattributes", "README.md", "config.json",
                                                     "model.safetensors"}
    weights_sha = sha256_of(model_folder / "model.safetensors")
    assert hub.lfs_events == [(event, uploaded, weights_sha) for event in ("batch", "upload", "verify")]
    assert [method for method, _ in hub.requests].count("PUT") == 1
    last = hub.commits(uploaded)[-1]
    assert (last["author"], last["lfs"]) == ("alice", ["model.safetensors"])
    assert sorted(last["added"]) == ["README.md", "config.json", "model.safetensors"]
    tree = {entry.path: entry for entry in client.list_repo_tree(uploaded, recursive=True)}
    assert tree["model.safetensors"].lfs.sha256 == weights_sha
    assert tree["config.json"].lfs is None

    for name in ("model.safetensors", "config.json", "README.md"):
        path = hf_hub_download(uploaded, name, cache_dir=tmp_path / "cache-1", endpoint=hub.url, token=False)
        assert Path(path).read_bytes() == (model_folder / name).read_bytes(), name
    snapshot = Path(snapshot_download(uploaded, cache_dir=tmp_path / "cache-2", endpoint=hub.url, token=False))
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (snapshot / name).read_bytes() == (model_folder / name).read_bytes(), name
    assert snapshot.name == client.model_info(uploaded).sha
    assert hub.files(uploaded)["model.safetensors"] == (model_folder / "model.safetensors").read_bytes()


def test_reuploading_identical_files_makes_no_commit_and_a_change_commits_only_that_file(
        hub: FakeHub, uploaded: str, model_folder: Path, tmp_path: Path) -> None:
    client = client_for(hub)
    before = hub.commits(uploaded)
    info = client.upload_folder(repo_id=uploaded, folder_path=model_folder)
    assert hub.commits(uploaded) == before
    assert info.oid == before[-1]["oid"]
    assert [event for event, _, _ in hub.lfs_events].count("upload") == 1  # the batch had nothing to upload

    changed = tmp_path / "changed"
    shutil.copytree(model_folder, changed)
    (changed / "config.json").write_text(json.dumps({**CONFIG, "hidden_size": 64}))
    client.upload_folder(repo_id=uploaded, folder_path=changed)
    after = hub.commits(uploaded)
    assert len(after) == len(before) + 1
    assert (after[-1]["added"], after[-1]["lfs"]) == (["config.json"], [])


def test_private_repo_is_readable_by_its_owner_only_and_others_cannot_write(hub: FakeHub, tmp_path: Path) -> None:
    alice, bob, anonymous = client_for(hub), client_for(hub, "tok-bob"), client_for(hub, False)
    alice.create_repo("alice/secret", private=True)
    alice.create_commit("alice/secret", [CommitOperationAdd("config.json", b"{}")], commit_message="config")
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "config.json", cache_dir=tmp_path / "anon", endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        bob.list_repo_files("alice/secret")
    path = hf_hub_download("alice/secret", "config.json", cache_dir=tmp_path / "alice", endpoint=hub.url,
                           token="tok-alice")
    assert Path(path).read_bytes() == b"{}"

    alice.create_repo("alice/public")
    with pytest.raises(HfHubHTTPError) as forbidden:
        bob.create_commit("alice/public", [CommitOperationAdd("x.txt", b"x")], commit_message="by bob")
    assert forbidden.value.response.status_code == 403
    assert not isinstance(forbidden.value, RepositoryNotFoundError)
    with pytest.raises(RepositoryNotFoundError):
        bob.create_commit("alice/secret", [CommitOperationAdd("x.txt", b"x")], commit_message="by bob")
    with pytest.raises(HfHubHTTPError) as unauthenticated:
        anonymous.create_commit("alice/public", [CommitOperationAdd("x.txt", b"x")], commit_message="anonymous")
    assert unauthenticated.value.response.status_code == 401
    assert len(hub.commits("alice/public")) == 1


@pytest.mark.parametrize(("card", "error"), [
    (URL_BASE_MODEL_CARD, '"base_model" with value "https://huggingface.co/meta-llama/Llama-3.2-1B" is not valid'),
    (BAD_RELATION_CARD, '"base_model_relation" must be one of [adapter, merge, quantized, finetune]'),
    ("---\ntags: int8\n---\n", '"tags" must be an array of strings'),
    ("---\nmodel-index:\n- name: m\n  results:\n  - task: {type: text-generation}\n---\n", ".dataset must have"),
    ("---\n- a list\n---\n", "must be a mapping"),
    ("---\nbase_model: [unclosed\n---\n", "Invalid YAML"),
    (GOOD_CARD, None),
], ids=["url-base-model", "quantised", "tags-string", "model-index", "not-a-mapping", "bad-yaml", "good"])
def test_validate_yaml_applies_the_hub_rules(hub: FakeHub, card: str, error: str | None) -> None:
    status, headers, body = raw(hub, "POST", "/api/validate-yaml",
                                json.dumps({"content": card, "repoType": "model"}).encode(),
                                {"Content-Type": "application/json"})
    answer = json.loads(body)
    assert (status, answer["warnings"]) == ((200, []) if error is None else (400, []))
    messages = [e["message"] for e in answer["errors"]]
    if error is None:
        assert messages == []
    else:
        assert any(error in m for m in messages), messages
    assert headers["Content-Length"] == str(len(body))


def test_invalid_card_metadata_is_refused_by_the_client_and_by_the_commit_endpoint(hub: FakeHub) -> None:
    client = client_for(hub)
    client.create_repo("alice/card")
    with pytest.raises(ValueError, match="base_model_relation"):
        client.create_commit("alice/card", [CommitOperationAdd("README.md", BAD_RELATION_CARD.encode())],
                             commit_message="card")
    body = ndjson({"key": "header", "value": {"summary": "raw"}},
                  {"key": "file", "value": {"path": "README.md", "encoding": "base64",
                                            "content": base64.b64encode(URL_BASE_MODEL_CARD.encode()).decode()}})
    status, _, answer = raw(hub, "POST", "/api/models/alice/card/commit/main", body,
                            {"Authorization": "Bearer tok-alice", "Content-Type": "application/x-ndjson"})
    assert status == 400 and b"base_model" in answer
    client.create_commit("alice/card", [CommitOperationAdd("README.md", GOOD_CARD.encode())], commit_message="ok")
    assert [c["message"] for c in hub.commits("alice/card")] == ["initial commit", "ok"]
    assert client.model_info("alice/card").card_data.base_model == "meta-llama/Llama-3.2-1B"


@pytest.mark.skipif(HUB_MAJOR < 2, reason="huggingface_hub < 2 posts ModelCard.validate to huggingface.co")
def test_model_card_validate_uses_the_fake_hub(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    ModelCard(GOOD_CARD).validate()
    with pytest.raises(ValueError, match="base_model"):
        ModelCard(URL_BASE_MODEL_CARD).validate()


def test_missing_repo_file_and_revision_raise_the_client_errors(hub: FakeHub, tmp_path: Path) -> None:
    client = client_for(hub)
    client.create_repo("alice/sparse")
    with pytest.raises(RepositoryNotFoundError):
        client.model_info("alice/nothing-here")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/nothing-here", "config.json", cache_dir=tmp_path, endpoint=hub.url)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("alice/sparse", "config.json", cache_dir=tmp_path, endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        client.model_info("alice/sparse", revision="v1.0")
    assert not client.file_exists("alice/sparse", "config.json")
    assert client.file_exists("alice/sparse", ".gitattributes")


def test_a_stopped_server_gives_a_connection_error(hub: FakeHub) -> None:
    client = client_for(hub)
    client.create_repo("alice/gone")  # leaves a keep-alive connection in the client's pool
    hub.stop()
    with pytest.raises(Exception) as excinfo:
        client.model_info("alice/gone")
    assert type(excinfo.value).__name__ == "ConnectError"


def test_parent_commit_mismatch_is_refused_with_412(hub: FakeHub) -> None:
    client = client_for(hub)
    client.create_repo("alice/race")
    parent = client.model_info("alice/race").sha
    client.create_commit("alice/race", [CommitOperationAdd("a.txt", b"a")], commit_message="a", parent_commit=parent)
    with pytest.raises(HfHubHTTPError) as excinfo:
        client.create_commit("alice/race", [CommitOperationAdd("b.txt", b"b")], commit_message="b",
                             parent_commit=parent)
    assert excinfo.value.response.status_code == 412
    assert hub.files("alice/race").keys() == {".gitattributes", "a.txt"}


def test_resolve_headers_etags_and_ranges(hub: FakeHub, uploaded: str, model_folder: Path,
                                          request: pytest.FixtureRequest) -> None:
    head = client_for(hub).model_info(uploaded).sha
    weights = (model_folder / "model.safetensors").read_bytes()
    conn = connect(hub)
    request.addfinalizer(conn.close)
    status, headers, body = raw(hub, "HEAD", f"/{uploaded}/resolve/main/model.safetensors", conn=conn)
    assert (status, body) == (200, b"")
    assert headers["ETag"] == headers["X-Linked-Etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
    assert headers["X-Linked-Size"] == headers["Content-Length"] == str(len(weights))
    assert headers["X-Repo-Commit"] == head
    status, headers, body = raw(hub, "GET", f"/{uploaded}/resolve/{head}/model.safetensors",
                                headers={"Range": "bytes=100-199"}, conn=conn)
    assert (status, body, headers["Content-Range"]) == (206, weights[100:200], f"bytes 100-199/{len(weights)}")
    config = (model_folder / "config.json").read_bytes()
    _, headers, body = raw(hub, "GET", f"/{uploaded}/resolve/main/config.json", conn=conn)
    git_oid = hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    assert (body, headers["ETag"], headers.get("X-Linked-Etag")) == (config, f'"{git_oid}"', None)
    status, headers, _ = raw(hub, "GET", f"/{uploaded}/resolve/main/missing.bin", conn=conn)
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", head)


def test_malformed_requests_get_json_errors_on_a_reusable_connection(hub: FakeHub,
                                                                     request: pytest.FixtureRequest) -> None:
    client_for(hub).create_repo("alice/robust")
    conn = connect(hub)
    request.addfinalizer(conn.close)
    alice = {"Authorization": "Bearer tok-alice"}
    unknown_object = "0" * 64
    cases = [
        ("POST", "/api/repos/create", b"{not json", alice, 400, "malformed JSON"),
        ("GET", "/no/such/route/at/all", None, {}, 404, "not found"),
        ("GET", "/api/agent-harnesses", None, {}, 404, "not found"),
        ("GET", "/api/models/alice/robust", None, {"Authorization": "Bearer nope"}, 401, "Invalid credentials"),
        ("POST", "/api/models/alice/robust/commit/main", ndjson({"key": "file", "value": {}}), alice, 400, "header"),
        ("POST", "/api/models/alice/robust/commit/main",
         ndjson({"key": "header", "value": {"summary": "s"}},
                {"key": "file", "value": {"path": "a", "encoding": "base64", "content": "%%%"}}), alice, 400, "base64"),
        ("POST", "/api/models/alice/robust/commit/main",
         ndjson({"key": "header", "value": {"summary": "s"}},
                {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": unknown_object, "size": 1}}),
         alice, 400, "was not uploaded"),
        ("POST", "/api/models/alice/robust/commit/main",
         ndjson({"key": "header", "value": {"summary": "s"}}, {"key": "file", "value": {"path": "../x"}}),
         alice, 400, "invalid path"),
        ("PUT", f"/__fakehub/lfs-upload?repo_type=model&repo_id=alice/robust&oid={unknown_object}&size=1&sig=x",
         b"x", {}, 403, "signature"),
        ("GET", "/api/models/alice/robust/xet-write-token/main", None, alice, 501, "HF_HUB_DISABLE_XET=1"),
        ("POST", "/api/models/alice/robust/preupload/main", b'{"files": 3}', alice, 400, "preupload expects"),
        ("DELETE", "/api/whoami-v2", None, alice, 405, "not allowed"),
    ]
    for method, path, body, headers, status, message in cases:
        got_status, got_headers, got_body = raw(hub, method, path, body, headers, conn=conn)
        assert got_status == status, (method, path, got_body)
        assert message in json.loads(got_body)["error"], (method, path, got_body)
        assert got_headers["Content-Length"] == str(len(got_body))
    assert len(hub.commits("alice/robust")) == 1
    assert raw(hub, "GET", "/api/models/alice/robust", conn=conn)[0] == 200  # same connection, still in sync


def test_delete_repo(hub: FakeHub) -> None:
    alice, bob = client_for(hub), client_for(hub, "tok-bob")
    alice.create_repo("alice/doomed")
    with pytest.raises(HfHubHTTPError) as forbidden:
        bob.delete_repo("alice/doomed")
    assert forbidden.value.response.status_code == 403
    alice.delete_repo("alice/doomed")
    assert not alice.repo_exists("alice/doomed")
    with pytest.raises(KeyError):
        hub.commits("alice/doomed")
    alice.delete_repo("alice/doomed", missing_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        alice.delete_repo("alice/doomed")


def test_dataset_repo_round_trip_through_lfs(hub: FakeHub, tmp_path: Path) -> None:
    client = client_for(hub)
    client.create_repo("alice/table", repo_type="dataset")
    data = random.Random(1).randbytes(4096)
    client.create_commit("alice/table", [CommitOperationAdd("data/train.parquet", data),
                                         CommitOperationAdd("README.md", b"---\nlicense: mit\n---\n")],
                         commit_message="data", repo_type="dataset")
    assert hub.commits("alice/table", "dataset")[-1]["lfs"] == ["data/train.parquet"]
    assert ("POST", "/datasets/alice/table.git/info/lfs/objects/batch") in hub.requests
    assert client.list_repo_files("alice/table", repo_type="dataset") == [
        ".gitattributes", "README.md", "data/train.parquet"]
    path = hf_hub_download("alice/table", "data/train.parquet", repo_type="dataset", cache_dir=tmp_path,
                           endpoint=hub.url)
    assert Path(path).read_bytes() == data
    with pytest.raises(RepositoryNotFoundError):
        client.model_info("alice/table")  # a dataset is not a model


def test_xet_left_on_fails_at_the_xet_token_route(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """hf_xet asks for the token itself (in Rust), so the 501 message does not reach the exception; the route does."""
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", False)
    client = client_for(hub)
    client.create_repo("alice/xet")
    with pytest.raises(Exception, match="501"):
        client.create_commit("alice/xet", [CommitOperationAdd("w.safetensors", b"\0" * 64)], commit_message="w")
    assert any(path.startswith("/api/models/alice/xet/xet-write-token/") for _, path in hub.requests)
    assert len(hub.commits("alice/xet")) == 1


def test_transformers_loads_a_config_through_hf_endpoint(hub: FakeHub, tmp_path: Path) -> None:
    client = client_for(hub)
    client.create_repo("alice/tiny-bert")
    client.create_commit("alice/tiny-bert", [CommitOperationAdd("config.json", json.dumps(CONFIG).encode())],
                         commit_message="config")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home")}
    code = ("from transformers import AutoConfig\n"
            "c = AutoConfig.from_pretrained('alice/tiny-bert')\n"
            "print(c.model_type, c.hidden_size, c.num_hidden_layers)\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["bert", "32", "2"]
    assert any(method == "GET" and path.endswith("/config.json") and path.startswith("/alice/tiny-bert/resolve/")
               for method, path in hub.requests)


def test_command_line_prints_the_ready_line_and_serves(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-m", "qformat.testing.fakehub", "--port", "0",
                                "--user", "tok-carol:carol", "--root", str(tmp_path / "root")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if not select.select([process.stdout], [], [], 60)[0]:
            pytest.fail("no FAKEHUB_READY line within 60 s")
        line = process.stdout.readline()
        assert line.startswith("FAKEHUB_READY http://127.0.0.1:"), line or process.stderr.read()  # "": it died
        url = line.split()[1]
        with closing(http.client.HTTPConnection(urlsplit(url).netloc, timeout=10)) as conn:
            conn.request("GET", "/api/whoami-v2", headers={"Authorization": "Bearer tok-carol"})
            assert json.loads(conn.getresponse().read())["name"] == "carol"
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == 0
