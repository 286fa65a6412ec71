"""Writing files so that nobody ever sees half of one: temporary name, then rename; clean-up after a kill."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Callable


# This machine's name in temporary file names: letters, digits and '_' only, so names parse back.
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host"


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before the rename: hidden, beside it, named after this process
    and machine (``remove_stale_partials`` reads both back), with the final suffix."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}-{_HOST}{path.suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Create ``path`` through ``write(temporary_path)``, then rename it into place.

    The temporary file sits in the same folder (so the rename is atomic) and
    keeps the final suffix, which Keras and the image writers need. Readers
    never see a half-written file, and an interrupted write leaves the old file.
    """
    path = Path(path)
    temporary = partial_path(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def remove_stale_partials(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Delete temporary files that a killed writer left behind; returns how many.

    They are hidden (``.<stem>.partial-<pid>-<host><suffix>``) and never trusted;
    those of a process that is still running are left alone, and so are those
    of other machines (shards of one job may share an output folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.rglob(".*.partial-*") if recursive else folder.glob(".*.partial-*"):
        pid, _, host = path.name.rsplit(".partial-", 1)[1].split(".")[0].partition("-")
        if host not in ("", _HOST) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not _process_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: str | os.PathLike, payload: dict) -> None:
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda temporary: Path(temporary).write_text(text))
