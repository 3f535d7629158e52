"""The benchmarks: what they report is what they measured (CSV = table, FLOP counts and ratios
by docs/design.md §3), the shared timing and memory code, and clear errors for absurd arguments
before any work starts. No assertion on wall-clock time beyond "positive and finite"."""

import contextlib
import csv
import dataclasses
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F

from longnet import report
from longnet.analysis.plotting import png_size
from longnet.bench import common, lm, op, sp, triton_kernel
from longnet.cli import main
from longnet.device import machine_name
from longnet.patterns import DilatedPattern, dense_flops, dilated_flops

W, R, H, D = (64, 128), (1, 2), 2, 8
TINY = ["--heads", str(H), "--head-dim", str(D), "--segment-lengths", "64,128", "--dilation-rates", "1,2",
        "--repeats", "1", "--warmup", "0"]


def _table_rows(text: str, first_header: str):
    """Cells of each row of the table whose header starts with ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_header])
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("wrote"):
            break
        rows.append(line.split())
    return rows


def _csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


# --------------------------------------------------------------------------- longnet bench


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    csv_path, png = out / "b.csv", out / "b.png"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["bench", "--n", "200,256", *TINY, "--csv", str(csv_path), "--plot", str(png)])
    return rc, buf.getvalue(), csv_path, png


def test_bench_csv_has_one_row_per_impl_and_length(bench_run):
    rc, _, csv_path, png = bench_run
    assert rc == 0
    header, rows = _csv(csv_path)
    assert header == [f.name for f in dataclasses.fields(op.Row)]
    assert [(r["impl"], int(r["n"])) for r in rows] == [
        ("dilated[auto]", 200), ("dense-sdpa", 200), ("dense-op", 200),
        ("dilated[auto]", 256), ("dense-sdpa", 256), ("dense-op", 256)]
    for r in rows:
        for key in ("fwd_ms", "fwdbwd_ms", "fwd_gflops", "fwdbwd_gflops"):
            assert 0 < float(r[key]) < math.inf, (key, r)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_size(str(png)) == (1210, 462)


def test_bench_flops_and_ratios_follow_from_the_measured_times(bench_run):
    _, _, csv_path, _ = bench_run
    _, rows = _csv(csv_path)
    pattern = DilatedPattern(W, R)
    for dil, dense, op_dense in zip(rows[::3], rows[1::3], rows[2::3]):
        n = int(dil["n"])
        # The reported FLOP ratio is the pattern's own, and GFLOP/s x time gives docs/design.md §3's count.
        assert float(dil["dense_over_dilated_flops"]) == pytest.approx(pattern.flop_ratio(n, H, D, causal=True))
        dense_fl = dense_flops(n, H, D, causal=True)
        for row, flops in ((dil, dilated_flops(n, H, D, W, R, causal=True)), (dense, dense_fl), (op_dense, dense_fl)):
            assert float(row["fwd_gflops"]) * float(row["fwd_ms"]) * 1e6 == pytest.approx(flops)
            assert float(row["fwdbwd_gflops"]) * float(row["fwdbwd_ms"]) * 1e6 == pytest.approx(3.5 * flops)
            assert float(row["io_mib"]) == 8 * n * H * D * 4 / 2**20  # q, k, v, out + grads, fp32
        assert float(dil["dense_over_dilated_fwd"]) == pytest.approx(float(dense["fwd_ms"]) / float(dil["fwd_ms"]))
        assert float(dil["dense_over_dilated_fwdbwd"]) == pytest.approx(
            float(dense["fwdbwd_ms"]) / float(dil["fwdbwd_ms"]))
        assert float(dil["op_dense_over_dilated_fwd"]) == pytest.approx(
            float(op_dense["fwd_ms"]) / float(dil["fwd_ms"]))
        assert float(dil["op_dense_over_dilated_fwdbwd"]) == pytest.approx(
            float(op_dense["fwdbwd_ms"]) / float(dil["fwdbwd_ms"]))
        assert dense["dense_over_dilated_fwd"] == "nan" and op_dense["op_dense_over_dilated_fwd"] == "nan"


def test_bench_table_agrees_with_csv(bench_run):
    _, text, csv_path, _ = bench_run
    _, rows = _csv(csv_path)
    table = _table_rows(text, "impl")
    assert len(table) == len(rows)
    for cells, r in zip(table, rows):
        assert cells[0] == r["impl"] and int(cells[1]) == int(r["n"])
        for cell, key, digits in ((cells[2], "fwd_ms", 1), (cells[3], "fwdbwd_ms", 1), (cells[4], "fwd_gflops", 1),
                                  (cells[7], "mem_over_io", 2), (cells[8], "total_over_io", 2)):
            assert cell == f"{float(r[key]):.{digits}f}", key
        # counting everything includes the inputs, which the growth alone does not
        assert float(r["total_over_io"]) >= float(r["mem_over_io"])
    assert table[0][-3] == f"{float(rows[0]['dense_over_dilated_flops']):.2f}"
    assert table[0][-1] == f"{float(rows[0]['op_dense_over_dilated_fwdbwd']):.2f}"
    assert len(table[1]) == len(table[2]) == 9  # dense rows: the ratio columns are blank, not "nan"


def test_bench_without_dense_non_causal(tmp_path, capsys):
    path = tmp_path / "nd.csv"
    assert main(["bench", "--n", "256", *TINY, "--no-dense", "--no-memory", "--non-causal",
                 "--backend", "math", "--csv", str(path)]) == 0
    _, rows = _csv(path)
    assert [r["impl"] for r in rows] == ["dilated[math]"]
    assert float(rows[0]["peak_mem_mib"]) == 0 and rows[0]["dense_over_dilated_fwd"] == "nan"
    assert float(rows[0]["dense_over_dilated_flops"]) == pytest.approx(
        DilatedPattern(W, R).flop_ratio(256, H, D, causal=False))
    assert "w=64,128 r=1,2" in capsys.readouterr().out


def test_bench_without_the_op_dense_baseline(tmp_path):
    path = tmp_path / "nop.csv"
    assert main(["bench", "--n", "128", *TINY, "--no-dense-op", "--no-memory", "--csv", str(path)]) == 0
    _, rows = _csv(path)
    assert [r["impl"] for r in rows] == ["dilated[auto]", "dense-sdpa"]
    assert rows[0]["op_dense_over_dilated_fwd"] == "nan" and float(rows[0]["dense_over_dilated_fwd"]) > 0


def test_bench_times_the_local_window_against_the_paper_pattern(tmp_path):
    """--pattern paper+lw16: one row each, timed in turn; the lw16 row's time per FLOP against the paper
    pattern's is the paper row's GFLOP/s over its own, and its FLOPs are those of the lw16 pattern."""
    path = tmp_path / "lw.csv"
    assert main(["bench", "--n", "256", *TINY, "--pattern", "paper+lw16", "--no-dense", "--no-memory",
                 "--csv", str(path)]) == 0
    _, rows = _csv(path)
    paper, lw = rows
    assert (paper["impl"], lw["impl"]) == ("dilated[auto]", "dilated+lw16")
    assert paper["fwd_cost_per_flop_vs_paper"] == "nan"
    for mode in ("fwd", "fwdbwd"):
        assert float(lw[f"{mode}_cost_per_flop_vs_paper"]) == pytest.approx(
            float(paper[f"{mode}_gflops"]) / float(lw[f"{mode}_gflops"]), rel=1e-6)
    variant = DilatedPattern(W, R).with_local_window(16)
    flops = dilated_flops(256, H, D, variant.segment_lengths, variant.dilation_rates, causal=True,
                          segment_phases=variant.segment_phases)
    assert float(lw["fwd_gflops"]) * float(lw["fwd_ms"]) / 1e3 == pytest.approx(flops / 1e9, rel=1e-6)


def test_machine_name_is_descriptive():
    assert f"{torch.get_num_threads()} threads" in machine_name(torch.device("cpu"))


# --------------------------------------------------------------------------- shared timing code


def test_best_of_times_only_the_repeats_and_returns_the_fastest(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 12.0, 20.0, 27.0])  # three timed calls: 5, 2 and 7 seconds
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    calls = []
    assert common.best_of(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=2) == 2.0
    assert len(calls) == 5  # the two warm-up calls read no clock: one more read would raise
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        common.best_of(lambda: None, torch.device("cpu"), repeats=0, warmup=0)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_and_dilated_calls_compute_the_same_attention(causal):
    """With one pattern (w >= N, r = 1) dilated attention is dense attention: the bench compares like with like."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 40, 2, 8, generator=g, dtype=torch.float64) for _ in range(4))
    one = DilatedPattern((64,), (1,))
    outs = {}
    for impl in (common.DENSE, common.DENSE_OP, None, "math"):
        fwd = common.attention_call(impl, "fwd", q, k, v, do, one, causal)()
        fwdbwd = common.attention_call(impl, "fwdbwd", q, k, v, do, one, causal)()
        assert not fwd.requires_grad and fwd.shape == q.shape
        torch.testing.assert_close(fwdbwd.detach(), fwd)
        outs[impl] = fwd
    torch.testing.assert_close(outs[None], outs[common.DENSE])
    torch.testing.assert_close(outs["math"], outs[common.DENSE])
    torch.testing.assert_close(outs[common.DENSE_OP], outs[common.DENSE])
    with pytest.raises(ValueError, match="mode must be"):
        common.attention_call(None, "bwd", q, k, v, do, one, causal)


