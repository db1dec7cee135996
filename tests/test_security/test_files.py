"""Files that must not escape their folder: writes never follow a planted symlink, a push uploads only regular files
inside DIR, support files are copied only from inside SOURCE, a dead run's temporary folder is cleaned up (never a
live run's), OUTPUT created by someone else mid-run is a one-line error, and a malformed --endpoint is refused.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import qformat
from qformat.cli.main import cli
from qformat.errors import OutputError, QFormatError, SourceError
from qformat.io.atomic import TEMP_MARKER, atomic_output_dir
from qformat.testing.fakehub import FakeHub

TOKENS = {"tok-alice": "alice"}
SECRET = "hf_secret_token_do_not_publish\n"


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory) -> Path:
    return qformat.convert(tiny_models["llama"], tmp_path_factory.mktemp("sec") / "ckpt", scheme="w8a8-int8",
                           base_model="qformat-test/tiny-llama").output


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside every folder under test, holding a secret file and a subfolder."""
    folder = tmp_path / "outside"
    (folder / "ssl").mkdir(parents=True)
    (folder / "token").write_text(SECRET)
    (folder / "ssl" / "cert.pem").write_text("cert\n")
    return folder


@pytest.fixture
def cli_push(monkeypatch):
    """`qformat push` in process, without it installing its signal handlers in the test process."""
    import qformat.cli.push

    monkeypatch.setattr(qformat.cli.push, "install_signal_handlers", lambda: None)
    return lambda *args: CliRunner().invoke(cli, ["push", *map(str, args)])


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".qformat-" in p.name)


# --- symlink write -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [".README.md.qformat-tmp", "README.md"])
@pytest.mark.parametrize("dangling", [False, True])
def test_card_never_writes_through_a_planted_link(checkpoint, outside, tmp_path, name, dangling):
    folder = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    victim = outside / ("created.pth" if dangling else "token")
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(victim)
    result = CliRunner().invoke(cli, ["card", str(folder)])
    if dangling:
        assert not victim.exists()
    else:
        assert victim.read_text() == SECRET
    assert sorted(os.listdir(outside)) == ["ssl", "token"]
    readme = folder / "README.md"
    if name == "README.md":  # a linked source card is not read either (its target would be published): refused
        assert result.exit_code == 2 and "symbolic link" in result.output, result.output
        assert readme.is_symlink()
        return
    assert result.exit_code == 0, result.output
    assert not readme.is_symlink() and readme.is_file()
    assert "qformat" in readme.read_text()


def test_write_file_atomic_replaces_a_link_and_leaves_no_temp(tmp_path, outside):
    from qformat.io.atomic import write_file_atomic

    (tmp_path / "notes.txt").symlink_to(outside / "token")
    path = write_file_atomic(tmp_path, "notes.txt", b"new\n")
    assert path == tmp_path / "notes.txt" and not path.is_symlink() and path.read_bytes() == b"new\n"
    assert (outside / "token").read_text() == SECRET
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "outside"]
    with pytest.raises(ValueError):
        write_file_atomic(tmp_path, "../escape.txt", b"x")


# --- symlink upload ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with FakeHub(TOKENS, root=tmp_path_factory.mktemp("sec-hub")) as server:
        yield server


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def _plant(folder: Path, outside: Path, case: str) -> str:
    """Put one thing a push must refuse into `folder`; return its path relative to `folder`."""
    if case == "link to a file outside":
        (folder / "notes.txt").symlink_to(outside / "token")
        return "notes.txt"
    if case == "link to a file inside":
        (folder / "copy.json").symlink_to(folder / "config.json")
        return "copy.json"
    if case == "link to a folder":
        (folder / "extra").symlink_to(outside / "ssl", target_is_directory=True)
        return "extra"
    if case == "nested link":
        (folder / "sub").mkdir()
        (folder / "sub" / "token").symlink_to(outside / "token")
        return "sub/token"
    if case == "readme link":
        (folder / "README.md").unlink(missing_ok=True)
        (folder / "README.md").symlink_to(outside / "token")
        return "README.md"
    os.mkfifo(folder / "pipe")
    return "pipe"


@pytest.mark.parametrize("case", ["link to a file outside", "link to a file inside", "link to a folder",
                                  "nested link", "readme link", "fifo"])
def test_push_uploads_only_regular_files_inside_the_folder(hub, online, checkpoint, outside, tmp_path, case):
    from qformat.hub import push

    folder = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    planted = _plant(folder, outside, case)
    repo = f"alice/sec-{case.replace(' ', '-')}"
    with pytest.raises(QFormatError, match=planted) as info:
        push(folder, repo, endpoint=hub.url, token="tok-alice", keep_card=case == "readme link")
    assert "\n" not in str(info.value)
    with pytest.raises(KeyError):  # refused before the repo was even created
        hub.files(repo)


