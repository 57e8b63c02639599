"""Atomic file writes: a file is written under a temporary name, flushed to disk and renamed into
place, so an interrupted write never leaves a torn file (checkpoints, datasets, results)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (a rename into it) to disk."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_mode(base: int = 0o666) -> int:
    """``base`` minus the umask: what open() (0o666) or mkdir() (0o777) would leave."""
    umask = os.umask(0o022)
    os.umask(umask)
    return base & ~umask


def new_file_mode(path: Path) -> int:
    """The mode a plain write would leave: the replaced file's, else 0o666 minus the umask
    (mkstemp's own 0o600 would hide checkpoints and results from the rest of a team)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return plain_mode(0o666)


def atomic_write(path: Union[str, Path], write) -> None:
    """Call ``write(tmp_path)`` and then rename tmp_path over ``path`` after an fsync."""
    path = Path(path)
    mode = new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)
