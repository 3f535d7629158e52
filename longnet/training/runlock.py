"""One owner per output folder: an exclusive lock a process holds while it writes there.

``longnet train --out R`` and ``longnet experiment --out E`` take :class:`FolderLock` on their
folder before they write anything in it and hold it until they return (any exit path: done,
stopped, error, Ctrl-C). A second process asking for the same folder gets one line naming the
holder's pid, instead of two runs overwriting each other's checkpoints and logs.

The lock is ``fcntl.flock`` on ``FOLDER/.longnet.lock``. The operating system releases it when
the holding process dies, however it dies (SIGKILL, a crash, a power cut), so a stale lock
never blocks anybody: the next process simply takes it, and says whose it was (the file keeps
the pid of its last holder while held and is emptied on a clean release). Readers (``longnet
eval`` of a checkpoint while the run trains) take no lock. Within one process the lock is
re-entrant: the command and the training loop it calls may both ask for it.

Where ``fcntl`` does not exist (Windows), folders are not locked.
"""

from __future__ import annotations

import os
import socket
from typing import Dict, Optional, Tuple

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here
    fcntl = None

__all__ = ["LOCK_NAME", "FolderLock"]

LOCK_NAME = ".longnet.lock"

# realpath of a folder -> (the lock file's descriptor, how many holders in this process)
_HELD: Dict[str, Tuple[int, int]] = {}


def _missing_top(path: str) -> Optional[str]:
    """The highest folder of ``path`` (``path`` included) that does not exist yet, or None."""
    top = None
    while not os.path.exists(path):
        top, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return top


class FolderLock:
    """Exclusive ownership of ``path`` (created, with its parents, when missing).

    ``flag`` names the option the folder came from in messages (``--out``). :meth:`acquire`
    raises ValueError with one line when the folder cannot be created or written, or when
    another process holds it; :attr:`stale` is then the pid text of a holder that died
    holding it (None otherwise). :meth:`release` also removes the lock file, and the folders
    it created, when nothing else was written there.
    """

    def __init__(self, path: str, flag: str = "--out"):
        self.path, self.flag = path, flag
        self.stale: Optional[str] = None
        self.inherited = False  # whether the lock file was there before (a longnet process made the folder)
        self._key: Optional[str] = None
        self._created: Optional[str] = None
        self._made_file = False

    def acquire(self) -> "FolderLock":
        path = os.path.abspath(self.path)
        created = _missing_top(path)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{self.flag} {self.path!r}: cannot create the folder ({e.strerror or e}); pass a "
                             "folder you can write to") from None
        if not os.path.isdir(path):
            raise ValueError(f"{self.flag} {self.path!r} is a file; pass a folder")
        self._created, self._key = created, os.path.realpath(path)
        if fcntl is None:
            return self
        if self._key in _HELD:
            fd, n = _HELD[self._key]
            self.inherited = True
            _HELD[self._key] = (fd, n + 1)
            return self
        _HELD[self._key] = (self._open_locked(path), 1)
        return self

    def _open_locked(self, path: str) -> int:
        lock_path = os.path.join(path, LOCK_NAME)
        while True:
            existed = os.path.exists(lock_path)
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                self._cleanup()
                raise ValueError(f"{self.flag} {self.path!r}: cannot write into the folder ({e.strerror or e}); "
                                 "pass a folder you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read(fd) or "unknown"
                os.close(fd)
                raise ValueError(f"{self.flag} {self.path} is in use by another longnet process (pid {holder}); "
                                 f"wait for it to end, or pass another {self.flag}") from None
            # A holder that released removes the file when it leaves nothing else behind: if the
            # name now points elsewhere, the lock taken is on a file nobody else will ever open.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.stale = _read(fd) or None
        self._made_file, self.inherited = not existed, existed
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return fd

    def release(self, discard: bool = False) -> None:
        """Give the folder up (the last release of this process unlocks it); idempotent.
        ``discard``: nothing was written, so a lock file this holder created goes too."""
        if self._key is None:
            return
        key, self._key = self._key, None
        if fcntl is None or key not in _HELD:
            return
        fd, n = _HELD.pop(key)
        if n > 1:
            _HELD[key] = (fd, n - 1)
            return
        try:
            os.ftruncate(fd, 0)  # a clean release: the next holder finds no pid to report as stale
            self._cleanup(locked=True, discard=discard)
        finally:
            os.close(fd)

    def _cleanup(self, locked: bool = False, discard: bool = False) -> None:
        """Remove what acquire created (the lock file, new folders) when nothing else is in there."""
        path = os.path.abspath(self.path)
        try:
            if locked and self._made_file and (discard or os.listdir(path) == [LOCK_NAME]):
                os.unlink(os.path.join(path, LOCK_NAME))
            if self._created is not None:
                while not os.listdir(path):
                    os.rmdir(path)
                    if path == self._created:
                        break
                    path = os.path.dirname(path)
        except OSError:
            pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
