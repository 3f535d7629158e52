"""The README and docs/*.md are true: their Python examples run and print what their comments say,
and each op call matches a direct computation; every command they show parses with the real
argument parser (no job is run); every path and module they name exists.

A Python block that cannot run here says why on its first line (``# needs: ...``, e.g. torchrun
or a downloaded checkpoint); there are few of them."""

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import pathlib
import re
import shlex

import pytest
import torch

import longnet
from longnet.bench import op as bench_op, sp as bench_sp, triton_kernel as bench_triton
from longnet.cli import COMMANDS
from tests.helpers import assert_close, loop_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in PAGES)


def _blocks(lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", _text(), flags=re.S)


def _python_blocks(include_launched=False):
    # Blocks that cannot run in a test say so on their first line.
    return [b for b in _blocks("python") if include_launched or not b.startswith("# needs:")]


def _run_block(block: str, i: int):
    """Execute one README block; returns (namespace, stdout)."""
    ns = {"__name__": f"readme_{i}"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, f"README.md/docs python block {i}", "exec"), ns)
    return ns, out.getvalue()


def test_readme_has_python_examples_and_few_exemptions():
    assert _python_blocks(), "README.md lost its Python example"
    assert re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S), "README.md lost its Python example"
    assert len(_python_blocks(include_launched=True)) - len(_python_blocks()) <= 4


# "print(EXPR)   # what it is: VALUE" -- the comment states the printed value.
STATED = re.compile(r"^print\((?P<expr>.*)\)\s*#.*?(?P<value>-?\d+(?:\.(?P<dec>\d+))?)\s*$")


def test_readme_examples_print_what_their_comments_say():
    checked = 0
    for i, block in enumerate(_python_blocks()):
        ns, out = _run_block(block, i)
        for line in block.splitlines():
            m = STATED.match(line)
            if not m:
                continue
            value = eval(m["expr"], ns)
            decimals = len(m["dec"] or "")
            assert round(float(value), decimals) == float(m["value"]), (line, value)
            assert str(value) in out, (line, out)
            checked += 1
    assert checked >= 4, "the README's examples no longer state their printed values"


