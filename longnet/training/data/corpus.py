"""Byte-level corpora for the LongNet language model.

Everything is bytes (vocabulary 256). A corpus is one file on disk that is memory-mapped;
``Corpus.train`` / ``.valid`` / ``.test`` are 1-D ``np.memmap`` (uint8) views of it, so no
corpus is ever read whole into RAM: building a cache file streams file by file, extraction
streams chunk by chunk, and samplers read only the windows they draw.

Sources (``open_corpus(spec)``):

* ``None`` / ``"builtin"``: the ``*.py`` files of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``). Skipped: ``site-packages``, ``dist-packages``,
  ``__pycache__``, hidden directories and the test suites (directories named ``test``,
  ``tests`` or ``idle_test``): those hold deliberately broken, odd-encoding and generated
  files and would make up well over half of the bytes; the rest is ordinary library code,
  a small "The Stack". Files are sorted by relative path (POSIX separators), each preceded
  by a header line ``# ==> relpath <==`` and followed by a newline.
* ``"enwik8:PATH"``: the 100,000,000-byte Hutter prize file, as the raw file, the
  distributed ``enwik8.zip`` (member ``enwik8``) or a ``.gz``; PATH may also be a folder
  holding one of those. Archives are extracted once, streaming, into the cache directory.
  Standard split: first 90M bytes train, next 5M valid, last 5M test.
* ``"text:PATH"``: one text file or a folder of them (recursive, sorted by relative path,
  hidden files/folders skipped, binary files skipped by a NUL byte in their first 8 KiB).
  Files are concatenated with a blank line between them.

Deterministic split, for ``builtin`` and for ``text:`` folders: each file goes whole to one
split by the SHA-1 of its relative path: ``int(sha1[:8], 16) % 100`` below 90 is train,
below 95 valid, else test. Files never straddle splits, so valid/test hold unseen files.
If that leaves a split empty (a handful of files) or there is a single file, the
concatenation is instead cut by byte ranges: first 90% train, next 5% valid, last 5% test.

Caches live in ``cache_dir`` (default ``$LONGNET_CACHE`` or ``~/.cache/longnet``), are
named by a hash of the sources (paths, sizes, mtimes), and are written atomically
(temporary file + ``os.replace``); a JSON sidecar holding the split offsets is written last,
so a cache without its sidecar is never trusted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...checks import check_int
from ...fileio import atomic_path, atomic_write_json

__all__ = ["LongNetDataError", "Corpus", "open_corpus", "open_builtin", "open_enwik8", "open_text",
           "default_cache_dir", "ENWIK8_URL", "ENWIK8_SIZE", "VOCAB_SIZE"]


VOCAB_SIZE = 256
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SIZE = 100_000_000
_CACHE_VERSION = 1  # bump when the cache layout or the split rule changes
_CHUNK = 1 << 20
_SNIFF = 8192
_SKIP_DIRS_BUILTIN = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_TEXT_SEPARATOR = b"\n\n"
_SPEC_FORMS = ('None or "builtin" (Python standard library sources)', '"enwik8:PATH"', '"text:PATH"')


class LongNetDataError(ValueError):
    """A data source is missing, the wrong size, unreadable or too small."""


@dataclass
class Corpus:
    """A byte corpus split three ways.

    ``train``, ``valid``, ``test``: 1-D ``np.memmap`` views (uint8) of ``path``.
    ``description``: what was found, how many bytes, where the cache is.
    """

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    description: str
    path: str = ""
    meta: Dict = field(default_factory=dict)

    def split(self, name: str) -> np.ndarray:
        """The split called ``name``: "train", "valid" (or "val", "validation") or "test"."""
        key = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}.get(name)
        if key is None:
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {name!r}")
        return getattr(self, key)

    @property
    def sizes(self) -> Dict[str, int]:
        return {"train": int(self.train.size), "valid": int(self.valid.size), "test": int(self.test.size)}


# ----------------------------------------------------------------------------- helpers


def default_cache_dir() -> str:
    """``$LONGNET_CACHE`` if set, else ``~/.cache/longnet``."""
    return os.environ.get("LONGNET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "longnet")


def _cache_dir(cache_dir: Optional[str]) -> str:
    d = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise LongNetDataError(f"cannot create cache_dir {d!r} ({e}); pass --cache-dir DIR (cache_dir= in Python) or set $LONGNET_CACHE "
                               f"to a writable folder") from e
    return d


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _bucket(relpath: str) -> str:
    h = int(hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).hexdigest()[:8], 16) % 100
    return "train" if h < 90 else ("valid" if h < 95 else "test")


def _byte_split(total: int, split: Sequence[int]) -> Tuple[int, int, int]:
    """Lengths (train, valid, test) of byte ranges in proportion ``split``; test takes the rest."""
    if len(split) != 3 or any(int(s) < 0 for s in split) or sum(split) <= 0:
        raise ValueError(f"split must be three non-negative numbers with a positive sum, got {split!r}")
    s = sum(split)
    n_train = total * split[0] // s
    n_valid = total * split[1] // s
    return n_train, n_valid, total - n_train - n_valid


def _is_binary(path: str) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_SNIFF)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _memmap_views(path: str, lengths: Sequence[int]) -> Tuple[np.ndarray, ...]:
    """Consecutive read-only memmap views of ``path`` with the given lengths."""
    total = int(sum(lengths))
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=(total,))
    views, start = [], 0
    for n in lengths:
        views.append(mm[start:start + n])
        start += n
    return tuple(views)


def _walk(root: str, *, skip_dirs: set, suffix: Optional[str]) -> List[Tuple[str, str]]:
    """(relpath with '/', abspath) of regular files under ``root``, sorted by relpath."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or (suffix is not None and not name.endswith(suffix)):
                continue
            full = os.path.join(dirpath, name)
            if not os.path.isfile(full):
                continue
            found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    found.sort()
    return found


