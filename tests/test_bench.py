"""`longnet bench` runs end to end at tiny sizes and writes its table, CSV and plot (no timing asserts)."""

import csv

import pytest

from longnet.bench import op as bench
from longnet.cli import main


def test_bench_writes_table_csv_and_plot(tmp_path, capsys):
    out_csv, out_png = tmp_path / "b.csv", tmp_path / "b.png"
    rc = main(["bench", "--n", "200,256", "--heads", "2", "--head-dim", "8", "--segment-lengths", "64,128",
               "--dilation-rates", "1,2", "--repeats", "1", "--warmup", "0", "--csv", str(out_csv),
               "--plot", str(out_png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "dense-sdpa" in text and "dilated[auto]" in text
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["impl"] for r in rows] == ["dilated[auto]", "dense-sdpa"] * 2
    assert all(float(r["fwd_ms"]) > 0 and float(r["fwd_gflops"]) > 0 for r in rows)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_options():
    with pytest.raises(SystemExit):
        main(["bench", "--n", "abc"])
    with pytest.raises(SystemExit):
        main(["bench", "--segment-lengths", "64"])
    with pytest.raises(SystemExit):
        main(["bench", "--segment-lengths", "64", "--dilation-rates", "128"])


def test_machine_name_is_descriptive():
    import torch
    assert "threads" in bench.machine_name(torch.device("cpu"))
