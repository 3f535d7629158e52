"""Evaluation (``longnet/training/evaluate.py``): the per-position loss and its boundary-spike
metric, the weighted loss, and the ``longnet eval`` command (its progress bar, ``--position-loss``).

Bits-per-byte through ``longnet eval`` after a real training run is also checked end to end in
test_train.py; DCP checkpoints under ``longnet eval`` in test_dcp.py.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from longnet.cli import main
from longnet.model import LongNetLM
from longnet.training.data import PasskeyTask, RandomWindowSampler
from longnet.training.evaluate import (
    boundary_spike,
    next_token_loss,
    position_loss,
    weighted_loss,
)
from tests.train_helpers import MICRO, PNG_MAGIC, write_corpus


# ----------------------------------------------------------------------------- the spike metric


def test_boundary_spike_of_a_synthetic_loss_curve():
    losses = np.full(512, 1.84)
    losses[::128] = 2.68  # the boundary residue
    losses[1::128] = 2.20
    losses[:5] = 9.0  # the first positions have no context: left out by the default skip
    s = boundary_spike(losses, 128)
    assert s.period == 128 and s.skip == 128
    assert s.spike == pytest.approx(2.68 / 1.84)
    assert s.worst(2) == [(0, pytest.approx(2.68 / 1.84)), (1, pytest.approx(2.20 / 1.84))]
    assert s.group_means.shape == (128,) and s.median == pytest.approx(1.84)
    assert boundary_spike(np.ones(300), 100).spike == 1.0
    assert boundary_spike(losses, 128, skip=0).spike > s.spike  # the first positions would count


@pytest.mark.parametrize("losses,period,kw,match", [
    (np.ones(300), 1, {}, "period must be an integer >= 2"),
    (np.ones(150), 100, {}, "fewer than one full period"),
    (np.ones((2, 300)), 100, {}, "1-D"),
    (np.array([1.0, np.nan] * 150), 100, {}, "finite"),
    (np.ones(300), 100, {"skip": -1}, "skip"),
])
def test_boundary_spike_rejects_bad_input(losses, period, kw, match):
    with pytest.raises(ValueError, match=match):
        boundary_spike(losses, period, **kw)


def test_position_loss_averages_the_seeded_windows():
    torch.manual_seed(0)
    model = LongNetLM(n_layers=1, d_model=16, n_heads=2, d_ffn=32, segment_lengths=(8, 16), dilation_rates=(1, 2))
    data = np.random.default_rng(0).integers(0, 256, 4000).astype(np.uint8)
    losses = position_loss(model, data, 32, num_windows=5, seed=3, batch_size=2)
    x, y = RandomWindowSampler(data, 5, 32, seed=3).next_batch()
    with torch.no_grad():
        per_token, _ = next_token_loss(model.eval(), x, y, reduction="none")
    assert losses.shape == (32,)
    np.testing.assert_allclose(losses, per_token.view(5, 32).mean(0).double().numpy(), rtol=1e-5)


# ----------------------------------------------------------------------------- the weighted loss


def test_weighted_loss_is_the_weighted_mean():
    task = PasskeyTask(128, key_digits=4, answer_weight=10.0)
    per_token = torch.ones(3, 128)
    per_token[:, -4:] = 5.0  # answer positions lose 5 nats, filler 1
    expected = (124 * 1.0 + 10 * 4 * 5.0) / (124 + 10 * 4)
    assert float(weighted_loss(per_token, task.loss_weights())) == pytest.approx(expected)
    assert float(weighted_loss(per_token, task.loss_weights().expand(3, -1))) == pytest.approx(expected)
    with pytest.raises(ValueError, match="weights"):
        weighted_loss(per_token, torch.ones(64))


# ----------------------------------------------------------------------------- longnet eval


def test_eval_shows_a_progress_bar(finished_run, corpus, capsys):
    _, cache = corpus
    argv = ["eval", "--checkpoint", str(finished_run), "--cache-dir", cache, "--max-windows", "3",
            "--batch-size", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "windows" in err and "3/3" in err
    assert main(argv + ["--no-progress"]) == 0
    assert "3/3" not in capsys.readouterr().err


def test_eval_position_loss_prints_the_spike_and_writes_files(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--data", corpus, "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                 "--max-steps", "2", *MICRO]) == 0
    capsys.readouterr()
    csv_path, png_path = tmp_path / "pos.csv", tmp_path / "pos.png"
    assert main(["eval", "--checkpoint", str(out), "--cache-dir", str(tmp_path / "cache"), "--position-loss",
                 "--max-windows", "4", "--position-csv", str(csv_path), "--position-png", str(png_path),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "boundary spike (positions >= 8 by residue mod 8)" in text and "worst residues" in text
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["position"]) for r in rows] == list(range(32))
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    # a window too short for two periods, and the passkey task, are refused up front
    assert main(["eval", "--checkpoint", str(out), "--position-loss", "--context", "12"]) == 2
    assert "--context (12) must be at least twice" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(out), "--data", "passkey", "--context", "128", "--position-loss"]) == 2
    assert "needs a corpus" in capsys.readouterr().err
