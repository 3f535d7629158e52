"""Shared by the trainer tests: a micro model config, a small corpus, and readers of a run folder.

The ``finished_run`` fixture (a 4-step run with two checkpoints) is in conftest.py.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import shutil
from typing import Dict, List, Tuple

# A 2-layer, d=32 model on 32-byte windows: a step takes milliseconds.
MICRO = ["--set", "model.n_layers=2", "--set", "d_model=32", "--set", "n_heads=4", "--set", "d_ffn=64",
         "--set", "segment_lengths=8,16", "--set", "dilation_rates=1,2", "--set", "seq_len=32",
         "--set", "batch_size=2", "--set", "eval_windows=2", "--set", "eval_interval=2",
         "--set", "sample_tokens=8", "--set", "warmup_steps=2", "--set", "num_threads=1", "--no-progress"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_corpus(folder, lines: int = 800) -> str:
    """A small code-like text file in ``folder``; returns its ``text:`` data spec."""
    rng = random.Random(0)
    words = "def class return self import for in if else while yield lambda print value".split()
    path = os.path.join(str(folder), "code.txt")
    with open(path, "w") as f:
        f.write("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(lines)))
    return f"text:{path}"


def train_rows(out, split: str = "train") -> List[Tuple[int, str]]:
    """(step, loss as logged) of the rows of ``split`` in the run's log.csv."""
    with open(os.path.join(str(out), "log.csv")) as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f) if r["split"] == split]


def train_argv(corpus, out, *extra) -> List[str]:
    """``longnet train`` arguments for the MICRO model on ``corpus`` (spec, cache dir) into ``out``."""
    spec, cache = corpus
    return ["train", "--data", spec, "--cache-dir", cache, "--out", str(out), *MICRO, *extra]


def run_train(corpus, out, *extra) -> int:
    """Run :func:`train_argv`'s command in this process; returns its exit code."""
    from longnet.cli import main
    return main(train_argv(corpus, out, *extra))


def copy_run(run, tmp_path):
    """A copy of the run folder ``run`` at ``tmp_path / "run"``, for a test that may damage or extend it."""
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def file_hashes(path) -> Dict[str, str]:
    """Every file under ``path`` with its content hash: equal trees mean nothing was written."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def error_line(err: str, command: str) -> str:
    """The one line of ``err``, checked to be ``longnet COMMAND: error: ...``."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"longnet {command}: error: "), err
    return lines[0]
