"""One training run per adapter folder: a lock file holding the run's pid and host.

Two `tinylora train` runs on the same --adapter-path (it has a default, so this is
easy) would interleave their checkpoints. So a run takes the folder first:

    adapters/mine/.tinylora.lock     {"pid": 4711, "host": "box", "started": "2026-12-06 08:40:12 UTC"}

created with O_CREAT | O_EXCL, which only one process can win. It is removed when
the run ends, however it ends (an exception, Ctrl-C). A lock left by a process
that no longer exists (kill -9, a crash, a reboot) is taken over with a note; one
whose process is alive, or held on another host (whose processes cannot be seen
from here), refuses the new run in one line naming the folder, pid and host, and
nothing of the first run's is touched. `check_not_held` lets `fuse` and `export`
refuse to write into a folder a run holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from ..errors import TinyloraError

LOCK_FILE = ".tinylora.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)                      # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:                  # it exists, owned by someone else
        return True
    return True


def holder(folder: str | os.PathLike) -> dict | None:
    """The lock's contents if a live run (or one on another host) holds `folder`, else None."""
    path = Path(folder) / LOCK_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        pid, host = int(info["pid"]), str(info["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None                          # unreadable: a half-written lock of a killed run
    if host == socket.gethostname() and not _alive(pid):
        return None
    return info


def _busy(folder: Path, info: dict, what: str) -> TinyloraError:
    where = "this machine" if info.get("host") == socket.gethostname() else f"host {info.get('host')}"
    return TinyloraError(f"{folder}: a tinylora training run (pid {info.get('pid')} on {where}, started "
                         f"{info.get('started', '?')}) holds this folder; {what} (if that run is gone, "
                         f"delete {folder / LOCK_FILE})")


def check_not_held(path: str | os.PathLike, what: str = "choose another output") -> None:
    """Refuse to write `path` (a folder, or a file in one) while a training run holds it."""
    path = Path(path)
    for folder in (path, path.parent):
        info = holder(folder)
        if info is not None and int(info.get("pid", -1)) != os.getpid():
            raise _busy(folder, info, what)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, log: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold `folder` for this process for the duration of the with-block (see the module docstring)."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            held = holder(folder)
            if held is not None or attempt:
                raise _busy(folder, held or {}, "wait for it to finish or choose another --adapter-path") from None
            log(f"{path}: taking over the lock of a run that is gone")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(info) + "\n")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                path.unlink()
            if created and not any(folder.iterdir()):
                folder.rmdir()               # a run that wrote nothing leaves no folder behind
