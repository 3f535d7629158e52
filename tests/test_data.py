"""Byte-level data: built-in corpus, enwik8 (small generated files of the same format), text, samplers, passkey."""

import gzip
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from longnet.training.data import (
    ENWIK8_URL, Corpus, LongNetDataError, PasskeyTask, RandomWindowSampler, check_sampler_state, iter_eval_windows,
    num_eval_windows, open_builtin, open_corpus, open_enwik8, open_text,
)
from longnet.training.data.corpus import _bucket, _byte_split

SMALL = 10_000  # stand-in for enwik8's 100,000,000 bytes


def _payload(n=SMALL, seed=0):
    rng = np.random.default_rng(seed)
    return bytes(rng.integers(32, 127, size=n, dtype=np.uint8))


def _assert_memmap_split(c: Corpus):
    for arr in (c.train, c.valid, c.test):
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint8 and arr.ndim == 1 and arr.size > 0


# ----------------------------------------------------------------------------- builtin


def test_builtin_real_stdlib_small(tmp_path, capsys):
    c = open_builtin(cache_dir=str(tmp_path), max_files=60)
    _assert_memmap_split(c)
    err = capsys.readouterr().err
    assert "60 files" in err and "bytes" in err and str(tmp_path) in err
    assert bytes(c.train[:6]) == b"# ==> "
    total = sum(c.sizes.values())
    assert total == os.path.getsize(c.path)
    # second open: from cache, silent, same bytes
    c2 = open_builtin(cache_dir=str(tmp_path), max_files=60)
    assert capsys.readouterr().err == ""
    assert c2.path == c.path and np.array_equal(c2.valid, c.valid)


def test_builtin_default_full_stdlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LONGNET_CACHE", str(tmp_path))
    c = open_corpus()  # None -> builtin, cache dir from $LONGNET_CACHE
    _assert_memmap_split(c)
    assert os.path.dirname(c.path) == str(tmp_path)
    assert "standard library" in capsys.readouterr().err
    assert c.meta["mode"] == "file" and c.meta["n_files"] > 100 and sum(c.sizes.values()) > 1_000_000
    headers = [line for line in bytes(c.test).split(b"\n") if line.startswith(b"# ==> ")]
    assert headers and not any(b"site-packages" in h or b"/test/" in h or h.startswith(b"# ==> test/")
                               for h in headers)
    assert open_corpus("builtin").path == c.path


def _make_tree(root, n=40):
    for i in range(n):
        d = root / f"pkg{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"m{i}.py").write_text(f"def f{i}():\n    return {i}\n" * (i + 1))
    (root / "pkg0" / "notes.txt").write_text("not python\n")
    for skipped in ("site-packages", "test", "__pycache__"):
        (root / skipped).mkdir()
        (root / skipped / "x.py").write_text("SKIPPED = 1\n")
    (root / "pkg1" / "binary.py").write_bytes(b"abc\0def")


def test_builtin_root_override_split_by_file_deterministic(tmp_path):
    src = tmp_path / "src"
    _make_tree(src)
    a = open_builtin(root=str(src), cache_dir=str(tmp_path / "c1"), verbose=False)
    b = open_builtin(root=str(src), cache_dir=str(tmp_path / "c2"), verbose=False)
    assert a.meta["mode"] == "file" and a.meta["n_files"] == 40 and a.meta["skipped_binary"] == 1
    for s in ("train", "valid", "test"):
        assert np.array_equal(a.split(s), b.split(s))
    text = b"".join(bytes(a.split(s)) for s in ("train", "valid", "test"))
    assert b"SKIPPED" not in text and b"not python" not in text and b"\0" not in text
    # each file lies whole in one split, which one depends only on its relative path
    valid = bytes(a.valid).decode()
    assert valid.startswith("# ==> ") and sum(a.meta["files_per_split"].values()) == 40
    for chunk in valid.split("# ==> ")[1:]:
        rel = chunk.split(" <==")[0]
        assert _bucket(rel) == "valid"


def test_builtin_cache_rebuilds_when_sources_change(tmp_path):
    src = tmp_path / "src"
    _make_tree(src)
    a = open_builtin(root=str(src), cache_dir=str(tmp_path / "c"), verbose=False)
    (src / "pkg2" / "new.py").write_text("NEW = 1\n" * 100)
    b = open_builtin(root=str(src), cache_dir=str(tmp_path / "c"), verbose=False)
    assert a.path != b.path and b.meta["n_files"] == 41