def _source_key(kind: str, root: str, files: Sequence[Tuple[str, str]], extra) -> str:
    h = hashlib.sha1()
    h.update(json.dumps([_CACHE_VERSION, kind, os.path.abspath(root), extra]).encode())
    for rel, full in files:
        st = os.stat(full)
        h.update(f"\n{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _load_cached(bin_path: str, meta_path: str) -> Optional[Dict]:
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("version") != _CACHE_VERSION or os.path.getsize(bin_path) != meta["total"]:
            return None
        return meta
    except (OSError, ValueError, KeyError):
        return None


def _build_concat(files: Sequence[Tuple[str, str]], bin_path: str, *, header: Optional[str],
                  separator: bytes, file_split: bool) -> Dict:
    """Stream ``files`` into ``bin_path`` (atomically), grouped train|valid|test.

    Returns the metadata: byte lengths and file counts per split and the split mode.
    ``header`` is a format string with ``{rel}`` written before each file.
    """
    kept = [(rel, full) for rel, full in files if os.path.getsize(full) > 0 and not _is_binary(full)]
    skipped_binary = sum(1 for rel, full in files if os.path.getsize(full) > 0) - len(kept)
    if not kept:
        return {"total": 0, "n_files": 0, "skipped_binary": skipped_binary}
    groups = {"train": [], "valid": [], "test": []}
    for rel, full in kept:
        groups[_bucket(rel)].append((rel, full))
    mode = "file" if file_split and len(kept) > 1 and all(groups.values()) else "byte"
    order = groups["train"] + groups["valid"] + groups["test"] if mode == "file" else list(kept)
    lengths = {"train": 0, "valid": 0, "test": 0}
    with atomic_path(bin_path, ".bin") as tmp, open(tmp, "wb") as out:
        for i, (rel, full) in enumerate(order):
            start = out.tell()
            if header is not None:
                out.write(header.format(rel=rel).encode("utf-8", "surrogateescape"))
            elif i > 0:
                out.write(separator)
            with open(full, "rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)
            if header is not None:
                out.write(separator)
            if mode == "file":
                lengths[_bucket(rel)] += out.tell() - start
        total = out.tell()
    if mode == "byte":
        lengths = dict(zip(("train", "valid", "test"), _byte_split(total, (90, 5, 5))))
    return {"total": total, "lengths": lengths, "mode": mode, "n_files": len(kept),
            "files_per_split": {k: len(v) for k, v in groups.items()} if mode == "file" else None,
            "skipped_binary": skipped_binary}


def _split_text(meta: Dict) -> str:
    L = meta["lengths"]
    if meta["mode"] == "file":
        fs = meta["files_per_split"]
        how = "split by file (sha1 of relative path % 100: <90 train, <95 valid, else test)"
        parts = ", ".join(f"{k} {_fmt_bytes(L[k])} ({fs[k]} files)" for k in ("train", "valid", "test"))
    else:
        how = "split by byte ranges 90/5/5"
        parts = ", ".join(f"{k} {_fmt_bytes(L[k])}" for k in ("train", "valid", "test"))
    return f"{how}: {parts}"


def _check_splits(name: str, lengths: Dict[str, int], total: int) -> None:
    empty = [k for k in ("train", "valid", "test") if lengths[k] <= 0]
    if empty:
        raise LongNetDataError(f"{name}: corpus of {total} bytes is too small to split 90/5/5 "
                               f"({', '.join(empty)} would be empty); give it more text")


def _concat_corpus(name: str, kind: str, root: str, files, *, cache_dir, verbose: bool, header, separator,
                   extra, found_text: str) -> Corpus:
    cdir = _cache_dir(cache_dir)
    key = _source_key(kind, root, files, extra)
    bin_path = os.path.join(cdir, f"{kind}-{key}.bin")
    meta_path = bin_path[:-4] + ".json"
    meta = _load_cached(bin_path, meta_path)
    if meta is None:
        t0 = time.perf_counter()
        meta = _build_concat(files, bin_path, header=header, separator=separator, file_split=True)
        if meta["total"] == 0:
            _unlink(bin_path)
            raise LongNetDataError(f"{name}: no text found: {found_text} gave {len(files)} candidate files, "
                                   f"{meta['skipped_binary']} skipped as binary (NUL byte), none non-empty")
        try:
            _check_splits(name, meta["lengths"], meta["total"])
        except LongNetDataError:
            _unlink(bin_path)
            raise
        seconds = time.perf_counter() - t0
        meta["version"] = _CACHE_VERSION
        meta["description"] = (f"{name}: {found_text}: {meta['n_files']} files"
                               + (f" ({meta['skipped_binary']} binary skipped)" if meta["skipped_binary"] else "")
                               + f", {meta['total']:,} bytes -> {bin_path}; " + _split_text(meta))
        atomic_write_json(meta_path, meta)
        if verbose:
            print(f"[longnet.training.data] built {meta['description']} (in {seconds:.1f} s)", file=sys.stderr)
    L = meta["lengths"]
    train, valid, test = _memmap_views(bin_path, (L["train"], L["valid"], L["test"]))
    return Corpus(name, train, valid, test, meta["description"], bin_path, meta)


# ----------------------------------------------------------------------------- sources


def open_builtin(*, root: Optional[str] = None, cache_dir: Optional[str] = None, max_files: Optional[int] = None,
                 verbose: bool = True) -> Corpus:
    """The built-in code corpus: the standard library's ``*.py`` sources (see module docstring).

    ``root`` overrides the standard library folder and ``max_files`` keeps only the first
    files in sorted order (both for tests and quick runs).
    """
    if root is None:
        root = sysconfig.get_paths().get("stdlib") or ""
        label = f"Python {sys.version.split()[0]} standard library at {root}"
    else:
        label = f"*.py files under {root}"
    if not root or not os.path.isdir(root):
        raise LongNetDataError(f"builtin corpus: standard library folder {root!r} not found (this interpreter may "
                               f"ship it zipped); use text:PATH with a folder of text or enwik8:PATH instead")
    if max_files is not None:
        max_files = check_int("max_files", max_files)
    files = _walk(root, skip_dirs=_SKIP_DIRS_BUILTIN, suffix=".py")
    if max_files is not None:
        files = files[:max_files]
    return _concat_corpus("builtin", "builtin", root, files, cache_dir=cache_dir, verbose=verbose,
                          header="# ==> {rel} <==\n", separator=b"\n", extra=[max_files],
                          found_text=label + " (site-packages and test folders skipped)")


def open_text(path: str, *, cache_dir: Optional[str] = None, verbose: bool = True) -> Corpus:
    """``text:PATH``: a text file or a folder of text files (see module docstring)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        root, files = os.path.dirname(path), [(os.path.basename(path), path)]
        found = f"text file {path}"
    elif os.path.isdir(path):
        root, files = path, _walk(path, skip_dirs={"__pycache__"}, suffix=None)
        found = f"folder {path}"
    else:
        raise LongNetDataError(f"text:PATH: {path!r} is neither a file nor a folder")
    if not files:
        raise LongNetDataError(f"text:PATH: no files under {path!r} (hidden files and folders are skipped)")
    return _concat_corpus(f"text:{path}", "text", root, files, cache_dir=cache_dir, verbose=verbose,
                          header=None, separator=_TEXT_SEPARATOR, extra=[path], found_text=found)


def _enwik8_error(msg: str, expected_size: int) -> LongNetDataError:
    return LongNetDataError(f"enwik8: {msg}. Expected the {expected_size:,}-byte enwik8 file, the distributed "
                            f"enwik8.zip (member 'enwik8') or a .gz of it; download it from {ENWIK8_URL} "
                            f"and pass enwik8:/path/to/enwik8.zip")


def _find_enwik8(path: str, expected_size: int) -> str:
    if os.path.isdir(path):
        for name in ("enwik8", "enwik8.zip", "enwik8.gz"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise _enwik8_error(f"folder {path!r} holds none of enwik8, enwik8.zip, enwik8.gz", expected_size)
    if not os.path.isfile(path):
        raise _enwik8_error(f"file {path!r} not found", expected_size)
    return path


def _archive_kind(path: str) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    lower = path.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith(".gz") or lower.endswith(".gzip"):
        return "gz"
    if magic == b"PK\x03\x04":
        return "zip"
    if magic[:2] == b"\x1f\x8b":
        return "gz"
    return "raw"


def _extract_enwik8(path: str, kind: str, expected_size: int, cdir: str, verbose: bool) -> str:
    st = os.stat(path)
    key = hashlib.sha1(json.dumps([_CACHE_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns,
                                   expected_size]).encode()).hexdigest()[:16]
    out_path = os.path.join(cdir, f"enwik8-{key}.bin")
    if os.path.isfile(out_path) and os.path.getsize(out_path) == expected_size:
        return out_path
    t0 = time.perf_counter()
    with atomic_path(out_path, ".bin") as tmp:
        with open(tmp, "wb") as out:
            try:
                if kind == "zip":
                    with zipfile.ZipFile(path) as zf:
                        names = zf.namelist()
                        if "enwik8" not in names:
                            raise _enwik8_error(f"zip archive {path!r} has no member 'enwik8' (members: "
                                                f"{names[:5]})", expected_size)
                        size = zf.getinfo("enwik8").file_size
                        if size != expected_size:
                            raise _enwik8_error(f"member 'enwik8' of {path!r} is {size:,} bytes", expected_size)
                        with zf.open("enwik8") as src:
                            _copy_limited(src, out, expected_size)
                else:
                    with gzip.open(path, "rb") as src:
                        _copy_limited(src, out, expected_size)
            except LongNetDataError:
                raise
            except (zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError, OSError) as e:
                raise _enwik8_error(f"cannot read {kind} archive {path!r} (corrupt or truncated: {e})",
                                    expected_size) from e
            n = out.tell()
        if n != expected_size:
            raise _enwik8_error(f"{path!r} decompresses to {n:,} bytes" if n <= expected_size else
                                f"{path!r} decompresses to more than {expected_size:,} bytes", expected_size)
    if verbose:
        print(f"[longnet.training.data] extracted {path} -> {out_path} ({expected_size:,} bytes, "
              f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return out_path


def _copy_limited(src, out, limit: int) -> None:
    # Stop one byte past the limit: a wrong file must not fill the disk before we notice.
    written = 0
    while True:
        chunk = src.read(min(_CHUNK, limit + 1 - written))
        if not chunk:
            return
        out.write(chunk)
        written += len(chunk)
        if written > limit:
            return


def open_enwik8(path: str, *, expected_size: int = ENWIK8_SIZE, split: Sequence[int] = (90, 5, 5),
                cache_dir: Optional[str] = None, verbose: bool = True) -> Corpus:
    """``enwik8:PATH``: raw file, ``enwik8.zip`` or ``.gz`` (or a folder holding one).

    Split in proportion ``split`` of ``expected_size``: (90, 5, 5) on the real file is the
    standard 90M / 5M / 5M. ``expected_size`` exists so tests can use a small file.
    """
    expected_size = check_int("expected_size", expected_size, minimum=3)
    path = _find_enwik8(os.path.abspath(os.path.expanduser(path)), expected_size)
    kind = _archive_kind(path)
    if kind == "raw":
        size = os.path.getsize(path)
        if size != expected_size:
            raise _enwik8_error(f"{path!r} is {size:,} bytes (not a zip or gzip archive either)", expected_size)
        data_path = path
    else:
        data_path = _extract_enwik8(path, kind, expected_size, _cache_dir(cache_dir), verbose)
    lengths = _byte_split(expected_size, tuple(split))
    _check_splits("enwik8", dict(zip(("train", "valid", "test"), lengths)), expected_size)
    train, valid, test = _memmap_views(data_path, lengths)
    desc = (f"enwik8: {path} ({kind}), {expected_size:,} bytes -> {data_path}; split by byte ranges "
            f"{'/'.join(str(s) for s in split)}: train {lengths[0]:,}, valid {lengths[1]:,}, test {lengths[2]:,}")
    return Corpus("enwik8", train, valid, test, desc, data_path, {"source": path, "kind": kind})


def open_corpus(spec: Optional[str] = None, *, cache_dir: Optional[str] = None, verbose: bool = True) -> Corpus:
    """Open a corpus by spec: None or "builtin", "enwik8:PATH" or "text:PATH".

    Returns a :class:`Corpus` whose splits are memory-mapped uint8 arrays.
    """
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"spec must be a str or None, got {type(spec).__name__}")
    s = (spec or "builtin").strip()
    kind, sep, arg = s.partition(":")
    kind = kind.lower()
    if kind == "builtin" and not arg:
        return open_builtin(cache_dir=cache_dir, verbose=verbose)
    if kind == "passkey":
        raise ValueError("'passkey' is a synthetic task, not a corpus: use longnet.training.data.PasskeyTask(seq_len, "
                         "distance) (its next_batch()/state_dict() work like RandomWindowSampler)")
    if kind == "enwik8":
        if not arg:
            # No path: look where a user following the error message would likely put it.
            cdir = cache_dir or default_cache_dir()
            for name in ("enwik8", "enwik8.zip", "enwik8.gz"):
                if os.path.isfile(os.path.join(cdir, name)):
                    return open_enwik8(os.path.join(cdir, name), cache_dir=cache_dir, verbose=verbose)
            raise _enwik8_error(f"no path given and none of enwik8, enwik8.zip, enwik8.gz in {cdir!r}; "
                                f"use enwik8:PATH", ENWIK8_SIZE)
        return open_enwik8(arg, cache_dir=cache_dir, verbose=verbose)
    if kind == "text":
        if not arg:
            raise ValueError("text:PATH needs a path to a text file or folder, e.g. text:./my_notes")
        return open_text(arg, cache_dir=cache_dir, verbose=verbose)
    raise ValueError(f"unknown data spec {spec!r}; accepted: {', '.join(_SPEC_FORMS)} "
                     f"(the passkey task is longnet.training.data.PasskeyTask)")
