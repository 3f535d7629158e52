"""The plan of ``longnet experiment``: its settings, the models, and their equal FLOP budgets.

Everything here is arithmetic on configs (no training, no data), so the budget rules are
tested in milliseconds.

Models (same width and depth; only attention differs), C = ``Settings.context``:

* ``dense@C``: one pattern (w = C, r = 1), i.e. dense causal attention, trained at C;
* ``longnet@4C``, ``longnet@16C``: the paper-style geometric pattern trained at 4C and 16C,
  w_i = w0 * 2^i up to the training length and r_i = min(2^i, heads) (:func:`paper_pattern`);
* ``longnet+lwL@4C``, ``longnet+lwL@16C``: the same plus ``local_window`` = L (two r = 1
  patterns of length L with phases 0 and L/2, which link every pair of neighbours; docs/design.md §2.1);
* ``slidingL@16C``: local attention only, as the two patterns (L, 1, phase 0) and
  (L, 1, phase L/2), each query seeing the previous L/2 to L tokens. L is chosen so that its
  attention FLOPs at 16C match ``longnet@16C``'s (:func:`matched_window`).

Equal compute: every model trains on the same FLOP budget, counted per training token as
6 x non-embedding parameters plus, per layer, the attention FLOPs of one sequence (docs/design.md §3:
forward + backward, causal; :func:`longnet.patterns.dilated_flops`, or
:func:`~longnet.patterns.dense_flops` for the dense model) divided by its length. All models
take the same tokens per optimiser step (``batch_tokens``), so the step count follows from the
budget: ``steps = floor(budget / (FLOPs per token * batch_tokens))``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import List, Tuple

from ...checks import check_int
from ...config import LongNetConfig, xpos_max_length
from ...patterns import DilatedPattern, dense_flops
from ..data import DEFAULT_ANSWER_WEIGHT, PasskeyTask

PLAN = "plan.json"  # in an experiment's --out (either suite): its settings and runs

__all__ = ["Settings", "DEFAULT", "QUICK", "ModelSpec", "Run", "paper_pattern", "attention_flops", "flops_per_token",
           "non_embedding_params", "matched_window", "model_specs", "plan_runs", "passkey_fits", "passkey_distances",
           "check_settings", "DENSE", "LONGNET", "VARIANT", "SLIDING", "LM", "PASSKEY", "MIN_STEPS"]

DENSE, LONGNET, VARIANT, SLIDING = "dense", "longnet", "longnet+local", "sliding"
LM, PASSKEY = "lm", "passkey"
MIN_STEPS = 5  # fewer optimiser steps than this is no training: the budget is refused
LENGTH_FACTORS = (1, 4, 16)  # training / evaluation lengths in units of the context C


@dataclass(frozen=True)
class Settings:
    """The experiment's knobs; each has a ``longnet experiment`` flag of the same name (``--d-model``).

    ``budget`` and ``passkey_budget`` are training FLOPs per model (``passkey_budget`` 0: no
    passkey runs). ``base_segment`` 0 means C/2 and ``batch_tokens`` 0 means 16C (one sequence
    of the longest models per step). ``passkey_weight``: loss weight of an answer digit (a filler
    byte weighs 1); ``passkey_curriculum``: the fraction of a passkey run's steps over which the
    longest training distance grows from the shortest to the task's longest (0: none; see
    :class:`~longnet.training.data.PasskeyTask`). ``eval_tokens``: bytes of the test split scored at each
    evaluation length; ``position_tokens``: bytes of random test windows for the loss against
    position (windows of each model's training length, so every model scores as many bytes).
    """

    context: int = 256
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    d_ffn: int = 512
    base_segment: int = 0
    local_window: int = 16
    budget: float = 1.2e13
    passkey_budget: float = 4e12
    batch_tokens: int = 0
    lr: float = 3e-3
    warmup_fraction: float = 0.1
    eval_tokens: int = 65536
    position_tokens: int = 262144
    passkey_weight: float = DEFAULT_ANSWER_WEIGHT
    passkey_curriculum: float = 0.5
    passkey_sequences: int = 16
    passkey_digits: int = 5
    seed: int = 0

    @property
    def w0(self) -> int:
        """The smallest segment length of the LongNet patterns."""
        return self.base_segment or self.context // 2

    @property
    def lengths(self) -> Tuple[int, ...]:
        """Training and evaluation lengths: C, 4C, 16C."""
        return tuple(f * self.context for f in LENGTH_FACTORS)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_tokens or self.lengths[-1]


DEFAULT = Settings()
# Everything at toy size: all runs and evaluations in well under 3 minutes on 2 CPU cores.
QUICK = Settings(context=32, layers=2, d_model=32, heads=4, d_ffn=64, local_window=4, budget=3e10,
                 passkey_budget=1.5e10, eval_tokens=2048, position_tokens=8192, passkey_sequences=4)


@dataclass(frozen=True)
class ModelSpec:
    """One architecture: its name, kind (DENSE, LONGNET, VARIANT, SLIDING), config and training length.

    ``period``: the boundary spike takes query positions modulo this, the smallest segment
    length of the model's own patterns: w0 for LongNet and for the variant (whose local window
    is there to remove the spike at those boundaries), L for the sliding window. The dense model
    has no boundary inside its window; its period is w0, as a control.
    """

    name: str
    kind: str
    config: LongNetConfig
    seq_len: int
    period: int

    @property
    def slug(self) -> str:
        """The name as a folder name."""
        return re.sub(r"[^A-Za-z0-9.-]+", "_", self.name)


@dataclass(frozen=True)
class Run:
    """One training run: a model on a task (LM or PASSKEY) for ``steps`` steps of ``batch_size`` sequences."""

    model: ModelSpec
    task: str
    batch_size: int
    steps: int
    flops_per_token: float

    @property
    def name(self) -> str:
        return f"{self.task}-{self.model.name}"

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.model.seq_len

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token


def paper_pattern(n: int, base_segment: int, heads: int) -> DilatedPattern:
    """The paper-style pattern for training length n: w_i = base_segment * 2^i for every w_i <= n,
    r_i = min(2^i, heads). The rate stops at the head count, as in the paper (r <= 12 = H), so in
    every segment each row is kept by some head."""
    base_segment = check_int("base_segment", base_segment, maximum=n)
    count = int(math.log2(n // base_segment)) + 1
    w = tuple(base_segment * 2**i for i in range(count))
    return DilatedPattern(w, tuple(min(2**i, heads, wi) for i, wi in enumerate(w)))


def attention_flops(config: LongNetConfig, n: int, dense: bool = False) -> float:
    """Attention FLOPs of one layer on one sequence of n tokens, forward + backward, causal (docs/design.md §3)."""
    if dense:
        return dense_flops(n, config.n_heads, config.head_dim, causal=True, backward=True)
    return config.pattern.flops(n, config.n_heads, config.head_dim, causal=True, backward=True)


def non_embedding_params(config: LongNetConfig) -> int:
    """Parameters outside the token and position embeddings and the output projection."""
    embeddings = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    return config.num_parameters() - embeddings - config.max_positions * config.d_model


def flops_per_token(spec: ModelSpec) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + attention FLOPs per token of every layer."""
    c = spec.config
    attention = attention_flops(c, spec.seq_len, dense=spec.kind == DENSE) / spec.seq_len
    return 6.0 * non_embedding_params(c) + c.n_layers * attention