def test_builtin_errors(tmp_path):
    with pytest.raises(LongNetDataError, match="not found"):
        open_builtin(root=str(tmp_path / "nope"), cache_dir=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LongNetDataError, match="no text found"):
        open_builtin(root=str(tmp_path / "empty"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="max_files"):
        open_builtin(cache_dir=str(tmp_path), max_files=0)


# ----------------------------------------------------------------------------- enwik8


@pytest.mark.parametrize("fmt", ["raw", "zip", "gz", "folder"])
def test_enwik8_formats(tmp_path, fmt):
    data = _payload()
    if fmt in ("raw", "folder"):
        path = tmp_path / "enwik8"
        path.write_bytes(data)
    elif fmt == "zip":
        path = tmp_path / "enwik8.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("enwik8", data)
    else:
        path = tmp_path / "enwik8.gz"
        with gzip.open(path, "wb") as f:
            f.write(data)
    arg = str(tmp_path) if fmt == "folder" else str(path)
    c = open_enwik8(arg, expected_size=SMALL, cache_dir=str(tmp_path / "cache"), verbose=False)
    _assert_memmap_split(c)
    assert c.sizes == {"train": 9000, "valid": 500, "test": 500}
    assert bytes(c.train) + bytes(c.valid) + bytes(c.test) == data
    if fmt in ("zip", "gz"):
        assert c.path.startswith(str(tmp_path / "cache"))
        again = open_enwik8(str(path), expected_size=SMALL, cache_dir=str(tmp_path / "cache"), verbose=False)
        assert again.path == c.path
    else:
        assert c.path == str(path)  # raw file is memmapped in place, not copied


def test_enwik8_standard_split_sizes():
    assert _byte_split(100_000_000, (90, 5, 5)) == (90_000_000, 5_000_000, 5_000_000)


def _assert_helpful(excinfo, *words):
    msg = str(excinfo.value)
    assert ENWIK8_URL in msg and "-byte enwik8" in msg  # says where to get it and what size is expected
    for w in words:
        assert w in msg


def test_enwik8_missing_file(tmp_path):
    with pytest.raises(LongNetDataError) as e:
        open_corpus(f"enwik8:{tmp_path / 'enwik8.zip'}", cache_dir=str(tmp_path))
    _assert_helpful(e, "not found", "100,000,000")


def test_enwik8_wrong_size(tmp_path):
    raw = tmp_path / "enwik8"
    raw.write_bytes(_payload(SMALL - 1))
    with pytest.raises(LongNetDataError) as e:
        open_enwik8(str(raw), expected_size=SMALL, cache_dir=str(tmp_path))
    _assert_helpful(e, "9,999 bytes", f"{SMALL:,}")
    gz = tmp_path / "big.gz"
    with gzip.open(gz, "wb") as f:
        f.write(_payload(SMALL + 5000))
    with pytest.raises(LongNetDataError) as e:
        open_enwik8(str(gz), expected_size=SMALL, cache_dir=str(tmp_path / "c"))
    _assert_helpful(e, "more than")
    assert not [p for p in os.listdir(tmp_path / "c") if p.endswith(".bin")]  # no partial extraction left


def test_enwik8_corrupt_archives(tmp_path):
    bad = tmp_path / "enwik8.zip"
    bad.write_bytes(b"PK\x03\x04" + b"garbage" * 100)
    with pytest.raises(LongNetDataError) as e:
        open_enwik8(str(bad), expected_size=SMALL, cache_dir=str(tmp_path / "c"))
    _assert_helpful(e, "corrupt")
    # a valid zip whose compressed data is damaged: CRC / inflate error while streaming
    good = tmp_path / "e.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", _payload())
    raw = bytearray(good.read_bytes())
    for i in range(60, 400):
        raw[i] ^= 0x5A
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(LongNetDataError) as e:
        open_enwik8(str(damaged), expected_size=SMALL, cache_dir=str(tmp_path / "c"))
    _assert_helpful(e)
    wrong_member = tmp_path / "other.zip"
    with zipfile.ZipFile(wrong_member, "w") as zf:
        zf.writestr("enwik9", _payload())
    with pytest.raises(LongNetDataError) as e:
        open_enwik8(str(wrong_member), expected_size=SMALL, cache_dir=str(tmp_path / "c"))
    _assert_helpful(e, "no member 'enwik8'")
    truncated = tmp_path / "t.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(_payload())
    truncated.write_bytes(truncated.read_bytes()[:-40])
    with pytest.raises(LongNetDataError) as e:
        open_enwik8(str(truncated), expected_size=SMALL, cache_dir=str(tmp_path / "c"))
    _assert_helpful(e)


