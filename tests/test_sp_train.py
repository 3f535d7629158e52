"""``longnet train`` on a (data x sequence) mesh: parity with one process, checkpoints across
mesh shapes, Ctrl-C, and clear errors.

One world of 2 gloo processes is spawned per module. Each process sets the environment
torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and calls ``longnet train``
several times, so the trainer initialises and destroys the process group itself, as under
torchrun. The single-process references run in the test process. fp32, micro model whose
longest segment (w = 64 = seq_len, r = 4) spans both ranks at S = 2.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import longnet.training.signals as signals_mod
import longnet.training.trainer as train_mod
from longnet.training.checkpoint import load_checkpoint, load_trainer_state, resolve_checkpoint
from longnet.cli import main
from tests.train_helpers import write_corpus

MICRO = ["--set", "model.n_layers=2", "--set", "d_model=32", "--set", "n_heads=4", "--set", "d_ffn=64",
         "--set", "segment_lengths=16,32,64", "--set", "dilation_rates=1,2,4", "--set", "seq_len=64",
         "--set", "batch_size=2", "--set", "grad_accum=2", "--set", "eval_windows=4",
         "--set", "eval_batch_size=2", "--set", "eval_interval=2", "--set", "sample_tokens=8",
         "--set", "warmup_steps=2", "--set", "precision=fp32", "--set", "num_threads=1",
         "--max-steps", "6", "--no-progress"]
RTOL = 1e-5  # losses are logged with 6 significant digits
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(data, out, *extra):
    spec, cache = data
    return ["train", "--data", spec, "--cache-dir", cache, "--out", str(out), *MICRO, *extra]


# ----------------------------------------------------------------------------- spawned world


def _worker(rank, world, tasks, result_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    results = {}
    for name, argv, port, signal_at in tasks:
        os.environ["MASTER_PORT"] = str(port)

        def after_step(step, signal_at=signal_at):
            # A signal reaching one rank only: the others must stop after the same step.
            if signal_at is not None and rank == world - 1 and step == signal_at[0]:
                os.kill(os.getpid(), signal_at[1])
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


def _train_rows(out, split="train"):
    with open(os.path.join(out, "log.csv")) as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["split"] == split]


def _weights(out):
    return load_file(os.path.join(resolve_checkpoint(str(out)), "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp_train")
    data = (write_corpus(root), str(root / "cache"))
    d = {name: root / name for name in ("single", "single_cut", "sp2", "sp2_cut", "sp2_term", "dp2", "dp2_sp2")}

    # Single-process references: straight, and cut by an exception after step 3 (saves step 3).
    single_out = io.StringIO()
    with contextlib.redirect_stdout(single_out):
        assert main(_argv(data, d["single"])) == 0

    def cut(step):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setattr(train_mod, "_after_step", cut)
        with contextlib.redirect_stderr(io.StringIO()):
            assert main(_argv(data, d["single_cut"])) == 130
    cut_at_3 = root / "single_cut_at_3"
    shutil.copytree(d["single_cut"], cut_at_3)

    tasks = [
        ("sp2", _argv(data, d["sp2"], "--sequence-parallel", "2"), _free_port(), None),
        ("sp2_cut", _argv(data, d["sp2_cut"], "--sequence-parallel", "2"), _free_port(), (3, signal.SIGINT)),
        ("sp2_term", _argv(data, d["sp2_term"], "--sequence-parallel", "2", "--set", "eval_interval=0"),
         _free_port(), (2, signal.SIGTERM)),
        ("resume_1_to_2", ["train", "--resume", "--out", str(d["single_cut"]), "--sequence-parallel", "2",
                           "--no-progress"], _free_port(), None),
        ("dp2", _argv(data, d["dp2"], "--data-parallel", "2"), _free_port(), None),
    ]
    mp.spawn(_worker, args=(2, tasks, str(root)), nprocs=2, join=True)
    world = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # The full 2-D mesh: 4 processes, 2 sequence groups of 2 (sub-groups, not the world).
    root4 = root / "world4"
    root4.mkdir()
    tasks4 = [("dp2_sp2", _argv(data, d["dp2_sp2"], "--sequence-parallel", "2", "--data-parallel", "2"),
               _free_port(), None)]
    mp.spawn(_worker, args=(4, tasks4, str(root4)), nprocs=4, join=True)
    world4 = [torch.load(root4 / f"rank{r}.pt", weights_only=False) for r in range(4)]
    for rank, res in [*enumerate(world), *enumerate(world4)]:
        for name, r in res.items():
            assert r["rc"] != "exception", f"rank {rank}, {name}:\n{r['err']}"

    # The checkpoint written at S = 2 (step 3) continues in this single process.
    sp2_cut_at_3 = root / "sp2_cut_at_3"
    shutil.copytree(d["sp2_cut"], sp2_cut_at_3)
    assert main(["train", "--resume", "--out", str(d["sp2_cut"]), "--no-progress"]) == 0
    return {"dirs": d, "data": data, "world": world, "world4": world4, "single_out": single_out.getvalue(),
            "sp2_cut_at_3": sp2_cut_at_3, "single_cut_at_3": cut_at_3}


def _assert_same_curve(got, ref, what):
    assert [s for s, _ in got] == [s for s, _ in ref], what
    torch.testing.assert_close(torch.tensor([v for _, v in got], dtype=torch.float64),
                               torch.tensor([v for _, v in ref], dtype=torch.float64), rtol=RTOL, atol=0,
                               msg=lambda m: f"{what}: {m}")


def _assert_close_weights(out, ref_out, atol=2e-5):
    a, b = _weights(out), _weights(ref_out)
    assert sorted(a) == sorted(b)  # same names: no "module." prefix, nothing about the mesh
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=lambda m: f"{k}: {m}")


# ----------------------------------------------------------------------------- parity


def test_sp2_follows_the_single_process_loss_curve(runs):
    d = runs["dirs"]
    assert all(res["sp2"]["rc"] == 0 for res in runs["world"])
    _assert_same_curve(_train_rows(d["sp2"]), _train_rows(d["single"]), "S=2 train loss")
    # Validation at steps 2, 4, 6: each rank scores its block, sums are all-reduced.
    _assert_same_curve(_train_rows(d["sp2"], "valid"), _train_rows(d["single"], "valid"), "S=2 val loss")
    _assert_close_weights(d["sp2"], d["single"])


def test_dp2_with_the_same_global_batch_follows_the_single_process_curve(runs):
    d = runs["dirs"]
    assert all(res["dp2"]["rc"] == 0 for res in runs["world"])
    _assert_same_curve(_train_rows(d["dp2"]), _train_rows(d["single"]), "D=2 train loss")
    _assert_same_curve(_train_rows(d["dp2"], "valid"), _train_rows(d["single"], "valid"), "D=2 val loss")
    _assert_close_weights(d["dp2"], d["single"])


def test_2x2_mesh_follows_the_single_process_loss_curve(runs):
    d = runs["dirs"]
    assert all(res["dp2_sp2"]["rc"] == 0 for res in runs["world4"])
    assert "data-parallel 2 x sequence-parallel 2" in runs["world4"][0]["dp2_sp2"]["out"]
    _assert_same_curve(_train_rows(d["dp2_sp2"]), _train_rows(d["single"]), "D=2 x S=2 train loss")
    _assert_same_curve(_train_rows(d["dp2_sp2"], "valid"), _train_rows(d["single"], "valid"), "D=2 x S=2 val")
    _assert_close_weights(d["dp2_sp2"], d["single"])


def test_rank0_alone_prints_and_samples(runs):
    r0, r1 = runs["world"][0]["sp2"], runs["world"][1]["sp2"]
    assert "mesh: 2 processes (gloo) = data-parallel 1 x sequence-parallel 2" in r0["out"]
    assert "32 of 64 positions" in r0["out"]
    assert "final val bpb" in r0["out"] and "[longnet] sample" in r0["out"]  # rank 0 sampled after SP
    assert r1["out"] == "", r1["out"]
    # Sampling ran on one device with the single-device attention: the same bytes as one process.
    sample = lambda text: text[text.index("[longnet] sample"):]  # noqa: E731
    assert sample(r0["out"]) == sample(runs["single_out"])
    assert "data-parallel 2 x sequence-parallel 1" in runs["world"][0]["dp2"]["out"]


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_saved_at_s2_resumes_at_s1(runs):
    d = runs["dirs"]
    assert load_checkpoint(str(runs["sp2_cut_at_3"]))["step"] == 3
    _, data_state = load_trainer_state(str(runs["sp2_cut_at_3"]))
    assert data_state["step"] == 3 * 2  # 3 steps x grad_accum 2 global batches, as in one process
    _assert_same_curve(_train_rows(d["sp2_cut"]), _train_rows(d["single"]), "S=2 -> S=1 train loss")
    _assert_close_weights(d["sp2_cut"], d["single"])


def test_checkpoint_saved_at_s1_resumes_at_s2(runs):
    d = runs["dirs"]
    assert load_checkpoint(str(runs["single_cut_at_3"]))["step"] == 3
    assert all(res["resume_1_to_2"]["rc"] == 0 for res in runs["world"])
    assert "resuming at step 3" in runs["world"][0]["resume_1_to_2"]["out"]
    _assert_same_curve(_train_rows(d["single_cut"]), _train_rows(d["single"]), "S=1 -> S=2 train loss")
    _assert_close_weights(d["single_cut"], d["single"])


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(runs):
    # SIGINT reached rank 1 after step 3; the ranks agree on the stop at that step's boundary.
    for rank, res in enumerate(runs["world"]):
        assert res["sp2_cut"]["rc"] == 130, (rank, res["sp2_cut"])
    assert "stopped at step 3" in runs["world"][0]["sp2_cut"]["err"]
    assert "torchrun --nproc_per_node 2 -m longnet train --resume" in runs["world"][0]["sp2_cut"]["err"]
    assert runs["world"][1]["sp2_cut"]["err"] == ""


def test_sigterm_on_one_rank_stops_every_rank_and_saves(runs):
    # What a scheduler preempting one node sends: every rank stops after step 2, exit 128 + 15.
    for rank, res in enumerate(runs["world"]):
        assert res["sp2_term"]["rc"] == 128 + signal.SIGTERM, (rank, res["sp2_term"])
    assert "stopped at step 2" in runs["world"][0]["sp2_term"]["err"]
    assert load_checkpoint(str(runs["dirs"]["sp2_term"]))["step"] == 2
    assert [s for s, _ in _train_rows(runs["dirs"]["sp2_term"])] == [1, 2]


# ----------------------------------------------------------------------------- torchrun, two nodes


def _launch_nodes(tmp_path, argv, port):
    """Two torchrun launchers, one process each, meeting through a c10d rendezvous on 127.0.0.1."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"longnet-{port}",
           "-m", "longnet", *argv]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
             for log in logs]
    return procs, logs


