"""``longnet experiment``: the equal-compute plan, passkey loss weighting and the command's argument
checks. The run of ``--quick`` is slow. The boundary-spike metric, the weighted loss and
``longnet eval --position-loss`` are in test_evaluate.py."""

import csv
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

from longnet.cli import main
from longnet.config import LongNetConfig, TrainConfig
from longnet.patterns import dense_flops, dilated_flops
from longnet.training.context import TrainContext
from longnet.training.data import PasskeyTask
from longnet.training.experiment.plan import (
    DEFAULT,
    DENSE,
    LM,
    LONGNET,
    PASSKEY,
    QUICK,
    SLIDING,
    VARIANT,
    attention_flops,
    flops_per_token,
    matched_window,
    model_specs,
    non_embedding_params,
    paper_pattern,
    passkey_distances,
    plan_runs,
)
from longnet.training.setup import TrainData
from longnet.training.trainer import _Trainer
from tests.train_helpers import PNG_MAGIC


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("settings", [DEFAULT, QUICK], ids=["default", "quick"])
def test_every_model_gets_the_same_budget(settings):
    for task, budget in ((LM, settings.budget), (PASSKEY, settings.passkey_budget)):
        runs = [r for r in plan_runs(settings) if r.task == task]
        assert runs
        for r in runs:
            per_step = r.flops_per_token * r.batch_size * r.model.seq_len
            assert r.batch_size * r.model.seq_len == settings.tokens_per_step  # same tokens per step
            assert r.steps == math.floor(budget / per_step)  # the steps follow from the budget
            assert budget - per_step < r.flops <= budget  # equal FLOPs, up to one step
            assert r.tokens == r.steps * settings.tokens_per_step


def test_more_budget_buys_proportionally_more_steps():
    small = {r.name: r.steps for r in plan_runs(DEFAULT)}
    big = {r.name: r.steps for r in plan_runs(dataclasses.replace(DEFAULT, budget=4 * DEFAULT.budget))}
    for name, steps in small.items():
        if name.startswith("lm-"):
            assert 4 * steps <= big[name] <= 4 * steps + 4
    # cheaper attention per token buys more tokens for the same budget
    lm = {r.model.kind: r for r in plan_runs(DEFAULT) if r.task == LM}
    assert lm[DENSE].tokens > lm[LONGNET].tokens


def test_flops_per_token_counts_parameters_and_attention():
    specs = {s.name: s for s in model_specs(DEFAULT)}
    dense = specs["dense@256"]
    c = dense.config
    six_n = 6 * (c.num_parameters() - c.vocab_size * c.d_model)  # tied embedding and head
    attn = 4 * 256 * 256 * c.n_heads * c.head_dim / 2 * 3.5 / 256  # causal, forward + backward, per token
    assert flops_per_token(dense) == pytest.approx(six_n + c.n_layers * attn, rel=1e-12)
    assert non_embedding_params(c) == c.num_parameters() - 256 * c.d_model
    ln = specs["longnet@4096"]
    w, r = ln.config.segment_lengths, ln.config.dilation_rates
    expected = dilated_flops(4096, c.n_heads, c.head_dim, w, r, causal=True, backward=True)
    assert attention_flops(ln.config, 4096) == expected
    assert attention_flops(c, 256, dense=True) == dense_flops(256, c.n_heads, c.head_dim, causal=True, backward=True)


def test_models_differ_only_in_attention():
    specs = model_specs(DEFAULT)
    assert [s.kind for s in specs] == [DENSE, LONGNET, VARIANT, LONGNET, VARIANT, SLIDING]
    assert [s.seq_len for s in specs] == [256, 1024, 1024, 4096, 4096, 4096]
    strip = ("segment_lengths", "dilation_rates", "segment_phases", "local_window")
    bodies = {tuple((k, v) for k, v in s.config.to_dict().items() if k not in strip) for s in specs}
    assert len(bodies) == 1
    assert len({s.config.num_parameters() for s in specs}) == 1
    variant = specs[2].config
    assert variant.local_window == 16 and variant.segment_lengths == specs[1].config.segment_lengths


