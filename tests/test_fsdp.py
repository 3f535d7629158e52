"""``longnet train --fsdp``: FSDP2 x sequence parallelism against one process, and DCP
checkpoints that reshard 4 -> 2 -> 1 -> 4 ranks with the loss curve of an uninterrupted run.

Worlds of gloo processes are spawned as in tests/test_sp_train.py (each sets the environment
torchrun would and calls ``longnet train`` several times); the single-process runs happen in
the test process. fp32, a micro model whose longest segment (w = 64 = seq_len) spans both
sequence ranks at S = 2, the "math" attention backend (what is tested is the sharding).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import longnet.training.trainer as train_mod
from longnet.cli import main
from longnet.training.checkpoint import is_dcp, load_model, resolve_checkpoint
from tests.test_sp_train import _free_port, _train_rows
from tests.train_helpers import write_corpus

STEPS = 20
MICRO = ["--set", "model.n_layers=2", "--set", "d_model=32", "--set", "n_heads=4", "--set", "d_ffn=64",
         "--set", "segment_lengths=16,32,64", "--set", "dilation_rates=1,2,4", "--set", "seq_len=64",
         "--set", "batch_size=4", "--set", "grad_accum=2", "--set", "eval_windows=4",
         "--set", "eval_batch_size=2", "--set", "eval_interval=5", "--set", "sample_tokens=8",
         "--set", "warmup_steps=2", "--set", "precision=fp32", "--set", "num_threads=1",
         "--set", "attention_backend=math", "--max-steps", str(STEPS), "--no-progress"]
# Losses are logged with 6 significant digits; over 20 AdamW steps the reduction order of
# reduce-scatter vs one process moves them by a few units in the 6th digit at most.
RTOL = 2e-5


def _argv(data, out, *extra):
    spec, cache = data
    return ["train", "--data", spec, "--cache-dir", cache, "--out", str(out), *MICRO, *extra]


def _worker(rank, world, tasks, result_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    results = {}
    for name, argv, port, stop_at in tasks:
        os.environ["MASTER_PORT"] = str(port)

        def after_step(step, stop_at=stop_at):
            # SIGTERM on one rank only: every rank stops after the same step and saves.
            if stop_at is not None and rank == world - 1 and step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
        train_mod._after_step = after_step
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(argv)
        except BaseException:
            rc = "exception"
            err.write(traceback.format_exc())
        results[name] = {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}
        if rc == "exception":
            break
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))


def _spawn(root, name, world, tasks):
    folder = root / name
    folder.mkdir()
    mp.spawn(_worker, args=(world, tasks, str(folder)), nprocs=world, join=True)
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for rank, res in enumerate(results):
        for task, r in res.items():
            assert r["rc"] != "exception", f"{name} rank {rank}, {task}:\n{r['err']}"
    return results


def _in_process(argv, stop_at=None):
    def after_step(step):
        if stop_at is not None and step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setattr(train_mod, "_after_step", after_step)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = (write_corpus(root), str(root / "cache"))
    single = root / "single"
    assert _in_process(_argv(data, single))[0] == 0
    return root, data, single


def _fsdp_world(base, name, extra):
    root, data, single = base
    w4 = _spawn(root, f"w4_{name}", 4, [(name, _argv(data, root / name, "--fsdp", *extra), _free_port(), None)])
    return {"dirs": {"single": single, name: root / name}, "w4": w4}


@pytest.fixture(scope="module")
def runs(base):
    """FSDP at 4 ranks as (dp 2 x sp 2)."""
    return _fsdp_world(base, "fsdp_2x2", ["--sequence-parallel", "2", "--data-parallel", "2"])


@pytest.fixture(scope="module")
def runs_fsdp4(base):
    """FSDP at 4 ranks as (fsdp 4 x sp 1)."""
    return _fsdp_world(base, "fsdp4", [])


@pytest.fixture(scope="module")
def reshard(base):
    """One process -> FSDP 2x2 (safetensors), and a DCP chain 4 -> 2 -> 1 -> 4 stopped by SIGTERM."""
    root, data, single = base
    d = {"single": single, "single_cut": root / "single_cut", "chain": root / "chain"}
    # One process stopped (SIGTERM) after step 10: a safetensors checkpoint for FSDP to resume.
    assert _in_process(_argv(data, d["single_cut"]), stop_at=10)[0] == 128 + signal.SIGTERM
    w4 = _spawn(root, "w4r", 4, [
        ("from_single", ["train", "--resume", "--out", str(d["single_cut"]), "--fsdp", "--sequence-parallel", "2",
                         "--no-progress"], _free_port(), None),
        ("chain_a", _argv(data, d["chain"], "--fsdp", "--sequence-parallel", "2", "--data-parallel", "2"),
         _free_port(), 5)])
    resume = ["train", "--resume", "--out", str(d["chain"]), "--no-progress"]
    shutil.copytree(d["chain"], root / "chain_at_5")
    w2 = _spawn(root, "w2", 2, [("chain_b", resume + ["--fsdp", "--sequence-parallel", "2"], _free_port(), 10)])
    shutil.copytree(d["chain"], root / "chain_at_10")
    chain_c = _in_process(resume + ["--checkpoint-format", "dcp"], stop_at=15)
    shutil.copytree(d["chain"], root / "chain_at_15")
    w4b = _spawn(root, "w4b", 4, [("chain_d", resume + ["--fsdp"], _free_port(), None)])
    return {"dirs": d, "root": root, "w4": w4, "w2": w2, "w4b": w4b, "chain_c": chain_c}


def _assert_same_curve(got, ref, what):
    assert [s for s, _ in got] == [s for s, _ in ref], what
    torch.testing.assert_close(torch.tensor([v for _, v in got], dtype=torch.float64),
                               torch.tensor([v for _, v in ref], dtype=torch.float64), rtol=RTOL, atol=0,
                               msg=lambda m: f"{what}: {m}")


def _assert_close_weights(out, ref_out):
    a, b = load_model(str(out)).state_dict(), load_model(str(ref_out)).state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", ["fsdp_2x2", pytest.param("fsdp4", marks=pytest.mark.slow)])
def test_fsdp_follows_the_single_process_run(request, name):
    runs = request.getfixturevalue("runs" if name == "fsdp_2x2" else "runs_fsdp4")
    d = runs["dirs"]
    assert all(res[name]["rc"] == 0 for res in runs["w4"])
    assert len(_train_rows(d[name])) == STEPS
    _assert_same_curve(_train_rows(d[name]), _train_rows(d["single"]), f"{name} train loss")
    _assert_same_curve(_train_rows(d[name], "valid"), _train_rows(d["single"], "valid"), f"{name} val loss")
    assert is_dcp(resolve_checkpoint(str(d[name])))  # FSDP runs write DCP checkpoints
    _assert_close_weights(d[name], d["single"])


def test_fsdp_run_reports_its_sharding_and_rank0_samples(runs):
    out = runs["w4"][0]["fsdp_2x2"]["out"]
    assert "data-parallel 2 x sequence-parallel 2" in out and "FSDP2 shards" in out and "checkpoints: dcp" in out
    assert "[longnet] sample" in out  # rank 0 sampled from the gathered full weights
    assert runs["w4"][1]["fsdp_2x2"]["out"] == ""


@pytest.mark.slow
def test_fsdp_resumes_a_single_process_safetensors_checkpoint(reshard):
    d = reshard["dirs"]
    assert all(res["from_single"]["rc"] == 0 for res in reshard["w4"])
    _assert_same_curve(_train_rows(d["single_cut"]), _train_rows(d["single"]), "1 process -> FSDP 2x2")
    _assert_close_weights(d["single_cut"], d["single"])


@pytest.mark.slow
def test_dcp_reshards_4_2_1_4_with_the_uninterrupted_curve(reshard):
    runs = reshard
    d, root = runs["dirs"], runs["root"]
    assert all(res["chain_a"]["rc"] == 128 + signal.SIGTERM for res in runs["w4"])
    assert all(res["chain_b"]["rc"] == 128 + signal.SIGTERM for res in runs["w2"])
    assert runs["chain_c"][0] == 128 + signal.SIGTERM, runs["chain_c"][2]
    assert all(res["chain_d"]["rc"] == 0 for res in runs["w4b"])
    for at in (5, 10, 15):  # each leg's checkpoint is a DCP folder of its last step
        ckpt = resolve_checkpoint(str(root / f"chain_at_{at}"))
        assert ckpt.endswith(f"step_{at:08d}") and is_dcp(ckpt)
    _assert_same_curve(_train_rows(d["chain"]), _train_rows(d["single"]), "4 -> 2 -> 1 -> 4 train loss")
    _assert_same_curve(_train_rows(d["chain"], "valid"), _train_rows(d["single"], "valid"), "resharded val loss")
    _assert_close_weights(d["chain"], d["single"])


@pytest.fixture(scope="module")
def options(base):
    """HSDP, activation checkpointing, async DCP saves and bf16 parameters, at 4 ranks."""
    root, data, single = base
    d = {n: root / n for n in ("hsdp", "ac", "async", "bf16")}
    w4 = _spawn(root, "w4o", 4, [
        ("hsdp", _argv(data, d["hsdp"], "--fsdp", "--dp-replicate", "2"), _free_port(), None),
        ("ac", _argv(data, d["ac"], "--fsdp", "--sequence-parallel", "2", "--set", "activation_checkpointing=true"),
         _free_port(), None),
        ("async", _argv(data, d["async"], "--fsdp", "--sequence-parallel", "2", "--async-checkpoint",
                        "--set", "save_interval=3"), _free_port(), None),
        ("bf16", _argv(data, d["bf16"], "--fsdp", "--sequence-parallel", "2", "--fsdp-param-dtype", "bf16"),
         _free_port(), None)])
    return {"dirs": {**d, "single": single}, "w4": w4}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hsdp", "ac", "async"])
def test_fsdp_options_follow_the_single_process_run(options, name):
    d = options["dirs"]
    assert all(res[name]["rc"] == 0 for res in options["w4"]), options["w4"][0][name]["err"]
    _assert_same_curve(_train_rows(d[name]), _train_rows(d["single"]), f"{name} train loss")
    _assert_close_weights(d[name], d["single"])
    if name == "hsdp":
        assert "2 replicas (HSDP)" in options["w4"][0][name]["out"]
    if name == "async":  # background saves finished and were moved into place; the last one waited
        from longnet.training.checkpoint import checkpoint_steps
        assert checkpoint_steps(str(d[name])) == [18, 20]
        assert not [n for n in os.listdir(d[name] / "checkpoints") if n.startswith(".")]


@pytest.mark.slow
def test_fsdp_bf16_parameters_train_close_to_fp32(options):
    d = options["dirs"]
    assert all(res["bf16"]["rc"] == 0 for res in options["w4"])
    got, ref = _train_rows(d["bf16"]), _train_rows(d["single"])
    # bf16 compute: not fp32 parity, but the same curve to a few percent, and it learns
    assert got[-1][1] < got[0][1] - 1.0
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in ref]),
                               rtol=0.05, atol=0)
