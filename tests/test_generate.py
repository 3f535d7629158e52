"""Generation: a KV cache that grows lazily, streaming, Ctrl-C in `longnet generate`, the XPOS limit."""

import io
import itertools
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from longnet.cli import main
from longnet.config import TrainConfig, xpos_max_length
from longnet.model import LongNetLM
from longnet.training.checkpoint import save_checkpoint


def micro(**kw):
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_ffn=64, segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4))
    cfg.update(kw)
    return LongNetLM(**cfg)


# ----------------------------------------------------------------------------- the cache


# A prompt shorter, and one longer, than the largest segment (16). With 30 the cache first drops
# positions at p = 31, whose r = 1 pattern reads key 16 = p - 15, the oldest any query reads.
@pytest.mark.parametrize("prompt", [5, 30])
def test_cache_grows_lazily_and_drops_what_no_query_reads(prompt, seed):
    model = micro(dilation_rates=(2, 4, 1)).eval()
    n = 72  # past two windows of the largest segment (2 * 16), so the cache has to drop positions
    x = torch.randint(0, 256, (2, n))
    full = model(x)
    logits, cache = model.prefill(x[:, :prompt])
    torch.testing.assert_close(logits, full[:, :prompt], atol=1e-5, rtol=1e-5)
    capacities = [cache.capacity]
    for t in range(prompt, n):
        step = model.decode_step(x[:, t], cache)
        torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=1e-5, msg=f"position {t}")
        capacities.append(cache.capacity)
    assert cache.length == n
    # It starts with the prompt's kept positions plus one slot, never holds more than two
    # windows, and has dropped positions no later query reads.
    assert capacities[0] == min(prompt, 15) + 1
    assert max(capacities) <= 2 * 16 and cache.start >= n - 2 * 16
    assert len(set(capacities)) > 1  # it grew past its first capacity
    assert capacities[3] <= 2 * (min(prompt, 15) + 1) < n


def test_cache_without_xpos_and_with_a_pattern_of_one_segment(seed):
    model = micro(segment_lengths=(6,), dilation_rates=(3,), xpos=False).eval()
    x = torch.randint(0, 256, (1, 50))
    full = model(x)
    _, cache = model.prefill(x[:, :2], capacity=1)  # the capacity is a hint: at least what it keeps
    assert cache.capacity == 2
    for t in range(2, 50):
        torch.testing.assert_close(model.decode_step(x[:, t], cache), full[:, t], atol=1e-5, rtol=1e-5)
    assert cache.capacity <= 12


# ----------------------------------------------------------------------------- batches of lengths

LENGTHS = [3, 40, 17, 1]  # shorter and longer than the largest segment (16), one of a single token


@pytest.mark.parametrize("kw", [dict(), dict(xpos=False, max_positions=128), dict(segment_phases=(0, 3, 5))])
def test_prompts_of_different_lengths_decode_as_if_alone(kw, seed):
    model = micro(dilation_rates=(2, 4, 1), **kw).eval()
    seqs = [torch.randint(0, 256, (n + 30,)) for n in LENGTHS]
    full = [model(s[None])[0] for s in seqs]
    logits, cache = model.prefill([s[:n] for s, n in zip(seqs, LENGTHS)])
    for f, lg, n in zip(full, logits, LENGTHS):
        torch.testing.assert_close(lg, f[:n], atol=1e-5, rtol=1e-5)
    capacities = []
    for t in range(30):
        step = model.decode_step(torch.stack([s[n + t] for s, n in zip(seqs, LENGTHS)]), cache)
        for b, (f, n) in enumerate(zip(full, LENGTHS)):
            torch.testing.assert_close(step[b], f[n + t], atol=1e-5, rtol=1e-5, msg=f"sequence {b}, step {t}")
        capacities.append(cache.capacity)
    assert cache.lengths == [n + 30 for n in LENGTHS]
    # Every sequence keeps at most two windows of the largest segment, and the long one dropped keys.
    assert max(capacities) <= 2 * 16 and cache.starts[1] > 0
    with pytest.raises(ValueError, match="different lengths"):
        cache.length


def test_generate_a_batch_of_prompts_equals_each_alone(seed):
    model = micro()
    prompts = [torch.randint(0, 256, (n,)) for n in LENGTHS]
    greedy = model.generate(prompts, 25, temperature=0)
    assert [len(x) for x in greedy] == [n + 25 for n in LENGTHS]
    for p, out in zip(prompts, greedy):
        assert torch.equal(out, model.generate(p, 25, temperature=0))
    assert all(torch.equal(a, b) for a, b in zip(greedy, model.generate(prompts, 25, temperature=0,
                                                                          use_cache=False)))
    # Sampling: one generator per prompt makes each row that prompt's own draw.
    gens = [torch.Generator().manual_seed(10 + i) for i in range(len(prompts))]
    sampled = model.generate([p.tolist() for p in prompts], 25, top_k=20, generator=gens)
    for i, (p, out) in enumerate(zip(prompts, sampled)):
        alone = model.generate(p, 25, top_k=20, generator=[torch.Generator().manual_seed(10 + i)])
        assert torch.equal(out, alone)
    with pytest.raises(ValueError, match="one torch.Generator per prompt"):
        model.generate(prompts, 2, generator=gens[:2])


