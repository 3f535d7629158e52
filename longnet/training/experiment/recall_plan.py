"""The plan of ``longnet experiment --suite recall``: probes, models, sweeps and FLOP budgets.

Arithmetic only (no training), so the budget rules and the gap buckets are tested in milliseconds.

A *probe* is one task at one length (:class:`Probe`: task name, sequence length N, the task's
knobs, a training budget in FLOPs per run). For each probe the plan trains four models of the
same depth, width and block, that differ only in attention (``ModelSpec`` of :mod:`.plan`):

* ``dense``: one pattern (w = N, r = 1);
* ``longnet``: the paper-style pattern w_i = w0 * 2^i up to N, r_i = min(2^i, heads)
  (:func:`~.plan.paper_pattern`);
* ``longnet+lwL``: the same plus the causal local window L (the presets' default);
* ``slidingL``: a sliding window whose attention FLOPs at N match ``longnet``'s
  (:func:`~.plan.matched_window`).

Each model is trained once per (d_model, learning rate) of the sweep and reported at its best,
as Zoology does. Every run of a probe gets the same training FLOPs, counted as in
:func:`~.plan.flops_per_token` (6 x non-embedding parameters plus the attention FLOPs of every
layer, per token), so ``steps = floor(budget / (FLOPs per token * batch * N))``: a cheaper
model takes more steps.

Gap buckets (:func:`gap_bucket`): an answer at query position q that must read position j
is bucketed by the *LongNet* pattern of its probe (the same buckets for every model):

* ``local``: q and j share a segment of an r = 1 pattern (inside w0, or the local window);
* ``dilated``: not local, but a segment of an r > 1 pattern holds both, at rows one head keeps;
* ``off-residue``: they share a segment of some pattern, but no head keeps both rows
  (a query only reads keys of its own residue mod r);
* ``beyond``: no segment holds both; one layer cannot link them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ...checks import check_int, check_short_conv, one_line
from ...config import LongNetConfig
from ...patterns import DilatedPattern, row_offset, segment_start, used_offsets
from ..recall import make_task
from .plan import DENSE, LONGNET, SLIDING, VARIANT, ModelSpec, attention_flops, flops_per_token, matched_window, \
    paper_pattern

__all__ = ["Probe", "RecallSettings", "RecallRun", "RECALL_DEFAULT", "RECALL_QUICK", "BUCKETS", "BLOCKS", "MODEL_KINDS",
           "DENSE_CONV", "LONGNET_CONV", "LONGNET_RATE", "CPU_FLOPS_PER_S", "recall_models", "plan_recall",
           "check_recall_settings", "gap_bucket", "gap_buckets", "settings_from_dict"]

BUCKETS = ("local", "dilated", "off-residue", "beyond")
# The opt-in variants (docs/recall.md §8): the short convolution of keys and values on dense and
# on LongNet (--short-conv), and LongNet with its rates capped (--max-rate), which gives each kept
# row of the largest segments more heads.
DENSE_CONV, LONGNET_CONV, LONGNET_RATE = "dense+conv", "longnet+conv", "longnet+maxrate"
# What --models names: ModelSpec kinds of recall_models.
MODEL_KINDS = (DENSE, LONGNET, VARIANT, SLIDING, DENSE_CONV, LONGNET_CONV, LONGNET_RATE)
BLOCKS = ("magneto", "gpt")
MIN_RUN_STEPS = 5


@dataclass(frozen=True)
class Probe:
    """One task at one length: ``knobs`` are the task's keyword arguments, e.g. (("num_pairs", 8),)."""

    task: str
    seq_len: int
    budget: float
    knobs: Tuple[Tuple[str, int], ...] = ()

    def make(self):
        return make_task(self.task, self.seq_len, **dict(self.knobs))

    @property
    def name(self) -> str:
        return self.make().describe()


