"""The recall probes (longnet.training.recall), the recall suite's plan and gap buckets, the GPT block."""

import dataclasses

import numpy as np
import pytest
import torch

from longnet.config import LongNetConfig
from longnet.model import LongNetLM
from longnet.patterns import DilatedPattern
from longnet.training.experiment.plan import flops_per_token, non_embedding_params
from longnet.training.experiment.recall_plan import (BUCKETS, RECALL_DEFAULT, RECALL_QUICK, Probe, RecallSettings,
                                                    gap_bucket, gap_buckets, plan_recall, reference_pattern)
from longnet.training.experiment.recall_suite import _eval_steps, best_runs, lr_factor
from longnet.training.recall import (ASSIGN, FILLER, KEYS, NEEDLE, QUERY, SEP, VALUES, MQAR, Copying, Passkey,
                                     VariableTracking, chance_accuracy, make_task)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _in(t, rng):
    return bool(((t >= rng[0]) & (t < rng[1])).all())


def test_byte_ranges_disjoint():
    ranges = [FILLER, KEYS, VALUES]
    for a, b in zip(ranges, ranges[1:]):
        assert a[1] <= b[0]
    assert max(SEP, QUERY, NEEDLE, ASSIGN) < FILLER[0] and VALUES[1] == 256


def test_mqar_layout():
    task = MQAR(128, num_pairs=6)
    b = task.batch(16, _gen(1))
    assert b.x.shape == b.y.shape == b.mask.shape == b.gap.shape == (16, 128)
    assert (b.mask.sum(1) == 6).all()
    for i in range(16):
        x, y, m = b.x[i], b.y[i], b.mask[i]
        keys, values = x[0:12:2], x[1:12:2]
        assert _in(keys, KEYS) and _in(values, VALUES) and len(set(keys.tolist())) == 6
        rest = x[12:]
        # The query region holds only filler and the queried keys, each key once.
        assert sorted(rest[_in_mask(rest, KEYS)].tolist()) == sorted(keys.tolist())
        assert _in(rest[~_in_mask(rest, KEYS)], FILLER)
        q = m.nonzero().flatten()
        assert (q >= 12).all() and (q % 2 == 0).all()
        pairs = dict(zip(keys.tolist(), values.tolist()))
        for p in q.tolist():
            assert y[p].item() == pairs[x[p].item()]
            j = p - b.gap[i, p].item()  # the value's position, right after its key
            assert x[j].item() == y[p].item() and x[j - 1].item() == x[p].item()
        assert (b.gap[i][~m] == 0).all()


def _in_mask(t, rng):
    return (t >= rng[0]) & (t < rng[1])


def test_mqar_query_parity():
    even = MQAR(64, 4).batch(64, _gen(0))
    assert (even.gap[even.mask] % 2 == 1).all()  # Zoology's layout: every gap odd
    anyq = MQAR(64, 4, even_queries=False).batch(64, _gen(0))
    odd = (anyq.gap[anyq.mask] % 2 == 1).float().mean().item()
    assert 0.3 < odd < 0.7 and (anyq.mask.sum(1) == 4).all()
    q = anyq.mask.nonzero()[:, 1]
    assert q.min() >= 8 and q.max() <= 63


def test_mqar_seed_fixes_batches_and_refuses_bad_knobs():
    a, b = MQAR(64, 4).batch(4, _gen(3)), MQAR(64, 4).batch(4, _gen(3))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    with pytest.raises(ValueError, match="num_pairs"):
        MQAR(256, 65)
    with pytest.raises(ValueError, match="too short"):
        MQAR(32, 10)


