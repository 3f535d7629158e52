"""DCP checkpoints in one process (``--checkpoint-format dcp``): what eval, generate and the
safetensors export read, atomic saves, and (slow) an elastic restart under torchrun after a
rank is killed."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import longnet.training.trainer as train_mod
from longnet.cli import main
from longnet.training.checkpoint import (CheckpointError, PendingSave, checkpoint_steps, export_safetensors, is_dcp,
                                         load_model, load_resume_state, resolve_checkpoint, save_dcp_checkpoint)
from longnet.training.context import TrainContext
from tests.test_fsdp import _argv, _assert_same_curve, _free_port
from tests.test_sp_train import _train_rows
from tests.train_helpers import write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--max-steps", "6", "--set", "eval_interval=3", "--set", "save_interval=2"]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    data = (write_corpus(root), str(root / "cache"))
    rc, _, err = _run(_argv(data, root / "run", "--checkpoint-format", "dcp", *SHORT))
    assert rc == 0, err
    rc, _, err = _run(_argv(data, root / "plain", *SHORT))
    assert rc == 0, err
    return root, data


def test_one_process_dcp_run_matches_safetensors_and_is_read_directly(dcp_run, tmp_path):
    root, _ = dcp_run
    ckpt = resolve_checkpoint(str(root / "run"))
    assert is_dcp(ckpt) and ckpt.endswith("step_00000006") and checkpoint_steps(str(root / "run")) == [4, 6]
    _assert_same_curve(_train_rows(root / "run"), _train_rows(root / "plain"), "dcp vs safetensors run")
    a, b = load_model(str(root / "run")).state_dict(), load_model(str(root / "plain")).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)  # the same run, bit for bit
    out = export_safetensors(str(root / "run"), str(tmp_path / "model.safetensors"))
    exported = load_file(out)
    assert set(exported) <= set(a) and "embed.weight" in exported
    for k, v in exported.items():
        torch.testing.assert_close(v, a[k], rtol=0, atol=0)


def test_eval_and_generate_read_a_dcp_checkpoint(dcp_run):
    root, data = dcp_run
    rc, out, err = _run(["eval", "--checkpoint", str(root / "run"), "--data", data[0], "--cache-dir", data[1],
                         "--max-windows", "2", "--batch-size", "2", "--no-progress"])
    rc2, out2, _ = _run(["eval", "--checkpoint", str(root / "plain"), "--data", data[0], "--cache-dir", data[1],
                         "--max-windows", "2", "--batch-size", "2", "--no-progress"])
    assert rc == 0 and rc2 == 0, err
    assert out.splitlines()[-1].split("bpb")[1].split(",")[0] == out2.splitlines()[-1].split("bpb")[1].split(",")[0]
    rc, out, err = _run(["generate", "--checkpoint", str(root / "run"), "--prompt", "def ", "--max-new-tokens", "8",
                         "--temperature", "0"])
    assert rc == 0, err


def test_one_process_resumes_a_dcp_checkpoint_on_the_same_curve(dcp_run, tmp_path):
    root, data = dcp_run
    cut = tmp_path / "cut"

    def stop(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "_after_step", stop)
        assert _run(_argv(data, cut, "--checkpoint-format", "dcp", *SHORT))[0] == 128 + signal.SIGTERM
    assert is_dcp(resolve_checkpoint(str(cut)))
    assert _run(["train", "--resume", "--out", str(cut), "--no-progress"])[0] == 0
    _assert_same_curve(_train_rows(cut), _train_rows(root / "plain"), "resumed from DCP")


def test_an_unfinished_dcp_save_never_becomes_latest(dcp_run, tmp_path, monkeypatch):
    root, _ = dcp_run
    run = tmp_path / "run"
    import shutil
    shutil.copytree(root / "run", run)
    resume = load_resume_state(str(run))
    model = resume.model
    from longnet.training.checkpoint import load_dcp_state
    from longnet.training.optim import decay_groups
    opt = torch.optim.AdamW(decay_groups(model, 0.1))  # the trainer's two groups
    load_dcp_state(model, opt, resume.dir)
    kw = dict(ctx=TrainContext(torch.device("cpu")), model=model, optimizer=opt, train_config=resume.train_config,
              data_spec=resume.data, step=8, data_state=resume.data_state)
    # 1. The shards are written but the save is not finished (a process that dies here).
    pending = save_dcp_checkpoint(str(run), **kw)
    assert isinstance(pending, PendingSave)
    assert resolve_checkpoint(str(run)).endswith("step_00000006") and checkpoint_steps(str(run)) == [4, 6]
    # 2. A save that fails while writing shards leaves nothing under a step_* name either.
    import torch.distributed.checkpoint as dcp

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(dcp, "save", broken)
    with pytest.raises(OSError):
        save_dcp_checkpoint(str(run), **{**kw, "step": 10})
    assert load_resume_state(str(run)).step == 6
    monkeypatch.undo()
    # 3. The next save clears the leftovers, and a finished one becomes latest.
    save_dcp_checkpoint(str(run), **{**kw, "step": 10}).finish()
    assert resolve_checkpoint(str(run)).endswith("step_00000010")
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".")]
    # A damaged shard is one line naming the folder.
    shard = next(p for p in os.listdir(run / "checkpoints" / "step_00000010" / "dcp") if p.endswith(".distcp"))
    with open(run / "checkpoints" / "step_00000010" / "dcp" / shard, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match="step_00000010"):
        load_model(str(run))


# ----------------------------------------------------------------------------- elastic restart

ENTRY = textwrap.dedent("""
    import os, signal, sys
    import longnet.training.trainer as train_mod
    from longnet.cli import main
    marker, kill_at = sys.argv[1], int(sys.argv[2])

    def after_step(step):
        # First attempt only: rank 1 dies (SIGKILL, no chance to save) after step kill_at.
        if os.environ["RANK"] == "1" and step == kill_at and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    train_mod._after_step = after_step
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.slow
def test_elastic_restart_resumes_from_the_last_complete_checkpoint(tmp_path):
    data = (write_corpus(tmp_path), str(tmp_path / "cache"))
    ref = tmp_path / "ref"
    assert _run(_argv(data, ref, "--set", "save_interval=4"))[0] == 0
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    out = tmp_path / "elastic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", str(entry),
           str(tmp_path / "killed"), "10", *_argv(data, out, "--fsdp", "--sequence-parallel", "2",
                                                  "--set", "save_interval=4", "--auto-resume")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "killed").exists()  # the first attempt really lost a rank
    # The restart resumed at step 8 (the last complete checkpoint before the kill after step 10).
    assert "resuming at step 8" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    _assert_same_curve(_train_rows(out), _train_rows(ref), "elastic restart")
