"""Small things from the 2026-12 adversarial pass (issue 24): a non-UTF-8 ``--prompt`` keeps its
bytes, the cache error names the CLI flag, and a double backward says which backend supports it."""

from __future__ import annotations

import os

import pytest
import torch

from longnet import dilated_attention
from longnet.cli import main
from tests.train_helpers import MICRO, write_corpus


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    out = d / "run"
    assert main(["train", "--data", write_corpus(d), "--cache-dir", str(d / "cache"), "--out", str(out),
                 "--max-steps", "1", *MICRO, "--set", "sample_tokens=0"]) == 0
    return out


def test_a_prompt_that_is_not_utf8_keeps_its_bytes(checkpoint, capsys):
    capsys.readouterr()
    prompt = os.fsdecode(b"\xff\xfeab")  # how Python hands such argv bytes over: lone surrogates
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "2",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("\ufffd\ufffdab")


def test_the_cache_error_names_the_flag(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--data", "builtin", "--cache-dir", str(tmp_path / "afile" / "c"), "--out",
                 str(tmp_path / "run"), "--max-steps", "1"]) == 2
    assert "pass --cache-dir DIR" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "math"])
def test_double_backward_names_the_backend_that_supports_it(backend):
    q = torch.randn(1, 32, 2, 8, dtype=torch.float64, requires_grad=True)
    out = dilated_attention(q, q, q, [16], [1], is_causal=True, backend=backend)
    (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='reference' is twice differentiable"):
        g.sum().backward()
    ref = torch.randn(1, 8, 1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: dilated_attention(x, x, x, [4], [1], is_causal=True,
                                                                    backend="reference"), (ref,))


def test_output_keeps_the_raw_bytes(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.bin"
    prompts.write_bytes(b"\xff\xfe\x80\n")
    out = tmp_path / "gen.bin"
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt-file", str(prompts), "--max-new-tokens", "6",
                 "--temperature", "0", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    data = out.read_bytes()
    assert data.startswith(b"\xff\xfe\x80") and len(data) == 3 + 6
    assert text == data.decode("utf-8", errors="replace") + "\n"  # stdout: the same bytes, decoded
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a", "--output", str(tmp_path)]) == 2
    assert "--output" in capsys.readouterr().err