def test_copying_layout():
    task = Copying(64, copy_len=10)
    b = task.batch(8, _gen(2))
    for i in range(8):
        x, y, m = b.x[i], b.y[i], b.mask[i]
        sep = (x == SEP).nonzero().flatten()
        assert sep.tolist() == [54]  # the second copy ends at the last target: 64 + 1 - 11 + 10 - 1
        s0 = 54
        first = x[s0 - 10:s0]
        assert _in(first, VALUES) and _in(x[:s0 - 10], FILLER)
        assert torch.equal(y[m], first) and m.nonzero().flatten().tolist() == list(range(s0, s0 + 10))
        assert torch.equal(x[s0 + 1:], first[:-1])  # the second copy, minus its last byte (only a target)
        assert (b.gap[i][m] == 10).all()
    lengths = Copying(64).batch(32, _gen(0)).mask.sum(1)
    assert lengths.min() >= 4 and lengths.max() <= 31 and len(set(lengths.tolist())) > 3


def test_variable_tracking_layout():
    task = VariableTracking(96, hops=3, chains=2)
    b = task.batch(8, _gen(4))
    for i in range(8):
        x, y, m = b.x[i].tolist(), b.y[i], b.mask[i]
        assign = {}
        for p in range(len(x) - 2):
            if x[p] == ASSIGN:
                assign[x[p + 1]] = (x[p + 2], p)
        qs = m.nonzero().flatten().tolist()
        assert len(qs) == 2 and all(x[q - 1] == QUERY for q in qs)
        for q in qs:
            name, hops = x[q], 0
            while name in assign:  # follow the chain back to its value; every hop is earlier
                src, p = assign[name]
                assert p < q
                name, hops = src, hops + 1
            assert hops == 3 and VALUES[0] <= name < VALUES[1] and y[q].item() == name
            assert x[q - b.gap[i, q].item()] == name  # the gap points at the value itself


def test_passkey_layout():
    task = Passkey(64, digits=4)
    b = task.batch(8, _gen(5))
    for i in range(8):
        x, m = b.x[i], b.mask[i]
        at = (x == NEEDLE).nonzero().flatten().item()
        key = x[at + 1:at + 5]
        assert _in(key, VALUES) and x[60].item() == QUERY
        assert torch.equal(b.y[i][m], key) and m.nonzero().flatten().tolist() == [60, 61, 62, 63]
        assert (b.gap[i][m] == 60 - (at + 1)).all()


def test_make_task_and_chance():
    assert isinstance(make_task("vt", 64, hops=1, chains=2), VariableTracking)
    assert chance_accuracy(MQAR(64, 4)) == 0.25
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("nope", 64)


def test_gap_buckets_follow_the_pattern():
    # w = 8, 16, 32 with r = 1, 2, 4 and 4 heads: every offset used.
    p = DilatedPattern((8, 16, 32), (1, 2, 4))
    assert gap_bucket(p, 32, 4, 7, 1) == "local"          # one segment of w0 = 8
    assert gap_bucket(p, 32, 4, 9, 7) == "dilated"        # crosses 8, same residue mod 2 in w = 16
    assert gap_bucket(p, 32, 4, 10, 7) == "off-residue"   # w = 16 holds both, residues 0 and 1; w = 32: 2, 3
    assert gap_bucket(p, 32, 4, 20, 8) == "dilated"       # w = 32, both 0 mod 4
    assert gap_bucket(p, 64, 4, 40, 20) == "beyond"       # no segment holds both
    # Heads fewer than r: offsets >= H are kept by no head.
    assert gap_bucket(p, 32, 2, 22, 10) == "off-residue"  # 2 mod 4 in w = 32, unused with 2 heads
    # Against a brute force over every pair of a small pattern with phases.
    q = DilatedPattern((4, 8, 6), (1, 2, 1), (0, 0, 3))
    n, heads = 24, 2
    qs, js = np.tril_indices(n)
    got = gap_buckets(q, n, heads, qs, js)
    for a, b, g in zip(qs, js, got):
        assert BUCKETS[g] == _brute_bucket(q, n, heads, int(a), int(b))


