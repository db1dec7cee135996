"""Atomic writes: whole output folders built beside OUTPUT and renamed into place, single files written under a
random name and renamed onto theirs; neither ever follows a symlink it did not create.

Output folders. A run builds ".<name>.qformat-tmp-<token>" beside OUTPUT and renames it onto OUTPUT only when
complete. An interrupted or failed run (exception, Ctrl-C, SIGTERM, full disk) removes the temporary folder and any
parent folders it had to create, so nothing is left beside OUTPUT and an existing OUTPUT is untouched. With
`overwrite`, the old OUTPUT is moved aside as ".<name>.qformat-old-<token>", the new one renamed in, and only then
is the old one deleted. The rename never replaces something another program put at OUTPUT meanwhile: OUTPUT is
first claimed with mkdir (which fails if any entry has the name), then the temporary folder is renamed onto that
empty claim.

Runs that die without unwinding (kill -9, SIGBUS, power loss). For its whole life a run holds an exclusive `flock`
on ".<name>.qformat-lock-<token>" beside OUTPUT, created before its temporary folder and removed after it is gone
(so OUTPUT never contains it). Every run first cleans up after dead runs in OUTPUT's parent folder: an entry whose
lock file it can lock, or that has no lock file, belongs to a dead run; its temporary folder is removed and its
moved-aside old OUTPUT is renamed back (or removed, when a new OUTPUT had already replaced it). Entries that are
symlinks or not folders are never touched, and a live run's lock cannot be taken, so its folders stay.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qformat.errors import OutputError, WriteError

try:
    import fcntl
except ImportError:  # no flock (Windows): runs cannot tell dead from live, so nothing is cleaned up
    fcntl = None  # type: ignore[assignment]

__all__ = ["TEMP_MARKER", "atomic_output_dir", "check_output_location", "remove_stale_temps", "write_file_atomic"]

#: Temporary folders are named ".<OUTPUT name>.qformat-tmp-<token>" beside OUTPUT.
TEMP_MARKER = ".qformat-tmp-"
#: An OUTPUT being replaced (`overwrite`) is moved aside as ".<OUTPUT name>.qformat-old-<token>".
_OLD_MARKER = ".qformat-old-"
#: The lock a run holds for its whole life: ".<OUTPUT name>.qformat-lock-<token>", a file beside OUTPUT.
_LOCK_MARKER = ".qformat-lock-"
#: A single file being written: ".<name>.qformat-write-<token>" beside it.
_WRITE_MARKER = ".qformat-write-"
_RUN_ENTRY = re.compile(r"^\.(?P<name>.+)(?P<marker>\.qformat-(?:tmp|old|lock)-)(?P<token>[0-9a-f]{12})$", re.DOTALL)


def _token() -> str:
    return uuid.uuid4().hex[:12]


def _sibling(output: Path, marker: str, token: str) -> Path:
    return output.parent / f".{output.name}{marker}{token}"


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_location(output: Path, *, source: Path | None, overwrite: bool) -> None:
    """Refuse an OUTPUT that would clobber data: an existing path without `overwrite`, or one inside SOURCE.

    Also refuses an OUTPUT that contains SOURCE (overwriting it would delete the source) and an OUTPUT that is a file.
    """
    out = output.resolve()
    if source is not None:
        src = source.resolve()
        if _is_within(out, src):
            raise OutputError(f"OUTPUT {output} lies inside SOURCE {source}; write it somewhere else (sources are "
                              "never modified)")
        if _is_within(src, out):
            raise OutputError(f"OUTPUT {output} contains SOURCE {source}; choose an OUTPUT outside the source")
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise OutputError(f"OUTPUT {output} exists and is not a folder; remove it or choose another OUTPUT")
        if not overwrite:
            raise OutputError(f"OUTPUT {output} already exists; pass --overwrite to replace it")


@contextmanager
def atomic_output_dir(output: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on normal exit it becomes `output`, on any exception it disappears.

    Temporary folders that dead runs left in `output`'s parent are removed first (see the module docstring).

    Raises:
        OutputError: OUTPUT appeared meanwhile (without `overwrite`), or another program created it during the rename.
        WriteError: the parent folder cannot be written.
    """
    output = Path(os.path.abspath(output))
    created = _make_parents(output.parent)
    done = False
    try:
        if not created:
            remove_stale_temps(output.parent)
        with _run_lock(output) as token:
            tmp = _sibling(output, TEMP_MARKER, token)
            try:
                tmp.mkdir()
            except OSError as exc:
                raise WriteError(f"cannot create {tmp.parent}: {exc.strerror}; choose an OUTPUT you can write to") \
                    from None
            try:
                yield tmp
                _move_into_place(tmp, output, token, overwrite=overwrite)
            except BaseException:
                _remove_tree(tmp)
                raise
        done = True
    finally:
        if not done:
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break