def test_readme_flop_ratio_matches_a_direct_count():
    """The stated 3.95 at 16K: dense over dilated, counting each segment's kept rows directly."""
    n, h, d = 16384, 12, 64
    p = longnet.DilatedPattern.paper()
    pairs = 0  # sum over (pattern, head, segment) of m^2, m = kept rows; causal halves both sides
    for k, (w, _) in enumerate(p):
        for head in range(h):
            rows = torch.tensor(p.kept_rows(k, head, n))
            pairs += int((torch.bincount(rows // w).double() ** 2).sum())
    direct = n * n * h / pairs
    assert p.flop_ratio(n, h, d, causal=True) == pytest.approx(direct, rel=1e-12)
    assert any("flop_ratio(16384, 12, 64, causal=True)" in b and f"{direct:.2f}" in b for b in _python_blocks())


def test_readme_op_calls_match_the_loop_oracle(monkeypatch):
    """Each dilated_attention call of the README, recomputed by docs/design.md §1-2 spelled out in loops."""
    original, calls = longnet.dilated_attention, []
    sig = inspect.signature(original)

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((sig.bind(*args, **kwargs).arguments, result))
        return result

    monkeypatch.setattr(longnet, "dilated_attention", recording)
    for i, block in enumerate(_python_blocks()):
        _run_block(block, i)
    assert calls, "the README no longer calls longnet.dilated_attention"
    for a, result in calls:
        got = result if isinstance(result, torch.Tensor) else result[0]
        if a.get("cu_seqlens") is not None or a.get("key_padding_mask") is not None:
            _check_varlen_call(a, got)
            continue
        q, k, v = (a[x].double() for x in ("q", "k", "v"))
        out, lse = loop_reference(q, k, v, a["segment_lengths"], a["dilation_rates"],
                                  is_causal=a.get("is_causal", False), scale=a.get("scale"),
                                  segment_phases=a.get("segment_phases"))
        assert_close(got, out, a["q"].dtype)
        if a.get("return_lse"):
            assert_close(result[1], lse, a["q"].dtype, "lse")


def _check_varlen_call(a, got):
    """A packed or padded call: each sequence against the loop oracle run on it alone; padding gives 0."""
    q, k, v = (a[x].double() for x in ("q", "k", "v"))
    if a.get("cu_seqlens") is not None:
        cu = a["cu_seqlens"].tolist()
        pieces = [(slice(s, e), q[None, s:e], k[None, s:e], v[None, s:e]) for s, e in zip(cu, cu[1:])]
        rows = lambda sl: got[sl]  # noqa: E731
    else:
        mask = a["key_padding_mask"]
        pieces, rows = [], None
        for b in range(q.shape[0]):
            idx = mask[b].nonzero().flatten()
            assert got[b][~mask[b]].abs().max() == 0 if (~mask[b]).any() else True
            pieces.append(((b, idx), q[b, idx][None], k[b, idx][None], v[b, idx][None]))
        rows = lambda sl: got[sl[0], sl[1]]  # noqa: E731
    for sl, qs, ks, vs in pieces:
        if qs.shape[1] == 0:
            continue
        out, _ = loop_reference(qs, ks, vs, a["segment_lengths"], a["dilation_rates"],
                                is_causal=a.get("is_causal", False), scale=a.get("scale"),
                                segment_phases=a.get("segment_phases"))
        assert_close(rows(sl), out[0], a["q"].dtype)


# --------------------------------------------------------------------------- shell commands


def _commands():
    """(line, argv) of every command in the README's bash blocks, '&&' chains split."""
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                argv, tokens = tokens[:cut], tokens[cut + 1:]
                while argv and re.fullmatch(r"\w+=\S*", argv[0]):  # VAR=value prefixes
                    argv = argv[1:]
                if argv:
                    yield line, argv


def _module_and_args(argv):
    """(module, its argv) for `longnet ...`, `python -m M ...` and `torchrun ... -m M ...`; else None."""
    if argv[0] == "longnet":
        return "longnet", argv[1:]
    if argv[0] in ("python", "python3", "torchrun") and "-m" in argv:
        i = argv.index("-m")
        return argv[i + 1], argv[i + 2:]
    return None


def _parse_longnet(argv):
    name, rest = argv[0], argv[1:]
    assert name in COMMANDS, f"unknown subcommand {name!r}"
    module = importlib.import_module(COMMANDS[name][0])
    if hasattr(module, "parse_cli"):
        return module.parse_cli(rest)[1]
    parser = argparse.ArgumentParser(prog=f"longnet {name}")
    module.add_arguments(parser)
    return parser.parse_args(rest)


PARSERS = {
    "longnet": _parse_longnet,
    "longnet.bench.sp": lambda argv: bench_sp.build_parser().parse_args(argv),
    "longnet.bench.triton_kernel": bench_triton.parse_args,
}
NOT_OURS = {"venv", "pytest", "pip"}


def test_readme_commands_parse_with_the_real_parsers(capsys):
    parsed = 0
    for line, argv in _commands():
        target = _module_and_args(argv)
        if target is None or target[0] in NOT_OURS:
            continue
        module, args = target
        assert module in PARSERS, f"README runs {module}, which this test cannot check: {line}"
        try:
            PARSERS[module](args)
        except SystemExit as e:
            pytest.fail(f"README command does not parse ({e.code}): {line}\n{capsys.readouterr().err}")
        parsed += 1
    assert parsed >= 20, parsed


def test_readme_bench_commands_reach_the_right_benchmark():
    run, args = bench_op.parse_cli(["--sequence-parallel", "--block-length", "2048", "--world-sizes", "1,2,4"])
    assert run is bench_sp.run and args.world_sizes == [1, 2, 4] and args.block_length == 2048
    run, args = bench_op.parse_cli(["--n", "65536", "--no-dense"])
    assert run is bench_op.run and args.n == [65536] and args.no_dense


def test_readme_paths_and_modules_exist():
    text = _text()
    paths = set(re.findall(r"`(longnet/[\w/.]*)`", text))
    assert {"longnet/bench/", "longnet/analysis/", "longnet/backends/"} <= paths
    for path in paths:
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
    # `a.py`, `b.py` after a folder path in the README's layout table: files of the same folder
    layout = README.read_text()
    for folder, rest in re.findall(r"\| `(longnet/[\w/]*/)?[\w.]*`((?:, `[\w.]+`)+) \|", layout):
        for name in re.findall(r"`([\w.]+)`", rest):
            assert (ROOT / (folder or "longnet/") / name).exists(), f"README names {name} beside {folder}"
    for folder, files in re.findall(r"\| `(longnet/\w+/)` \| ([^|]*)\|", layout):
        for name in re.findall(r"`(\w+\.py)`", files):
            assert (ROOT / folder / name).exists(), f"README names {folder}{name}"
    modules = set(re.findall(r"(?:python -m|-m) (longnet[\w.]*)", text))
    assert "longnet" in modules and len(modules) >= 2
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"README runs {module}, which does not exist"


def test_docs_pages_that_are_named_exist_and_the_readme_links_every_page():
    text = _text()
    for name in set(re.findall(r"docs/([\w-]+\.md)", text)):
        assert (ROOT / "docs" / name).exists(), f"docs/{name} is named but does not exist"
    readme = README.read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def test_readme_is_short_and_nothing_cites_a_file_outside_the_repository():
    assert len(README.read_text().splitlines()) <= 320
    for path in [*ROOT.joinpath("longnet").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py"), *PAGES]:
        if path.name == "test_readme.py":
            continue
        assert "SPEC" + ".md" not in path.read_text(encoding="utf-8"), path
