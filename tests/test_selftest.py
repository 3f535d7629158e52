"""``longnet selftest --gpu`` on a CPU-only machine: its plan, the dry run, the no-GPU exit, the report.

The GPU run itself needs a GPU; here the plan is checked, the dry run executes its
correctness checks small on CPU and the sequence-parallel harness over gloo, and
failures are shown to be reported without stopping the run.
"""

from __future__ import annotations

import json

import torch

from longnet import cli, selftest




def test_plan_covers_what_the_gpu_validation_needs():
    plan = selftest.build_plan(n_gpus=4, have_flash_attn=True)
    assert selftest.check_plan(plan, 4) == []
    corr = [c.params for c in plan if c.group == "correctness"]
    assert {p["backend"] for p in corr} == {"triton", "torch", "math"}
    assert {p["dtype"] for p in corr} == {"fp16", "bf16", "fp32"}
    assert {p["cuda_kernel"] for p in corr if p["backend"] == "torch"} == {None, "efficient"}
    assert {p["causal"] for p in corr} == {False, True}
    assert {p["case"]["d"] for p in corr} == {16, 32, 64, 128}
    assert any(any(p["case"]["segment_phases"]) for p in corr)  # phases and the local window
    assert any(p["case"]["n"] % max(p["case"]["segment_lengths"][:2]) for p in corr)  # an awkward N
    sp = [c.params for c in plan if c.group == "sequence-parallel"]
    assert {p["world"] for p in sp} == {2, 4}
    bench = {(c.params["backend"], c.params["n"], c.params["mode"]) for c in plan if c.group == "benchmark"}
    assert bench == {(b, n, m) for b in ("triton", "torch", "sdpa", "flash-attn") for n in (16384, 65536, 262144)
                     for m in ("fwd", "fwdbwd")}
    assert [c.name for c in plan if c.group == "capacity"][-1] == "1M tokens bf16 fwd+bwd"
    one_gpu = selftest.build_plan(n_gpus=1, have_flash_attn=False)
    assert not any(c.group == "sequence-parallel" for c in one_gpu)
    assert not any(c.params.get("backend") == "flash-attn" for c in one_gpu)


def test_sp_checks_exchange_halos_and_span_ranks():
    from longnet.backends.sequence_parallel import check_sequence_parallel
    for world in (2, 4):
        case = selftest._sp_case(world)
        halos = [check_sequence_parallel(selftest.SP_BLOCK, world, case.segment_lengths, case.dilation_rates, rk,
                                         segment_phases=case.segment_phases)[1:] for rk in range(world)]
        assert any(h for _, h in halos) and all(spans for spans, _ in halos)


def test_check_plan_reports_problems():
    plan = selftest.build_plan(n_gpus=2, have_flash_attn=False)
    bad_sp = [c for c in plan if c.group == "sequence-parallel"][0]
    bad_sp.params = dict(bad_sp.params, block_length=100)  # w = 128 is not whole blocks of 100
    plan = [c for c in plan if not (c.group == "correctness" and c.params["backend"] == "math")]
    problems = selftest.check_plan(plan + plan[:1], 2)
    assert any("duplicate check name" in p for p in problems)
    assert any(p.startswith(bad_sp.name) and "L = 100" in p for p in problems)
    assert any("backend=math" in p for p in problems)


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report"
    assert cli.main(["selftest", "--gpu", "--out", str(out)]) == 0
    assert "no CUDA GPU on this machine" in capsys.readouterr().out
    assert not out.exists()


def test_failures_are_reported_and_the_run_carries_on():
    def fails(ctx):
        raise selftest.CheckFailed("dq outside the tolerance", {"tolerance_ratio": {"dq": 3.0}})

    def raises(ctx):
        raise RuntimeError("CUDA error: misaligned address")

    checks = [selftest.Check("a", "correctness", {}, fails), selftest.Check("b", "correctness", {}, raises),
              selftest.Check("c", "correctness", {}, lambda ctx: {"tolerance_ratio": {"out": 0.5}}),
              selftest.Check("d", "benchmark", dict(backend="triton", n=16384, mode="fwd"), lambda ctx: {},
                             estimate_s=1e9)]
    lines = []
    outcomes = selftest.run_plan(checks, selftest.Context(torch.device("cpu"), False), 100.0, log=lines.append)
    assert [o.status for o in outcomes] == ["fail", "error", "pass", "skipped"]
    assert "misaligned address" in outcomes[1].message and "Traceback" in outcomes[1].detail["traceback"]
    assert "time budget" in outcomes[3].message and len(lines) == 4
    md = selftest.render_markdown(selftest.environment(), outcomes, dry_run=False)
    assert "1 passed, 1 failed, 1 errors, 1 skipped" in md
    failures = md.split("## Failures")[1].split("##")[0]
    assert "| a | fail |" in failures and "| b | error |" in failures and "| c |" not in failures


def test_tolerance_ratio_catches_empty_rows_that_differ():
    want = torch.tensor([0.0, float("-inf")])
    assert selftest.tolerance_ratio(torch.tensor([1e-6, float("-inf")]), want, torch.float32, "lse") < 1
    assert selftest.tolerance_ratio(torch.tensor([0.0, 0.0]), want, torch.float32, "lse") == float("inf")
    assert selftest.tolerance_ratio(torch.tensor([1e-3, float("-inf")]), want, torch.float32, "lse") > 1


def test_dry_run_runs_its_cpu_part_and_writes_both_reports(tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli.main(["selftest", "--gpu", "--dry-run", "--only", "awkward-n", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads((out / "selftest.json").read_text())
    assert report["dry_run"] is True
    status = {o["name"]: o["status"] for o in report["outcomes"]}
    ran = sorted(n for n, s in status.items() if s == "pass")
    assert ran == ["awkward-n math-fp32 causal", "awkward-n math-fp32 full",
                   "awkward-n torch-flash-fp16 causal", "awkward-n torch-flash-fp16 full"]
    assert all(s == "skipped" for n, s in status.items() if n not in ran)
    assert any(o["message"] == "dry run: needs a GPU" for o in report["outcomes"])
    assert "(dry run on CPU)" in (out / "selftest.md").read_text()


def test_sequence_parallel_harness_over_gloo():
    """The GPU run's sequence-parallel check, spawned as in the dry run (gloo, CPU, float32)."""
    ctx = selftest.Context(torch.device("cpu"), dry_run=True)
    detail = selftest.sp_check(2, "bf16", True, 300.0)(ctx)
    assert detail["world"] == 2 and max(detail["tolerance_ratio"].values()) <= 1.0
    assert set(detail["tolerance_ratio"]) == {"out", "lse", "dq", "dk", "dv"}