def _brute_bucket(p, n, heads, q, j):
    local = dilated = shared = False
    for w, r, phi in zip(p.segment_lengths, p.dilation_rates, p.segment_phases):
        w = min(w, n)
        def start(x):
            return 0 if x < phi else phi + (x - phi) // w * w
        if start(q) != start(j):
            continue
        shared = True
        if r == 1:
            local = True
        elif (q - start(q)) % r == (j - start(j)) % r and (q - start(q)) % r < heads:
            dilated = True
    return "local" if local else "dilated" if dilated else "off-residue" if shared else "beyond"


def test_reach_rows_explain_mqar_parity():
    from longnet.training.experiment.recall_suite import eval_set, reach_rows
    s = RecallSettings(probes=())
    for even, dilated_expected in ((True, False), (False, True)):
        probe = Probe("mqar", 256, 1e12, (("num_pairs", 4), ("even_queries", even)))
        rows = {r["bucket"]: r for r in reach_rows(s, probe, eval_set(probe, 64, 0))}
        # One layer links exactly the local and dilated answers; the rest need two.
        assert rows["local"]["max_depth"] == 1
        assert ("dilated" in rows) == dilated_expected
        if dilated_expected:
            assert rows["dilated"]["max_depth"] == 1
        assert rows["off-residue"]["min_depth"] == 2
        one_hop = rows["local"]["answers"] + (rows["dilated"]["answers"] if dilated_expected else 0)
        assert rows["one_hop"]["answers"] == one_hop
        assert sum(rows[b]["answers"] for b in BUCKETS if b in rows) == 64 * 4


def test_plan_equal_flops_same_shape():
    s = dataclasses.replace(RECALL_DEFAULT, probes=(Probe("mqar", 512, 1.2e13, (("num_pairs", 8),)),))
    runs = plan_recall(s)
    assert len(runs) == 4 * len(s.d_models) * len(s.lrs)
    for d in s.d_models:
        mine = [r for r in runs if r.d_model == d]
        cfgs = {r.model.name: r.model.config for r in mine}
        assert set(cfgs) == {"dense", "longnet", "longnet+lw16", next(m for m in cfgs if m.startswith("sliding"))}
        # Only attention differs: same width, depth, heads, FFN, block and parameters.
        shapes = {(c.n_layers, c.d_model, c.n_heads, c.d_ffn, c.block, c.num_parameters()) for c in cfgs.values()}
        assert len(shapes) == 1
        for r in mine:
            # The steps spend the budget: one more step would pass it.
            assert r.flops <= 1.2e13 < r.flops + r.flops_per_step
            assert r.flops_per_token == flops_per_token(r.model)
        dense = next(r for r in mine if r.model.name == "dense")
        longnet = next(r for r in mine if r.model.name == "longnet")
        assert longnet.steps > dense.steps  # cheaper attention, more steps at equal FLOPs
    ln = next(r for r in runs if r.model.name == "longnet")
    sl = next(r for r in runs if r.model.name.startswith("sliding") and r.d_model == ln.d_model)
    assert abs(sl.flops_per_token / ln.flops_per_token - 1) < 0.01  # the window matches LongNet's FLOPs


def test_blocks_of_the_plan():
    for block, pos in (("magneto", 0), ("gpt", 64)):
        runs = plan_recall(dataclasses.replace(RECALL_QUICK, block=block))
        for r in runs:
            c = r.model.config
            assert c.block == block and c.max_positions == pos and c.xpos == (block == "magneto")
            assert c.tie_embeddings == (block == "magneto")


def test_position_embeddings_are_not_counted_as_compute():
    c = LongNetConfig(n_layers=2, d_model=64, n_heads=4, d_ffn=256, block="gpt", max_positions=512,
                      tie_embeddings=False, xpos=False)
    plain = dataclasses.replace(c, max_positions=0)
    assert c.num_parameters() == plain.num_parameters() + 512 * 64
    assert non_embedding_params(c) == non_embedding_params(plain)


