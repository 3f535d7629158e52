"""Typed, validated settings of the LongNet language model and of its training.

:class:`LongNetConfig` describes the model, :class:`TrainConfig` the optimiser, schedule,
batching and logging. Both are plain dataclasses that validate themselves on
construction (bad values raise ``ValueError``/``TypeError`` naming the field), convert
to and from JSON-able dicts, and come in named presets (:data:`PRESETS`):

* ``tiny``: 4 layers, d=256, trains on 2 CPU cores in about 4 minutes (``longnet train``'s default);
* ``small``: 6 layers, d=384, context 2048, for a GPU or a patient CPU;
* ``paper-base``: the paper's base model (12 layers, d=768, 12 heads, FFN 3072,
  w = 2048..32768, r = 1, 2, 4, 6, 12) and its optimiser (docs/design.md §5).

Overrides use one syntax everywhere (``longnet train --set KEY=VALUE``): KEY is
``model.FIELD``, ``train.FIELD`` or a bare FIELD name that only one of the two has;
VALUE is parsed by the field's type (``true``/``false``, ``none``, ``128,256,512`` for tuples).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import typing
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterable, Optional, Tuple

from .checks import check_int, check_short_conv
from .patterns import DilatedPattern, validate_pattern, validate_phases

__all__ = ["LongNetConfig", "TrainConfig", "PRESETS", "preset", "apply_overrides", "parse_override",
           "config_fields_help", "xpos_max_length"]

ACTIVATIONS = ("gelu", "relu", "silu", "swish")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BLOCKS = ("magneto", "gpt")


def _check_int(name: str, value, minimum: int = 1) -> int:
    # A field of the wrong type is a TypeError here, as for _check_float and _check_bool; the range is
    # longnet.checks.check_int's.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return check_int(name, value, minimum)


def _check_float(name: str, value, lo: float = -math.inf, hi: float = math.inf, *,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    bad = (not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo)
           or (hi_open and value == hi))
    if bad:
        lb, hb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must be a finite number in {lb}{lo}, {hi}{hb}, got {value}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def xpos_max_length(scale_base: float) -> int:
    """Longest sequence a full forward with XPOS supports before its decay overflows float32.

    :class:`longnet.modules.XPOS` centres the decay on the middle of the positions, so
    this is twice its limit on ``|p - c|`` (:func:`longnet.modules.xpos_max_distance`).
    """
    from .modules import xpos_max_distance
    return int(2 * xpos_max_distance(scale_base))


@dataclass
class LongNetConfig:
    """The LongNet decoder-only language model (docs/design.md §5).

    Attributes:
        vocab_size: tokens; 256 for bytes.
        n_layers, d_model, n_heads, d_ffn: depth, width, attention heads, FFN hidden size.
        segment_lengths, dilation_rates: the dilation patterns (w_i, r_i) of every layer.
        segment_phases: empty (all 0), or one phase 0 <= phi_i < w_i per pattern: pattern i's
            segments start at phi_i + k * w_i (and [0, phi_i) is a short first segment).
        local_window: 0, or an even length l >= 2: add a causal local window to every layer's
            mixture, as two r = 1 patterns of length l with segment phases 0 and l/2
            (:meth:`longnet.DilatedPattern.with_local_window`). It links every pair of
            neighbouring tokens, which the paper's causal pattern does not (docs/design.md §2.1).
        dropout: on the embeddings, attention output, FFN hidden and residual branches.
        activation: FFN activation, one of gelu, relu, silu/swish.
        tie_embeddings: share the input embedding and the output projection.
        bias: biases in the linear layers.
        qk_norm: LayerNorm on each head's q and k.
        xpos, xpos_scale_base: XPOS relative positions and their decay length scale.
        layer_norm_eps: epsilon of every LayerNorm.
        activation_checkpointing: recompute each block in the backward (less memory).
        attention_backend: None (best available), "torch", "math", "reference", ...
        block: "magneto" (pre-LN with MAGNETO's Sub-LayerNorm and initialisation) or "gpt"
            (a plain pre-LN GPT-2 block: no Sub-LN, weights drawn from N(0, 0.02), residual
            outputs from N(0, 0.02 / sqrt(2 n_layers))); attention is the dilated op in both.
        max_positions: 0, or learned absolute position embeddings for positions < max_positions
            (added to the token embedding; a sequence may not be longer).
        scale_embedding: multiply the token embedding by sqrt(d_model) (fairseq's and
            torchscale's ``embed_scale``). MAGNETO's Sub-LN makes every branch output O(1)
            whatever its input, so an unscaled embedding (std d^-0.5) starts as a few tenths of
            a percent of the residual stream, which kept a 2-layer model from learning
            associative recall (docs/recall.md §2). None: True for the magneto block, False for
            gpt. A config saved without this field loads as False (its model was trained so).
        short_conv: 0 (off), or a width W >= 2: a causal depthwise convolution over the
            last W rows of every layer's keys and values, before attention (an opt-in variant
            for recall, docs/recall.md; :class:`longnet.MultiheadDilatedAttention`). Models with
            it generate without the KV cache and do not run sequence-parallel.
    """

    vocab_size: int = 256
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    d_ffn: int = 1024
    segment_lengths: Tuple[int, ...] = (128, 256, 512)
    dilation_rates: Tuple[int, ...] = (1, 2, 4)
    segment_phases: Tuple[int, ...] = ()
    local_window: int = 0
    dropout: float = 0.0
    activation: str = "gelu"
    tie_embeddings: bool = True
    bias: bool = True
    qk_norm: bool = False
    xpos: bool = True
    xpos_scale_base: float = 512.0
    layer_norm_eps: float = 1e-5
    activation_checkpointing: bool = False
    attention_backend: Optional[str] = None
    block: str = "magneto"
    max_positions: int = 0
    scale_embedding: Optional[bool] = None
    short_conv: int = 0

    def __post_init__(self) -> None:
        self.vocab_size = _check_int("vocab_size", self.vocab_size, 2)
        self.n_layers = _check_int("n_layers", self.n_layers)
        self.d_model = _check_int("d_model", self.d_model)
        self.n_heads = _check_int("n_heads", self.n_heads)
        self.d_ffn = _check_int("d_ffn", self.d_ffn)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        self.segment_lengths, self.dilation_rates = validate_pattern(self.segment_lengths, self.dilation_rates)
        self.segment_phases = (validate_phases(self.segment_phases, self.segment_lengths)
                               if self.segment_phases else ())
        self.local_window = _check_int("local_window", self.local_window, 0)
        if self.local_window == 1 or self.local_window % 2:
            raise ValueError(f"local_window must be 0 (off) or an even length >= 2, got {self.local_window}")
        self.dropout = _check_float("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        _check_choice("activation", self.activation, ACTIVATIONS)
        for name in ("tie_embeddings", "bias", "qk_norm", "xpos", "activation_checkpointing"):
            _check_bool(name, getattr(self, name))
        self.xpos_scale_base = _check_float("xpos_scale_base", self.xpos_scale_base, 0.0, lo_open=True)
        self.layer_norm_eps = _check_float("layer_norm_eps", self.layer_norm_eps, 0.0, lo_open=True)
        if self.xpos and self.head_dim % 2:
            raise ValueError(f"xpos needs an even head dim, got d_model / n_heads = {self.head_dim}; "
                             "change d_model or n_heads, or set xpos=False")
        _check_choice("block", self.block, BLOCKS)
        self.max_positions = _check_int("max_positions", self.max_positions, 0)
        if self.scale_embedding is not None:
            _check_bool("scale_embedding", self.scale_embedding)
        self.short_conv = check_short_conv(self.short_conv)
        if self.attention_backend is not None and not isinstance(self.attention_backend, str):
            raise TypeError(f"attention_backend must be a string or None, got {self.attention_backend!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def pattern(self) -> DilatedPattern:
        """Every layer's patterns (w, r, phase), with the local window's two r = 1 patterns if set."""
        p = DilatedPattern(self.segment_lengths, self.dilation_rates, self.segment_phases or None)
        return p.with_local_window(self.local_window) if self.local_window else p

    @property
    def embed_scale(self) -> float:
        """The factor on the token embedding: sqrt(d_model) or 1 (see ``scale_embedding``)."""
        on = self.block == "magneto" if self.scale_embedding is None else self.scale_embedding
        return math.sqrt(self.d_model) if on else 1.0

    @property
    def max_segment(self) -> int:
        return max(self.pattern.segment_lengths)

    def num_parameters(self) -> int:
        """Parameter count of :class:`longnet.model.LongNetLM` with this config."""
        d, f, v, b = self.d_model, self.d_ffn, self.vocab_size, int(self.bias)
        sub_ln = self.block == "magneto"
        attn = 4 * (d * d + b * d) + 2 * d * sub_ln + 2 * self.short_conv * d  # q, k, v, out, sub-LN, conv
        if self.qk_norm:
            attn += 4 * self.head_dim
        ffn = d * f + b * f + 2 * f * sub_ln + f * d + b * d  # fc1, sub-LN, fc2
        block = attn + ffn + 4 * d  # two pre-LNs
        head = 0 if self.tie_embeddings else v * d
        return v * d + self.max_positions * d + self.n_layers * block + 2 * d + head

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["segment_lengths"], d["dilation_rates"] = list(self.segment_lengths), list(self.dilation_rates)
        d["segment_phases"] = list(self.segment_phases)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LongNetConfig":
        if isinstance(d, dict) and "scale_embedding" not in d:
            d = {**d, "scale_embedding": False}  # saved before the field existed: trained unscaled
        return _from_dict(cls, d, "model")


@dataclass
class TrainConfig:
    """Training settings (the optimiser defaults follow docs/design.md §5).

    Attributes:
        seq_len: training context in tokens.
        batch_size: sequences per micro-batch; grad_accum micro-batches make one step.
        max_steps: optimiser steps; the schedule decays to ``lr * min_lr_ratio`` at the last one.
        lr, warmup_steps, lr_power, min_lr_ratio: linear warm-up to lr, then polynomial decay
            ``lr * (min_lr_ratio + (1 - min_lr_ratio) * (1 - t) ** lr_power)``.
        beta1, beta2, eps, weight_decay: AdamW; weight decay skips biases, norms and embeddings.
        grad_clip: max global grad norm (0 disables).
        eval_interval: steps between validation evaluations (0: only at the end).
        eval_windows, eval_batch_size: validation windows (of seq_len) per evaluation and per batch.
        save_interval: steps between checkpoints (0: only at the end and on Ctrl-C).
        keep_checkpoints: how many step checkpoints to keep.
        sample_tokens: bytes sampled at the end of a run (0: none).
        precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16".
        seed: model init, dropout and data sampling.
        num_threads: CPU threads for torch (0: leave torch's default).
        time_limit_s: stop (and checkpoint) after this many seconds of training (0: no limit).
        passkey_distance, passkey_digits: the passkey task (``--data passkey``); distance 0 draws
            a random distance per sequence.
        passkey_answer_weight: loss weight of an answer digit against a filler byte's 1 (1: the
            plain mean, under which the answer's 5 bytes of 1,024 give almost no signal).
        passkey_curriculum_steps: with random distances, the longest training distance grows
            from the shortest to the longest over this many batches (0: no curriculum).
        pack_documents: train on whole documents (the built-in corpus's files, enwik8's
            articles) laid end to end, with no attention across a document boundary
            (:class:`longnet.training.data.DocumentSampler`, varlen attention); false: random
            windows, which cross file boundaries.
    """

    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 30
    lr_power: float = 1.0
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 2.0
    eval_interval: int = 100
    eval_windows: int = 32
    eval_batch_size: int = 8
    save_interval: int = 0
    keep_checkpoints: int = 2
    sample_tokens: int = 200
    precision: str = "auto"
    seed: int = 0
    num_threads: int = 0
    time_limit_s: float = 0.0
    passkey_distance: int = 0
    passkey_digits: int = 5
    passkey_answer_weight: float = 100.0
    passkey_curriculum_steps: int = 0
    pack_documents: bool = False

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_windows", "eval_batch_size",
                     "keep_checkpoints", "passkey_digits"):
            setattr(self, name, _check_int(name, getattr(self, name), 1))
        for name in ("warmup_steps", "eval_interval", "save_interval", "sample_tokens", "seed", "num_threads",
                     "passkey_distance", "passkey_curriculum_steps"):
            setattr(self, name, _check_int(name, getattr(self, name), 0))
        self.lr = _check_float("lr", self.lr, 0.0, lo_open=True)
        self.lr_power = _check_float("lr_power", self.lr_power, 0.0, lo_open=True)
        self.min_lr_ratio = _check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        self.beta1 = _check_float("beta1", self.beta1, 0.0, 1.0, hi_open=True)
        self.beta2 = _check_float("beta2", self.beta2, 0.0, 1.0, hi_open=True)
        self.eps = _check_float("eps", self.eps, 0.0, lo_open=True)
        self.weight_decay = _check_float("weight_decay", self.weight_decay, 0.0)
        self.grad_clip = _check_float("grad_clip", self.grad_clip, 0.0)
        self.time_limit_s = _check_float("time_limit_s", self.time_limit_s, 0.0)
        self.passkey_answer_weight = _check_float("passkey_answer_weight", self.passkey_answer_weight, 0.0,
                                                  lo_open=True)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_bool("pack_documents", self.pack_documents)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step ``step`` (0-based)."""
        return self.lr * lr_factor(step, self.warmup_steps, self.max_steps, self.lr_power, self.min_lr_ratio)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d, "train")


def lr_factor(step: int, warmup: int, total: int, power: float, min_ratio: float) -> float:
    """Multiplier of the peak lr at 0-based ``step``: linear warm-up, then polynomial decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * (1.0 - t) ** power


def _from_dict(cls, d: Dict[str, Any], section: str):
    if not isinstance(d, dict):
        raise TypeError(f"{section} config must be a dict, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {section} config field(s) {unknown}; known: {sorted(names)}")
    kw = dict(d)
    for f in fields(cls):
        if f.name in kw and isinstance(kw[f.name], list):
            kw[f.name] = tuple(kw[f.name])
    return cls(**kw)


# ----------------------------------------------------------------------------- presets

# Every preset adds a causal local window (LongNetConfig.local_window) to the paper's pattern:
# at equal training FLOPs it lowered test bits-per-byte by 3-4% and removed the loss spike at
# segment boundaries (README, "Experiment"). ``--set model.local_window=0`` gives the paper's pattern.
PRESETS: Dict[str, Tuple[LongNetConfig, TrainConfig]] = {
    # About 3.2M parameters; ~4.5 minutes on 2 CPU cores. The time limit is a safety net for
    # slower machines: training stops (and checkpoints) after 420 s even if steps remain.
    "tiny": (
        LongNetConfig(n_layers=4, d_model=256, n_heads=4, d_ffn=1024,
                      segment_lengths=(128, 256, 512), dilation_rates=(1, 2, 4), local_window=16),
        TrainConfig(seq_len=512, batch_size=8, max_steps=300, lr=3e-3, warmup_steps=30,
                    eval_interval=100, eval_windows=32, time_limit_s=420.0),
    ),
    "small": (
        LongNetConfig(n_layers=6, d_model=384, n_heads=6, d_ffn=1536,
                      segment_lengths=(256, 512, 1024, 2048), dilation_rates=(1, 2, 4, 8), local_window=16),
        TrainConfig(seq_len=2048, batch_size=8, max_steps=5000, lr=1e-3, warmup_steps=200,
                    eval_interval=500, eval_windows=64, save_interval=1000),
    ),
    # docs/design.md §5: the paper's base model and optimiser. Steps and batch are our choice.
    "paper-base": (
        LongNetConfig(n_layers=12, d_model=768, n_heads=12, d_ffn=3072,
                      segment_lengths=(2048, 4096, 8192, 16384, 32768), dilation_rates=(1, 2, 4, 6, 12),
                      local_window=128, dropout=0.0),
        TrainConfig(seq_len=32768, batch_size=1, grad_accum=16, max_steps=100_000, lr=6e-4,
                    warmup_steps=750, min_lr_ratio=0.0, weight_decay=0.01, grad_clip=2.0,
                    eval_interval=1000, eval_windows=16, eval_batch_size=1, save_interval=1000),
    ),
}


def preset(name: str) -> Tuple[LongNetConfig, TrainConfig]:
    """Fresh copies of preset ``name``'s (model, train) configs."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    m, t = PRESETS[name]
    return dataclasses.replace(m), dataclasses.replace(t)


# ----------------------------------------------------------------------------- overrides

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _field_types(cls) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _parse_value(key: str, text: str, tp) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        if text.strip().lower() in ("none", "null", ""):
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    s = text.strip()
    try:
        if tp is bool:
            if s.lower() in _TRUE:
                return True
            if s.lower() in _FALSE:
                return False
            raise ValueError
        if tp is int:
            return int(s)
        if tp is float:
            return float(s)
        if tp is str:
            return s
        if origin in (tuple, typing.Tuple):
            return tuple(int(t) for t in s.replace("(", "").replace(")", "").split(",") if t.strip())
    except ValueError:
        pass
    else:
        raise TypeError(f"cannot parse {key}: unsupported type {tp}")
    kind = {bool: "true/false", int: "an integer", float: "a number"}.get(tp, "comma-separated integers")
    raise ValueError(f"{key}={text!r}: expected {kind}")


def parse_override(item: str) -> Tuple[str, str]:
    """``"KEY=VALUE"`` -> (KEY, VALUE); raises ValueError for anything else."""
    if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"override must look like KEY=VALUE (e.g. model.n_layers=2 or train.lr=1e-3), got {item!r}")
    key, value = item.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ValueError(f"override {item!r} has an empty KEY; expected KEY=VALUE")
    return key, value