def test_peak_memory_growth_sees_an_allocation():
    held = []
    mib = 64
    growth = common.peak_memory_growth(lambda: held.append(torch.ones(mib * 2**18)), torch.device("cpu"))
    assert mib * 2**20 * 0.9 <= growth < 4 * mib * 2**20


def test_peak_rss_is_exact_on_linux_and_sees_a_peak_already_freed():
    """The high-water mark, reset on entry: a temporary freed before the end counts, and an older,
    larger peak of the process does not."""
    old = torch.ones(256 * 2**18)  # 256 MiB, freed before the measurement
    del old
    common.release_free_heap()
    mib = 64

    def spike():
        t = torch.ones(mib * 2**18)
        del t

    with common.PeakRSS() as m:
        spike()
    assert m.exact == os.path.exists("/proc/self/clear_refs")
    assert mib * 2**20 * 0.9 <= m.growth < 3 * mib * 2**20, m.growth


def test_format_table_blanks_nan_and_aligns():
    cols = (report.Column("name", "a", width=6, align="<"), report.Column("x", "b", ".2f", 6))
    text = report.format_table([{"a": "p", "b": 1.234}, {"a": "q", "b": float("nan")}], cols)
    assert text.splitlines() == ["name        x", "-" * 13, "p        1.23", "q            "]
    assert report.format_table([{"a": "p", "b": 2.0}], cols, header=False) == "p        2.00"


