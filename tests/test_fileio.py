"""The shared helpers of the lowest layer: read_json (longnet.fileio) and one_line (longnet.checks)."""

import pytest

from longnet.checks import one_line
from longnet.fileio import atomic_write_json, read_json


def test_read_json_reads_what_atomic_write_json_wrote_and_names_a_damaged_file(tmp_path):
    path = str(tmp_path / "a.json")
    atomic_write_json(path, {"x": [1, 2.5, None]})
    assert read_json(path) == {"x": [1, 2.5, None]}
    with pytest.raises(FileNotFoundError):
        read_json(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_bytes(b'{"x": \xff')
    with pytest.raises(ValueError, match=r"bad\.json is damaged: not readable JSON \("):
        read_json(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="not readable JSON"):
        read_json(str(tmp_path))  # a folder: an OSError other than a missing file


def test_one_line_joins_lines_and_cuts_long_messages():
    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(ValueError("x" * 300), limit=10) == "x" * 10 + "..."
