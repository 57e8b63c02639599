"""One run per output directory: ``run_lock(out_dir)`` holds ``out_dir/.run.lock`` while a run writes there.

The lock file names its owner (pid, host, start time). A second run into the same directory is refused with
one line naming that owner. A lock left by a process that is gone (same host, pid no longer running) is
taken over, with a log line saying so; a lock from another host is never assumed stale.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Optional, Union

LOCK_NAME = ".run.lock"
logger = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """Another run owns the output directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _owner(path: Path) -> Optional[dict]:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_lock(directory: Union[str, Path]) -> Iterator[Path]:
    """Hold ``directory``'s run lock for the ``with`` block (the directory is created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):  # a stale lock removed, then taken: at most a couple of rounds
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(path)
            if owner is None:  # being written this instant, or torn: look again
                time.sleep(0.05)
                owner = _owner(path)
            if owner and owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) \
                    and not _alive(owner["pid"]):
                logger.warning("%s: taking over the lock of pid %d (started %s), which is no longer running",
                               directory, owner["pid"], owner.get("started"))
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            who = (f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('started')}" if owner
                   else f"an unreadable lock {path}")
            raise RunLockedError(f"{directory} is in use by another run ({who}); wait for it to finish or use "
                                 f"another output directory") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        break
    else:
        raise RunLockedError(f"{directory}: could not take the run lock {path} (it keeps reappearing)")
    try:
        yield path
    finally:
        if _owner(path) == me:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
