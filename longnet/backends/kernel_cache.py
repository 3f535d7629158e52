"""Building and loading longnet's C++ extensions through a cache that heals itself.

:func:`load_extension` wraps ``torch.utils.cpp_extension.load`` with what it lacks:

* **Verify before loading.** After a successful build the loader writes ``longnet-build.json``
  beside the library, with its size and SHA-256. A library is loaded only when it matches
  that record. A truncated library (a full disk, a killed copy) would otherwise be mapped and
  crash the process with a Bus error, and ninja, which trusts file times, would never rebuild
  it; a 0-byte or garbage one would fail to import on every run, forever. A library that does
  not match is removed with its objects and rebuilt, and stderr says so.
* **One folder per source version.** The folder is ``<torch extensions dir>/<name>-<key>``,
  the key a hash of the source, the flags, and the PyTorch and Python versions, and the
  source is copied into it. So checkouts with the same source share one build, and a checkout
  with another source gets its own folder instead of rebuilding the shared one on every switch.
* **Every build is announced** on stderr, and the build holds ``fcntl.flock`` on the folder's
  ``longnet-build.lock``, which the OS releases when a process dies. PyTorch's own lock file,
  which a killed build leaves behind and on which every later build would wait forever, is
  removed while that lock is held.
* **A read-only cache** that holds a verified build is used as it is.

:func:`explain_failure` turns a failed build into one line: no C++ compiler, no ninja, an
unwritable cache, or the compiler's first error.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import shutil
import sys
from typing import Iterator, List, Optional, Sequence

import torch

from ..checks import one_line
from ..fileio import atomic_path, atomic_write_json

try:
    import fcntl
except ImportError:  # Windows: builds are not serialised across processes here
    fcntl = None

__all__ = ["CacheError", "cache_root", "build_folder", "load_extension", "explain_failure", "RECORD"]

RECORD = "longnet-build.json"
_LOCK = "longnet-build.lock"


class CacheError(OSError):
    """The extension cache cannot be used (unwritable, not a folder); the message says which."""


def cache_root() -> str:
    """PyTorch's extension cache for this Python and accelerator (``$TORCH_EXTENSIONS_DIR`` wins),
    computed as ``torch.utils.cpp_extension`` does, without creating it."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    from torch.utils import cpp_extension
    if torch.version.hip is not None:
        acc = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        acc = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        acc = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(cpp_extension.get_default_build_root(), f"{py}_{acc}")