def test_plan_refuses_bad_settings():
    with pytest.raises(ValueError, match="raise it to at least"):
        plan_recall(dataclasses.replace(RECALL_QUICK, probes=(Probe("mqar", 64, 1e6, (("num_pairs", 2),)),)))
    with pytest.raises(ValueError, match="--block"):
        plan_recall(dataclasses.replace(RECALL_QUICK, block="rnn"))
    with pytest.raises(ValueError, match="--d-models"):
        plan_recall(dataclasses.replace(RECALL_QUICK, d_models=(36,)))
    with pytest.raises(ValueError, match="too short"):
        plan_recall(dataclasses.replace(RECALL_QUICK, probes=(Probe("mqar", 16, 1e12, (("num_pairs", 8),)),)))


def test_variants_and_model_filter_of_the_plan():
    probe = Probe("mqar", 256, 3e13, (("num_pairs", 4),))
    s = RecallSettings(probes=(probe,), d_models=(64,), lrs=(1e-3,), short_conv=4, max_rate=2)
    runs = {r.model.name: r for r in plan_recall(s)}
    assert set(runs) == {"dense", "longnet", "longnet+lw16", "sliding38", "dense+conv4", "longnet+conv4",
                         "longnet+maxrate2"}
    cfg = {n: r.model.config for n, r in runs.items()}
    assert cfg["longnet+conv4"].short_conv == 4 and cfg["longnet+conv4"].pattern == cfg["longnet"].pattern
    assert cfg["dense+conv4"].pattern == cfg["dense"].pattern and cfg["longnet"].short_conv == 0
    assert cfg["longnet+maxrate2"].dilation_rates == (1, 2, 2, 2)
    # The convolution's parameters are compute: the variant takes fewer steps on the same budget.
    assert runs["longnet+conv4"].flops_per_token > runs["longnet"].flops_per_token
    assert runs["longnet+conv4"].steps <= runs["longnet"].steps
    only = plan_recall(dataclasses.replace(s, models=("longnet", "longnet+conv")))
    assert [r.model.name for r in only] == ["longnet", "longnet+conv4"]
    with pytest.raises(ValueError, match="--models longnet\\+conv needs --short-conv"):
        plan_recall(dataclasses.replace(s, short_conv=0, models=("longnet+conv",)))
    with pytest.raises(ValueError, match="--models must name models among"):
        plan_recall(dataclasses.replace(s, models=("lstm",)))
    with pytest.raises(ValueError, match="--short-conv"):
        plan_recall(dataclasses.replace(s, short_conv=1))


def test_reference_pattern_and_quick_plan():
    s = RecallSettings(probes=(Probe("mqar", 256, 1e12),))
    assert reference_pattern(s, 256).segment_lengths == (32, 64, 128, 256)
    runs = plan_recall(RECALL_QUICK)
    assert {r.probe.task for r in runs} == {"mqar", "copy", "vt", "passkey"}


def test_schedule_and_eval_steps():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(9, 100, 10) == 1.0
    assert lr_factor(100, 100, 10) == pytest.approx(0.1)
    assert _eval_steps(10, 4) == [2, 5, 8, 10] and _eval_steps(3, 5) == [1, 2, 3]


def test_best_runs_prefers_accuracy_then_fewer_flops():
    from longnet.training.experiment.recall_suite import RunResult
    runs = plan_recall(RECALL_QUICK)[:2]
    a = RunResult(runs[0], 0.5, 1.0, 5, 2e9, 1.0)
    b = RunResult(runs[0], 0.5, 1.0, 5, 1e9, 1.0)
    c = RunResult(runs[1], 0.4, 1.0, 5, 1e9, 1.0)
    best = best_runs([a, b, c])
    assert best[(runs[0].probe.name, runs[0].model.name)] is b


