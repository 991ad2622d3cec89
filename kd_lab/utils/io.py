"""Atomic writes: a reader sees the old file or the whole new one, never a half-written one."""

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


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
    """Flush the complete file ``tmp`` to disk, then rename it to ``path`` (same directory): atomic."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode()))


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))
