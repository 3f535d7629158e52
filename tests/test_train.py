"""The train / eval / generate commands end to end, resume, passkey training and bad command-line
input (in-process, micro configs). Checkpoint files are tested in test_checkpoint.py, evaluation in
test_evaluate.py."""

import csv
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import longnet.commands.train as train_command
import longnet.training.trainer as train_mod

from longnet.cli import main
from longnet.config import TrainConfig, preset
from longnet.training.checkpoint import load_checkpoint, resolve_checkpoint
from tests.train_helpers import MICRO, train_rows, run_train


# ----------------------------------------------------------------------------- train CLI


def test_train_eval_generate_end_to_end(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert run_train(corpus, out, "--max-steps", "4") == 0
    text = capsys.readouterr().out
    assert "final val bpb" in text and "sample" in text
    assert (out / "loss_curve.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [r["step"] for r in rows if r["split"] == "train"] == ["1", "2", "3", "4"]
    assert [r["step"] for r in rows if r["split"] == "valid"] == ["2", "4"]
    info = load_checkpoint(str(out))
    assert info["step"] == 4 and info["metrics"]["val_bpb"] > 0 and info["model_config"].n_layers == 2

    spec, cache = corpus
    assert main(["eval", "--checkpoint", str(out), "--cache-dir", cache, "--split", "test", "--context", "48",
                 "--max-windows", "3", "--prompt-lengths", "8,32", "--suffix-length", "16"]) == 0
    text = capsys.readouterr().out
    assert "test: bpb" in text and "perplexity" in text and "3 windows of 48" in text
    assert "suffix against prompt length" in text

    assert main(["generate", "--checkpoint", str(out), "--prompt", "def f(", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("def f(")
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def f(", "--max-new-tokens", "12",
                 "--temperature", "0", "--no-cache"]) == 0
    assert capsys.readouterr().out == greedy


def test_tensorboard_events_are_written(tmp_path, corpus, capsys):
    # tensorboard is in the [test] extra, so this path runs in CI rather than being skipped.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    assert run_train(corpus, out, "--max-steps", "2") == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/bpb", "valid/bpb"} <= tags
    csv_losses = [float(loss) for _, loss in train_rows(out)]
    tb_losses = [e.value for e in acc.Scalars("train/loss")]
    assert tb_losses == pytest.approx(csv_losses, rel=1e-5)


def test_resume_follows_the_uninterrupted_run(tmp_path, corpus, monkeypatch, capsys):
    # Dropout and gradient accumulation make the RNG and sampler state matter.
    extra = ["--max-steps", "6", "--set", "dropout=0.1", "--set", "grad_accum=2"]
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    assert run_train(corpus, straight, *extra) == 0

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "_after_step", interrupt)
    assert run_train(corpus, pieces, *extra) == 130
    assert "interrupted; saved step 3" in capsys.readouterr().err
    assert load_checkpoint(str(pieces))["step"] == 3
    monkeypatch.setattr(train_mod, "_after_step", lambda step: None)
    assert main(["train", "--resume", "--out", str(pieces), "--no-progress"]) == 0
    a, b = train_rows(straight), train_rows(pieces)
    assert [s for s, _ in a] == [1, 2, 3, 4, 5, 6]
    assert a == b
    wa = load_file(os.path.join(resolve_checkpoint(str(straight)), "model.safetensors"))
    wb = load_file(os.path.join(resolve_checkpoint(str(pieces)), "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_stops_after_the_step_and_saves(tmp_path, corpus, monkeypatch, capsys):
    def send_sigint(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(train_mod, "_after_step", send_sigint)
    out = tmp_path / "run"
    assert run_train(corpus, out, "--max-steps", "5") == 130
    err = capsys.readouterr().err
    assert "Ctrl-C" in err and "--resume" in err
    assert load_checkpoint(str(out))["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_passkey_training_reports_accuracy(tmp_path, capsys):
    out = tmp_path / "pk"
    args = ["train", "--data", "passkey", "--out", str(out), "--max-steps", "2", "--set", "seq_len=128",
            "--set", "eval_windows=4", *MICRO[:12], "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "passkey accuracy" in text and "passkey example" in text
    assert main(["eval", "--checkpoint", str(out), "--data", "passkey", "--max-windows", "4"]) == 0
    assert "passkey (seq_len 128" in capsys.readouterr().out


def test_passkey_weight_and_curriculum_reach_the_task():
    from longnet.training.setup import open_data
    tcfg = TrainConfig(seq_len=256, passkey_answer_weight=7.0, passkey_curriculum_steps=40)
    data = open_data("passkey", tcfg, None)
    task = data.task
    assert task.answer_weight == 7.0 and task.curriculum_steps == 40
    w = data.loss_weights
    assert w[-1] / w[0] == pytest.approx(7.0) and "answer weight 7" in data.description
    assert task.longest_distance() < task.max_distance  # the curriculum starts short
    plain = open_data("passkey", TrainConfig(seq_len=256, passkey_answer_weight=1.0), None).loss_weights
    assert torch.equal(plain, torch.ones(256))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv,match", [
    (["train", "--set", "n_layer=2"], "unknown config field 'n_layer'"),
    (["train", "--set", "lr=fast"], "train.lr='fast': expected a number"),
    (["train", "--set", "n_heads=5"], "divisible by n_heads"),
    (["train", "--set", "noequals"], "KEY=VALUE"),
    (["train", "--max-steps", "0"], "--max-steps must be a positive integer"),
    (["train", "--resume"], "--resume needs --out"),
    (["train", "--device", "tpu:7"], "--device"),
    (["train", "--data", "nosuch:thing"], "unknown data spec"),
    (["train", "--data", "text:/nonexistent/path"], "nonexistent"),
    (["eval", "--checkpoint", "/nonexistent/run"], "does not exist"),
    (["generate", "--checkpoint", "/nonexistent/run", "--prompt", "x"], "does not exist"),
])
def test_bad_cli_input_gives_clear_error(argv, match, capsys, tmp_path):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_resume_and_out_conflicts(tmp_path, corpus, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--resume", "--out", str(empty)]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    out = tmp_path / "run"
    assert run_train(corpus, out, "--max-steps", "1", "--set", "sample_tokens=0") == 0
    capsys.readouterr()
    assert run_train(corpus, out, "--max-steps", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(out), "--set", "d_model=64"]) == 2
    assert "cannot change the model (model.d_model: the checkpoint has" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(out), "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(out), "--temperature", "-1"])


def test_default_command_is_tiny_on_builtin():
    import argparse
    p = argparse.ArgumentParser()
    train_command.add_arguments(p)
    args = p.parse_args([])
    assert args.preset == "tiny" and args.data is None and args.overrides == [] and args.device == "auto"
    m, t = preset("tiny")
    assert t.seq_len * t.batch_size * t.max_steps > 0 and m.n_layers == 4


@pytest.mark.slow
def test_default_run_reaches_3_bpb(tmp_path, capsys):
    """The README command: `longnet train` with no options (about 4-5 minutes on 2 cores)."""
    assert main(["train", "--out", str(tmp_path / "default"), "--no-progress"]) == 0
    info = load_checkpoint(str(tmp_path / "default"))
    assert info["metrics"]["val_bpb"] < 3.0
