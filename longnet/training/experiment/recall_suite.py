"""Running ``longnet experiment --suite recall``: train every run of the plan, evaluate, report.

Each run trains a fresh model (:class:`longnet.model.LongNetLM` with the run's config) on batches
drawn on the fly from its probe's task, with the loss (cross-entropy) only at the answer
positions; AdamW (betas 0.9, 0.98; weight decay on the linear layers' weights only), linear
warm-up then cosine decay to a tenth of the peak, gradient norm clipped at 1. It is evaluated
``evals`` times on one fixed set of ``eval_sequences`` test sequences of its probe (the same
set for every model), and stops early once it reaches ``stop_accuracy`` there. Accuracy is
argmax over all 256 bytes at the answer positions.

The best run of each (probe, model) over the sweep (highest final accuracy, ties to the
fewer FLOPs) gives that model's row; its per-answer results give accuracy against gap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...analysis.reach import depth_matrix
from ...checks import one_line
from ...model import LongNetLM
from ..optim import decay_groups
from ..recall import RecallBatch, chance_accuracy
from .recall_plan import BUCKETS, Probe, RecallRun, RecallSettings, gap_buckets, reference_pattern

__all__ = ["RunResult", "eval_set", "evaluate", "train_recall_run", "best_runs", "rank", "gap_rows", "reach_rows",
           "result_record", "result_from_record", "EVAL_CHUNK", "REACH_MAX_LEN"]

EVAL_CHUNK = 32  # sequences per evaluation forward
REACH_MAX_LEN = 4096  # depth_matrix is (N, N) int32: 64 MiB here
FORWARD_SHARE = 1.0 / 3.0  # an evaluation forward costs about a third of a training step's FLOPs


@dataclass
class RunResult:
    """What one run gives: final accuracy and loss on the evaluation set, the steps and FLOPs it
    took (fewer than planned when it stopped early), wall time, and the accuracy curve
    ``curve`` = [(step, training FLOPs, accuracy), ...]. ``correct`` (answers,) bool, per answer
    of the evaluation set, for the gap analysis."""

    run: RecallRun
    accuracy: float
    loss: float
    steps: int
    train_flops: float
    wall_s: float
    curve: List[Tuple[int, float, float]] = field(default_factory=list)
    correct: Optional[np.ndarray] = None

    def row(self) -> Dict[str, Any]:
        r = self.run
        return {"probe": r.probe.name, "task": r.probe.task, "seq_len": r.probe.seq_len, "model": r.model.name,
                "kind": r.model.kind, "pattern": str(r.model.config.pattern), "block": r.model.config.block,
                "layers": r.model.config.n_layers,
                "d_model": r.d_model, "lr": r.lr, "params": r.model.config.num_parameters(),
                "planned_steps": r.steps, "steps": self.steps, "batch": r.batch_size,
                "flops_per_token": r.flops_per_token, "train_flops": self.train_flops, "accuracy": self.accuracy,
                "loss": self.loss, "chance": chance_accuracy(r.probe.make()), "wall_s": self.wall_s,
                "s_per_step": self.wall_s / max(1, self.steps)}


def eval_set(probe: Probe, sequences: int, seed: int) -> RecallBatch:
    """The fixed evaluation sequences of a probe (a generator of its own, apart from training's)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return probe.make().batch(sequences, g)


@torch.no_grad()
def evaluate(model: nn.Module, data: RecallBatch) -> Tuple[np.ndarray, float]:
    """(correct (answers,) bool in row-major order of ``data.mask``, mean answer loss in nats)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, losses = [], []
    for i in range(0, data.x.shape[0], EVAL_CHUNK):
        x, y, m = (t[i:i + EVAL_CHUNK].to(device) for t in (data.x, data.y, data.mask))
        logits = model(x)[m].float()
        correct.append((logits.argmax(-1) == y[m]).cpu().numpy())
        losses.append(F.cross_entropy(logits, y[m], reduction="none").cpu().numpy())
    model.train(was)
    return np.concatenate(correct), float(np.concatenate(losses).mean())


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))


def _eval_steps(steps: int, evals: int) -> List[int]:
    """The steps after which a run evaluates: ``evals`` of them, evenly spaced, the last one last."""
    return sorted({max(1, round(steps * (k + 1) / evals)) for k in range(evals)})


def train_recall_run(run: RecallRun, s: RecallSettings, data: RecallBatch,
                     advance: Callable[[float], None] = lambda flops: None,
                     device: torch.device = torch.device("cpu"),
                     report: Callable[[int, float, float], None] = lambda step, accuracy, loss: None) -> RunResult:
    """Train ``run`` (fresh weights from ``s.seed``) on ``device`` and evaluate it on ``data``;
    ``advance(flops)`` is called after each step and evaluation (the plan's progress bar),
    ``report(step, accuracy, answer loss)`` after each evaluation."""
    torch.manual_seed(s.seed)
    model = LongNetLM(run.model.config).to(device)
    opt = torch.optim.AdamW(decay_groups(model, s.weight_decay), lr=run.lr, betas=(0.9, 0.98))
    task, g = run.probe.make(), torch.Generator().manual_seed(s.seed)
    warmup = max(1, round(s.warmup_fraction * run.steps))
    eval_at, curve = set(_eval_steps(run.steps, s.evals)), []
    eval_cost = FORWARD_SHARE * run.flops_per_token * data.x.numel()
    t0, step, correct, loss = time.perf_counter(), 0, None, float("nan")
    while step < run.steps:
        for group in opt.param_groups:
            group["lr"] = run.lr * lr_factor(step, run.steps, warmup)
        b = task.batch(run.batch_size, g)
        x, y, m = b.x.to(device), b.y.to(device), b.mask.to(device)
        out = F.cross_entropy(model(x)[m].float(), y[m])
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        advance(run.flops_per_step)
        if step in eval_at:
            correct, loss = evaluate(model, data)
            curve.append((step, step * run.flops_per_step, float(correct.mean())))
            advance(eval_cost)
            report(step, float(correct.mean()), loss)
            if correct.mean() >= s.stop_accuracy:
                break
    wall = time.perf_counter() - t0
    # What an early stop leaves of the plan still moves the bar, so it ends at 100%.
    advance((run.steps - step) * run.flops_per_step + eval_cost * (len(eval_at) - len(curve)))
    return RunResult(run, float(correct.mean()), loss, step, step * run.flops_per_step, wall, curve, correct)


def result_record(res: RunResult) -> Dict[str, Any]:
    """A finished run as JSON (``results.json``, what ``--resume`` reads back): its measurements,
    curve and, packed into hex, which answers of the evaluation set it got right."""
    c = res.correct
    return {"run": res.run.name, "accuracy": res.accuracy, "loss": res.loss, "steps": res.steps,
            "train_flops": res.train_flops, "wall_s": res.wall_s, "curve": [list(t) for t in res.curve],
            "answers": None if c is None else int(c.size),
            "correct": None if c is None else np.packbits(c.astype(bool)).tobytes().hex()}


def result_from_record(rec: Dict[str, Any], run: RecallRun) -> RunResult:
    """The :class:`RunResult` that :func:`result_record` wrote for ``run``; raises ValueError."""
    if rec.get("run") != run.name:
        raise ValueError(f"the record of {rec.get('run')!r} is not the run {run.name!r}")
    try:
        correct = None
        if rec["correct"] is not None:
            bits = np.unpackbits(np.frombuffer(bytes.fromhex(rec["correct"]), dtype=np.uint8))
            correct = bits[:int(rec["answers"])].astype(bool)
        curve = [(int(st), float(fl), float(acc)) for st, fl, acc in rec["curve"]]
        return RunResult(run, float(rec["accuracy"]), float(rec["loss"]), int(rec["steps"]),
                         float(rec["train_flops"]), float(rec["wall_s"]), curve, correct)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"the record of run {run.name!r} is damaged ({one_line(e)})") from None


def best_runs(results: List[RunResult]) -> Dict[Tuple[str, str], RunResult]:
    """{(probe name, model name): its best run}: highest accuracy, then fewest training FLOPs."""
    best: Dict[Tuple[str, str], RunResult] = {}
    for r in results:
        key = (r.run.probe.name, r.run.model.name)
        if key not in best or rank(r.accuracy, r.train_flops) > rank(best[key].accuracy, best[key].train_flops):
            best[key] = r
    return best


def rank(accuracy: float, train_flops: float) -> Tuple[float, float]:
    """What makes a run a model's best: the higher accuracy, then the fewer training FLOPs."""
    return accuracy, -train_flops


def _answer_positions(data: RecallBatch) -> Tuple[np.ndarray, np.ndarray]:
    """(q, j) per answer, in the order of :func:`evaluate`: query position and the position it must read."""
    rows, q = data.mask.nonzero(as_tuple=True)
    gap = data.gap[rows, q]
    return q.numpy(), (q - gap).numpy()


def gap_rows(s: RecallSettings, result: RunResult, data: RecallBatch) -> List[Dict[str, Any]]:
    """Accuracy of one run by gap bucket (:data:`BUCKETS`, LongNet's pattern of the probe) and by
    gap in powers of two: rows of probe, model, kind (``bucket``/``log2``), bin, answers, accuracy."""
    n = result.run.probe.seq_len
    q, j = _answer_positions(data)
    buckets = gap_buckets(reference_pattern(s, n), n, s.heads, q, j)
    ok = result.correct
    head = {"probe": result.run.probe.name, "model": result.run.model.name}
    rows = [{**head, "by": "bucket", "bin": b, "answers": int((buckets == i).sum()),
             "accuracy": float(ok[buckets == i].mean()) if (buckets == i).any() else float("nan")}
            for i, b in enumerate(BUCKETS)]
    bins = np.floor(np.log2(np.maximum(q - j, 1))).astype(np.int64)
    for k in np.unique(bins):
        sel = bins == k
        rows.append({**head, "by": "log2", "bin": f"{2 ** k}-{2 ** (k + 1) - 1}", "answers": int(sel.sum()),
                     "accuracy": float(ok[sel].mean())})
    return rows


def reach_rows(s: RecallSettings, probe: Probe, data: RecallBatch) -> List[Dict[str, Any]]:
    """How many layers each answer of the evaluation set needs under LongNet's pattern
    (:func:`longnet.analysis.reach.depth_matrix`, causal, ``s.heads`` heads): per gap bucket, the
    share of answers and their depths (layers after which position j can influence query q).

    An MQAR answer needs a two-layer circuit: layer 1 attaches the key at j - 1 to the value at j
    (always one local hop), then layer 2 at q must read j directly. So a 2-layer LongNet can only
    answer where the depth is 1 (the ``local`` and ``dilated`` buckets); ``one_hop`` is that share.
    Returns [] for probes longer than :data:`REACH_MAX_LEN`.
    """
    n = probe.seq_len
    if n > REACH_MAX_LEN:
        return []
    pattern = reference_pattern(s, n)
    depth = depth_matrix(pattern, n, s.heads, causal=True)
    q, j = _answer_positions(data)
    d = depth[q, j]  # D[i, j]: layers after which j influences i; -1 never
    buckets = gap_buckets(pattern, n, s.heads, q, j)
    rows = []
    for i, b in enumerate(BUCKETS):
        sel = buckets == i
        if not sel.any():
            continue
        ds = d[sel]
        rows.append({"probe": probe.name, "pattern": str(pattern), "bucket": b, "answers": int(sel.sum()),
                     "share": float(sel.mean()), "min_depth": int(ds.min()), "max_depth": int(ds.max()),
                     "mean_depth": float(ds.mean()), "never": int((ds < 0).sum())})
    rows.append({"probe": probe.name, "pattern": str(pattern), "bucket": "one_hop", "answers": int((d == 1).sum()),
                 "share": float((d == 1).mean()), "min_depth": 1, "max_depth": 1, "mean_depth": 1.0, "never": 0})
    return rows