def test_push_refusal_is_one_cli_line(cli_push, checkpoint, outside, tmp_path):
    folder = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    (folder / "notes.txt").symlink_to(outside / "token")
    result = cli_push(folder, "alice/x", "--token", "tok-alice")
    assert result.exit_code == 2, result.output
    assert "notes.txt" in result.output and "symlink" in result.output
    assert "Traceback" not in result.output and SECRET.strip() not in result.output


# --- symlink copy ------------------------------------------------------------------------------------------------

def _source(tiny_models, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_models["llama"], tmp_path / "src"))


@pytest.mark.parametrize("case", ["file outside", "folder outside", "up", "dangling", "fifo"])
def test_convert_copies_nothing_from_outside_the_source(tiny_models, tmp_path, outside, case):
    src = _source(tiny_models, tmp_path)
    (tmp_path / "outputs").mkdir()
    out = tmp_path / "outputs" / "out"
    name = {"file outside": "token.txt", "folder outside": "ssl", "up": "up", "dangling": "gone.json",
            "fifo": "pipe"}[case]
    if case == "file outside":
        (src / name).symlink_to(outside / "token")
    elif case == "folder outside":
        (src / name).symlink_to(outside / "ssl", target_is_directory=True)
    elif case == "up":
        (src / name).symlink_to("..", target_is_directory=True)
    elif case == "dangling":
        (src / name).symlink_to(tmp_path / "nowhere.json")
    else:
        os.mkfifo(src / name)
    with pytest.raises(SourceError, match=name) as info:
        qformat.convert(src, out, scheme="w8a16-int8")
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path / "outputs") == []


def test_a_link_inside_the_source_is_copied_as_a_regular_file(tiny_models, tmp_path):
    src = _source(tiny_models, tmp_path)
    (src / "extra").mkdir()
    (src / "extra" / "alias.json").symlink_to("../tokenizer_config.json")
    out = qformat.convert(src, tmp_path / "out", scheme="w8a16-int8").output
    copied = out / "extra" / "alias.json"
    assert not copied.is_symlink() and copied.read_bytes() == (src / "tokenizer_config.json").read_bytes()