def test_paper_pattern_is_geometric_with_rates_capped_at_the_heads():
    p = paper_pattern(4096, 128, 4)
    assert p.segment_lengths == (128, 256, 512, 1024, 2048, 4096)
    assert p.dilation_rates == (1, 2, 4, 4, 4, 4)  # r <= H: every row is kept by some head
    assert paper_pattern(1024, 128, 8).dilation_rates == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="base_segment"):
        paper_pattern(64, 128, 4)


@pytest.mark.parametrize("settings", [DEFAULT, QUICK], ids=["default", "quick"])
def test_sliding_window_matches_longnet_attention_flops(settings):
    specs = {s.kind: s for s in model_specs(settings) if s.seq_len == settings.lengths[-1]}
    sliding, longnet = specs[SLIDING].config, specs[LONGNET].config
    L = sliding.segment_lengths[0]
    assert sliding.segment_lengths == (L, L) and sliding.dilation_rates == (1, 1)
    assert sliding.segment_phases == (0, L // 2) and L % 2 == 0
    n = settings.lengths[-1]
    ratio = attention_flops(sliding, n) / attention_flops(longnet, n)
    assert abs(ratio - 1) < 0.03
    # an exact target is found exactly
    target = attention_flops(sliding, n)
    assert matched_window(n, sliding.n_heads, sliding.head_dim, target) == L


def test_budget_too_small_is_refused_with_the_flag():
    with pytest.raises(ValueError, match=r"--budget .* raise --budget to at least"):
        plan_runs(dataclasses.replace(QUICK, budget=1e6))
    with pytest.raises(ValueError, match="--passkey-budget"):
        plan_runs(dataclasses.replace(QUICK, passkey_budget=1e6))
    assert all(r.task == LM for r in plan_runs(dataclasses.replace(QUICK, passkey_budget=0)))


def test_passkey_distances_cover_the_task():
    task = PasskeyTask(1024)
    d = passkey_distances(1024, 5)
    assert d[0] >= task.min_distance and d[-1] == task.max_distance and d == sorted(set(d))
    assert 64 in d and 512 in d


# ----------------------------------------------------------------------------- passkey weighting


def test_passkey_loss_weights_put_the_weight_on_the_answer():
    task = PasskeyTask(256, key_digits=5, answer_weight=40.0)
    w = task.loss_weights()
    _, _, mask = task.batch(2)
    assert w.shape == (256,) and w.dtype == torch.float32
    assert float(w.mean()) == pytest.approx(1.0)
    assert torch.equal(w > w.min(), mask[0])  # the answer positions, exactly
    assert float(w[mask[0]][0] / w[~mask[0]][0]) == pytest.approx(40.0)
    assert torch.allclose(PasskeyTask(256, answer_weight=1).loss_weights(), torch.ones(256))
    for bad in (0, -1.0, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="answer_weight"):
            PasskeyTask(256, answer_weight=bad)


def _distances(task, x):
    """The passkey distance of each row of x (B, seq_len): from the needle's first key digit to the answer."""
    needle = b"\nThe pass key is "
    return [task.answer_start - (bytes(row.tolist()).index(needle) + len(needle)) for row in x]


def test_passkey_curriculum_grows_the_training_distance():
    task = PasskeyTask(512, seed=1, batch_size=16, curriculum_steps=10)
    ramp = [task.longest_distance(step) for step in range(12)]
    assert ramp == sorted(ramp) and ramp[0] < task.min_distance + 50 and ramp[9:] == [task.max_distance] * 3
    for step in range(12):
        x, _ = task.next_batch()
        assert max(_distances(task, x)) <= ramp[step]
        assert min(_distances(task, x)) >= task.min_distance
    assert max(_distances(task, task.batch(64)[0])) > ramp[0]  # evaluation batches use the whole range
    assert PasskeyTask(512).longest_distance(0) == PasskeyTask(512).max_distance  # no curriculum by default
    with pytest.raises(ValueError, match="curriculum_steps"):
        PasskeyTask(512, curriculum_steps=-1)


def test_trainer_minimises_the_weighted_passkey_loss(tmp_path):
    task = PasskeyTask(96, key_digits=3, batch_size=2, answer_weight=50.0)
    mcfg = LongNetConfig(n_layers=1, d_model=16, n_heads=2, d_ffn=32, segment_lengths=(32, 64), dilation_rates=(1, 2))
    tcfg = TrainConfig(seq_len=96, batch_size=2, max_steps=1, passkey_digits=3)
    data = TrainData(kind="passkey", sampler=task, task=task, loss_weights=task.loss_weights(), description="")
    trainer = _Trainer(mcfg, tcfg, "passkey", data, str(tmp_path / "run"), TrainContext(torch.device("cpu")),
                       resume=None, compile_model=False, progress=False, preset_name="t")
    x, y = task.next_batch()
    loss, plain = trainer._loss(x, y)
    with torch.no_grad():
        per_token = F.cross_entropy(trainer.model(x).flatten(0, 1), y.flatten(), reduction="none").view(2, 96)
    assert float(loss.detach()) == pytest.approx(float((per_token * task.loss_weights()).mean()), rel=1e-5)
    assert plain == pytest.approx(float(per_token.mean()), rel=1e-5)  # the log shows the plain loss
    assert loss.requires_grad  # the weighted loss is what the step differentiates


# ----------------------------------------------------------------------------- the commands


@pytest.mark.parametrize("argv,match", [
    (["--budget", "-1"], "--budget must be a number > 0"),
    (["--budget", "nan"], "--budget must be a number > 0"),
    (["--budget", "1e6"], "raise --budget to at least"),
    (["--local-window", "3"], "--local-window must be 0"),
    (["--passkey-curriculum", "1.5"], "--passkey-curriculum must be a fraction"),
    (["--passkey-weight", "0"], "--passkey-weight must be a number > 0"),
    (["--batch-tokens", "100"], "--batch-tokens must be a multiple of"),
    (["--base-segment", "64"], "--base-segment must be between 2 and --context"),
    (["--context", "3"], "--context must be an even integer"),
    (["--eval-tokens", "64"], "--eval-tokens must be at least"),
    (["--data", "passkey"], "--data must be a corpus"),
    (["--heads", "3"], "divisible by n_heads"),
])
def test_experiment_rejects_bad_settings_before_training(tmp_path, capsys, argv, match):
    out = tmp_path / "exp"
    assert main(["experiment", "--quick", "--out", str(out), *argv]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("argv", [["--context", "0"], ["--context", "x"], ["--budget", "lots"],
                                  ["--threads", "-1"], ["--bogus"]])
def test_experiment_rejects_malformed_flags(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(["experiment", *argv])
    assert e.value.code == 2
    assert "longnet experiment" in capsys.readouterr().err


def test_experiment_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "something").write_text("x")
    assert main(["experiment", "--quick", "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_experiment_dry_run_prints_the_plan(capsys):
    assert main(["experiment", "--quick", "--dry-run"]) == 0
    text = capsys.readouterr().out
    for r in plan_runs(QUICK):
        assert r.name in text and f"{r.steps:>6}" in text
    assert "training FLOPs" in text


@pytest.mark.slow
def test_quick_experiment_end_to_end(tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["experiment", "--quick", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    specs = model_specs(QUICK)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == [s.name for s in specs]  # one row per model
    for r in rows:
        for n in QUICK.lengths:
            assert math.isfinite(float(r[f"bpb@{n}"])) and 0 < float(r[f"bpb@{n}"]) < 8
        assert float(r["lm_train_flops"]) <= QUICK.budget and float(r["lm_wall_s"]) > 0
        assert float(r["spike"]) >= 1.0 and r["model"] in text
    with open(out / "passkey.csv") as f:
        passkey = list(csv.DictReader(f))
    assert {p["model"] for p in passkey} == {s.name for s in specs if s.seq_len >= 128}
    assert all(0 <= float(p["accuracy"]) <= 1 for p in passkey)
    for name in ("bpb.png", "position_loss.png", "passkey.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert (out / "table.txt").read_text().strip() in text
    assert os.path.isfile(out / "plan.json") and os.path.isfile(out / "position_loss.csv")