def _make_parents(parent: Path) -> list[Path]:
    """Create the missing folders above OUTPUT; return them, deepest first (to remove them again on failure)."""
    created: list[Path] = []
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    try:
        for folder in reversed(created):
            folder.mkdir()
    except OSError as exc:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                pass
        raise WriteError(f"cannot create {created[0]}: {exc.strerror}; choose an OUTPUT you can write to") from None
    return created


def _move_into_place(tmp: Path, output: Path, token: str, *, overwrite: bool) -> None:
    """Rename the finished `tmp` onto `output`, moving an existing OUTPUT aside first when `overwrite`."""
    old: Path | None = None
    if os.path.lexists(output):
        if not overwrite:
            raise OutputError(f"OUTPUT {output} appeared while converting; pass --overwrite to replace it")
        old = _sibling(output, _OLD_MARKER, token)
        try:
            os.rename(output, old)
        except FileNotFoundError:  # removed meanwhile: nothing to move aside
            old = None
        except OSError as exc:
            raise WriteError(f"cannot move the old OUTPUT {output} aside: {exc.strerror}; remove it yourself and run "
                             "again") from None
    try:
        _rename_onto_claim(tmp, output)
    except BaseException:
        if old is not None:
            _put_back(old, output)
        raise
    if old is not None:
        _remove_tree(old)
    _fsync_dir(output.parent)


def _put_back(old: Path, output: Path) -> None:
    """Rename the moved-aside OUTPUT back; remove it only if another program's OUTPUT took its place (the user had
    asked to replace it). If the rename fails, `old` stays for the next run's cleanup to put back."""
    if os.path.lexists(output):
        _remove_tree(old)
        return
    try:
        os.rename(old, output)
    except OSError:
        pass


def _rename_onto_claim(tmp: Path, output: Path) -> None:
    """Claim `output` with mkdir (fails if anything has the name), then rename `tmp` onto that empty claim: a file,
    link or folder another program puts at OUTPUT meanwhile is never replaced."""
    raced = (f"OUTPUT {output} was created by another program while qformat was writing it; nothing was written to "
             "it: choose another OUTPUT, or remove it and run again")
    try:
        os.mkdir(output)
    except FileExistsError:
        raise OutputError(raced) from None
    except OSError as exc:
        raise WriteError(f"cannot create {output}: {exc.strerror}; choose an OUTPUT you can write to") from None
    claim = os.lstat(output)
    try:
        os.rename(tmp, output)
    except OSError as exc:
        _drop_claim(output, claim)
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise OutputError(raced) from None
        raise WriteError(f"cannot rename the finished output onto {output}: {exc.strerror}") from None


def _drop_claim(output: Path, claim: os.stat_result) -> None:
    """Remove the empty folder this run created at `output`, if it is still there and still empty."""
    try:
        now = os.lstat(output)
        if stat.S_ISDIR(now.st_mode) and (now.st_dev, now.st_ino) == (claim.st_dev, claim.st_ino):
            os.rmdir(output)
    except OSError:
        pass