@pytest.mark.parametrize("block", ["magneto", "gpt"])
def test_block_options_decode_matches_forward(block):
    torch.manual_seed(0)
    c = LongNetConfig(n_layers=2, d_model=32, n_heads=4, d_ffn=64, segment_lengths=(8, 16), dilation_rates=(1, 2),
                      block=block, max_positions=48, xpos=block == "magneto", tie_embeddings=block == "magneto",
                      attention_backend="reference")
    m = LongNetLM(c).eval()
    assert m.num_parameters() == c.num_parameters()
    x = torch.randint(0, 256, (2, 40))
    full = m(x)
    _, cache = m.prefill(x[:, :30])
    for p in range(30, 40):
        step = m.decode_step(x[:, p], cache)
        torch.testing.assert_close(step, full[:, p], atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_positions"):
        m(torch.randint(0, 256, (1, 49)))


def test_gpt_block_has_no_sub_ln_and_small_init():
    c = LongNetConfig(n_layers=2, d_model=64, n_heads=4, d_ffn=256, block="gpt")
    blk = LongNetLM(c).blocks[0]
    assert blk.attn.sub_ln is None and isinstance(blk.ffn.sub_ln, torch.nn.Identity)
    assert blk.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert blk.ffn.fc2.weight.std().item() == pytest.approx(0.01, rel=0.1)
    with pytest.raises(ValueError, match="block"):
        LongNetConfig(block="transformer")


def test_cli_refuses_lm_flags_and_prints_the_plan(capsys):
    from longnet.cli import main
    assert main(["experiment", "--suite", "recall", "--quick", "--dry-run", "--tasks", "mqar"]) == 0
    out = capsys.readouterr().out
    assert "recall plan: 4 runs" in out and "sliding10" in out
    assert main(["experiment", "--suite", "recall", "--quick", "--dry-run", "--context", "64"]) == 2
    assert "--context only apply to --suite lm" in capsys.readouterr().err
    assert main(["experiment", "--suite", "recall", "--quick", "--dry-run", "--tasks", "sort"]) == 2


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path, capsys):
    import csv
    from longnet.cli import main
    out = tmp_path / "rq"
    assert main(["experiment", "--suite", "recall", "--quick", "--out", str(out), "--threads", "1",
                 "--no-progress"]) == 0
    # Each evaluation is reported as it happens: at least one per run.
    assert capsys.readouterr().out.count(", accuracy ") >= 16
    for name in ("runs.csv", "best.csv", "curve.csv", "gaps.csv", "reach.csv", "frontier.png", "gaps.png",
                 "table.txt", "plan.json"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "best.csv", newline="") as f:
        best = list(csv.DictReader(f))
    assert len(best) == 16  # 4 probes x 4 models, each at its best of the (1 x 1) sweep
    assert {r["task"] for r in best} == {"mqar", "copy", "vt", "passkey"}
    for r in best:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and int(r["steps"]) >= 1
    # Equal FLOPs within a probe: every model's training FLOPs within one step of the budget.
    for probe in {r["probe"] for r in best}:
        flops = [float(r["train_flops"]) for r in best if r["probe"] == probe]
        assert max(flops) / min(flops) < 1.1


def test_scaled_embedding_is_not_drowned_at_init():
    """docs/recall.md §2: with Sub-LN every branch output is O(1), so the token embedding must be
    too, or the token's identity starts as a fraction of a percent of the residual stream."""
    torch.manual_seed(0)
    x = MQAR(64, 4).batch(8, _gen(0)).x
    for scale, ratio_at_least in ((None, 0.4), (False, 0.0)):
        c = LongNetConfig(n_layers=2, d_model=64, n_heads=4, d_ffn=256, segment_lengths=(64,), dilation_rates=(1,),
                          scale_embedding=scale)
        m = LongNetLM(c)
        seen = {}
        m.blocks[0].attn.register_forward_hook(lambda mod, inp, out: seen.update(attn=out.pow(2).mean().sqrt()))
        m(x)
        token = (m.embed(x) * c.embed_scale).pow(2).mean().sqrt()
        ratio = (token / seen["attn"]).item()
        if scale is None:
            assert c.embed_scale == 8.0 and ratio > ratio_at_least
        else:
            assert c.embed_scale == 1.0 and ratio < 0.15  # the unscaled embedding is drowned


