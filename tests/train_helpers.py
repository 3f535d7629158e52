"""Shared by the trainer tests: a micro model config, a small corpus, and readers of a run folder."""

from __future__ import annotations

import csv
import os
import random
from typing import List, Tuple

# A 2-layer, d=32 model on 32-byte windows: a step takes milliseconds.
MICRO = ["--set", "model.n_layers=2", "--set", "d_model=32", "--set", "n_heads=4", "--set", "d_ffn=64",
         "--set", "segment_lengths=8,16", "--set", "dilation_rates=1,2", "--set", "seq_len=32",
         "--set", "batch_size=2", "--set", "eval_windows=2", "--set", "eval_interval=2",
         "--set", "sample_tokens=8", "--set", "warmup_steps=2", "--set", "num_threads=1", "--no-progress"]


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
