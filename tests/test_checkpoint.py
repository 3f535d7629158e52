"""Checkpoints (``longnet/training/checkpoint.py``): a save and load round trip, the errors of a
folder that holds none, durable writes (every file and folder fsynced, published by rename),
saves cut short by a dying process, and each damaged file named in one line with ``--resume``
falling back to an older intact checkpoint. DCP (sharded) checkpoints are in test_dcp.py.

Micro configs; ``finished_run`` (conftest.py) is a 4-step run with checkpoints at steps 2 and 4.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from longnet.cli import main
from longnet.config import TrainConfig
from longnet.model import LongNetLM
from longnet.training.checkpoint import (FILES, CheckpointError, load_checkpoint, load_model, load_trainer_state,
                                         resolve_checkpoint, save_checkpoint)
from longnet.training.data import RandomWindowSampler
from tests.train_helpers import copy_run as _copy
from tests.train_helpers import error_line as _error_line
from tests.train_helpers import file_hashes as _tree
from tests.train_helpers import run_train, train_rows


# ----------------------------------------------------------------------------- save and load


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LongNetLM(n_layers=2, d_model=32, n_heads=4, d_ffn=64, segment_lengths=(8,), dilation_rates=(1,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.loss(torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 9))).backward()
    opt.step()
    tcfg = TrainConfig(max_steps=5)
    sampler = RandomWindowSampler(np.arange(100, dtype=np.uint8), 2, 8, seed=0)
    for step in (1, 2, 3):
        sampler.next_batch()
        path = save_checkpoint(str(tmp_path), model=model, train_config=tcfg, data_spec="builtin", step=step,
                               optimizer=opt, data_state=sampler.state_dict(), keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002", "step_00000003"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_00000003"
    assert resolve_checkpoint(str(tmp_path)) == path
    info = load_checkpoint(str(tmp_path))
    assert info["step"] == 3 and info["data"] == "builtin" and info["model_config"] == model.config
    assert info["train_config"] == tcfg
    loaded = load_model(str(tmp_path))
    assert loaded.lm_head.weight is loaded.embed.weight  # tying survives
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randint(0, 256, (1, 20))
    torch.testing.assert_close(loaded(x), model.eval()(x), atol=0, rtol=0)
    state, data_state = load_trainer_state(path)
    assert data_state == json.loads(json.dumps(sampler.state_dict())) and data_state["step"] == 3
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # Tied weights are stored once; nothing temporary is left behind.
    assert "lm_head.weight" not in load_file(os.path.join(path, "model.safetensors"))
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(str(tmp_path))
    d = tmp_path / "fake"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    (d / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a longnet checkpoint"):
        load_checkpoint(str(d))


# ----------------------------------------------------------------------------- writing


def _tiny_model():
    torch.manual_seed(0)
    return LongNetLM(n_layers=1, d_model=32, n_heads=4, d_ffn=64, segment_lengths=(8,), dilation_rates=(1,))


def test_checkpoint_files_and_folders_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    path = save_checkpoint(str(tmp_path), model=_tiny_model(), train_config=TrainConfig(), data_spec="builtin",
                           step=1, data_state=None)
    ckpt_root = str(tmp_path / "checkpoints")
    tmp_dirs = [p for p in synced if os.path.basename(p).startswith(".tmp-step_00000001")]
    assert tmp_dirs, synced  # the folder's entries, before it is renamed into place
    for name in FILES:
        assert any(os.path.dirname(p) == tmp_dirs[0] and p.endswith(name) for p in synced), name
    # The rename into checkpoints/, then `latest` and its rename in the run folder.
    assert synced.index(ckpt_root) > synced.index(tmp_dirs[0])
    assert str(tmp_path) in synced and any(p.endswith("latest") for p in synced)
    assert os.path.isdir(path)


def test_a_save_that_died_midway_is_named_then_cleaned_up(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    stale = out / "checkpoints" / ".tmp-step_00000002-x1y2"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\x00" * 100)  # what a killed first save leaves
    assert main(["train", "--resume", "--out", str(out)]) == 2
    line = _error_line(capsys.readouterr().err, "train")
    assert str(stale) in line and "incomplete save" in line and "without --resume" in line
    assert run_train(corpus, out, "--max-steps", "2") == 0  # a new run in the same folder works
    assert "never saved a checkpoint; starting it over" in capsys.readouterr().err
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002"]


def test_a_checkpoint_swapped_out_when_the_process_died_is_put_back(tmp_path):
    model, tcfg = _tiny_model(), TrainConfig()
    save_checkpoint(str(tmp_path), model=model, train_config=tcfg, data_spec="builtin", step=1, keep=5)
    root = tmp_path / "checkpoints"
    old = root / ".old-step_00000001-abcd"
    old.mkdir()
    os.replace(root / "step_00000001", old / "step_00000001")  # died between the two renames
    save_checkpoint(str(tmp_path), model=model, train_config=tcfg, data_spec="builtin", step=2, keep=5)
    assert sorted(os.listdir(root)) == ["step_00000001", "step_00000002"]


# ----------------------------------------------------------------------------- damaged files


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _random(path):
    path.write_bytes(os.urandom(max(64, path.stat().st_size)))


def _config(edit):
    def apply(path):
        meta = json.loads(path.read_text())
        path.write_text(json.dumps(edit(meta)))
    return apply


def _wider(meta):
    meta["model"]["d_model"] = 64
    return meta


def _no_step(meta):
    del meta["step"]
    return meta


DAMAGE = {
    "weights-truncated": ("model.safetensors", _truncate),
    "weights-random": ("model.safetensors", _random),
    "trainer-state-truncated": ("trainer_state.pt", _truncate),
    "trainer-state-random": ("trainer_state.pt", _random),
    "data-state-truncated": ("data_state.json", _truncate),
    "data-state-random": ("data_state.json", _random),
    "config-contradicts-weights": ("config.json", _config(_wider)),
    "config-without-step": ("config.json", _config(_no_step)),
    "config-not-an-object": ("config.json", lambda p: p.write_text("[1, 2, 3]")),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_file_is_named_and_resume_falls_back(case, finished_run, tmp_path, capsys):
    name, damage = DAMAGE[case]
    # Only one checkpoint, and it is damaged: one line naming the file, exit 2, nothing written.
    alone = _copy(finished_run, tmp_path / "alone")
    shutil.rmtree(alone / "checkpoints" / "step_00000002")
    damage(alone / "checkpoints" / "step_00000004" / name)
    before = _tree(alone)
    assert main(["train", "--resume", "--out", str(alone), "--max-steps", "6"]) == 2
    line = _error_line(capsys.readouterr().err, "train")
    assert str(alone / "checkpoints" / "step_00000004" / name) in line or (
        name == "config.json" and str(alone / "checkpoints" / "step_00000004") in line)
    assert _tree(alone) == before
    if name in ("model.safetensors", "config.json"):  # what eval and generate read
        assert main(["eval", "--checkpoint", str(alone), "--max-windows", "1"]) == 2
        assert "step_00000004" in _error_line(capsys.readouterr().err, "eval")
    # With an older intact checkpoint, resume falls back to it and says so.
    run = _copy(finished_run, tmp_path / "fallback")
    damage(run / "checkpoints" / "step_00000004" / name)
    assert main(["train", "--resume", "--out", str(run), "--max-steps", "6", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "step_00000004" in captured.err and "resuming from the older" in captured.err
    assert "resuming at step 2" in captured.out
    assert load_checkpoint(str(run))["step"] == 6
    assert [s for s, _ in train_rows(run)] == [1, 2, 3, 4, 5, 6]