def test_scale_embedding_defaults_and_legacy_configs():
    assert LongNetConfig().embed_scale == 16.0  # d_model 256, magneto block
    assert LongNetConfig(block="gpt").embed_scale == 1.0
    legacy = {k: v for k, v in LongNetConfig().to_dict().items() if k != "scale_embedding"}
    assert LongNetConfig.from_dict(legacy).embed_scale == 1.0  # trained before the field: unscaled
    assert LongNetConfig.from_dict(LongNetConfig().to_dict()).embed_scale == 16.0
    with pytest.raises(TypeError, match="scale_embedding"):
        LongNetConfig(scale_embedding="yes")


def _suite_folder(path, layers, runs):
    """A recall output folder as the suite writes it; runs: (model, lr, accuracy, train_flops)."""
    import json
    from longnet.training.experiment.recall_report import write_recall_results
    path.mkdir()
    (path / "plan.json").write_text(json.dumps({"settings": {"layers": layers, "block": "magneto"}}))
    rows, curve, gaps = [], [], []
    for model, lr, acc, flops in runs:
        rows.append({"probe": "mqar@64/2p", "model": model, "layers": layers, "d_model": 32, "lr": lr,
                     "steps": 10, "train_flops": flops, "accuracy": acc, "chance": 0.5})
        curve += [{"probe": "mqar@64/2p", "model": model, "d_model": 32, "lr": lr, "step": s, "train_flops": f,
                   "accuracy": a} for s, f, a in ((5, flops / 2, acc / 2), (10, flops, acc))]
    best = {}
    for r in rows:  # the folder's own best per model, as the suite keeps it
        if r["model"] not in best or r["accuracy"] > best[r["model"]]["accuracy"]:
            best[r["model"]] = r
    for r in best.values():
        gaps += [{"probe": r["probe"], "model": r["model"], "by": "bucket", "bin": b, "answers": 4,
                  "accuracy": r["accuracy"]} for b in BUCKETS[:2]]
    write_recall_results(str(path), rows, list(best.values()), curve, gaps)