# ----------------------------------------------------------------------------- text


def test_text_single_file_byte_split(tmp_path):
    f = tmp_path / "book.txt"
    f.write_bytes(b"".join(b"line %d of a book\n" % i for i in range(500)))
    c = open_corpus(f"text:{f}", cache_dir=str(tmp_path / "c"), verbose=False)
    _assert_memmap_split(c)
    assert c.meta["mode"] == "byte"
    total = f.stat().st_size
    assert c.sizes["train"] == total * 90 // 100 and c.sizes["valid"] == total * 5 // 100
    assert bytes(c.train) + bytes(c.valid) + bytes(c.test) == f.read_bytes()


def test_text_folder(tmp_path, capsys):
    d = tmp_path / "notes"
    for i in range(30):
        sub = d / f"s{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"n{i}.md").write_text(f"note {i}\n" * 20)
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (d / ".hidden").write_text("secret")
    c = open_corpus(f"text:{d}", cache_dir=str(tmp_path / "c"))
    assert "30 files" in capsys.readouterr().err
    everything = bytes(c.train) + bytes(c.valid) + bytes(c.test)
    assert b"PNG" not in everything and b"secret" not in everything
    assert everything.count(b"note ") == 30 * 20
    assert c.meta["mode"] == "file"
    # deterministic: a fresh cache gives the same split
    c2 = open_text(str(d), cache_dir=str(tmp_path / "c2"), verbose=False)
    assert np.array_equal(c.valid, c2.valid) and np.array_equal(c.test, c2.test)


def test_text_few_files_fall_back_to_byte_split(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    (d / "a.txt").write_text("alpha " * 100)
    (d / "b.txt").write_text("beta " * 100)
    c = open_text(str(d), cache_dir=str(tmp_path / "c"), verbose=False)
    assert c.meta["mode"] == "byte"
    assert bytes(c.train) + bytes(c.valid) + bytes(c.test) == b"alpha " * 100 + b"\n\n" + b"beta " * 100


def test_text_errors(tmp_path):
    with pytest.raises(LongNetDataError, match="neither a file nor a folder"):
        open_corpus(f"text:{tmp_path / 'missing'}", cache_dir=str(tmp_path))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.dat").write_bytes(b"\0\1\2")
    with pytest.raises(LongNetDataError, match="no text found"):
        open_corpus(f"text:{tmp_path / 'bin'}", cache_dir=str(tmp_path))
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(LongNetDataError, match="too small"):
        open_corpus(f"text:{tmp_path / 'tiny.txt'}", cache_dir=str(tmp_path))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(LongNetDataError, match="no files"):
        open_text(str(tmp_path / "emptydir"), cache_dir=str(tmp_path))


def test_open_corpus_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="PasskeyTask"):
        open_corpus("passkey")
    with pytest.raises(ValueError, match="enwik8:PATH"):
        open_corpus("wikitext:foo")
    with pytest.raises(ValueError, match="text:PATH"):
        open_corpus("text:")
    with pytest.raises(TypeError):
        open_corpus(3)
    with pytest.raises(LongNetDataError, match="enwik8:PATH"):
        open_corpus("enwik8", cache_dir=str(tmp_path))


# ----------------------------------------------------------------------------- samplers


def _ramp(n=5000):
    return (np.arange(n) % 251).astype(np.uint8)


def test_sampler_windows_and_determinism():
    data = _ramp()
    s = RandomWindowSampler(data, 4, 32, seed=7)
    x, y = s.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x[:, 1:] - x[:, :-1]) % 251, torch.ones(4, 31, dtype=torch.int64))  # contiguous windows
    t = RandomWindowSampler(data, 4, 32, seed=7)
    assert torch.equal(t.next_batch()[0], x)
    u = RandomWindowSampler(data, 4, 32, seed=8)
    assert not torch.equal(u.next_batch()[0], x)