@dataclass(frozen=True)
class RecallSettings:
    """The suite's knobs (flags of ``longnet experiment --suite recall``).

    ``block``: ``magneto`` (longnet's block, :class:`~longnet.model.LongNetBlock`, XPOS, tied
    embeddings) or ``gpt`` (a plain pre-LN GPT-2 block with learned absolute positions, untied;
    config ``block="gpt"``).
    ``models``: the model kinds to train (:data:`MODEL_KINDS`; empty: all of them).
    ``short_conv``: 0, or a width W that adds ``dense+convW`` and ``longnet+convW`` (the short
    convolution of keys and values, ``LongNetConfig.short_conv``). ``max_rate``: 0, or R that
    adds ``longnet+maxrateR``, LongNet with r_i = min(r_i, R).
    ``base_segment``: w0 of the LongNet patterns (0: N / 8). ``evals``: evaluations per run,
    evenly spaced in its steps (accuracy against training FLOPs); a run stops early once it
    reaches ``stop_accuracy`` on the evaluation set. ``eval_sequences``: fixed test sequences
    per probe, the same for every model.
    """

    probes: Tuple[Probe, ...]
    layers: int = 2
    heads: int = 4
    d_models: Tuple[int, ...] = (64, 128)
    lrs: Tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    ffn_mult: int = 4
    batch_size: int = 32
    base_segment: int = 0
    local_window: int = 16
    block: str = "magneto"
    eval_sequences: int = 256
    evals: int = 4
    stop_accuracy: float = 0.99
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    seed: int = 0
    models: Tuple[str, ...] = ()
    short_conv: int = 0
    max_rate: int = 0


def _mqar(n: int, pairs: int, budget: float) -> Probe:
    return Probe("mqar", n, budget, (("num_pairs", pairs),))


# The full suite: every task, lengths 256 to 4096. Each budget (FLOPs per run) gives dense
# attention at d_model 128 about 2,000 steps of 32 sequences, 2.5 times what it took to learn
# MQAR at length 128 with 4 pairs (docs/recall.md §2); the cheaper models take more steps on the
# same budget.
RECALL_DEFAULT = RecallSettings(probes=(
    _mqar(256, 4, 4.7e13), _mqar(512, 8, 1.1e14), _mqar(1024, 8, 2.8e14), _mqar(4096, 8, 2.2e15),
    Probe("copy", 256, 4.7e13),  # copy lengths drawn per sequence: gaps of every residue
    Probe("vt", 512, 1.1e14, (("hops", 2), ("chains", 2))),
    Probe("passkey", 2048, 9.4e14, (("digits", 5),)),
))
# Training FLOPs per CPU-second of one core, a round figure from the per-step costs in
# docs/recall.md §3; only for the dry run's time estimate.
CPU_FLOPS_PER_S = 5e10
# Toy sizes: every task, model and output in under 3 minutes on 2 CPU cores.
RECALL_QUICK = RecallSettings(
    probes=(_mqar(64, 2, 1.2e10), Probe("copy", 64, 6e9, (("copy_len", 8),)),
            Probe("vt", 64, 6e9, (("hops", 1), ("chains", 2))), Probe("passkey", 64, 6e9, (("digits", 2),))),
    layers=2, heads=4, d_models=(32,), lrs=(3e-3,), batch_size=16, local_window=4, eval_sequences=32, evals=2)


@dataclass(frozen=True)
class RecallRun:
    """One training run: a model on a probe at one (d_model, lr), ``steps`` steps of ``batch_size``."""

    probe: Probe
    model: ModelSpec
    d_model: int
    lr: float
    batch_size: int
    steps: int
    flops_per_token: float

    @property
    def name(self) -> str:
        return f"{self.probe.name} {self.model.name} d{self.d_model} lr{self.lr:g}"

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.batch_size * self.probe.seq_len

    @property
    def flops(self) -> float:
        return self.steps * self.flops_per_step


