"""`longnet train` never loses a user's work: signals, safe resume, settings checked up front
(issue 9, section 3). The checkpoint files themselves (durable writes, damaged files) are in
test_checkpoint.py, and the progress bar of ``longnet eval`` in test_evaluate.py.

Micro configs (a step takes milliseconds); the signal tests run ``python -m longnet train``
as a subprocess and send it real signals. ``finished_run`` (conftest.py) is a 4-step run with
checkpoints at steps 2 and 4; tests work on copies (``_copy``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import longnet.training.trainer as train_mod
from longnet.cli import main
from longnet.model import LongNetLM
from longnet.training.checkpoint import load_checkpoint, load_trainer_state
from tests.train_helpers import copy_run as _copy
from tests.train_helpers import error_line as _error_line
from tests.train_helpers import file_hashes as _tree
from tests.train_helpers import MICRO, train_rows, write_corpus, run_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- signals


def _launch(out, corpus, *extra):
    spec, cache = corpus
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "longnet", "train", "--data", spec, "--cache-dir", cache,
                             "--out", str(out), *MICRO, *extra], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_steps(proc, out, steps, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.isfile(out / "log.csv") and len(train_rows(out)) >= steps:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {steps} training steps within {timeout} s: {proc.communicate()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_after_the_step_save_and_exit_nonzero(sig, tmp_path, corpus):
    out = tmp_path / "run"
    proc = _launch(out, corpus, "--max-steps", "100000")
    _wait_for_steps(proc, out, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"{name}: stopping after this step and saving a checkpoint" in err
    last = train_rows(out)[-1][0]
    assert f"stopped at step {last}; checkpoint" in err and "longnet train --resume --out" in err
    assert load_checkpoint(str(out))["step"] == last
    _, data_state = load_trainer_state(str(out))
    assert data_state["step"] == last  # the sampler state of that very step


def test_a_signal_during_the_final_evaluation_loses_nothing(tmp_path, corpus, monkeypatch, capsys):
    real = train_mod.evaluate_lm

    def evaluate_then_get_terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate_lm", evaluate_then_get_terminated)
    out = tmp_path / "run"
    assert run_train(corpus, out, "--max-steps", "3", "--set", "eval_interval=0", "--set", "save_interval=0") == 143
    assert "saved step 3" in capsys.readouterr().err
    assert load_checkpoint(str(out))["step"] == 3
    monkeypatch.setattr(train_mod, "evaluate_lm", real)
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "4", "--no-progress"]) == 0
    assert [s for s, _ in train_rows(out)] == [1, 2, 3, 4]


def test_an_interrupt_inside_a_step_saves_the_previous_step_whole(tmp_path, corpus, monkeypatch, capsys):
    # Step 4's first micro-batch has drawn its batch and dropout masks when the interrupt comes:
    # the checkpoint must hold step 3's weights with step 3's sampler and RNG state.
    extra = ["--max-steps", "6", "--set", "dropout=0.1", "--set", "grad_accum=2", "--set", "eval_interval=0"]
    assert run_train(corpus, tmp_path / "straight", *extra) == 0
    real, calls = train_mod.next_token_loss, []

    def loss_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 * 2 + 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "next_token_loss", loss_then_interrupt)
    out = tmp_path / "cut"
    assert run_train(corpus, out, *extra) == 130
    assert "interrupted; saved step 3" in capsys.readouterr().err
    _, data_state = load_trainer_state(str(out))
    assert data_state["step"] == 3 * 2
    monkeypatch.setattr(train_mod, "next_token_loss", real)
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert train_rows(out) == train_rows(tmp_path / "straight")


def test_an_interrupt_inside_the_optimizer_update_saves_nothing_new(tmp_path, corpus, monkeypatch, capsys):
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_interrupt)
    out = tmp_path / "run"
    assert run_train(corpus, out, "--max-steps", "6", "--set", "save_interval=2") == 130
    assert "interrupted during an optimiser update; no checkpoint written" in capsys.readouterr().err
    assert load_checkpoint(str(out))["step"] == 2
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002"]


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("where", ["checkpoints/step_00000004", "checkpoints/step_00000004/sub", "checkpoints",
                                   "tensorboard/x"])
@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
def test_out_inside_a_run_is_refused_before_anything_is_written(where, resume, finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    before = _tree(run)
    argv = ["train", "--out", str(run / where), "--max-steps", "6"] + (["--resume"] if resume else [])
    assert main(argv) == 2
    line = _error_line(capsys.readouterr().err, "train")
    assert ("checkpoint folder" in line or "inside the run folder" in line) and str(run) in line
    assert _tree(run) == before


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, corpus, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "log.csv").write_text("date,amount\n")
    assert run_train(corpus, mine, "--max-steps", "2") == 2
    assert "is not a longnet run folder (it holds log.csv, notes.txt)" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(mine)]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert sorted(os.listdir(mine)) == ["log.csv", "notes.txt"] and (mine / "log.csv").read_text() == "date,amount\n"


def test_resume_at_or_past_max_steps_changes_nothing(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    before = _tree(run)
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert "already at step 4" in capsys.readouterr().out
    assert main(["train", "--resume", "--out", str(run), "--max-steps", "4", "--no-progress"]) == 0
    assert main(["train", "--resume", "--out", str(run), "--max-steps", "3", "--no-progress"]) == 2
    line = _error_line(capsys.readouterr().err, "train")
    assert "--max-steps 3 is below step 4" in line and "nothing was changed" in line
    assert _tree(run) == before


def test_a_grown_corpus_stops_resume_unless_allowed(tmp_path, capsys):
    spec, cache = write_corpus(tmp_path), str(tmp_path / "cache")
    out = tmp_path / "run"
    assert run_train((spec, cache), out, "--max-steps", "2", "--set", "sample_tokens=0") == 0
    with open(spec[len("text:"):], "a") as f:
        f.write("\nclass Grown:\n    pass\n" * 200)
    before = _tree(out)
    assert main(["train", "--resume", "--out", str(out), "--cache-dir", cache, "--max-steps", "3"]) == 2
    line = _error_line(capsys.readouterr().err, "train")
    assert "the training data changed since the checkpoint" in line and "--allow-data-change" in line
    assert _tree(out) == before
    assert main(["train", "--resume", "--out", str(out), "--cache-dir", cache, "--max-steps", "3",
                 "--allow-data-change", "--no-progress"]) == 0
    assert load_checkpoint(str(out))["step"] == 3


def test_a_changed_seq_len_resumes_with_a_warning(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    assert main(["train", "--resume", "--out", str(run), "--set", "seq_len=16", "--max-steps", "5",
                 "--no-progress"]) == 0
    assert "warning: train.seq_len changed from 32 to 16" in capsys.readouterr().err
    assert load_checkpoint(str(run))["train_config"].seq_len == 16


def test_a_damaged_log_resumes_with_a_warning_and_keeps_the_original(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    with open(run / "log.csv", "ab") as f:
        f.write(b"3,train,not-a-number,,,,,,\n\x00\xff\xfe,,\n5,trai")  # a bad row and a cut-off one
    damaged = (run / "log.csv").read_bytes()
    assert main(["train", "--resume", "--out", str(run), "--max-steps", "6", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"{run / 'log.csv'} is damaged" in err and "log.csv.damaged" in err
    assert (run / "log.csv.damaged").read_bytes() == damaged
    assert [s for s, _ in train_rows(run)] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("extra,match", [
    (["--set", "attention_backend=bogus"], "model.attention_backend='bogus': backend must be one of"),
    (["--set", "attention_backend=triton"], "model.attention_backend='triton'"),
    (["--set", "vocab_size=100"], "model.vocab_size=100 is smaller than the byte vocabulary (256)"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "cuda:1"], "CUDA is not available"),
    (["--device", "mps"], "--device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_settings_are_caught_before_the_run_folder_exists(extra, match, tmp_path, corpus, capsys):
    if "cuda" in extra[-1] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    assert run_train(corpus, out, "--max-steps", "2", *extra) == 2
    assert match in _error_line(capsys.readouterr().err, "train")
    assert not out.exists()


def test_fp16_trains_with_loss_scaling_and_resumes(tmp_path, corpus, monkeypatch):
    dtypes = []
    real = LongNetLM.forward

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(LongNetLM, "forward", forward)
    out = tmp_path / "run"
    assert run_train(corpus, out, "--max-steps", "3", "--set", "precision=fp16", "--set", "sample_tokens=0") == 0
    assert dtypes and set(dtypes) == {torch.float16}  # training and evaluation ran in fp16
    state, _ = load_trainer_state(str(out))
    assert state["scaler"]["scale"] > 0
    assert all(float(loss) > 0 for _, loss in train_rows(out))
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "4", "--no-progress"]) == 0
    assert load_checkpoint(str(out))["step"] == 4
