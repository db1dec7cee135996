"""`qformat push` and Hub sources end to end, against the test Hub (qformat.testing.fakehub) with the real client.

The CLI and transformers run in subprocesses whose environment points huggingface_hub at the test Hub
(HF_ENDPOINT, HF_HUB_DISABLE_XET=1: the test Hub speaks classic LFS, not Xet, see hub-and-models.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qformat
from qformat.testing.fakehub import FakeHub

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with FakeHub(TOKENS, root=tmp_path_factory.mktemp("hub-blobs")) as server:
        yield server


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """In-process client calls: online, classic LFS (huggingface_hub reads these constants at every call)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture(scope="module")
def ckpt(tiny_models, tmp_path_factory) -> Path:
    return qformat.convert(tiny_models["llama"], tmp_path_factory.mktemp("push") / "llama-int8", scheme="w8a8-int8",
                           base_model="qformat-test/tiny-llama").output


def hub_env(hub: FakeHub, tmp_path: Path, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_OFFLINE="0")
    if token:
        env["HF_TOKEN"] = token
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qformat", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def one_line_failure(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qformat: error: "), result.stderr
    assert "Traceback" not in result.stderr and words in lines[0], lines[0]
    for token in TOKENS:
        assert token not in result.stderr + result.stdout


LOAD_AND_COMPARE = """
import sys, torch, qformat
from transformers import AutoModelForCausalLM
remote = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
local = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
ids = torch.tensor([[5, 17, 42, 99, 3, 200]])
with torch.no_grad():
    a, b = remote(ids).logits, local(ids).logits
print(type(remote.model.layers[0].mlp.up_proj).__name__, bool(torch.equal(a, b)))
"""