def test_csv_write_read_roundtrip_and_append(tmp_path):
    path = str(tmp_path / "sp.csv")
    row = sp.Row(2, 64, 128, 1.5, 2.5, 3.5, 4.5, 10, 20, 30, 40, float("nan"), 7.0, "cpu", "cfg, with comma")
    assert sp.write_csv([row], path) == [row]
    both = sp.write_csv([dataclasses.replace(row, world_size=4)], path, append=True)
    back = report.read_csv(path, sp.Row)
    assert [r.world_size for r in back] == [2, 4] and len(both) == 2
    assert back[0].config == "cfg, with comma" and math.isnan(back[0].single_fwd_ms)
    assert dataclasses.replace(back[1], single_fwd_ms=0.0) == dataclasses.replace(both[1], single_fwd_ms=0.0)
    assert [type(getattr(back[0], f.name)) for f in dataclasses.fields(sp.Row)][:3] == [int, int, int]
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other.csv: not a CSV of Row rows"):
        report.read_csv(str(tmp_path / "other.csv"), sp.Row)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []  # atomic writes left nothing


def test_write_csv_fills_missing_fields_blank(tmp_path):
    path = tmp_path / "t.csv"
    triton_kernel.write_csv([{"gpu": "g", "backend": "triton", "n": 16}], str(path))
    header, rows = _csv(path)
    assert header == list(triton_kernel.FIELDS)
    assert rows == [{**{k: "" for k in triton_kernel.FIELDS}, "gpu": "g", "backend": "triton", "n": "16"}]


# --------------------------------------------------------------------------- sequence-parallel weak scaling