def _sliding_flops(window: int, n: int, heads: int, head_dim: int) -> float:
    return DilatedPattern((window, window), (1, 1), (0, window // 2)).flops(n, heads, head_dim, causal=True,
                                                                            backward=True)


def matched_window(n: int, heads: int, head_dim: int, target: float) -> int:
    """The even window L in [2, n] whose sliding-window attention ((L, L), r = (1, 1), phases
    (0, L/2)) at n tokens costs closest to ``target`` FLOPs (forward + backward, causal).

    The cost grows with L, so a bisection finds the crossing; the closer of its two neighbours wins.
    """
    lo, hi = 1, n // 2  # over k = L / 2
    while lo < hi:
        mid = (lo + hi) // 2
        if _sliding_flops(2 * mid, n, heads, head_dim) < target:
            lo = mid + 1
        else:
            hi = mid
    candidates = [2 * k for k in (lo - 1, lo) if 1 <= k <= n // 2]
    return min(candidates, key=lambda w: abs(_sliding_flops(w, n, heads, head_dim) - target))


def model_specs(s: Settings) -> List[ModelSpec]:
    """The six architectures of the plan (see the module docstring)."""
    C, (_, n4, n16) = s.context, s.lengths
    base = LongNetConfig(n_layers=s.layers, d_model=s.d_model, n_heads=s.heads, d_ffn=s.d_ffn,
                         segment_lengths=(C,), dilation_rates=(1,))
    specs = [ModelSpec(f"dense@{C}", DENSE, base, C, s.w0)]
    for n in (n4, n16):
        p = paper_pattern(n, s.w0, s.heads)
        cfg = dataclasses.replace(base, segment_lengths=p.segment_lengths, dilation_rates=p.dilation_rates)
        specs.append(ModelSpec(f"longnet@{n}", LONGNET, cfg, n, s.w0))
        if s.local_window:
            specs.append(ModelSpec(f"longnet+lw{s.local_window}@{n}", VARIANT,
                                   dataclasses.replace(cfg, local_window=s.local_window), n, s.w0))
    L = matched_window(n16, s.heads, base.head_dim, attention_flops(cfg, n16))  # cfg: longnet@16C
    sliding = dataclasses.replace(base, segment_lengths=(L, L), dilation_rates=(1, 1), segment_phases=(0, L // 2))
    specs.append(ModelSpec(f"sliding{L}@{n16}", SLIDING, sliding, n16, L))
    return specs


def _run(spec: ModelSpec, task: str, budget: float, s: Settings, flag: str) -> Run:
    batch = s.tokens_per_step // spec.seq_len
    fpt = flops_per_token(spec)
    steps = int(budget // (fpt * batch * spec.seq_len))
    if steps < MIN_STEPS:
        need = MIN_STEPS * fpt * batch * spec.seq_len
        raise ValueError(f"{flag} {budget:.3g} gives {spec.name} only {steps} optimiser steps of "
                         f"{batch * spec.seq_len:,} tokens ({fpt:.3g} FLOPs per token); raise {flag} to at least "
                         f"{need:.3g}")
    return Run(spec, task, batch, steps, fpt)


def plan_runs(s: Settings) -> List[Run]:
    """Every training run, in order: each model on the corpus, then (``passkey_budget`` > 0) on the
    passkey task where its training length can hold a passkey sequence."""
    check_settings(s)
    runs = []
    for spec in model_specs(s):
        runs.append(_run(spec, LM, s.budget, s, "--budget"))
        if s.passkey_budget > 0 and passkey_fits(spec.seq_len, s.passkey_digits):
            runs.append(_run(spec, PASSKEY, s.passkey_budget, s, "--passkey-budget"))
    return runs


def passkey_fits(seq_len: int, key_digits: int) -> bool:
    """Whether a passkey sequence (needle, filler, query, key) fits in seq_len bytes."""
    try:
        PasskeyTask(seq_len, key_digits=key_digits)
    except ValueError:
        return False
    return True


def passkey_distances(seq_len: int, key_digits: int) -> List[int]:
    """Distances at which a model trained at seq_len is tested: the powers of two the task allows
    at this length, and its longest distance (the needle at the first byte)."""
    task = PasskeyTask(seq_len, key_digits=key_digits)
    powers = [2**k for k in range(math.ceil(math.log2(task.min_distance)), int(math.log2(task.max_distance)) + 1)]
    return sorted(set(powers) | {task.max_distance})


def _positive(name: str, value, kind=int, allow_zero: bool = False) -> None:
    if kind is int:
        check_int(name, value, minimum=0 if allow_zero else 1)
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_settings(s: Settings) -> None:
    """Raise ValueError naming the flag for settings the plan cannot use (before anything runs)."""
    for name in ("context", "layers", "d_model", "heads", "d_ffn", "eval_tokens", "position_tokens",
                 "passkey_sequences", "passkey_digits"):
        _positive(f"--{name.replace('_', '-')}", getattr(s, name))
    for name in ("base_segment", "local_window", "batch_tokens", "seed"):
        _positive(f"--{name.replace('_', '-')}", getattr(s, name), allow_zero=True)
    for name in ("budget", "lr", "passkey_weight"):
        _positive(f"--{name.replace('_', '-')}", getattr(s, name), float)
    _positive("--passkey-budget", s.passkey_budget, float, allow_zero=True)
    if not 0 <= s.warmup_fraction < 1:
        raise ValueError(f"warmup fraction must be in [0, 1), got {s.warmup_fraction}")
    if isinstance(s.passkey_curriculum, bool) or not 0 <= s.passkey_curriculum <= 1:
        raise ValueError(f"--passkey-curriculum must be a fraction in [0, 1], got {s.passkey_curriculum!r}")
    if s.context < 4 or s.context % 2:
        raise ValueError(f"--context must be an even integer >= 4, got {s.context}")
    if not 2 <= s.w0 <= s.context:
        raise ValueError(f"--base-segment must be between 2 and --context ({s.context}), got {s.base_segment}")
    if s.local_window == 1 or s.local_window % 2:
        raise ValueError(f"--local-window must be 0 (no variant) or an even integer >= 2, got {s.local_window}")
    longest = s.lengths[-1]
    if s.tokens_per_step % longest:
        raise ValueError(f"--batch-tokens must be a multiple of 16 * --context = {longest}, got {s.batch_tokens}")
    if s.eval_tokens < longest:
        raise ValueError(f"--eval-tokens must be at least 16 * --context = {longest} (one window at the longest "
                         f"evaluation length), got {s.eval_tokens}")
    if s.position_tokens < longest:
        raise ValueError(f"--position-tokens must be at least 16 * --context = {longest}, got {s.position_tokens}")
    limit = xpos_max_length(LongNetConfig().xpos_scale_base)
    if longest > limit:
        raise ValueError(f"16 * --context = {longest} is beyond XPOS's range ({limit} tokens); use a smaller --context")
