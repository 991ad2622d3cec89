"""Atomic writes: a reader sees the old file or the whole new one, never a half-written one.

A file written here gets the permissions a plain ``open()`` would give it: 0666 less the umask (0644 under
the usual 0022). ``tempfile.mkstemp`` creates its file 0600 and ignores the umask, so the temporary file is
given that mode before it is renamed into place; otherwise results, checkpoints and store entries would be
readable by their owner only.
"""

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask. Linux reports it in /proc/self/status; elsewhere it is read by setting it and
    setting it back (under a lock, since a file another thread creates in between gets the wrong mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def _named(e: OSError, path: Path) -> OSError:
    """``e`` naming the file that could not be written (a write's ENOSPC names none), same type and errno."""
    try:
        return type(e)(e.errno, e.strerror, str(path)) if e.errno is not None else type(e)(f"{e} (writing {path})")
    except Exception:  # an OSError subclass with a constructor of its own
        return e


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _named(e, path) from e
    try:
        with contextlib.suppress(OSError):  # a file system without modes (FAT, some network mounts) keeps its own
            os.fchmod(fd, default_file_mode())  # mkstemp made it 0600; the renamed file keeps this mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)  # a failed write (a full disk) leaves no partial file behind
        if isinstance(e, OSError):
            raise _named(e, path) from e
        raise


def move_into_place(tmp: Path, path: Path) -> None:
    """Flush the complete file ``tmp`` to disk, give it the mode of a plain ``open()``, then rename it to
    ``path`` (same directory): atomic. The mode is set here because the writer of ``tmp`` may not have
    applied the umask (fsspec, under Lightning's checkpoints, applies the umask it read first in the process)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    with contextlib.suppress(OSError):  # a file system without modes keeps its own
        os.chmod(tmp, default_file_mode())
    os.replace(tmp, path)


def atomic_write_bytes(data: bytes, path: Path) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))
