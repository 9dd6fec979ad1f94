"""Atomic file writes: a reader (a player, the web page, the next run) never sees a half-written file; and
a file's content hash, read in chunks."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Temporary files of an older version carry no pid: left by a killed writer when older than this.
UNOWNED_TEMP_AGE_S = 3600


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    A crash leaves the last good file, never a truncated one. The temporary file's name carries the
    writer's pid, so the next write to `path` removes what a killed writer left (`sweep_stale`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def sweep_stale(path: Path) -> list[Path]:
    """Remove the temporary files of earlier writes to `path` whose writer is gone; returns them."""
    pattern = re.compile(rf"^\.{re.escape(path.stem)}\.(?:(\d+)\.)?[^.]+{re.escape(path.suffix)}$")
    removed = []
    for candidate in path.parent.glob(f".{path.stem}.*{path.suffix}"):
        match = pattern.match(candidate.name)
        if match is None:
            continue
        pid = int(match.group(1)) if match.group(1) else None
        try:
            stale = not _alive(pid) if pid is not None else time.time() - candidate.stat().st_mtime > UNOWNED_TEMP_AGE_S
            if stale and pid != os.getpid():
                candidate.unlink()
                removed.append(candidate)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(data: Any, path: str | os.PathLike, indent: int | None = 2) -> Path:
    """`data` as JSON at `path`, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=indent, default=str)
        f.write("\n")
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """The file's SHA-256, read 1 MB at a time (weights and LoRAs of any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