def test_convert_card_push_and_load_from_the_hub(hub, ckpt, tmp_path):
    env = hub_env(hub, tmp_path, token="tok-alice")
    result = run(["push", str(ckpt), "alice/tiny-llama-int8"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"{hub.url}/alice/tiny-llama-int8") and "generated card" in result.stdout
    commits = hub.commits("alice/tiny-llama-int8")
    assert [c["message"] for c in commits][:1] == ["initial commit"] and len(commits) == 2  # the push: one commit
    files = hub.files("alice/tiny-llama-int8")
    assert set(files) >= {"config.json", "model.safetensors", "README.md", "generation_config.json"}
    assert files["model.safetensors"] == (ckpt / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert "base_model: qformat-test/tiny-llama" in card and "base_model_relation: quantized" in card
    assert 'from_pretrained("alice/tiny-llama-int8"' in card
    # the large file went through LFS batch -> PUT -> verify, on the server's own record
    oid = __import__("hashlib").sha256(files["model.safetensors"]).hexdigest()
    events = [e for e, repo, o in hub.lfs_events if repo == "alice/tiny-llama-int8" and o == oid]
    assert events[:3] == ["batch", "upload", "verify"]
    load = subprocess.run([sys.executable, "-c", LOAD_AND_COMPARE, "alice/tiny-llama-int8", str(ckpt)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert load.returncode == 0, load.stderr
    assert load.stdout.split() == ["QuantLinear", "True"]


def test_push_leaves_the_folder_alone_and_repush_makes_no_commit(hub, ckpt, tmp_path):
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    env = hub_env(hub, tmp_path, token="tok-alice")
    assert run(["push", str(ckpt), "alice/repush"], env).returncode == 0
    count = len(hub.commits("alice/repush"))
    again = run(["push", str(ckpt), "alice/repush"], env)
    assert again.returncode == 0 and "no changes, no commit" in again.stdout
    assert len(hub.commits("alice/repush")) == count
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before


def test_push_never_deletes_remote_files_unless_asked(hub, ckpt, tmp_path):
    from huggingface_hub import CommitOperationAdd, HfApi

    env = hub_env(hub, tmp_path, token="tok-alice")
    assert run(["push", str(ckpt), "alice/extra"], env).returncode == 0
    HfApi(endpoint=hub.url, token="tok-alice").create_commit(
        "alice/extra", [CommitOperationAdd(path_in_repo="notes.txt", path_or_fileobj=b"keep me")], commit_message="x")
    assert run(["push", str(ckpt), "alice/extra", "--commit-message", "again"], env).returncode == 0
    assert "notes.txt" in hub.files("alice/extra")
    assert run(["push", str(ckpt), "alice/extra", "--delete-extra"], env).returncode == 0
    assert "notes.txt" not in hub.files("alice/extra")


def test_private_repo_needs_the_token(hub, ckpt, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    assert run(["push", str(ckpt), "alice/secret", "--private"], hub_env(hub, tmp_path, "tok-alice")).returncode == 0
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "config.json", endpoint=hub.url, token=False, cache_dir=tmp_path / "c1")
    path = hf_hub_download("alice/secret", "config.json", endpoint=hub.url, token="tok-alice",
                           cache_dir=tmp_path / "c2")
    assert json.loads(Path(path).read_text())["quantization_config"]["quant_method"] == "qformat"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def owned_repo(hub, ckpt, tmp_path_factory) -> str:
    env = hub_env(hub, tmp_path_factory.mktemp("owned"), token="tok-alice")
    assert run(["push", str(ckpt), "alice/owned"], env).returncode == 0
    return "alice/owned"


@pytest.mark.parametrize("case, words", [
    ("wrong token", "rejected the credentials (401)"),
    ("no token", "not logged in to the Hub"),
    ("other user's repo", "you cannot write to alice/owned (403)"),
    ("missing branch", "branch 'nope' does not exist"),
    ("server down", "cannot reach the Hub"),
])
def test_push_errors_are_one_line(hub, ckpt, owned_repo, tmp_path, case, words):
    env = hub_env(hub, tmp_path, token="tok-alice")
    args = ["push", str(ckpt), owned_repo]
    if case == "wrong token":
        env["HF_TOKEN"] = "tok-mallory"
    elif case == "no token":
        env.pop("HF_TOKEN")
    elif case == "other user's repo":
        env["HF_TOKEN"] = "tok-bob"
    elif case == "missing branch":
        args += ["--revision", "nope"]
    else:
        args += ["--endpoint", f"http://127.0.0.1:{_closed_port()}"]
    one_line_failure(run(args, env), words)


def test_push_refuses_a_broken_checkpoint(hub, ckpt, tmp_path):
    import shutil

    broken = Path(shutil.copytree(ckpt, tmp_path / "broken"))
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["provenance"]["tensor_hashes"]["lm_head.weight"] = "sha256:" + "0" * 64
    (broken / "config.json").write_text(json.dumps(config))
    one_line_failure(run(["push", str(broken), "alice/broken"], hub_env(hub, tmp_path, "tok-alice")),
                     "refusing to push a checkpoint that fails verification")
    with pytest.raises(KeyError):  # refused before anything reached the Hub: not even the repo exists
        hub.commits("alice/broken")


def test_the_hub_validates_card_metadata(hub, ckpt, tmp_path):
    """Validation is real: the server rejects what the Hub rejects, and accepts the generated card."""
    import shutil

    from qformat.cards import render_card

    good = render_card(ckpt, repo_id="alice/cards")
    assert _validate(hub, good) == 200
    for bad in (good.replace("base_model: qformat-test/tiny-llama",
                             "base_model: https://huggingface.co/qformat-test/tiny-llama"),
                good.replace("base_model_relation: quantized", "base_model_relation: quantised")):
        assert _validate(hub, bad) == 400
    folder = Path(shutil.copytree(ckpt, tmp_path / "bad-card"))
    (folder / "README.md").write_text(good.replace("base_model_relation: quantized", "base_model_relation: quantised"))
    one_line_failure(run(["push", str(folder), "alice/cards", "--keep-card"], hub_env(hub, tmp_path, "tok-alice")),
                     "the Hub refused the card's metadata")


def _validate(hub: FakeHub, content: str) -> int:
    """POST a card to the server's validate-yaml endpoint, as the client does before committing a README."""
    import urllib.error
    import urllib.request

    body = json.dumps({"content": content, "repoType": "model"}).encode()
    request = urllib.request.Request(f"{hub.url}/api/validate-yaml", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


CONVERT_FROM_HUB = """
import sys, json, qformat
result = qformat.convert(sys.argv[1], sys.argv[2], scheme="w8a16-int8", revision=sys.argv[3])
print(json.dumps(json.loads(open(f"{sys.argv[2]}/config.json").read())["quantization_config"]["provenance"]["source"]))
"""


def test_convert_downloads_a_pinned_revision_from_the_hub(hub, tiny_models, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token="tok-alice")
    api.create_repo("alice/source-opt", exist_ok=True)
    first = api.upload_folder(repo_id="alice/source-opt", folder_path=str(tiny_models["opt"]), commit_message="v1")
    api.upload_file(repo_id="alice/source-opt", path_or_fileobj=b"# changed later\n", path_in_repo="NOTES.md")
    env = hub_env(hub, tmp_path, token="tok-alice")
    done = subprocess.run([sys.executable, "-c", CONVERT_FROM_HUB, "alice/source-opt", str(tmp_path / "out"),
                           first.oid], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    source = json.loads(done.stdout.strip().splitlines()[-1])
    assert (source["repo_id"], source["revision"], source["base_model"]) == ("alice/source-opt", first.oid,
                                                                            "alice/source-opt")
    assert not (tmp_path / "out" / "NOTES.md").exists()  # the pinned revision, not main
    assert qformat.verify(tmp_path / "out").linear_modules == 15
    missing = run(["convert", "alice/does-not-exist", str(tmp_path / "out2")], env)
    one_line_failure(missing, "neither a local folder nor a Hub repo you can read")


def test_import_a_compressed_tensors_repo_from_the_hub(hub, tmp_path):
    """`qformat import owner/name`: downloaded with huggingface_hub at a pinned revision, provenance recorded."""
    from huggingface_hub import HfApi

    from qformat.testing.ct_checkpoints import save_ct_checkpoint

    source = save_ct_checkpoint(tmp_path / "ct", {"group_0": ("FP8_DYNAMIC", ["Linear"])})
    api = HfApi(endpoint=hub.url, token="tok-alice")
    api.create_repo("alice/tiny-fp8-ct", exist_ok=True)
    first = api.upload_folder(repo_id="alice/tiny-fp8-ct", folder_path=str(source), commit_message="v1")
    api.upload_file(repo_id="alice/tiny-fp8-ct", path_or_fileobj=b"# later\n", path_in_repo="NOTES.md")
    env = hub_env(hub, tmp_path, token="tok-alice")
    done = run(["import", "alice/tiny-fp8-ct", str(tmp_path / "out"), "--revision", first.oid], env)
    assert done.returncode == 0, done.stderr
    assert "fp8-dynamic" in done.stdout and "base model        alice/tiny-fp8-ct" in done.stdout
    provenance = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["provenance"]
    assert (provenance["source"]["repo_id"], provenance["source"]["revision"]) == ("alice/tiny-fp8-ct", first.oid)
    assert provenance["command"] == f"qformat import alice/tiny-fp8-ct OUTPUT --revision {first.oid}"
    assert not (tmp_path / "out" / "NOTES.md").exists()
    assert qformat.verify(tmp_path / "out").quantized_modules == 14
    missing = run(["import", "alice/not-there", str(tmp_path / "out2")], env)
    one_line_failure(missing, "neither a local folder nor a Hub repo you can read")


PUSH_TO_HUB = """
import sys, qformat
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model.push_to_hub(sys.argv[2])
"""


def test_transformers_push_to_hub_uploads_a_valid_checkpoint(hub, ckpt, tmp_path):
    from huggingface_hub import snapshot_download

    env = hub_env(hub, tmp_path, token="tok-alice")
    done = subprocess.run([sys.executable, "-c", PUSH_TO_HUB, str(ckpt), "alice/via-transformers"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    local = snapshot_download("alice/via-transformers", endpoint=hub.url, token="tok-alice", cache_dir=tmp_path / "c")
    report = qformat.verify(local)
    assert report.linear_modules == 15 and report.quantized_modules == 14


def test_token_option_and_a_card_that_passes_check_is_kept(hub, ckpt, tmp_path):
    import shutil

    from qformat.cards import write_card

    folder = Path(shutil.copytree(ckpt, tmp_path / "with-card"))
    write_card(folder, repo_id="alice/kept")
    env = hub_env(hub, tmp_path)  # no HF_TOKEN: the --token option alone
    result = run(["push", str(folder), "alice/kept", "--token", "tok-alice"], env)
    assert result.returncode == 0 and "kept card" in result.stdout, result.stderr
    assert hub.files("alice/kept")["README.md"] == (folder / "README.md").read_bytes()
    assert "tok-alice" not in result.stdout + result.stderr
    assert not list((tmp_path / "hf-home").rglob("token"))  # the token was not written anywhere


QUANTIZE_ON_LOAD_AND_PUSH = """
import sys
from qformat import QFormatConfig
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], revision=sys.argv[2],
                                             quantization_config=QFormatConfig(scheme="w8a8-int8"))
model.push_to_hub(sys.argv[3])
"""


def test_quantized_on_load_from_the_hub_and_pushed(hub, tiny_models, ckpt, tmp_path):
    """from_pretrained(repo, quantization_config=QFormatConfig(...)) then push_to_hub: the uploaded checkpoint
    verifies, records the source repo and revision, and holds exactly the tensors `qformat convert` writes."""
    from huggingface_hub import HfApi, snapshot_download
    from safetensors.torch import load_file

    api = HfApi(endpoint=hub.url, token="tok-alice")
    api.create_repo("alice/source-llama", exist_ok=True)
    first = api.upload_folder(repo_id="alice/source-llama", folder_path=str(tiny_models["llama"]), commit_message="v1")
    env = hub_env(hub, tmp_path, token="tok-alice")
    done = subprocess.run([sys.executable, "-c", QUANTIZE_ON_LOAD_AND_PUSH, "alice/source-llama", first.oid,
                           "alice/llama-otf"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    local = snapshot_download("alice/llama-otf", endpoint=hub.url, token="tok-alice", cache_dir=tmp_path / "c")
    assert qformat.verify(local).quantized_modules == 14
    source = json.loads((Path(local) / "config.json").read_text())["quantization_config"]["provenance"]["source"]
    assert (source["repo_id"], source["revision"]) == ("alice/source-llama", first.oid)
    ours, converted = load_file(Path(local) / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert sorted(ours) == sorted(converted) and all(torch.equal(ours[k], converted[k]) for k in ours)