def test_sampler_covers_both_ends():
    data = np.arange(40, dtype=np.uint8)
    s = RandomWindowSampler(data, 64, 9, seed=0)
    firsts = set()
    for _ in range(20):
        x, y = s.next_batch()
        firsts |= set(x[:, 0].tolist())
    assert firsts == set(range(40 - 9))  # every start 0 .. len-(seq_len+1) reachable, none beyond


def test_sampler_resume_state_dict():
    data = _ramp()
    a = RandomWindowSampler(data, 3, 16, seed=1)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip
    expect = [a.next_batch() for _ in range(3)]
    b = RandomWindowSampler(data, 3, 16, seed=999)
    b.load_state_dict(state)
    assert b.step == 5
    for (xe, ye), (xb, yb) in zip(expect, [b.next_batch() for _ in range(3)]):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    with pytest.raises(ValueError, match="seq_len"):
        RandomWindowSampler(data, 3, 17).load_state_dict(state)
    RandomWindowSampler(data, 3, 17).load_state_dict(state, strict=False)
    with pytest.raises(ValueError, match="PasskeyTask"):
        b.load_state_dict(PasskeyTask(128).state_dict())


def test_sampler_states_are_checked_and_their_differences_named():
    data = _ramp()
    a = RandomWindowSampler(data, 3, 16, seed=1)
    a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    other = RandomWindowSampler(np.zeros(data.size + 7, np.uint8), 3, 8)
    assert other.state_differences(state) == {"seq_len": (16, 8), "data_size": (data.size, data.size + 7)}
    assert a.state_differences(state) == {}
    task = PasskeyTask(128, key_digits=3)
    assert PasskeyTask(128, key_digits=4).state_differences(task.state_dict()) == {"key_digits": (3, 4)}
    check_sampler_state(state)
    check_sampler_state(task.state_dict())
    for bad, match in [([1, 2], "JSON object"), ({**state, "kind": "Other"}, "'kind'"),
                       ({**state, "step": -1}, "'step'"), ({**state, "step": "3"}, "'step'"),
                       ({**state, "bit_generator": {"bit_generator": "PCG64"}}, "'bit_generator'")]:
        with pytest.raises(ValueError, match=match):
            check_sampler_state(bad)
        with pytest.raises(ValueError, match=match):
            RandomWindowSampler(data, 3, 16).load_state_dict(bad, strict=False)


def test_sampler_bad_inputs():
    with pytest.raises(ValueError, match=r"100 bytes.*seq_len \+ 1 = 101"):
        RandomWindowSampler(np.zeros(100, np.uint8), 2, 100)
    with pytest.raises(ValueError, match="batch_size"):
        RandomWindowSampler(_ramp(), 0, 8)
    with pytest.raises(TypeError, match="1-D numpy"):
        RandomWindowSampler(torch.zeros(100), 2, 8)