def apply_overrides(model: LongNetConfig, train: TrainConfig, overrides: Iterable[str]
                    ) -> Tuple[LongNetConfig, TrainConfig]:
    """New (model, train) configs with ``KEY=VALUE`` overrides applied (validated once, at the end).

    KEY: ``model.FIELD``, ``train.FIELD`` or a FIELD that only one section has.
    """
    sections = {"model": (LongNetConfig, model.to_dict()), "train": (TrainConfig, train.to_dict())}
    types = {name: _field_types(cls) for name, (cls, _) in sections.items()}
    for item in overrides:
        key, text = parse_override(item)
        if "." in key:
            sec, name = key.split(".", 1)
            if sec not in sections:
                raise ValueError(f"override {item!r}: section must be 'model' or 'train', got {sec!r}")
            candidates = [sec] if name in types[sec] else []
        else:
            name = key
            candidates = [s for s in sections if name in types[s]]
        if not candidates:
            all_keys = [f"{s}.{n}" for s in sections for n in types[s]]
            close = difflib.get_close_matches(key if "." in key else f"model.{key}", all_keys, n=3, cutoff=0.5)
            close += [k for k in difflib.get_close_matches(f"train.{key}", all_keys, n=3, cutoff=0.5)
                      if k not in close]
            hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
            raise ValueError(f"override {item!r}: unknown config field {key!r}{hint} "
                             "(see `longnet train --list-fields`)")
        if len(candidates) > 1:
            raise ValueError(f"override {item!r}: {name!r} is in both model and train; write model.{name} "
                             f"or train.{name}")
        sec = candidates[0]
        sections[sec][1][name] = _parse_value(f"{sec}.{name}", text, types[sec][name])
    try:
        new_model = LongNetConfig.from_dict(sections["model"][1])
        new_train = TrainConfig.from_dict(sections["train"][1])
    except (ValueError, TypeError) as e:
        raise type(e)(f"invalid config after overrides: {e}") from None
    return new_model, new_train


def check_compatible(model: LongNetConfig, train: TrainConfig) -> None:
    """Cross-checks between the two configs (raises ValueError)."""
    if model.xpos and train.seq_len > xpos_max_length(model.xpos_scale_base):
        raise ValueError(f"train.seq_len={train.seq_len} is too long for XPOS with xpos_scale_base="
                         f"{model.xpos_scale_base} (at most {xpos_max_length(model.xpos_scale_base)}); "
                         "raise model.xpos_scale_base or set model.xpos=false")


def config_fields_help() -> str:
    """One line per overridable field with its type and its value in the tiny preset."""
    lines = []
    for sec, cls, inst in (("model", LongNetConfig, PRESETS["tiny"][0]), ("train", TrainConfig, PRESETS["tiny"][1])):
        for name, tp in _field_types(cls).items():
            tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            val = getattr(inst, name)
            if isinstance(val, tuple):
                val = ",".join(map(str, val))
            lines.append(f"  {sec}.{name:<26} {tname:<16} tiny: {val}")
    return "\n".join(lines)