def test_packed_forward_and_gradients_equal_each_sequence_alone(seed):
    model = micro(max_positions=64, dropout=0.0)
    tokens = torch.randint(0, 256, (2, 24))
    cu = torch.tensor([0, 5, 24, 30, 30, 48], dtype=torch.int32)  # a document crosses the row boundary
    flat = tokens.flatten()
    logits = model(tokens, cu_seqlens=cu)
    (logits.square().mean()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = [model(flat[a:b][None])[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a]
    torch.testing.assert_close(logits.reshape(48, -1), torch.cat(alone), atol=1e-5, rtol=1e-5)
    (torch.cat(alone).square().sum() / logits.numel()).backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, :9] = False  # left padding
    padded = model(tokens, key_padding_mask=mask)
    torch.testing.assert_close(padded[0, 9:], model(tokens[:1, 9:])[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(padded[0, :9], torch.zeros_like(padded[0, :9]))
    with pytest.raises(ValueError, match="end at T = 48"):
        model(tokens, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


def test_generate_allocates_as_it_goes(monkeypatch):
    torch.manual_seed(0)
    model = micro()
    capacities = []
    decode_step = LongNetLM.decode_step

    def spy(self, token, cache):
        out = decode_step(self, token, cache)
        capacities.append(cache.capacity)
        return out
    monkeypatch.setattr(LongNetLM, "decode_step", spy)
    prompt = torch.randint(0, 256, (7,))
    out = model.generate(prompt, 60, temperature=0)
    assert torch.equal(out, model.generate(prompt, 60, temperature=0, use_cache=False))
    # One slot more than the prompt, doubled when full, then two windows (2 * 16) of 67 positions.
    assert capacities[:3] == [8, 16, 16] and max(capacities) == 32
    # A trillion new tokens are not allocated up front: the first tokens come at once.
    first = list(itertools.islice(model.stream(prompt, 10 ** 12, temperature=0), 5))
    assert torch.equal(torch.stack(first), out[7:12])


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("use_cache", [True, False])
def test_stream_yields_the_tokens_of_generate(use_cache):
    torch.manual_seed(0)
    model = micro()
    prompt = torch.randint(0, 256, (9,))
    greedy = model.generate(prompt, 25, temperature=0, use_cache=use_cache)
    items = list(model.stream(prompt, 25, temperature=0, use_cache=use_cache))
    assert all(t.shape == () for t in items) and len(items) == 25
    assert torch.equal(torch.stack(items), greedy[9:])
    batch = prompt[None].repeat(3, 1)
    sampled = model.generate(batch, 12, top_k=8, generator=torch.Generator().manual_seed(5), use_cache=use_cache)
    items = list(model.stream(batch, 12, top_k=8, generator=torch.Generator().manual_seed(5), use_cache=use_cache))
    assert all(t.shape == (3,) for t in items)
    assert torch.equal(torch.stack(items, dim=1), sampled[:, 9:])
    assert list(model.stream(prompt, 0)) == []


def test_stream_checks_arguments_up_front_and_restores_the_model():
    model = micro()
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.stream([1, 2], -1)  # raised by the call itself, not at the first next()
    with pytest.raises(ValueError, match="top_k"):
        model.stream([1, 2], 3, top_k=0)
    it = model.stream([1, 2, 3], 50)
    next(it)
    assert not model.training  # eval while it runs
    it.close()
    assert model.training and torch.get_num_threads() == threads


# ----------------------------------------------------------------------------- the XPOS limit


def test_xpos_length_limit_is_checked_up_front():
    torch.manual_seed(0)
    model = micro(xpos_scale_base=1.0)
    limit = xpos_max_length(1.0)
    assert limit == 127
    with pytest.raises(ValueError, match=r"prompt has 128 tokens, past the XPOS length limit of 127 tokens.*"
                                         r"xpos_scale_base=1.*model.xpos_scale_base"):
        model.stream(torch.randint(0, 256, (128,)), 5)
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens - 1 = 130 tokens.*limit of 127.*use the cache"):
        model.generate(torch.randint(0, 256, (100,)), 31, use_cache=False)
    # At the limit both paths run; with the cache, decoding goes on past it (decay by distance).
    assert model.generate(torch.randint(0, 256, (100,)), 28, use_cache=False).shape == (128,)
    assert model.generate(torch.randint(0, 256, (limit,)), 40, temperature=0).shape == (limit + 40,)
    assert micro(xpos=False, xpos_scale_base=1.0).generate(torch.randint(0, 256, (300,)), 2).shape == (302,)


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gen")
    model = micro()
    save_checkpoint(str(out / "run"), model=model, train_config=TrainConfig(max_steps=1), data_spec="builtin",
                    step=1)
    small = micro(xpos_scale_base=1.0)
    save_checkpoint(str(out / "short"), model=small, train_config=TrainConfig(max_steps=1, seq_len=64),
                    data_spec="builtin", step=1)
    return out, model.eval()


class _Recorder(io.StringIO):
    """stdout that remembers what had been flushed when each decode step began."""

    def __init__(self):
        super().__init__()
        self.flushed = ""

    def flush(self):
        self.flushed = self.getvalue()


def _expected_text(model, prompt: str, n: int) -> str:
    out = model.generate(torch.tensor(list(prompt.encode())), n, temperature=0)
    return bytes(out.tolist()).decode("utf-8", errors="replace")


def test_generate_command_streams_its_output(checkpoint, monkeypatch, capsys):
    out, model = checkpoint
    expected = _expected_text(model, "def f(", 20)
    stdout = _Recorder()
    seen = []
    decode_step = LongNetLM.decode_step

    def spy(self, token, cache):
        seen.append(len(stdout.flushed))
        return decode_step(self, token, cache)
    monkeypatch.setattr(LongNetLM, "decode_step", spy)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["generate", "--checkpoint", str(out / "run"), "--prompt", "def f(", "--max-new-tokens", "20",
                 "--temperature", "0"]) == 0
    assert stdout.getvalue() == expected + "\n"
    # Each step began after the previous token had been flushed: the text grew while generating.
    assert len(seen) == 19 and seen[-1] > seen[0] >= len("def f(")
    assert "20 bytes in" in capsys.readouterr().err


def test_ctrl_c_keeps_what_was_generated(checkpoint, monkeypatch, capsys):
    out, model = checkpoint
    expected = _expected_text(model, "abc", 5)  # 5 tokens are sampled before the 5th step
    calls = []
    decode_step = LongNetLM.decode_step

    def interrupted_on_the_fifth_step(self, token, cache):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return decode_step(self, token, cache)
    monkeypatch.setattr(LongNetLM, "decode_step", interrupted_on_the_fifth_step)
    assert main(["generate", "--checkpoint", str(out / "run"), "--prompt", "abc", "--max-new-tokens", "1000",
                 "--temperature", "0"]) == 130
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert "interrupted: kept the 5 of 1000 bytes" in captured.err


def test_sigint_in_a_real_process_keeps_the_output(checkpoint):
    out, _ = checkpoint
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "longnet.cli", "generate", "--checkpoint", str(out / "run"),
                             "--prompt", "hello", "--max-new-tokens", "100000000", "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    got = b""
    try:
        deadline = time.monotonic() + 120
        while len(got) < 40 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                got += chunk
        assert len(got) >= 40, (got, proc.poll())
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = got + rest
    assert proc.returncode == 130, err.decode()
    assert text.startswith(b"hello") and text.endswith(b"\n") and len(text) > len(got)
    assert b"interrupted: kept the" in err and b"Traceback" not in err


def test_generate_command_names_the_xpos_limit(checkpoint, capsys):
    out, _ = checkpoint
    assert main(["generate", "--checkpoint", str(out / "short"), "--prompt", "x" * 200,
                 "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert "prompt has 200 tokens, past the XPOS length limit of 127 tokens" in err
    assert "model.xpos_scale_base" in err


def test_prompt_file_generates_each_line_as_if_alone(checkpoint, tmp_path, capsys):
    out, _ = checkpoint
    lines = ["def f(", "a much longer prompt than the largest segment", "x"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")  # the empty line is skipped
    args = ["generate", "--checkpoint", str(out / "run"), "--max-new-tokens", "12", "--seed", "7"]
    assert main(args + ["--prompt-file", str(path)]) == 0
    captured = capsys.readouterr()
    assert "36 bytes in" in captured.err and "3 prompts" in captured.err
    blocks = captured.out.split("==> prompt ")[1:]
    assert [b.split(" <==\n")[0] for b in blocks] == ["0", "1", "2"]
    for line, block in zip(lines, blocks):
        assert main(args + ["--prompt", line]) == 0
        assert block.split(" <==\n", 1)[1] == capsys.readouterr().out
    path.write_text("\n\n")
    assert main(args + ["--prompt-file", str(path)]) == 2
    assert "holds no prompt" in capsys.readouterr().err
