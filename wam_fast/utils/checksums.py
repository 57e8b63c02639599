"""Content hashes of checkpoint files: ``checksums.json`` beside them, ``{"sha256": {file name: hex digest}}``.

Written last (after the files it covers, atomically), so a directory with a checksums.json is complete. Loading
verifies every listed file by default: a flipped bit or a truncated copy is refused with the file's path
instead of loading silently different weights. A directory written before checksums existed loads with a
one-time log line saying it was not verified.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Dict, Iterable, Union

from wam_fast.utils.files import atomic_write

CHECKSUMS_NAME = "checksums.json"
logger = logging.getLogger(__name__)
_UNVERIFIED_NOTED = set()


def file_sha256(path: Union[str, Path], chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Union[str, Path], names: Iterable[str]) -> Dict[str, str]:
    """Hash ``names`` (files in ``directory``) into ``directory/checksums.json``; returns the hashes."""
    directory = Path(directory)
    hashes = {name: file_sha256(directory / name) for name in sorted(names)}
    text = json.dumps({"sha256": hashes}, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CHECKSUMS_NAME, lambda tmp: Path(tmp).write_text(text))
    return hashes


def verify_checksums(directory: Union[str, Path], names: Iterable[str]) -> bool:
    """Check ``names`` against ``directory/checksums.json``: ValueError naming the file on a mismatch or a
    file the checksums do not cover; False (logged once) when there is no checksums.json; True when verified."""
    directory = Path(directory)
    path = directory / CHECKSUMS_NAME
    if not path.is_file():
        if str(directory) not in _UNVERIFIED_NOTED:
            _UNVERIFIED_NOTED.add(str(directory))
            logger.warning("%s has no %s (written before checksums): its files are not verified", directory,
                           CHECKSUMS_NAME)
        return False
    try:
        hashes = json.loads(path.read_text())["sha256"]
        if not isinstance(hashes, dict):
            raise TypeError("'sha256' is not a map")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a checksums file ({type(exc).__name__}: {exc}); the checkpoint may be "
                         f"damaged: restore it or save it again") from exc
    for name in names:
        if name not in hashes:
            raise ValueError(f"{directory / name} is not covered by {path}: the checkpoint was changed after it "
                             f"was saved")
        got = file_sha256(directory / name)
        if got != hashes[name]:
            raise ValueError(f"{directory / name} does not match its checksum in {path} (sha256 {got[:12]}..., "
                             f"saved {str(hashes[name])[:12]}...): the file is damaged or was changed; restore it "
                             f"or save the checkpoint again")
    return True
