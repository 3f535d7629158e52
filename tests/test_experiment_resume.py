"""``longnet experiment --resume`` continues the plan (issue 24): finished runs are kept, the
interrupted run continues from its checkpoint exactly as planned (passkey curriculum included),
and the table covers every model. Also: one experiment per ``--out``.

A plan of 7 micro runs (about 350 steps of a 2-layer d=32 model), stopped by a real SIGINT
inside its first passkey run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal

import pytest

import longnet.training.trainer as train_mod
from longnet.cli import main
from longnet.training.experiment.command import settings_from_args
from longnet.training.experiment.execute import train_run
from longnet.training.experiment.plan import PASSKEY, plan_runs
from tests.test_runfolder import hold_lock
from tests.train_helpers import write_corpus

PLAN = ["--quick", "--local-window", "0", "--budget", "4e9", "--passkey-budget", "2e9", "--eval-tokens", "512",
        "--position-tokens", "512", "--passkey-sequences", "2", "--threads", "1", "--no-progress"]


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def _losses(run_dir):
    with open(os.path.join(run_dir, "log.csv")) as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f) if r["split"] == "train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d, lines=3000), str(d / "cache")


def _plan():
    import argparse

    from longnet.training.experiment.command import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(PLAN))
    return settings, plan_runs(settings)


def test_an_interrupted_passkey_run_resumes_with_its_curriculum(tmp_path, data, monkeypatch, capsys):
    spec, cache = data
    from longnet.training.data import open_corpus
    corpus = open_corpus(spec, cache_dir=cache, verbose=False)
    settings, runs = _plan()
    pk = next(r for r in runs if r.task == PASSKEY)
    monkeypatch.setattr(train_mod, "_after_step", lambda step: step == 4 and os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(Exception, match="was stopped"):
        train_run(pk, settings, corpus, str(tmp_path / "run"), "cpu", 1, lambda f: None, resume_command="GO ON")
    assert "Continue with:\n  GO ON" in capsys.readouterr().err
    with open(tmp_path / "run" / "checkpoints" / "step_00000004" / "config.json") as f:
        saved = json.load(f)["train"]
    assert saved["passkey_curriculum_steps"] == round(settings.passkey_curriculum * pk.steps) > 0
    assert saved["passkey_answer_weight"] == settings.passkey_weight
    monkeypatch.setattr(train_mod, "_after_step", lambda step: None)
    train_run(pk, settings, corpus, str(tmp_path / "run"), "cpu", 1, lambda f: None, resume=True)
    train_run(pk, settings, corpus, str(tmp_path / "fresh"), "cpu", 1, lambda f: None)
    assert _losses(tmp_path / "run") == _losses(tmp_path / "fresh")
    assert [s for s, _ in _losses(tmp_path / "run")] == list(range(1, pk.steps + 1))


@pytest.mark.slow
def test_a_stopped_experiment_resumes_its_plan(tmp_path, data, monkeypatch, capsys):
    spec, cache = data
    exp = tmp_path / "exp"
    argv = ["experiment", *PLAN, "--data", spec, "--cache-dir", cache, "--out", str(exp)]
    settings, runs = _plan()
    first_passkey = next(i for i, r in enumerate(runs) if r.task == PASSKEY)
    stop_at = sum(r.steps for r in runs[:first_passkey]) + 5
    seen = []

    def interrupt(step):
        seen.append(step)
        if len(seen) == stop_at:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_mod, "_after_step", interrupt)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"longnet experiment --resume --out {exp}" in err and "longnet train --resume" not in err
    pk = runs[first_passkey]
    pk_dir = exp / "runs" / f"{pk.task}_{pk.model.slug}"
    with open(pk_dir / "checkpoints" / "step_00000005" / "config.json") as f:
        saved = json.load(f)["train"]
    assert saved["passkey_curriculum_steps"] == round(settings.passkey_curriculum * pk.steps) > 0
    assert saved["passkey_answer_weight"] == settings.passkey_weight
    done = [exp / "runs" / f"{r.task}_{r.model.slug}" for r in runs[:first_passkey]]
    before = {d: _digest(d / "log.csv") for d in done}

    monkeypatch.setattr(train_mod, "_after_step", lambda step: None)
    assert main(["experiment", "--out", str(exp), *PLAN]) == 2  # a new experiment may not use it
    assert "--resume to continue the experiment in it" in capsys.readouterr().err
    assert main(["experiment", "--resume", "--out", str(exp), "--lr", "0.01", "--no-progress"]) == 2
    assert "--lr 0.01 differs from the experiment's 0.003" in capsys.readouterr().err
    assert main(["experiment", "--resume", "--out", str(exp), "--no-progress", "--cache-dir", cache]) == 0
    out = capsys.readouterr().out
    assert {d: _digest(d / "log.csv") for d in done} == before  # finished runs kept, not trained again
    with open(exp / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["model"] for r in rows) == sorted({r.model.name for r in runs})
    assert all(r["passkey_accuracy"] for r in rows if r["model"] != runs[0].model.name)
    for r in runs:
        assert r.model.name in out
    # The interrupted run continued exactly: its losses equal those of an uninterrupted run.
    resumed = _losses(pk_dir)
    assert [s for s, _ in resumed] == list(range(1, pk.steps + 1))
    fresh = tmp_path / "fresh"
    from longnet.training.data import open_corpus
    train_run(pk, settings, open_corpus(spec, cache_dir=cache, verbose=False), str(fresh), "cpu", 1, lambda f: None)
    assert _losses(fresh) == resumed


def test_an_experiment_folder_in_use_is_refused(tmp_path, data, capsys):
    spec, cache = data
    exp = tmp_path / "exp"
    holder = hold_lock(exp)
    try:
        assert main(["experiment", *PLAN, "--data", spec, "--cache-dir", cache, "--out", str(exp)]) == 2
        err = capsys.readouterr().err
        assert f"--out {exp} is in use by another longnet process (pid {holder.pid} on" in err
        assert os.listdir(exp) == [".longnet.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