@contextmanager
def _run_lock(output: Path) -> Iterator[str]:
    """Create and hold the run's lock file beside OUTPUT; yield its token (the temporary folders share it).

    A cleanup that finds the file before this run has locked it takes it for a dead run's and deletes it; so after
    locking, the run checks that its file is still the one at the path, and starts again with a new token if not.
    """
    while True:
        token = _token()
        path = _sibling(output, _LOCK_MARKER, token)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        except OSError as exc:
            raise WriteError(f"cannot write in {output.parent}: {exc.strerror}; choose an OUTPUT you can write to") \
                from None
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _is_same_file(path, fd):
            break
        os.close(fd)
    try:
        yield token
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def _is_same_file(path: Path, fd: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def remove_stale_temps(parent: Path) -> list[str]:
    """Clean up after qformat runs that died in `parent` without unwinding; return the names of what was removed or
    restored. Live runs' entries (their lock is held) and entries that are symlinks or not folders are left alone."""
    if fcntl is None:
        return []
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    runs = {(m["name"], m["token"]) for m in map(_RUN_ENTRY.match, names) if m}
    handled: list[str] = []
    for name, token in sorted(runs):
        output = parent / name
        lock = _sibling(output, _LOCK_MARKER, token)
        fd = _lock_if_dead(lock)
        if fd is None:
            continue
        try:
            handled += _clean_dead_run(output, token)
        finally:
            if fd >= 0:
                try:
                    os.unlink(lock)
                except OSError:
                    pass
                os.close(fd)
    return handled


def _lock_if_dead(lock: Path) -> int | None:
    """An fd holding `lock` locked (its run is dead), -1 when there is no lock file (a dead run's leftovers: a live
    run creates its lock before anything else and removes it last), or None when the run may be alive."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1
    except OSError:
        return None  # a symlink, or someone else's file we cannot open: not ours to judge
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _clean_dead_run(output: Path, token: str) -> list[str]:
    """Remove a dead run's temporary folder; put its moved-aside old OUTPUT back (or remove it when replaced)."""
    handled = []
    tmp, old = _sibling(output, TEMP_MARKER, token), _sibling(output, _OLD_MARKER, token)
    if _is_real_dir(tmp):
        _remove_tree(tmp)
        handled.append(tmp.name)
    if _is_real_dir(old):
        _put_back(old, output)
        handled.append(old.name)
    return handled


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove_tree(path: Path) -> None:
    """Remove a folder this module created (or a symlink that took its name), never following a link."""
    if os.path.islink(path):
        try:
            os.unlink(path)
        except OSError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


def write_file_atomic(folder: str | Path, name: str, data: bytes) -> Path:
    """Write `data` to `folder`/`name`: to a new file under a random name in `folder`, flushed, then renamed onto
    `name`. Neither step follows a symlink inside `folder`: the new file is created with O_EXCL | O_NOFOLLOW, and the
    rename replaces whatever entry has the name (a link is replaced, never its target). `folder` itself is the
    caller's choice and may be a link. Returns the path written.

    Raises:
        ValueError: `name` is not a plain file name.
        WriteError: the folder cannot be written, or `name` is a folder.
    """
    if name in ("", ".", "..") or "/" in name or "\0" in name or (os.altsep and os.altsep in name):
        raise ValueError(f"{name!r} is not a plain file name")
    path = Path(folder) / name
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror}; give a folder you can write to") from None
    try:
        _write_and_rename(dir_fd, name, data)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror}; check that {folder} is a folder you can write to") \
            from None
    finally:
        os.close(dir_fd)
    return path


def _write_and_rename(dir_fd: int, name: str, data: bytes) -> None:
    while True:
        tmp = f".{name}{_WRITE_MARKER}{_token()}"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    try:
        os.fsync(dir_fd)
    except OSError:
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
