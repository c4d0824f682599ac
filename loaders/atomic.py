"""Atomic small-file writes shared by the loaders (sidecars) and the engine (checkpoint `latest` pointers).

A temporary file in the same folder (so the rename never crosses a filesystem), flushed and fsynced, renamed over
the final path, then the folder fsynced so the rename itself survives a power cut. A crash at any point leaves the
old file or the new one, never a mix; the temporary, named `.{name}.tmp-{pid}`, is removed on error.
"""
from __future__ import annotations

import os
from pathlib import Path


def temp_path(path: Path) -> Path:
    """The temporary a write of `path` uses (its stale leftovers match `.*.tmp-*` in the same folder)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames and creations inside `folder` durable (a no-op where directories cannot be opened)."""
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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` atomically."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