def build_folder(name: str, source: str, cflags: Sequence[str], ldflags: Sequence[str]) -> str:
    """The cache folder of this source version of extension ``name``."""
    h = hashlib.sha256()
    with open(source, "rb") as f:
        h.update(f.read())
    for part in (*cflags, "|", *ldflags, "|", torch.__version__, sys.version, platform.machine()):
        h.update(part.encode() + b"\0")
    return os.path.join(cache_root(), f"{name}-{h.hexdigest()[:16]}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _libraries(folder: str, name: str) -> List[str]:
    return sorted(glob.glob(os.path.join(folder, f"{name}*.so")) + glob.glob(os.path.join(folder, f"{name}*.pyd")))


def _problem(folder: str, name: str) -> Optional[str]:
    """None when the folder's library matches its build record; else what is wrong ("missing":
    nothing built yet)."""
    libs = _libraries(folder, name)
    if not libs:
        return "missing"
    try:
        with open(os.path.join(folder, RECORD), encoding="utf-8") as f:
            record = json.load(f)
        lib = os.path.join(folder, record["file"])
        size, digest = int(record["size"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{os.path.basename(libs[0])} has no intact build record (an interrupted build or an older longnet)"
    if not os.path.isfile(lib):
        return f"{record['file']} is missing"
    actual = os.path.getsize(lib)
    if actual != size:
        return f"{os.path.basename(lib)} is {actual:,} bytes, but its build wrote {size:,}"
    if _sha256(lib) != digest:
        return f"{os.path.basename(lib)} does not match the checksum its build recorded"
    return None


def _scrub(folder: str) -> None:
    """Remove the build's outputs so that ninja builds everything again (sources are kept)."""
    for pattern in ("*.so", "*.pyd", "*.o", "*.obj", ".ninja_log", ".ninja_deps", RECORD):
        for path in glob.glob(os.path.join(folder, pattern)):
            with contextlib.suppress(OSError):
                os.unlink(path)


@contextlib.contextmanager
def _build_lock(folder: str) -> Iterator[None]:
    fd = os.open(os.path.join(folder, _LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits for another process's build of this very source
        # PyTorch's lock file: a build killed by a signal leaves it, and torch then waits forever.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, "lock"))
        yield
    finally:
        os.close(fd)  # releases the flock


def _say(msg: str) -> None:
    print(f"longnet: {msg}", file=sys.stderr, flush=True)


def _torch_load(name: str, source: str, folder: str, cflags: Sequence[str], ldflags: Sequence[str]):
    from torch.utils import cpp_extension
    return cpp_extension.load(name, [source], extra_cflags=list(cflags), extra_ldflags=list(ldflags),
                              build_directory=folder, verbose=False)


def _import_verified(name: str, folder: str):
    from torch.utils import cpp_extension
    return cpp_extension._import_module_from_library(name, folder, True)


def load_extension(name: str, source: str, cflags: Sequence[str], ldflags: Sequence[str], *, what: str,
                   skip_hint: str = ""):
    """Build (when needed) and import extension ``name`` from the single C++ file ``source``.

    ``what`` names it in messages ("the CPU attention kernel"); ``skip_hint`` says how to do
    without it. Raises what the build raises, or :class:`CacheError` for an unusable cache.
    """
    folder = build_folder(name, source, cflags, ldflags)
    try:
        os.makedirs(folder, exist_ok=True)
        lock = _build_lock(folder)
        lock.__enter__()
    except OSError as e:
        if os.path.isdir(folder) and _problem(folder, name) is None:
            return _import_verified(name, folder)  # a read-only cache with a good build
        raise CacheError(f"cannot write the extension cache {folder} ({e.strerror or e}); set "
                         "TORCH_EXTENSIONS_DIR to a writable folder") from None
    try:
        return _load_locked(name, source, folder, cflags, ldflags, what, skip_hint)
    finally:
        lock.__exit__(None, None, None)


def _load_locked(name: str, source: str, folder: str, cflags, ldflags, what: str, skip_hint: str):
    copy = os.path.join(folder, os.path.basename(source))
    with open(source, "rb") as f:
        text = f.read()
    if not os.path.isfile(copy) or _read_bytes(copy) != text:
        with atomic_path(copy) as tmp, open(tmp, "wb") as f:
            f.write(text)
    hint = f"; {skip_hint}" if skip_hint else ""
    problem = _problem(folder, name)
    if problem == "missing":
        _say(f"building {what} into {folder} (once per source version; a minute or more on a busy machine"
             f"{hint})")
    elif problem is not None:
        _say(f"{what} in {folder} is damaged ({problem}); rebuilding it{hint}")
        _scrub(folder)
    try:
        module = _torch_load(name, copy, folder, cflags, ldflags)
    except ImportError as e:
        if problem is not None:
            raise
        # The library matched its record but does not load here (another system library?): build anew.
        _say(f"{what} in {folder} does not load ({one_line(e)}); rebuilding it{hint}")
        _scrub(folder)
        from torch.utils import cpp_extension
        cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop(name, None)  # else torch skips the build step
        problem = "does not load"
        module = _torch_load(name, copy, folder, cflags, ldflags)
    # After any build (ninja may also rebuild on its own), record what was just loaded.
    if problem is not None or _problem(folder, name) is not None:
        lib = os.path.abspath(module.__file__)
        atomic_write_json(os.path.join(folder, RECORD), {"file": os.path.basename(lib), "size": os.path.getsize(lib),
                                                         "sha256": _sha256(lib), "source": os.path.abspath(source)})
    return module


def explain_failure(e: BaseException) -> str:
    """One line on why a build failed, with what to do about it."""
    if isinstance(e, CacheError):
        return str(e)
    from torch.utils import cpp_extension
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found ({cxx!r} is not on PATH); install g++ (and ninja)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and len(ln) < 400]
    first = (errors or lines or [type(e).__name__])[0]
    return f"the build failed: {type(e).__name__}: {first[:300]}"