def test_eval_windows():
    data = _ramp(1000)
    wins = list(iter_eval_windows(data, 64, batch_size=4))
    n = num_eval_windows(1000, 64)
    assert n == (1000 - 1) // 64 == 15 and sum(x.shape[0] for x, _ in wins) == n
    assert [x.shape[0] for x, _ in wins] == [4, 4, 4, 3]
    x = torch.cat([x for x, _ in wins]).reshape(-1)
    y = torch.cat([y for _, y in wins]).reshape(-1)
    ref = torch.from_numpy(data.astype(np.int64))
    assert torch.equal(x, ref[:n * 64]) and torch.equal(y, ref[1:n * 64 + 1])  # contiguous, non-overlapping
    assert sum(x.shape[0] for x, _ in iter_eval_windows(data, 64, batch_size=4, max_windows=6)) == 6
    strided = list(iter_eval_windows(data, 64, stride=32))
    assert len(strided) == num_eval_windows(1000, 64, stride=32) and strided[1][0][0, 0] == 32
    again = list(iter_eval_windows(data, 64, batch_size=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(wins, again))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        next(iter_eval_windows(data[:10], 64))
    with pytest.raises(ValueError, match="stride"):
        next(iter_eval_windows(data, 64, stride=0))


# ----------------------------------------------------------------------------- passkey


def _decode(row):
    return bytes(row.tolist()).decode()


def test_passkey_layout_and_distance():
    t = PasskeyTask(512, 300, key_digits=5, seed=3)
    x, y, mask = t.batch(4)
    assert x.shape == y.shape == mask.shape == (4, 512) and x.dtype == torch.int64 and mask.dtype == torch.bool
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert mask.sum(1).tolist() == [5] * 4 and mask[:, -5:].all()
    for b in range(4):
        full = _decode(torch.cat([x[b], y[b, -1:]]))
        assert full.endswith(full[-5:]) and full[-5:].isdigit()
        key = full[-5:]
        query = "What is the pass key? The pass key is "
        assert full[:-5].endswith(query)
        needle = f"The pass key is {key}. Remember it."
        pos = full.index(needle) + len("The pass key is ")
        assert full.count(needle) == 1 and (len(full) - 5) - pos == 300  # distance: needle key -> answer
        assert _decode(y[b][mask[b]]) == key
    assert len({_decode(y[b][mask[b]]) for b in range(4)}) > 1  # keys vary


def test_passkey_extreme_and_random_distances():
    t = PasskeyTask(256, seed=0)
    lo, hi = t.min_distance, t.max_distance
    for d in (lo, hi):
        x, y, _ = PasskeyTask(256, d).batch(2)
        full = _decode(torch.cat([x[0], y[0, -1:]]))
        assert "The pass key is " in full[:-5]
    assert _decode(PasskeyTask(256, hi).batch(1)[0][0]).startswith("\nThe pass key is ")  # needle at byte 0
    x, y, _ = t.batch(16)
    dists = set()
    for b in range(16):
        full = _decode(torch.cat([x[b], y[b, -1:]]))
        dists.add(len(full) - 5 - (full.index("The pass key is ") + len("The pass key is ")))
    assert len(dists) > 1 and all(lo <= d <= hi for d in dists)


def test_passkey_accuracy_metric():
    t = PasskeyTask(128, 80, key_digits=4)
    x, y, mask = t.batch(4)
    logits = torch.nn.functional.one_hot(y, 256).float()
    assert t.accuracy(logits, y, mask) == 1.0 and t.digit_accuracy(logits, y, mask) == 1.0
    wrong = logits.clone()
    wrong[0, -1] = torch.nn.functional.one_hot((y[0, -1] + 1) % 256, 256).float()  # one digit of sequence 0
    wrong[1, :-4] = 0  # non-answer positions do not count
    assert t.accuracy(wrong, y, mask) == 0.75 and t.digit_accuracy(wrong, y, mask) == 15 / 16
    assert t.accuracy(torch.zeros_like(logits), y, mask) == 0.0  # argmax 0 is never a digit
    with pytest.raises(ValueError, match=r"\(B, N, V\)"):
        t.accuracy(logits[0], y, mask)
    with pytest.raises(TypeError, match="bool"):
        t.accuracy(logits, y, mask.long())


def test_passkey_sampler_interface_and_resume():
    t = PasskeyTask(200, seed=5, batch_size=3)
    t.next_batch()
    state = t.state_dict()
    expect = [t.next_batch() for _ in range(2)]
    u = PasskeyTask(200, seed=0, batch_size=3)
    u.load_state_dict(json.loads(json.dumps(state)))
    for (xe, ye), (xu, yu) in zip(expect, [u.next_batch() for _ in range(2)]):
        assert xe.shape == (3, 200) and torch.equal(xe, xu) and torch.equal(ye, yu)
    g1, g2 = np.random.default_rng(4), np.random.default_rng(4)
    assert torch.equal(t.batch(2, g1)[0], u.batch(2, g2)[0])


def test_passkey_bad_inputs():
    with pytest.raises(ValueError, match="too short"):
        PasskeyTask(40)
    t = PasskeyTask(256)
    with pytest.raises(ValueError, match=r"distance must be in \["):
        PasskeyTask(256, t.max_distance + 1)
    with pytest.raises(ValueError, match=r"distance must be in \["):
        PasskeyTask(256, t.min_distance - 1)
    with pytest.raises(ValueError, match="key_digits"):
        PasskeyTask(256, key_digits=0)
    with pytest.raises(ValueError, match="seq_len"):
        PasskeyTask(0)
    with pytest.raises(TypeError, match="generator"):
        t.batch(2, generator=torch.Generator())
