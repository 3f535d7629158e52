"""train.pack_documents: documents found in the corpus, packed whole into rows, resumable, trained varlen."""

import numpy as np
import pytest
import torch

import longnet.training.data.documents as documents
import longnet.training.setup as setup_mod
import longnet.training.trainer as train_mod
from longnet.cli import main
from longnet.config import TrainConfig
from longnet.model import LongNetLM
from longnet.training.data import DocumentSampler, document_start_loss, document_starts, open_builtin
from train_helpers import MICRO, train_rows


def _builtin_like(n_docs=12, seed=0):
    rng = np.random.default_rng(seed)
    docs = [b"# ==> pkg/m%d.py <==\n" % i + bytes(rng.integers(97, 123, int(rng.integers(5, 90))).tolist()) + b"\n"
            for i in range(n_docs)]
    return docs, np.frombuffer(b"".join(docs), dtype=np.uint8)


def test_document_starts_finds_each_header_across_chunks(monkeypatch):
    docs, data = _builtin_like()
    expect = np.cumsum([0] + [len(d) for d in docs[:-1]])
    monkeypatch.setattr(documents, "_CHUNK", 7)  # markers straddle the chunks
    assert document_starts(data, "builtin").tolist() == expect.tolist()
    wiki = np.frombuffer(b"<mediawiki>head  <page>a</page>\n  <page>bb</page>", dtype=np.uint8)
    assert document_starts(wiki, "enwik8").tolist() == [0, 17, 34]
    # "# ==> " inside a line is not a header.
    assert document_starts(np.frombuffer(b"x = '# ==> y <=='\n# ==> z <==\n", dtype=np.uint8),
                           "builtin").tolist() == [0, 18]
    with pytest.raises(ValueError, match="train.pack_documents needs a corpus with document boundaries"):
        document_starts(data, "text")


def test_rows_hold_whole_documents_in_a_shuffled_stream_with_their_boundaries():
    docs, data = _builtin_like()
    starts = document_starts(data, "builtin")
    s = DocumentSampler(data, starts, batch_size=3, seq_len=16, seed=1)
    stream, n = b"", 16
    for _ in range(40):  # past the first epoch
        x, y, cu = s.next_batch()
        assert x.shape == y.shape == (3, n) and cu.dtype == torch.int32
        assert torch.equal(x[:, 1:], y[:, :-1])
        bounds = cu.tolist()
        assert bounds[0] == 0 and bounds[-1] == 3 * n and all(b * n in bounds for b in range(3))
        for b in range(3):
            row = bytes(x[b].tolist()) + bytes([int(y[b, -1])])
            stream += row
            # A sequence starts exactly at each document start (a header) inside the row.
            heads = [i for i in range(1, n) if row[i] == ord("#")]  # only headers hold a '#' here
            assert [p - b * n for p in bounds if b * n < p < (b + 1) * n] == heads
    # The stream is the documents whole, each epoch a permutation of all of them.
    total = sum(map(len, docs))
    first_epoch = stream[:total]
    assert sorted(first_epoch.split(b"# ==> ")[1:]) == sorted(d[6:] for d in docs)
    assert s.epoch >= 1


def test_state_restores_the_batches_it_would_have_drawn():
    _, data = _builtin_like()
    starts = document_starts(data, "builtin")
    a = DocumentSampler(data, starts, 2, 24, seed=3)
    for _ in range(9):  # past an epoch boundary
        a.next_batch()
    b = DocumentSampler(data, starts, 2, 24, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        for u, v in zip(a.next_batch(), b.next_batch()):
            assert torch.equal(u, v)
    assert a.state_dict() == b.state_dict()
    bad = {**a.state_dict(), "index": 10 ** 6}
    with pytest.raises(ValueError, match="outside the"):
        b.load_state_dict(bad)
    with pytest.raises(ValueError, match="batch_size saved 2 vs now 3"):
        DocumentSampler(data, starts, 3, 24).load_state_dict(a.state_dict())


def test_pack_documents_is_a_validated_train_field():
    assert TrainConfig().pack_documents is False
    with pytest.raises(TypeError, match="pack_documents must be True or False"):
        TrainConfig(pack_documents="yes")


@torch.no_grad()
def test_document_start_loss_scores_the_first_bytes(seed):
    _, data = _builtin_like()
    starts = document_starts(data, "builtin")
    model = LongNetLM(n_layers=1, d_model=16, n_heads=2, d_ffn=32, segment_lengths=(4, 8), dilation_rates=(1, 2))
    model.eval()
    ce = torch.nn.functional.cross_entropy

    def window(lo, hi):
        return torch.from_numpy(np.asarray(data[lo:hi], dtype=np.int64))[None]
    alone = document_start_loss(model, data, starts, first=4, max_documents=2)
    expect = [ce(model(w[:, :-1])[0], w[0, 1:]) for w in (window(s, s + 5) for s in starts[:2].tolist())]
    assert alone["documents"] == 2
    assert alone["loss"] == pytest.approx(float(sum(expect) / 2), rel=1e-6)
    s = int(starts[1])
    ctx = document_start_loss(model, data, starts, first=4, context=8, max_documents=1)
    w = window(s - 8, s + 4)
    assert ctx["documents"] == 1  # the first document has nothing before it
    assert ctx["loss"] == pytest.approx(float(ce(model(w[:, :-1])[0, 7:], w[0, 8:])), rel=1e-6)


@pytest.fixture
def py_corpus(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    for i in range(40):
        d = root / f"p{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {j}\n" for j in range(i % 7 + 2)))
    corpus = open_builtin(root=str(root), cache_dir=str(tmp_path / "cache"), verbose=False)
    monkeypatch.setattr(setup_mod, "open_corpus", lambda spec, **kw: corpus)
    return corpus


def test_packed_training_runs_varlen_and_resumes(tmp_path, py_corpus, monkeypatch, capsys):
    calls = []
    forward = LongNetLM.forward

    def spy(self, tokens, **kw):
        calls.append(kw.get("cu_seqlens"))
        return forward(self, tokens, **kw)
    monkeypatch.setattr(LongNetLM, "forward", spy)
    args = ["train", *MICRO, "--set", "pack_documents=true", "--max-steps", "4"]
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    assert main(args + ["--out", str(straight)]) == 0
    assert "whole documents (no attention across a document boundary)" in capsys.readouterr().out
    assert sum(c is not None for c in calls) == 4  # one packed forward per training step

    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "_after_step", interrupt)
    assert main(args + ["--out", str(pieces)]) == 130
    monkeypatch.setattr(train_mod, "_after_step", lambda step: None)
    assert main(["train", "--resume", "--out", str(pieces), "--no-progress"]) == 0
    assert train_rows(straight) == train_rows(pieces)
    assert main(["train", *MICRO, "--set", "pack_documents=true", "--data", "passkey", "--max-steps", "1",
                 "--out", str(tmp_path / "pk")]) == 2
    assert "the passkey task has none" in capsys.readouterr().err
