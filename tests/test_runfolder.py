"""A run folder has one owner (issue 24): a second trainer is refused in one line naming the
holder's pid, a lock left by a killed process is taken over, and a folder longnet did not make
never passes as a run's. Also ``--out`` that cannot be created, and ``--resume`` that may not
change the model.

Micro configs; the concurrent trainers are real ``python -m longnet train`` processes.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from longnet.cli import main
from longnet.training.checkpoint import load_checkpoint
from longnet.training.runlock import LOCK_NAME, FolderLock
from tests.train_helpers import train_rows, train_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "longnet", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(proc, ready, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if ready():
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"not ready within {timeout} s: {proc.communicate()}")


def hold_lock(folder):
    """Another process holding ``folder``'s lock (it loads runlock.py alone: no torch to import)."""
    code = ("import importlib.util, sys, time; spec = importlib.util.spec_from_file_location('runlock', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "m.FolderLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, os.path.join(ROOT, "longnet", "training", "runlock.py"),
                               str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _one_error_line(err: str, command: str = "train") -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"longnet {command}: error: "), err
    return lines[0]


def test_a_second_trainer_on_a_running_folder_is_refused_naming_the_holder(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    first = _launch(train_argv(corpus, out, "--max-steps", "100000", "--set", "eval_interval=0", "--set", "lr=0.001"))
    try:
        # Before its first checkpoint the folder holds only a log: the case that passed as "ours".
        _wait_for(first, lambda: os.path.isfile(out / "log.csv") and len(train_rows(out)) >= 2)
        assert main(train_argv(corpus, out, "--max-steps", "3", "--set", "lr=0.002")) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"in use by another longnet process (pid {first.pid} on " in line and str(out) in line
        assert main(["train", "--resume", "--out", str(out), "--max-steps", "5", "--no-progress"]) == 2
        assert f"(pid {first.pid} on " in _one_error_line(capsys.readouterr().err)
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err
    ckpt = load_checkpoint(str(out))
    assert ckpt["train_config"].lr == 0.001 and ckpt["step"] == train_rows(out)[-1][0]
    steps = [s for s, _ in train_rows(out)]
    assert steps == list(range(1, steps[-1] + 1))  # one run's rows, none overwritten


@pytest.mark.slow
def test_two_trainers_started_together_never_both_succeed(tmp_path, corpus):
    out = tmp_path / "run"
    procs = [_launch(train_argv(corpus, out, "--max-steps", "30", "--set", "eval_interval=0", "--set", f"seed={s}"))
             for s in (1, 2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "in use by another longnet process (pid" in loser or "already holds a run" in loser, loser
    winner = procs[[code for code, _ in results].index(0)]
    seed = load_checkpoint(str(out))["train_config"].seed
    assert f"seed={seed}" in " ".join(winner.args)


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    holder = hold_lock(out)
    assert main(train_argv(corpus, out, "--max-steps", "2")) == 2
    assert f"pid {holder.pid} on" in capsys.readouterr().err
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert main(train_argv(corpus, out, "--max-steps", "2")) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of {out} from process {holder.pid} on" in err
    assert load_checkpoint(str(out))["step"] == 2
    with open(out / LOCK_NAME) as f:
        assert f.read() == ""  # released cleanly: the next run reports no stale holder


def test_the_lock_is_released_on_every_exit_path(tmp_path, corpus, capsys):
    out = tmp_path / "new" / "run"
    assert main(train_argv(corpus, out, "--max-steps", "2", "--data", "text:" + str(tmp_path / "missing.txt"))) == 2
    assert not (tmp_path / "new").exists()  # an error in the checks, after the lock: nothing left behind
    assert main(train_argv(corpus, out, "--max-steps", "2")) == 0
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "2"]) == 0  # nothing to do
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "3", "--no-progress"]) == 0
    with FolderLock(str(out)) as lock:  # free again, and no stale holder recorded
        assert lock.stale is None
    capsys.readouterr()


def test_a_header_only_log_that_longnet_did_not_write_is_not_a_run(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    out.mkdir()
    header = "step,split,loss,bpb,lr,grad_norm,tokens_per_s,elapsed_s,accuracy\n"
    (out / "log.csv").write_text(header)
    assert main(train_argv(corpus, out, "--max-steps", "2")) == 2
    assert "is not a longnet run folder (it holds log.csv)" in _one_error_line(capsys.readouterr().err)
    assert os.listdir(out) == ["log.csv"] and (out / "log.csv").read_text() == header


@pytest.mark.slow
def test_a_run_that_died_before_its_first_checkpoint_is_started_over(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    env_bad = dict(os.environ, LONGNET_CPU_KERNEL="bogus")  # fails at the first step, after log.csv is written
    proc = subprocess.run([sys.executable, "-m", "longnet", *train_argv(corpus, out, "--max-steps", "2")], cwd=ROOT,
                          env=env_bad, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and os.path.isfile(out / "log.csv") and os.path.isfile(out / LOCK_NAME)
    assert main(train_argv(corpus, out, "--max-steps", "2")) == 0
    assert "never saved a checkpoint; starting it over" in capsys.readouterr().err


def test_out_that_cannot_be_created_is_one_line(tmp_path, corpus, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(train_argv(corpus, afile / "run", "--max-steps", "2")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--out" in line and "cannot create the folder (Not a directory)" in line
    real = os.makedirs

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, *a, **k)

    monkeypatch.setattr(os, "makedirs", read_only)
    assert main(train_argv(corpus, tmp_path / "ro" / "run", "--max-steps", "2")) == 2
    assert "cannot create the folder (Read-only file system)" in _one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- resume may not change the model


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main(train_argv(corpus, out, "--max-steps", "2", "--set", "sample_tokens=0")) == 0
    return out


@pytest.mark.parametrize("extra, field, saved, given", [
    (["--preset", "small"], "model.n_layers", "2", "6"),
    (["--set", "d_model=64"], "model.d_model", "32", "64"),
    (["--set", "model.dropout=0.2"], "model.dropout", "0.0", "0.2"),
])
def test_resume_refuses_a_preset_or_model_field_that_differs(extra, field, saved, given, small_run, capsys):
    before = sorted(os.listdir(small_run))
    assert main(["train", "--resume", "--out", str(small_run), "--max-steps", "4", *extra]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert field in line and f"checkpoint has {saved}" in line and given in line, line
    assert sorted(os.listdir(small_run)) == before


def test_resume_may_change_training_fields_and_says_so(small_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    assert main(["train", "--resume", "--out", str(run), "--max-steps", "3", "--set", "train.lr=0.001",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "train.lr changed from 0.003 to 0.001 since the checkpoint" in err and "max_steps" not in err
    with open(run / "checkpoints" / "step_00000003" / "config.json") as f:
        assert json.load(f)["train"]["lr"] == 0.001
