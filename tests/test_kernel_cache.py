"""The extension cache heals (issue 24): a library is verified before it is loaded, and a
truncated, empty or garbage one is rebuilt, with a line on stderr, instead of a Bus error or a
fallback on every later run. Each case runs in a fresh subprocess with its own cache
(``TORCH_EXTENSIONS_DIR``). A one-function extension (Python's C API only) builds in a second
or two; the real kernel's rebuild is the slow test at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = r"""
#include <Python.h>
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "longnet_tiny_ext", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_longnet_tiny_ext(void) { return PyModule_Create(&mod); }
"""

LOAD = textwrap.dedent("""
    import sys
    from longnet.backends.kernel_cache import load_extension
    m = load_extension("longnet_tiny_ext", sys.argv[1], ["-O0"], [], what="the tiny extension")
    print("answer", m.answer())
""")


def _need_compiler():
    from torch.utils import cpp_extension
    if shutil.which(os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available():
        pytest.fail("these tests build a C++ extension: they need c++ and ninja on PATH")


@pytest.fixture
def tiny(tmp_path):
    _need_compiler()
    src = tmp_path / "tiny.cpp"
    src.write_text(TINY)
    cache = tmp_path / "ext"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache))

    def load(timeout=300):
        return subprocess.run([sys.executable, "-c", LOAD, str(src)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)

    return src, cache, load


def _library(cache):
    (folder,) = [d for d in cache.iterdir() if d.name.startswith("longnet_tiny_ext-")]
    return folder, folder / "longnet_tiny_ext.so"


def _damage(folder, lib, how):
    data = lib.read_bytes()
    if how == "truncated":
        lib.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        lib.write_bytes(b"")
    elif how == "garbage":
        lib.write_bytes(os.urandom(len(data)))
    else:
        (folder / "longnet-build.json").unlink()


def _heals(load):
    healed = load()
    assert healed.returncode == 0 and "answer 42" in healed.stdout, (healed.returncode, healed.stderr)
    assert "the tiny extension in" in healed.stderr and "is damaged" in healed.stderr and "rebuilding" in healed.stderr


def test_a_build_is_announced_verified_reused_and_healed(tiny):
    src, cache, load = tiny
    first = load()
    assert first.returncode == 0 and "answer 42" in first.stdout, first.stderr
    assert "building the tiny extension into" in first.stderr
    folder, lib = _library(cache)
    assert (folder / "longnet-build.json").is_file() and (folder / "tiny.cpp").read_text() == TINY
    _damage(folder, lib, "truncated")
    _heals(load)
    again = load()  # healed for good: no message, no rebuild
    assert again.returncode == 0 and "answer 42" in again.stdout and again.stderr == "", again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["garbage", "empty", "no record"])
def test_a_garbage_empty_or_unrecorded_library_is_rebuilt(how, tiny):
    src, cache, load = tiny
    assert load().returncode == 0
    _damage(*_library(cache), how)
    _heals(load)


@pytest.mark.slow
def test_a_lock_file_left_by_a_killed_build_does_not_hang(tiny):
    src, cache, load = tiny
    assert load().returncode == 0
    folder, lib = _library(cache)
    (folder / "lock").write_text("")  # what torch's FileBaton leaves when its build is killed
    lib.write_bytes(b"")  # so that torch has to build, which is where it waits on that file
    done = load(timeout=120)
    assert done.returncode == 0 and "answer 42" in done.stdout, done.stderr


@pytest.mark.slow
def test_another_source_gets_its_own_folder(tiny):
    src, cache, load = tiny
    assert load().returncode == 0
    src.write_text(TINY.replace("42", "43"))
    other = load()
    assert "answer 43" in other.stdout and "building the tiny extension" in other.stderr
    src.write_text(TINY)
    back = load()  # the first version's build is still there, verified: no rebuild
    assert "answer 42" in back.stdout and back.stderr == "", back.stderr
    assert len([d for d in cache.iterdir() if d.name.startswith("longnet_tiny_ext-")]) == 2


def test_no_compiler_is_said_plainly(tmp_path, monkeypatch):
    import warnings

    import longnet.backends.cpu_flash as cpu_flash
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv(cpu_flash.ENV, "auto")
    monkeypatch.setattr(cpu_flash, "_module", None)
    monkeypatch.setattr(cpu_flash, "_failed", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_flash.module() is None
    (w,) = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    text = str(w.message)
    assert "no C++ compiler found ('c++' is not on PATH)" in text and "ninja -v" not in text and len(text) < 300


def test_an_unwritable_cache_names_the_folder_not_the_compiler(tmp_path, monkeypatch):
    from longnet.backends.kernel_cache import CacheError, explain_failure, load_extension
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "afile"))
    src = tmp_path / "tiny.cpp"
    src.write_text(TINY)
    with pytest.raises(CacheError) as e:
        load_extension("longnet_tiny_ext", str(src), [], [], what="the tiny extension")
    text = explain_failure(e.value)
    assert "cannot write the extension cache" in text and "TORCH_EXTENSIONS_DIR" in text and "g++" not in text


@pytest.mark.slow
def test_a_truncated_kernel_is_rebuilt_not_a_bus_error(tmp_path):
    """The case of the report: build the real kernel, truncate it to 100,000 bytes, call the op."""
    _need_compiler()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), LONGNET_CPU_KERNEL="longnet",
               OMP_NUM_THREADS="1")
    call = ("import torch; from longnet.backends import cpu_flash; q = torch.randn(1, 2, 64, 16); "
            "out, lse = cpu_flash.fwd(q, q, q, True, 0.25); print('finite', bool(out.isfinite().all()))")

    def run():
        return subprocess.run([sys.executable, "-c", call], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)

    first = run()
    assert first.returncode == 0 and "finite True" in first.stdout, first.stderr
    (lib,) = list((tmp_path / "ext").glob("longnet_flash_cpu-*/longnet_flash_cpu.so"))
    os.truncate(lib, 100_000)
    healed = run()
    assert healed.returncode == 0 and "finite True" in healed.stdout, (healed.returncode, healed.stderr)
    assert "is damaged" in healed.stderr and "rebuilding" in healed.stderr