def test_sp_bench_spawns_ranks_and_counts_traffic(tmp_path, capsys):
    path, png = tmp_path / "sp.csv", tmp_path / "sp.png"
    rc = main(["bench", "--sequence-parallel", "--block-length", "64", "--world-sizes", "1,2", "--heads", "1",
               "--head-dim", "8", "--repeats", "1", "--warmup", "0", "--no-single-baseline",
               "--csv", str(path), "--plot", str(png)])
    assert rc == 0
    header, rows = _csv(path)
    assert header == [f.name for f in dataclasses.fields(sp.Row)]
    assert [(int(r["world_size"]), int(r["seq_len"])) for r in rows] == [(1, 64), (2, 128)]
    assert [int(rows[0][k]) for k in ("fwd_sent_bytes", "fwd_recv_bytes", "bwd_sent_bytes")] == [0, 0, 0]
    # At P = 2 only the w = 2L = 128, r = 8 pattern spans ranks: at most 2*B*(w/r)*H*D fp32 elements each way.
    for key in ("fwd_sent_bytes", "fwd_recv_bytes", "bwd_sent_bytes", "bwd_recv_bytes"):
        assert 0 < int(rows[1][key]) <= 2 * (128 // 8) * 1 * 8 * 4, key
    assert all(0 < float(r["fwd_ms_max"]) < math.inf and float(r["fwd_ms_mean"]) <= float(r["fwd_ms_max"])
               for r in rows)
    assert all(r["single_fwd_ms"] == "nan" for r in rows)
    table = _table_rows(capsys.readouterr().out, "P")
    assert [(int(c[0]), int(c[1])) for c in table] == [(1, 64), (2, 128)]
    assert table[1][2] == f"{float(rows[1]['fwd_ms_mean']):.1f}/{float(rows[1]['fwd_ms_max']):.1f}"
    assert png_size(str(png)) == (1210, 462)


# --------------------------------------------------------------------------- absurd arguments

ARGPARSE_CASES = [
    (["--heads", "0"], "--heads: expected a positive integer, got 0"),
    (["--batch", "0"], "--batch: expected a positive integer, got 0"),
    (["--head-dim", "-8"], "--head-dim: expected a positive integer, got -8"),
    (["--repeats", "-5"], "--repeats: expected a positive integer, got -5"),
    (["--warmup", "-1"], "--warmup: expected an integer >= 0, got -1"),
    (["--threads", "0"], "--threads: expected a positive integer"),
    (["--n", "0,64"], "--n: expected positive integers"),
    (["--n", "abc"], "--n: expected comma-separated integers"),
    (["--dtype", "fp8"], "--dtype: invalid choice"),
    (["--csv", "{tmp}"], "--csv: expected a file name, got the folder"),
    (["--csv", "{tmp}/missing/b.csv"], "--csv: the folder of"),
    (["--plot", "{tmp}"], "--plot: expected a file name, got the folder"),
    (["--plot", "{tmp}/missing/b.png"], "--plot: the folder of"),
]


LM_ARGPARSE_CASES = [
    (["--n", "0"], "--n: expected positive integers"),
    (["--lm-dim", "0"], "--lm-dim: expected a positive integer, got 0"),
    (["--dense-max-seconds", "0"], "--dense-max-seconds: expected a positive, finite number"),
    (["--dense-max-seconds", "soon"], "--dense-max-seconds: expected a number of seconds"),
    (["--dtype", "fp16"], "--dtype: invalid choice"),
    (["--repeats", "0"], "--repeats: expected a positive integer"),
    (["--csv", "{tmp}"], "--csv: expected a file name, got the folder"),
    (["--plot", "{tmp}/missing/lm.png"], "--plot: the folder of"),
]


LM_RUN_CASES = [
    (["--lm-dim", "65"], "--lm-layers/--lm-dim/--lm-heads/--lm-ffn: d_model (65) must be divisible by n_heads (4)"),
    (["--lm-dim", "36"], "xpos needs an even head dim"),
    (["--n", "256"], "--n 256: longnet's default pattern starts at w = 512 (--base-segment)"),
    (["--n", "1000000000000"], "--n 1000000000000: one training step needs at least"),
    (["--segment-lengths", "64"], "give both --segment-lengths and --dilation-rates"),
    (["--segment-lengths", "64", "--dilation-rates", "128"], "--dilation-rates[0] = 128"),
    (["--device", "tpu9"], "--device must be"),
]
if not torch.cuda.is_available():
    LM_RUN_CASES.append((["--device", "cuda"], "CUDA is not available"))


def _no_measuring(monkeypatch):
    for module in (op, lm):
        monkeypatch.setattr(module, "measure", lambda *a, **k: pytest.fail("measured despite a bad argument"))


@pytest.mark.parametrize("command, argv, needle", [([], *c) for c in ARGPARSE_CASES] +
                         [(["--lm"], *c) for c in LM_ARGPARSE_CASES])
def test_bench_rejects_absurd_arguments(command, argv, needle, tmp_path, capsys, monkeypatch):
    _no_measuring(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(["bench", *command, *[a.format(tmp=tmp_path) for a in argv]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.startswith(" ".join(["usage: longnet bench", *command]))
    assert os.listdir(tmp_path) == []


RUN_CASES = [
    (["--n", "1000000000"], "--n 1000000000: q, k, v, out and their gradients alone need"),
    (["--n", "4096", "--batch", "100000"], "--batch 100000"),
    (["--backend", "bogus"], "--backend bogus: backend must be one of"),
    (["--device", "tpu9"], "--device must be"),
    (["--segment-lengths", "64"], "give both --segment-lengths and --dilation-rates"),
    (["--segment-lengths", "64", "--dilation-rates", "128"], "--dilation-rates[0] = 128"),
    (["--segment-lengths", "64,x", "--dilation-rates", "1,2"], "--segment-lengths must be comma-separated"),
]
RUN_CASES += [  # --figure5: forward only, dense extrapolated from at least two measured N
    (["--figure5"], "--figure5 draws a plot: give --plot"),
    (["--figure5", "--no-dense", "--plot", "{tmp}/f.png"], "drop --no-dense"),
    (["--figure5", "--n", "4096,65536", "--plot", "{tmp}/f.png"],
     "give at least two --n at or below --dense-max-n 32768, got [4096]"),
    (["--figure5", "--n", "4096,8192", "--dense-max-n", "2048", "--plot", "{tmp}/f.png"], "got none"),
    (["--figure5", "--n", "4096,8192,268435456", "--plot", "{tmp}/f.png"], "q, k, v and out alone need"),
]
RUN_CASES += [(["--breakdown", flag, *rest], f"--breakdown prints two tables against dense attention: drop {flag}")
              for flag, *rest in (("--no-dense",), ("--plot", "{tmp}/b.png"))]
if not torch.cuda.is_available():
    RUN_CASES.append((["--device", "cuda"], "CUDA is not available"))


@pytest.mark.parametrize("command, argv, needle", [([], *c) for c in RUN_CASES] + [(["--lm"], *c) for c in LM_RUN_CASES])
def test_bench_checks_everything_before_measuring(command, argv, needle, tmp_path, capsys, monkeypatch):
    _no_measuring(monkeypatch)
    assert main(["bench", *command, *[a.format(tmp=tmp_path) for a in argv], "--csv", str(tmp_path / "b.csv")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(" ".join(["longnet bench", *command]) + ": error: ") and needle in captured.err, \
        captured.err
    assert captured.out == "" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, needle", [
    (["--block-length", "0"], "--block-length: expected a positive integer"),
    (["--world-sizes", "1,0"], "--world-sizes: expected positive integers"),
    (["--repeats", "0"], "--repeats: expected a positive integer"),
    (["--threads", "0"], "--threads: expected a positive integer"),
    (["--csv", "{tmp}"], "--csv: expected a file name, got the folder"),
    (["--plot", "{tmp}/missing/sp.png"], "--plot: the folder of"),
])
def test_sp_bench_argparse_errors(argv, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--sequence-parallel", *[a.format(tmp=tmp_path) for a in argv]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.startswith("usage: longnet bench --sequence-parallel")


@pytest.mark.parametrize("argv, needle", [
    (["--block-length", "48"], "--block-length must be a multiple of 32 for the default pattern, got 48"),
    (["--block-length", "64", "--segment-lengths", "96", "--dilation-rates", "1"],
     "--block-length 64 at P = 2: segment_lengths[0] = 96"),
    (["--device", "cuda"], "--device cuda: spawn mode runs gloo processes on the CPU"),
    (["--segment-lengths", "64"], "give both --segment-lengths and --dilation-rates"),
])
def test_sp_bench_checks_before_spawning(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sp, "_run_spawned", lambda args: pytest.fail("spawned despite a bad argument"))
    assert main(["bench", "--sequence-parallel", "--world-sizes", "1,2", *argv,
                 "--csv", str(tmp_path / "sp.csv"), "--plot", ""]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longnet bench --sequence-parallel: error: ") and needle in err, err
    assert os.listdir(tmp_path) == []


def test_sp_bench_under_torchrun_refuses_a_foreign_csv(tmp_path, capsys, monkeypatch):
    foreign = tmp_path / "other.csv"
    foreign.write_text("impl,n\ndense,4\n")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(sp, "_run_torchrun", lambda args: pytest.fail("measured despite a bad --csv"))
    assert sp.main(["--block-length", "64", "--csv", str(foreign), "--plot", ""]) == 2
    assert "rows are appended to it under torchrun" in capsys.readouterr().err
    assert foreign.read_text() == "impl,n\ndense,4\n"


@pytest.mark.parametrize("argv, needle", [
    (["--dims", "12x0"], "--dims: heads and head dim must be positive"),
    (["--dims", "12"], "--dims: expected HxD pairs"),
    (["--seq-lens", "16k,0"], "--seq-lens: expected a positive length"),
    (["--seq-lens", "16q"], "--seq-lens: expected a length like 16384, 16k or 1M"),
    (["--warmup", "0"], "--warmup: expected a positive integer"),
    (["--csv", "{tmp}"], "--csv: expected a file name, got the folder"),
    (["--backends", "foo"], "--backends: unknown backend 'foo'"),
    (["--modes", ","], "must each name at least one value"),
])
def test_triton_bench_argument_errors(argv, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        triton_kernel.parse_args([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2 and needle in capsys.readouterr().err


# --------------------------------------------------------------------------- Figure 5: time against N, dense extrapolated

@pytest.fixture(scope="module")
def figure5_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig5")
    csv_path, png = out / "f.csv", out / "f.png"
    panels = []
    real_plot = report.plot_panels
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as buf:
        mp.setattr(report, "plot_panels", lambda ps, *a, **k: (panels.extend(ps), real_plot(ps, *a, **k))[1])
        rc = main(["bench", "--figure5", "--n", "128,256,512,1024", "--dense-max-n", "256", *TINY,
                   "--csv", str(csv_path), "--plot", str(png)])
    return rc, buf.getvalue(), csv_path, png, panels


def test_figure5_extrapolates_dense_from_the_quadratic_fit_of_measured_rows(figure5_run):
    rc, text, csv_path, png, _ = figure5_run
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, rows = _csv(csv_path)
    assert [(r["impl"], int(r["n"])) for r in rows] == [
        ("dilated[auto]", 128), ("dense-sdpa", 128), ("dilated[auto]", 256), ("dense-sdpa", 256),
        ("dilated[auto]", 512), ("dilated[auto]", 1024), (op.EXTRAPOLATED, 512), (op.EXTRAPOLATED, 1024)]
    assert all(r["fwdbwd_ms"] == "nan" and 0 < float(r["fwd_ms"]) < math.inf for r in rows)  # forward only
    dense = [r for r in rows if r["impl"] == "dense-sdpa"]
    a, b = common.quadratic_fit([int(r["n"]) for r in dense], [float(r["fwd_ms"]) for r in dense])
    for r in rows[-2:]:
        n = int(r["n"])
        assert float(r["fwd_ms"]) == pytest.approx(a * n + b * n * n)
        assert float(r["fwd_gflops"]) * float(r["fwd_ms"]) * 1e6 == pytest.approx(dense_flops(n, H, D, causal=True))
    # Ratios are only ever measured ones: none at the extrapolated lengths.
    assert [r["dense_over_dilated_fwd"] == "nan" for r in rows if r["impl"] == "dilated[auto]"] == [
        False, False, True, True]
    assert f"{op.EXTRAPOLATED}: dense forward time from the fit" in text


def test_figure5_plot_draws_the_extrapolation_dashed_and_labelled(figure5_run):
    _, _, csv_path, _, panels = figure5_run
    _, rows = _csv(csv_path)
    (panel,) = panels
    assert panel.xscale[0] == panel.yscale[0] == "log"
    by_label = {s.label: s for s in panel.series}
    assert set(by_label) == {"dilated[auto]", "dense SDPA", "dense SDPA (extrapolated)"}
    measured, extrapolated = by_label["dense SDPA"], by_label["dense SDPA (extrapolated)"]
    assert "--" in extrapolated.style and "--" not in measured.style and extrapolated.color == measured.color
    # The dashed line continues from the last measured point through the fitted ones.
    assert list(measured.x) == [128, 256] and list(extrapolated.x) == [256, 512, 1024]
    assert extrapolated.y[0] == measured.y[-1]
    assert list(extrapolated.y[1:]) == [float(r["fwd_ms"]) / 1e3 for r in rows if r["impl"] == op.EXTRAPOLATED]


# --------------------------------------------------------------------------- fits and interleaved timing


def test_quadratic_fit_recovers_coefficients_and_keeps_them_non_negative():
    ns = [4096, 8192, 16384, 32768]
    a, b = common.quadratic_fit(ns, [2e-6 * n + 3e-10 * n * n for n in ns])
    assert a == pytest.approx(2e-6) and b == pytest.approx(3e-10)
    # Times that fall off faster than linear would need b < 0: b is clamped to 0 and a refitted alone.
    a, b = common.quadratic_fit([1, 2], [1.0, 1.5])
    assert b == 0 and a == pytest.approx((1 * 1.0 + 2 * 1.5) / (1 + 4))
    # Times that grow faster than N^2 would need a < 0: a is clamped to 0 and b refitted alone.
    a, b = common.quadratic_fit([1, 2], [1.0, 5.0])
    assert a == 0 and b == pytest.approx((1 * 1.0 + 4 * 5.0) / (1 + 16))
    with pytest.raises(ValueError, match="two or more distinct N"):
        common.quadratic_fit([4096, 4096], [1.0, 1.1])


def test_interleaved_times_take_turns_after_warming_up_each(monkeypatch):
    clock = iter([0.0, 1.0, 1.0, 3.0, 10.0, 14.0, 20.0, 28.0])  # a: 1, 4 s; b: 2, 8 s
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    calls = []
    times = common.interleaved_times([lambda: calls.append("a"), lambda: calls.append("b")],
                                     torch.device("cpu"), repeats=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b"] and times == [[1.0, 4.0], [2.0, 8.0]]


# --------------------------------------------------------------------------- longnet bench --lm

LM_TINY = ["--lm-layers", "1", "--lm-dim", "32", "--lm-heads", "2", "--lm-ffn", "64", "--base-segment", "64",
           "--repeats", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    csv_path, png = out / "lm.csv", out / "lm.png"
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        rc = main(["bench", "--lm", "--n", "256,128,512", *LM_TINY, "--dense-max-n", "256",
                   "--csv", str(csv_path), "--plot", str(png)])
    return rc, buf.getvalue(), csv_path, png


def test_lm_bench_csv_rows_and_throughput(lm_run):
    rc, _, csv_path, png = lm_run
    assert rc == 0 and png_size(str(png)) == (1210, 462)
    header, rows = _csv(csv_path)
    assert header == [f.name for f in dataclasses.fields(lm.Row)]
    assert [(r["model"], int(r["n"]), r["status"]) for r in rows] == [
        ("longnet", 128, "measured"), ("dense", 128, "measured"), ("longnet", 256, "measured"),
        ("dense", 256, "measured"), ("longnet", 512, "measured"), ("dense", 512, "extrapolated")]
    for r in rows:
        n, tps = int(r["n"]), float(r["tokens_per_s"])
        assert 0 < tps < math.inf and tps * float(r["step_s"]) == pytest.approx(n)  # batch 1: N tokens a step
        assert (r["status"] == "measured") == (0 <= float(r["peak_mem_mib"]) < math.inf)
        assert r["dtype"] == "fp32" and r["checkpointing"] == "False"
    # The geometric pattern w = 64..N, r = 1..N/64 for longnet; one w = N, r = 1 pattern for dense.
    assert [r["pattern"] for r in rows[-2:]] == ["w=64,128,256,512 r=1,2,4,8", "w=512 r=1"]
    for r in rows:
        pattern = DilatedPattern.parse(*(p.split("=")[1] for p in r["pattern"].split()))
        n = int(r["n"])
        flops = pattern.flops(n, 2, 16, causal=True, backward=True)
        assert float(r["attn_gflop"]) == pytest.approx(flops / 1e9)
        if r["model"] == "dense":
            assert flops == dense_flops(n, 2, 16, causal=True, backward=True)


def test_lm_bench_ratio_and_extrapolation_follow_the_measurements(lm_run):
    _, text, csv_path, _ = lm_run
    _, rows = _csv(csv_path)
    dense = {int(r["n"]): r for r in rows if r["model"] == "dense"}
    measured = [(n, float(r["step_s"])) for n, r in dense.items() if r["status"] == "measured"]
    a, b = common.quadratic_fit([m[0] for m in measured], [m[1] for m in measured])
    assert float(dense[512]["step_s"]) == pytest.approx(a * 512 + b * 512**2)
    for r in (r for r in rows if r["model"] == "longnet"):
        d = dense[int(r["n"])]
        assert float(r["longnet_over_dense"]) == pytest.approx(float(r["tokens_per_s"]) / float(d["tokens_per_s"]))
        assert r["dense_status"] == d["status"]
    table = _table_rows(text, "model")[:len(rows)]  # then the footnote on extrapolation
    assert [(c[0], int(c[1]), c[2]) for c in table] == [(r["model"], int(r["n"]), r["status"]) for r in rows]
    assert table[4][-1] == f"{float(rows[4]['longnet_over_dense']):.2f}*"  # against the extrapolated dense
    assert table[2][-1] == f"{float(rows[2]['longnet_over_dense']):.2f}"
    assert "extrapolated: dense step time from the fit" in text


def test_lm_bench_dense_model_is_dense_attention():
    """The dense LM (one pattern w = N, r = 1) computes exactly the LM with causal SDPA as its attention."""
    n = 200
    base = lm.base_config(lm.build_parser().parse_args(["--lm-layers", "2", "--lm-dim", "32", "--lm-heads", "2"]))
    dense = lm.build_model(lm.model_config(base, lm.dense_pattern(n), n), torch.device("cpu")).eval()
    longnet = lm.build_model(lm.model_config(base, lm.longnet_pattern(n, 64), n), torch.device("cpu")).eval()
    sdpa = lm.build_model(lm.model_config(base, lm.dense_pattern(n), n), torch.device("cpu")).eval()

    def causal_sdpa(q, k, v, *_, **__):  # (B, N, H, D) in and out
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)

    for blk in sdpa.blocks:
        blk.attn.attention_fn = causal_sdpa
    tokens = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(tokens), sdpa(tokens))
        assert not torch.allclose(longnet(tokens), sdpa(tokens), atol=1e-3)  # the pattern does matter here
    assert all(torch.equal(p, q) for p, q in zip(dense.state_dict().values(), longnet.state_dict().values()))


def test_lm_bench_skips_dense_by_its_estimated_step_time():
    assert math.isnan(lm.dense_estimate([], 4096))  # nothing to estimate from
    assert lm.dense_estimate([(1000, 1.0)], 2000) == 4.0  # one point: the (N/N0)^2 bound
    assert lm.run_dense(4096, [], None, 1.0)  # nothing measured yet: run it
    assert not lm.run_dense(2000, [(1000, 1.0)], None, 3.9) and lm.run_dense(2000, [(1000, 1.0)], None, 4.1)
    assert not lm.run_dense(2000, [], 1000, 100.0)  # over --dense-max-n
    row = lm.unmeasured_dense_row(2000, lm.base_config(lm.build_parser().parse_args([])), [(1000, 1.0)], "fp32")
    assert row.status == lm.SKIPPED and math.isnan(row.tokens_per_s)  # one point is not enough to extrapolate


def test_lm_xpos_range_reaches_n_with_the_same_cost():
    base = lm.base_config(lm.build_parser().parse_args([]))
    cfg = lm.model_config(base, lm.dense_pattern(65536), 65536)
    assert cfg.xpos_scale_base == 2 * base.xpos_scale_base  # 512 reaches only 65,391 tokens
    assert lm.model_config(base, lm.dense_pattern(16384), 16384).xpos_scale_base == base.xpos_scale_base
    assert cfg.num_parameters() == base.num_parameters()


# --------------------------------------------------------------------------- longnet bench --breakdown


def test_kernel_clock_sees_every_kernel_call_and_restores_the_kernels(monkeypatch):
    from longnet.backends import kernels
    from longnet.bench import breakdown
    seen = []
    for name in ("_attn_fwd", "_attn_bwd"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name: seen.append(_n) or _f(*a))
    before = kernels._attn_fwd, kernels._attn_bwd
    q, k, v = (torch.randn(1, 300, 4, 8, requires_grad=True) for _ in range(3))
    with breakdown.kernel_clock(torch.device("cpu")) as clock:
        out = longnet_op(q, k, v)
        out.sum().backward()
    assert clock.calls == len(seen) and "_attn_fwd" in seen and "_attn_bwd" in seen
    assert 0 < clock.seconds < math.inf
    assert (kernels._attn_fwd, kernels._attn_bwd) == before


def longnet_op(q, k, v):
    from longnet import dilated_attention
    return dilated_attention(q, k, v, [64, 128, 256], [1, 2, 4], is_causal=True, backend="torch")


def test_kept_lengths_are_the_clipped_segments_over_their_rates():
    from longnet.bench.breakdown import kept_lengths
    paper = DilatedPattern.paper()
    assert kept_lengths(paper, 32768) == [2048, 2731]
    assert kept_lengths(paper, 16384) == [1366, 2048, 2731]  # w = 32768 clipped to 16384, over r = 12


def test_breakdown_prints_both_tables_and_writes_them(tmp_path, capsys):
    path = tmp_path / "b.csv"
    assert main(["bench", "--breakdown", "--n", "256,512", *TINY, "--csv", str(path)]) == 0
    text = capsys.readouterr().out
    with open(path) as f:
        splits = list(csv.DictReader(f))
    with open(tmp_path / "b_tiles.csv") as f:
        tiles = list(csv.DictReader(f))
    assert [(r["n"], r["mode"]) for r in splits] == [("256", "fwd"), ("256", "fwdbwd"), ("512", "fwd"),
                                                     ("512", "fwdbwd")]
    for r in splits:
        total, kernel, dense = (float(r[c]) for c in ("dilated_ms", "kernel_ms", "dense_ms"))
        assert 0 < kernel <= total and dense > 0
        assert float(r["kernel_share"]) == pytest.approx(kernel / total)
        assert float(r["dense_over_kernel"]) == pytest.approx(dense / kernel)
        assert float(r["dense_over_dilated"]) == pytest.approx(dense / total)
        bwd = r["mode"] == "fwdbwd"
        n = int(r["n"])
        expect = (dense_flops(n, H, D, causal=True, backward=bwd)
                  / dilated_flops(n, H, D, W, R, causal=True, backward=bwd))
        assert float(r["flop_ratio"]) == pytest.approx(expect)
    assert [int(t["kept"]) for t in tiles] == [64]  # 64 / 1 and 128 / 2
    t = tiles[0]
    assert int(t["problems"]) == H * 512 // 64
    assert float(t["causal_over_full"]) == pytest.approx(float(t["causal_ms"]) / float(t["full_ms"]))
    assert float(t["ideal"]) == pytest.approx(65 / 128)
    assert float(t["op_kernel_over_causal"]) == pytest.approx(float(t["op_kernel_ms"]) / float(t["causal_ms"]))
    assert _table_rows(text, "N") and _table_rows(text, "kept")


def test_pattern_lw16_benchmarks_the_lm_presets_local_window():
    """--pattern lw16 times the flags' pattern plus with_local_window(16), phases included in the call
    and in the FLOP count."""
    _, args = op.parse_cli(["--pattern", "lw16", "--segment-lengths", "64,128", "--dilation-rates", "1,2",
                            "--device", "cpu"])
    pattern, _, _ = op._checked(args)
    assert pattern == DilatedPattern((64, 128), (1, 2)).with_local_window(16)
    row = op.measure(96, heads=2, head_dim=8, batch=2, pattern=pattern, dtype=torch.float32,
                     device=torch.device("cpu"), causal=True, backend=None, repeats=1, warmup=0, dense=False,
                     memory=False)[0]
    assert row.dense_over_dilated_flops == pytest.approx(pattern.flop_ratio(96, 2, 8, causal=True))
    assert op.run(op.parse_cli(["--pattern", "lw16", "--breakdown", "--device", "cpu"])[1]) == 2