def _cache_snapshot(model: Path, hub_cache: Path, repo: str, commit: str) -> Path:
    """A Hugging Face cache entry laid out as huggingface_hub lays it out: every snapshot file a relative symlink
    into ../../blobs (deeper for files in subfolders)."""
    owner, name = repo.split("/")
    root = hub_cache / f"models--{owner}--{name}"
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for index, path in enumerate(sorted(p for p in model.rglob("*") if p.is_file())):
        rel = path.relative_to(model)
        blob = root / "blobs" / f"blob{index:04d}"
        shutil.copyfile(path, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_hub_cache_snapshots_of_symlinks_still_convert(tiny_models, tmp_path):
    model = _source(tiny_models, tmp_path)
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    snapshot = _cache_snapshot(model, tmp_path / "hub", "sec-user/tiny-llama", "ab" * 20)
    out = qformat.convert(snapshot, tmp_path / "out", scheme="w8a16-int8").output
    for rel in ("tokenizer_config.json", "1_Pooling/config.json"):
        assert not (out / rel).is_symlink() and (out / rel).read_bytes() == (model / rel).read_bytes()
    source = qformat.verify(out)
    assert source.linear_modules > 0


def test_a_cache_snapshot_link_leaving_the_repo_folder_is_refused(tiny_models, tmp_path, outside):
    snapshot = _cache_snapshot(_source(tiny_models, tmp_path), tmp_path / "hub", "sec-user/tiny", "cd" * 20)
    (snapshot / "token.txt").symlink_to(outside / "token")
    with pytest.raises(SourceError, match="token.txt"):
        qformat.convert(snapshot, tmp_path / "out", scheme="w8a16-int8")


# --- stale temporary folders -------------------------------------------------------------------------------------

BLOCK_MID_CONVERT = """
import sys, time, qformat
import qformat.converter.api as api
copy = api.copy_support_files
def copy_then_stop(source, target, *args, **kwargs):
    result = copy(source, target, *args, **kwargs)
    print(target, flush=True)
    time.sleep(600)
    return result
api.copy_support_files = copy_then_stop
qformat.convert(sys.argv[1], sys.argv[2], scheme="w8a16-int8")
"""


def _start_blocked_convert(src: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", BLOCK_MID_CONVERT, str(src), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line, proc.communicate(timeout=60)[1]
    return proc, Path(line)


def test_a_run_killed_by_sigkill_is_cleaned_up_by_the_next(tiny_models, tmp_path):
    src = _source(tiny_models, tmp_path)
    (tmp_path / "outputs").mkdir()
    out = tmp_path / "outputs" / "out"
    proc, tmp = _start_blocked_convert(src, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert tmp.is_dir() and TEMP_MARKER in tmp.name  # what kill -9 leaves behind
    qformat.convert(src, out, scheme="w8a16-int8")
    assert _leftovers(out.parent) == []
    assert sorted(os.listdir(out.parent)) == ["out"]
    assert not any(".qformat-" in p.name for p in out.iterdir())


def test_a_live_runs_temporary_folder_is_left_alone(tiny_models, tmp_path):
    src = _source(tiny_models, tmp_path)
    (tmp_path / "outputs").mkdir()
    out = tmp_path / "outputs" / "out"
    proc, tmp = _start_blocked_convert(src, out)
    try:
        with atomic_output_dir(tmp_path / "outputs" / "other") as mine:
            (mine / "x").write_text("x")
        assert tmp.is_dir() and (tmp / "tokenizer_config.json").is_file()
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    with atomic_output_dir(tmp_path / "outputs" / "third"):
        pass
    assert sorted(os.listdir(out.parent)) == ["other", "third"]


def test_an_overwrite_killed_between_the_renames_gets_its_old_output_back(tmp_path):
    """The state kill -9 leaves between moving the old OUTPUT aside and renaming the new one in."""
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "v1").write_text("old")
    token = "0123456789ab"
    old = tmp_path / f".out.qformat-old-{token}"
    os.rename(out, old)
    (tmp_path / f".out{TEMP_MARKER}{token}").mkdir()
    (tmp_path / f".out.qformat-lock-{token}").write_text("")
    with atomic_output_dir(tmp_path / "other"):
        pass
    assert (out / "v1").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["other", "out"]


def test_cleanup_never_follows_a_link_named_like_a_temp_folder(tmp_path, outside):
    (tmp_path / f".out{TEMP_MARKER}0123456789ab").symlink_to(outside, target_is_directory=True)
    (tmp_path / ".out.qformat-old-0123456789ab").symlink_to(outside, target_is_directory=True)
    with atomic_output_dir(tmp_path / "other"):
        pass
    assert (outside / "token").read_text() == SECRET and (outside / "ssl" / "cert.pem").exists()


# --- OUTPUT created by someone else during the run ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["folder", "file", "symlink"])
def test_output_created_during_the_rename_is_a_one_line_error(tmp_path, monkeypatch, kind):
    out = tmp_path / "out"
    rename = os.rename

    def racing_rename(src, dst, *args, **kwargs):
        if Path(dst) == out and TEMP_MARKER in Path(src).name:  # another process wins the race for OUTPUT
            if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
                out.rmdir()
            if kind == "folder":
                out.mkdir(exist_ok=True)
                (out / "theirs").write_text("theirs")
            elif kind == "file":
                out.write_text("theirs")
            else:
                out.symlink_to(tmp_path / "elsewhere")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", racing_rename)
    monkeypatch.setattr(os, "replace", racing_rename)
    with pytest.raises(OutputError, match="out") as info:
        with atomic_output_dir(out) as tmp:
            (tmp / "mine").write_text("mine")
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    if kind == "folder":
        assert sorted(os.listdir(out)) == ["theirs"]
    elif kind == "file":
        assert out.read_text() == "theirs"
    else:
        assert out.is_symlink()
    assert _leftovers(tmp_path) == []


# --- malformed --endpoint ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ["not a url", "ftp://x", "http://[::1", "http://", "https://host:port",
                                      "file:///etc/passwd"])
def test_a_malformed_endpoint_is_one_line(cli_push, checkpoint, endpoint):
    result = cli_push(checkpoint, "alice/x", "--token", "tok-alice", "--endpoint", endpoint)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--endpoint" in lines[0] and "internal error" not in lines[0], result.output



def test_card_check_never_reads_a_linked_readme(checkpoint, outside, tmp_path):
    """`card --check` refuses a README.md linked outside the checkpoint too (never quoting the token it points at)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    (folder / "README.md").unlink(missing_ok=True)
    (folder / "README.md").symlink_to(outside / "token")
    result = CliRunner().invoke(cli, ["card", "--check", str(folder)])
    assert result.exit_code == 2, result.output
    assert "symbolic link" in result.output and SECRET.strip() not in result.output
    assert (outside / "token").read_text() == SECRET and (folder / "README.md").is_symlink()