def _wait(procs, logs, timeout=300):
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [log.read_text() for log in logs]


def test_two_torchrun_nodes_follow_the_single_process_loss_curve(runs, tmp_path):
    out = tmp_path / "nodes"
    procs, logs = _launch_nodes(tmp_path, _argv(runs["data"], out, "--sequence-parallel", "2"), _free_port())
    texts = _wait(procs, logs)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(texts)
    assert any("mesh: 2 processes (gloo) = data-parallel 1 x sequence-parallel 2" in t for t in texts)
    single = runs["dirs"]["single"]
    _assert_same_curve(_train_rows(out), _train_rows(single), "2 nodes train loss")
    _assert_same_curve(_train_rows(out, "valid"), _train_rows(single, "valid"), "2 nodes val loss")
    _assert_close_weights(out, single)


def test_sigterm_to_one_torchrun_node_stops_both_and_saves(runs, tmp_path):
    out = tmp_path / "nodes"
    argv = _argv(runs["data"], out, "--sequence-parallel", "2", "--max-steps", "100000")
    procs, logs = _launch_nodes(tmp_path, argv, _free_port())
    deadline = time.monotonic() + 240
    while not (os.path.isfile(out / "log.csv") and len(_train_rows(out)) >= 2):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _wait(procs, logs, 1)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one node is preempted
    texts = _wait(procs, logs)
    assert all(p.returncode != 0 for p in procs), "\n".join(texts)
    last = _train_rows(out)[-1][0]
    assert any(f"stopped at step {last}; checkpoint" in t for t in texts), "\n".join(texts)
    assert load_checkpoint(str(out))["step"] == last
    _, data_state = load_trainer_state(str(out))
    assert data_state["step"] == last * 2  # grad_accum 2: the sampler state of that very step


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("extra,match", [
    (["--sequence-parallel", "2", "--set", "seq_len=65"],
     "train.seq_len = 65 must be divisible by --sequence-parallel 2"),
    (["--sequence-parallel", "4", "--set", "segment_lengths=8,64", "--set", "dilation_rates=1,2"],
     "WORLD_SIZE=2 processes (torchrun --nproc_per_node x --nnodes) is not a multiple of --sequence-parallel 4"),
    (["--sequence-parallel", "2", "--data-parallel", "2"],
     "--sequence-parallel 2 x --data-parallel 2 = 4 processes, but torchrun started WORLD_SIZE=2"),
    (["--sequence-parallel", "2", "--set", "segment_lengths=24,64",
                 "--set", "dilation_rates=1,4"],
     "a segment of 24 positions straddles two ranks' blocks"),
    (["--sequence-parallel", "2", "--set", "segment_lengths=16,64", "--set", "dilation_rates=1,3"],
     "multiple of the dilation rate"),
    (["--data-parallel", "2", "--set", "batch_size=3"], "train.batch_size = 3 (the global batch of one micro-step) "
     "must be divisible by --data-parallel 2"),
])
def test_bad_mesh_gives_a_clear_error_before_any_process_group(extra, match, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    argv = ["train", "--out", str(tmp_path / "x"), *MICRO, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not torch.distributed.is_initialized()


def test_pattern_error_states_the_rule(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--out", str(tmp_path / "x"), *MICRO, "--sequence-parallel", "2",
                 "--set", "segment_lengths=24,64",
                 "--set", "dilation_rates=1,4"]) == 2
    err = capsys.readouterr().err
    assert "cannot be split into --sequence-parallel 2 blocks of train.seq_len / S = 32" in err
    assert "L % w' == 0" in err


def test_without_torchrun_the_error_gives_the_command(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--out", str(tmp_path / "x"), "--sequence-parallel", "2", "--data-parallel", "2"]) == 2
    err = capsys.readouterr().err
    assert "not started by torchrun" in err
    assert "torchrun --nproc_per_node 4 -m longnet train --sequence-parallel 2 --data-parallel 2" in err


def test_the_model_does_not_import_torch_distributed():
    import longnet.model
    import longnet.modules
    for mod in (longnet.model, longnet.modules):
        with open(mod.__file__, encoding="utf-8") as f:
            assert "torch.distributed" not in f.read(), mod.__name__


def test_stop_flag_counts_a_forwarded_sigint_once():
    # torchrun forwards the terminal's SIGINT to workers that already received it.
    flag = signals_mod.StopFlag(debounce_s=60.0, quiet=True)
    flag._handle(signal.SIGINT, None)
    flag._handle(signal.SIGINT, None)  # within the window: the same Ctrl-C
    assert flag.requested
    plain = signals_mod.StopFlag(quiet=True)
    plain._handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        plain._handle(signal.SIGINT, None)


def test_a_stop_adopted_from_another_rank_is_not_a_second_signal():
    flag = signals_mod.StopFlag(debounce_s=0.0, quiet=True)
    assert flag.agree([sig == signal.SIGTERM for sig in signals_mod.stop_signals()])  # rank 1 got SIGTERM
    assert flag.requested and flag.exit_code == 128 + signal.SIGTERM
    flag._handle(signal.SIGTERM, None)  # then this rank's own first one: still only a request
    with pytest.raises(KeyboardInterrupt):
        flag._handle(signal.SIGTERM, None)
    assert not signals_mod.StopFlag(quiet=True).agree([False, False, False])


def test_one_process_never_imports_the_distributed_package(runs, tmp_path):
    code = ("import sys\nfrom longnet.cli import main\n"
            f"assert main({_argv(runs['data'], tmp_path / 'one', '--max-steps', '2')!r}) == 0\n"
            "print(sorted(m for m in sys.modules if m.startswith('longnet.distributed')))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"