def test_merge_keeps_each_models_best_and_tells_depths_apart(tmp_path, capsys):
    import csv
    from longnet.cli import main
    _suite_folder(tmp_path / "a", 2, [("dense", 1e-3, 1.0, 2e9), ("longnet", 1e-3, 0.5, 2e9),
                                      ("longnet", 3e-3, 0.75, 2e9)])
    _suite_folder(tmp_path / "b", 2, [("longnet", 1e-3, 0.625, 6e9)])
    _suite_folder(tmp_path / "c", 3, [("longnet", 1e-3, 0.875, 3e9)])
    out = tmp_path / "m"
    assert main(["experiment", "--suite", "recall", "--merge", str(tmp_path / "a"), str(tmp_path / "b"),
                 str(tmp_path / "c"), "--out", str(out)]) == 0
    with open(out / "best.csv", newline="") as f:
        best = {r["model"]: r for r in csv.DictReader(f)}
    assert set(best) == {"dense 2L", "longnet 2L", "longnet 3L"}
    assert float(best["longnet 2L"]["accuracy"]) == 0.75 and float(best["longnet 2L"]["lr"]) == 3e-3
    assert float(best["longnet 3L"]["acc_local"]) == 0.875
    with open(out / "curve.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    assert {(c["model"], c["lr"]) for c in curves} >= {("longnet 2L", "0.003"), ("longnet 3L", "0.001")}
    with open(out / "runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 5
    for name in ("frontier.png", "gaps.png", "table.txt"):
        assert (out / name).stat().st_size > 0
    assert "longnet 3L" in capsys.readouterr().out
    # A folder that is not a finished output, and --out among the merged, are refused with a message.
    (tmp_path / "empty").mkdir()
    assert main(["experiment", "--suite", "recall", "--merge", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "m2")]) == 2
    assert "is not a finished recall suite output" in capsys.readouterr().err
    assert main(["experiment", "--suite", "recall", "--merge", str(tmp_path / "a"), "--out", str(tmp_path / "a")]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_settings_and_run_records_round_trip():
    from longnet.training.experiment.recall_plan import settings_from_dict
    from longnet.training.experiment.recall_suite import RunResult, result_from_record, result_record
    s = dataclasses.replace(RECALL_DEFAULT, models=("dense", "longnet"), lrs=(1e-3,), short_conv=4)
    import json
    back = settings_from_dict(json.loads(json.dumps(dataclasses.asdict(s))))
    assert back == s and plan_recall(back) == plan_recall(s)
    with pytest.raises(ValueError, match="not the settings of a recall suite"):
        settings_from_dict({"probes": [{"task": "mqar"}]})
    with pytest.raises(ValueError, match="--lrs"):
        settings_from_dict({**dataclasses.asdict(s), "lrs": [-1.0]})
    run = plan_recall(s)[0]
    correct = np.random.default_rng(0).random(1021) < 0.5  # not a multiple of 8
    res = RunResult(run, 0.5, 1.25, 7, 3e9, 1.5, [(3, 1e9, 0.25), (7, 3e9, 0.5)], correct)
    rec = json.loads(json.dumps(result_record(res)))
    again = result_from_record(rec, run)
    assert np.array_equal(again.correct, correct) and again.curve == res.curve
    assert (again.accuracy, again.loss, again.steps, again.train_flops) == (0.5, 1.25, 7, 3e9)
    with pytest.raises(ValueError, match="is not the run"):
        result_from_record(rec, plan_recall(s)[1])
    with pytest.raises(ValueError, match="damaged"):
        result_from_record({**rec, "correct": "zz"}, run)


def test_resume_skips_finished_runs_and_keeps_their_results(tmp_path, capsys, monkeypatch):
    """A suite stopped after its first run goes on with --resume: only the second run trains, and
    the report holds both; flags that would change the plan are refused."""
    import csv
    import json
    import longnet.training.experiment.recall_command as rc
    from longnet.cli import main
    real, calls = rc.train_recall_run, []

    def stop_on_second(run, *a, **kw):
        calls.append(run.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(run, *a, **kw)

    out = tmp_path / "r"
    base = ["experiment", "--suite", "recall", "--threads", "1", "--no-progress", "--out", str(out)]
    plan = ["--quick", "--tasks", "mqar", "--models", "dense,longnet"]
    monkeypatch.setattr(rc, "train_recall_run", stop_on_second)
    assert main(base + plan) == 130
    assert f"--resume --out {out} goes on" in capsys.readouterr().out
    first = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in first] == calls[:1]

    assert main(base + ["--resume", "--lrs", "1e-3"]) == 2
    assert "--lrs: a resumed suite keeps the plan" in capsys.readouterr().err

    calls.clear()
    monkeypatch.setattr(rc, "train_recall_run", lambda run, *a, **kw: calls.append(run.name) or real(run, *a, **kw))
    assert main(base + ["--resume"]) == 0
    assert "1 of 2 runs finished, 1 to go" in capsys.readouterr().out
    assert len(calls) == 1 and calls[0] != first[0]["run"]
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["dense", "longnet"]
    assert float(rows[0]["accuracy"]) == first[0]["accuracy"]
    assert (out / "frontier.png").stat().st_size > 0 and (out / "gaps.csv").stat().st_size > 0

    calls.clear()  # a finished suite: nothing to train, the report is rewritten
    assert main(base + ["--resume"]) == 0 and calls == []

    (out / "results.json").write_text("[{\"run\": \"" + first[0]["run"] + "\", \"accuracy\": \"x\"}]")
    assert main(base + ["--resume"]) == 2
    assert "is damaged" in capsys.readouterr().err
    (out / "results.json").unlink()  # finished runs without records: never trained again over their rows
    assert main(base + ["--resume"]) == 2
    assert "holds finished runs but no results.json" in capsys.readouterr().err
    assert main(["experiment", "--suite", "recall", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "holds no" in capsys.readouterr().err
