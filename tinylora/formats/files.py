"""Atomic file writes, and names from config files kept inside their folder.

Every file tinylora saves goes through `atomic_path` (or `atomic_write`, the
same for a file object): the bytes go to a temporary file in the same folder,
which is fsync'ed and then renamed over the target with `os.replace`. A rename within one filesystem is
atomic, so a reader (or a crash, or Ctrl-C) sees either the old file or the
complete new one, never half of each. If writing fails, the temporary file is
removed and the old file is untouched. The folder is fsync'ed after the rename
so the new name itself survives a power cut.

`inside(folder, name)` resolves a file name read from a file we did not write
(a shard name in `model.safetensors.index.json`, say) and refuses one that
would leave its folder (`../../etc/passwd`, an absolute path).

`atomic_folder(path)` does the same for a whole folder (a GGUF import): the
files are written into a hidden sibling folder, which is renamed into place
only when all of them are complete.

What is not here: locking (one writer per file is assumed; a training run holds its folder through lock.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import TinyloraError


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# The permissions open() and mkdir() would give; mkstemp's 0600 and mkdtemp's 0700 are too private.
_FILE_MODE = 0o666 & ~_umask()
_FOLDER_MODE = 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Context manager yielding a temporary path next to `path`; on a clean exit it becomes `path`.

        with atomic_path("out/model.safetensors") as tmp:
            save_file(tensors, tmp)              # a library that wants a file name

    On a clean exit the file is fsync'ed, given the permissions open() would
    give, and renamed over `path`. On an exception nothing at `path` changes,
    the temporary file is deleted, and the exception propagates.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    # Same folder as the target: os.replace is only atomic within one filesystem.
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp_name)
        fd = os.open(tmp_name, os.O_RDONLY)
        try:
            os.fchmod(fd, _FILE_MODE)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException:                       # includes KeyboardInterrupt: never leave the temp file
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_folder(folder)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Context manager yielding a binary file; on a clean exit it becomes `path` (see atomic_path).

        with atomic_write("out/config.json") as f:
            f.write(data)
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable. Not every OS/filesystem lets us open a folder; that is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Context manager yielding an empty staging folder; on a clean exit it becomes `path`.

    path must not exist or be an empty folder, unless overwrite=True: then the
    old one is moved aside after the new one is complete, and deleted. On an
    exception the staging folder is deleted and `path` is untouched.
    """
    path = Path(path)
    _recover(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise TinyloraError(f"{path}: already exists and is not empty; choose a new folder or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        os.chmod(staging, _FOLDER_MODE)
        yield staging
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, aside / path.name)
            try:
                os.replace(staging, path)
            except BaseException:
                os.replace(aside / path.name, path)     # put the old folder back
                shutil.rmtree(aside, ignore_errors=True)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, path)            # renaming onto an empty folder is allowed
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_folder(path.parent)


def _recover(path: Path) -> None:
    """Tidy up after a process killed inside `atomic_folder` for this path.

    Killed between the two renames of an overwrite, the old folder sits in a
    `.NAME.old-*` sibling and `path` is gone: move it back. Staging folders
    (`.NAME.partial-*`) of killed runs are incomplete by definition: delete them.
    """
    if not path.parent.is_dir():
        return
    for old in sorted(path.parent.glob(f".{path.name}.old-*")):
        if not path.exists() and (old / path.name).exists():
            os.replace(old / path.name, path)
        shutil.rmtree(old, ignore_errors=True)
    for partial in path.parent.glob(f".{path.name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text, written atomically (newlines are written as given)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    """JSON as Hugging Face writes it: indent 2, UTF-8 kept readable, trailing newline."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file; a missing file or malformed JSON is a TinyloraError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TinyloraError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TinyloraError(f"{path}: cannot read: {e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TinyloraError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise TinyloraError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def inside(folder: str | os.PathLike, name: str) -> Path:
    """folder / name, refusing a name that is absolute or climbs out of folder (via .. or a symlink)."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name or "\x00" in name:
        raise TinyloraError(f"{folder}: file name {name!r} is not a plain relative name")
    path = folder / name
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise TinyloraError(f"{folder}: file name {name!r} points outside the folder")
    return path
