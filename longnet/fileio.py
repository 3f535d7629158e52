"""Atomic, durable file writes: a reader sees the old file or the new one, never a partial one,
and once a write returns it survives a crash or a power cut.

Durability needs three fsyncs: the file's data before the rename, and the folder after it
(the rename is an entry of the folder). :func:`fsync_path` does either.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

from .checks import one_line

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_json", "atomic_savefig", "fsync_path",
           "replace_durably", "read_json"]


def fsync_path(path: str) -> None:
    """Flush a file's data, or a folder's entries, to disk (folders: POSIX only; a no-op elsewhere)."""
    if os.path.isdir(path) and os.name == "nt":  # Windows cannot open a folder for fsync
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(src: str, dst: str) -> None:
    """``os.replace(src, dst)``, then fsync the folder of ``dst`` so the rename itself is on disk."""
    os.replace(src, dst)
    fsync_path(os.path.dirname(os.path.abspath(dst)))


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The folder is created if needed. The file is fsynced before the rename and the folder
    after it. The file gets mode 0644, since mkstemp makes 0600 and outputs should be
    readable like any other file.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=suffix or os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        fsync_path(tmp)
        replace_durably(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def atomic_savefig(fig, path: str, **savefig_kwargs) -> str:
    """Save a matplotlib figure as PNG atomically and close it (also on error); returns ``path``."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, format="png", **savefig_kwargs)
    finally:
        plt.close(fig)
    return path


def read_json(path: str) -> Any:
    """The JSON value in ``path``. A missing file raises FileNotFoundError; one that cannot be read
    or parsed raises ValueError naming the path."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path} is damaged: not readable JSON ({one_line(e)})") from None