def w0(s: RecallSettings, n: int) -> int:
    return s.base_segment or max(2, n // 8)


def recall_models(s: RecallSettings, n: int, d_model: int) -> List[ModelSpec]:
    """The four models of a probe of length n at width d_model (see the module docstring)."""
    base = LongNetConfig(n_layers=s.layers, d_model=d_model, n_heads=s.heads, d_ffn=s.ffn_mult * d_model,
                         segment_lengths=(n,), dilation_rates=(1,), block=s.block,
                         tie_embeddings=s.block != "gpt", xpos=s.block != "gpt",
                         max_positions=n if s.block == "gpt" else 0)
    b0 = w0(s, n)
    p = paper_pattern(n, b0, s.heads)
    longnet = dataclasses.replace(base, segment_lengths=p.segment_lengths, dilation_rates=p.dilation_rates)
    specs = [ModelSpec("dense", DENSE, base, n, b0), ModelSpec("longnet", LONGNET, longnet, n, b0)]
    if s.local_window:
        specs.append(ModelSpec(f"longnet+lw{s.local_window}", VARIANT,
                               dataclasses.replace(longnet, local_window=s.local_window), n, b0))
    L = matched_window(n, s.heads, base.head_dim, attention_flops(longnet, n))
    sliding = dataclasses.replace(base, segment_lengths=(L, L), dilation_rates=(1, 1), segment_phases=(0, L // 2))
    specs.append(ModelSpec(f"sliding{L}", SLIDING, sliding, n, L))
    if s.short_conv:
        specs.append(ModelSpec(f"dense+conv{s.short_conv}", DENSE_CONV,
                               dataclasses.replace(base, short_conv=s.short_conv), n, b0))
        specs.append(ModelSpec(f"longnet+conv{s.short_conv}", LONGNET_CONV,
                               dataclasses.replace(longnet, short_conv=s.short_conv), n, b0))
    if s.max_rate:
        capped = tuple(min(r, s.max_rate) for r in p.dilation_rates)
        specs.append(ModelSpec(f"longnet+maxrate{s.max_rate}", LONGNET_RATE,
                               dataclasses.replace(longnet, dilation_rates=capped), n, b0))
    return [m for m in specs if not s.models or m.kind in s.models]


def reference_pattern(s: RecallSettings, n: int) -> DilatedPattern:
    """The pattern that defines a probe's gap buckets: LongNet's paper pattern at n."""
    return paper_pattern(n, w0(s, n), s.heads)


def plan_recall(s: RecallSettings) -> List[RecallRun]:
    """Every run, probe by probe, model by model, then d_model and lr; raises ValueError for a
    budget that gives some run fewer than MIN_RUN_STEPS steps."""
    check_recall_settings(s)
    runs = []
    for probe in s.probes:
        for d in s.d_models:
            for spec in recall_models(s, probe.seq_len, d):
                fpt = flops_per_token(spec)
                steps = int(probe.budget // (fpt * s.batch_size * probe.seq_len))
                if steps < MIN_RUN_STEPS:
                    need = MIN_RUN_STEPS * fpt * s.batch_size * probe.seq_len
                    raise ValueError(f"probe {probe.name}: a budget of {probe.budget:.3g} FLOPs gives {spec.name} "
                                     f"at d_model {d} only {steps} steps; raise it to at least {need:.3g}")
                runs += [RecallRun(probe, spec, d, lr, s.batch_size, steps, fpt) for lr in s.lrs]
    order = {m: i for i, m in enumerate(dict.fromkeys(r.model.name for r in runs))}
    return sorted(runs, key=lambda r: (s.probes.index(r.probe), order[r.model.name], r.d_model, r.lr))


def settings_from_dict(d: Dict[str, Any]) -> RecallSettings:
    """The settings that ``dataclasses.asdict`` turned into ``d`` (a suite's plan.json), checked;
    raises ValueError for a dict that is not one."""
    try:
        probes = tuple(Probe(str(p["task"]), int(p["seq_len"]), float(p["budget"]),
                             tuple((str(k), v) for k, v in p["knobs"])) for p in d["probes"])
        seqs = {f: tuple(d[f]) for f in ("d_models", "lrs", "models") if f in d}
        s = RecallSettings(**{**d, **seqs, "probes": probes})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not the settings of a recall suite ({one_line(e)})") from None
    check_recall_settings(s)
    return s


def _positive(name: str, value, kind=int) -> None:
    if kind is int:
        check_int(name, value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def check_recall_settings(s: RecallSettings) -> None:
    """Raise ValueError naming the flag for settings the suite cannot use."""
    for name in ("layers", "heads", "ffn_mult", "batch_size", "eval_sequences", "evals"):
        _positive(f"--{name.replace('_', '-')}", getattr(s, name))
    if not s.probes:
        raise ValueError("the recall suite needs at least one probe (--tasks)")
    if not s.d_models or not s.lrs:
        raise ValueError("--d-models and --lrs each need at least one value")
    for d in s.d_models:
        _positive("--d-models", d)
        if d % s.heads or (d // s.heads) % 2:
            raise ValueError(f"--d-models: each width must be a multiple of 2 * --heads = {2 * s.heads}, got {d}")
    for lr in s.lrs:
        _positive("--lrs", lr, float)
    unknown = [m for m in s.models if m not in MODEL_KINDS]
    if unknown:
        raise ValueError(f"--models must name models among {', '.join(MODEL_KINDS)}, got {', '.join(unknown)}")
    for kind, flag, value in ((VARIANT, "--local-window", s.local_window), (DENSE_CONV, "--short-conv", s.short_conv),
                              (LONGNET_CONV, "--short-conv", s.short_conv), (LONGNET_RATE, "--max-rate", s.max_rate)):
        if kind in s.models and not value:
            raise ValueError(f"--models {kind} needs {flag} > 0")
    check_short_conv(s.short_conv, "--short-conv")
    check_int("--max-rate", s.max_rate, minimum=0)
    if s.block not in BLOCKS:
        raise ValueError(f"--block must be one of {', '.join(BLOCKS)}, got {s.block!r}")
    if s.local_window == 1 or s.local_window % 2 or s.local_window < 0:
        raise ValueError(f"--local-window must be 0 or an even integer >= 2, got {s.local_window}")
    if not 0 < s.stop_accuracy <= 1:
        raise ValueError(f"--stop-accuracy must be in (0, 1], got {s.stop_accuracy}")
    for p in s.probes:
        p.make()  # the task validates its length and knobs
        _positive(f"budget of probe {p.name}", p.budget, float)
        if not 2 <= w0(s, p.seq_len) <= p.seq_len:
            raise ValueError(f"--base-segment must be in [2, {p.seq_len}] for probe {p.name}, got {s.base_segment}")
        if s.local_window > p.seq_len:
            raise ValueError(f"--local-window {s.local_window} is longer than probe {p.name}")


def gap_bucket(pattern: DilatedPattern, n: int, heads: int, q: int, j: int) -> str:
    """The bucket (:data:`BUCKETS`) of query q reading position j <= q under ``pattern`` at length n."""
    return BUCKETS[int(gap_buckets(pattern, n, heads, np.array([q]), np.array([j]))[0])]


def gap_buckets(pattern: DilatedPattern, n: int, heads: int, q: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Bucket indices into :data:`BUCKETS` of query positions q reading positions j (int arrays)."""
    q, j = np.asarray(q, dtype=np.int64), np.asarray(j, dtype=np.int64)
    local = np.zeros(q.shape, dtype=bool)
    dilated = np.zeros(q.shape, dtype=bool)
    shared = np.zeros(q.shape, dtype=bool)
    for w, r, phi in zip(pattern.segment_lengths, pattern.dilation_rates, pattern.segment_phases):
        w, phi = min(w, n), min(phi, n)  # a segment longer than the sequence covers all of it
        same = segment_start(q, w, phi) == segment_start(j, w, phi)
        shared |= same
        if r == 1:
            local |= same
            continue
        off_q, off_j = row_offset(q, w, r, phi), row_offset(j, w, r, phi)
        kept = np.isin(off_q, list(used_offsets(r, heads)))
        dilated |= same & (off_q == off_j) & kept
    out = np.full(q.shape, 3, dtype=np.int64)
    out[shared] = 2
    out[dilated] = 1
    out[local] = 0
    return out


def bucket_counts(buckets: np.ndarray, correct: np.ndarray) -> Dict[str, Tuple[int, int]]:
    """{bucket: (answers, correct answers)} over arrays of bucket indices and booleans."""
    return {b: (int((buckets == i).sum()), int(correct[buckets == i].sum())) for i, b in enumerate(BUCKETS)}


def total_flops(runs: Sequence[RecallRun]) -> float:
    return float(sum(r.flops for r in runs))
