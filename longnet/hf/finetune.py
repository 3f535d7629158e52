"""Fine-tune a Hugging Face Llama-style model to 4x its context with dilated attention.

``python -m longnet.hf.finetune`` (about 5 minutes on 2 CPU cores):

1. builds a small Llama from a config (random init, byte vocabulary of 256) and trains it
   densely (``sdpa``) at a short context C on the built-in corpus;
2. measures the validation loss at C and at 4C, still dense (4C is past the positions it
   was trained on);
3. switches it to dilated attention with :func:`longnet.hf.use_dilated_attention`
   (w = C, 2C, 4C; r = 1, 2, 4), measures the loss at 4C, fine-tunes at 4C and measures again;
4. with ``--controls``, also trains two dense copies for as many steps (at C, and at 4C) so
   that the dilated result can be told apart from the effect of more training.

Losses are nats per byte (the mean next-byte cross-entropy) over fixed validation windows.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, fields
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..argtypes import nonneg_int, output_dir, positive_int
from ..fileio import fsync_path, replace_durably
from ..training.data import RandomWindowSampler, iter_eval_windows, open_corpus
from ..training.evaluate import mean_loss, next_token_loss
from ..training.optim import decay_groups
from .attention import use_dilated_attention

__all__ = ["FinetuneConfig", "build_model", "evaluate", "train", "run", "build_parser", "main"]


@dataclass
class FinetuneConfig:
    context: int = 128           # C: the dense training context; fine-tuning runs at factor * C
    factor: int = 4
    dense_steps: int = 600
    finetune_steps: int = 300
    batch_size: int = 16         # sequences of C per dense step; fine-tuning keeps the tokens per step
    lr: float = 2e-3
    warmup: int = 30
    eval_windows: int = 32       # validation windows of factor * C bytes (the same bytes at every length)
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    seed: int = 0
    controls: bool = False       # also train two dense copies the same number of steps, for comparison

    def __post_init__(self) -> None:
        if self.factor < 2 or self.factor & (self.factor - 1):
            raise ValueError(f"factor must be a power of two >= 2, got {self.factor}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"heads must divide hidden and kv_heads must divide heads, got hidden={self.hidden}, "
                             f"heads={self.heads}, kv_heads={self.kv_heads}")

    def pattern(self):
        """w = C, 2C, 4C, ... up to factor * C with r = 1, 2, 4, ...: every row of a 4C window is kept."""
        n = int(round(math.log2(self.factor))) + 1
        return [self.context * 2**i for i in range(n)], [2**i for i in range(n)]


def build_model(cfg: FinetuneConfig) -> LlamaForCausalLM:
    """A random-init Llama over bytes (vocab 256), GQA when kv_heads < heads, dense sdpa attention."""
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=256, hidden_size=cfg.hidden, intermediate_size=3 * cfg.hidden,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.factor * cfg.context,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


class _Logits(torch.nn.Module):
    """A causal LM of ``transformers`` as longnet's loss loop sees a model: tokens (B, N) -> logits (B, N, V)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x, use_cache=False).logits


def evaluate(model, data: np.ndarray, seq_len: int, windows: int, window_len: int, batch_size: int = 8) -> float:
    """Mean loss (nats/byte) over the first ``windows`` windows of ``window_len`` bytes of ``data``,
    each cut into sequences of ``seq_len`` (so every length scores the same bytes)."""
    batches = ((x.reshape(-1, seq_len), y.reshape(-1, seq_len))
               for x, y in iter_eval_windows(data, window_len, batch_size=batch_size, max_windows=windows))
    device = next(model.parameters()).device
    return mean_loss(_Logits(model), batches, device=device, precision="fp32")["loss"]


def train(model, data: np.ndarray, seq_len: int, batch_size: int, steps: int, cfg: FinetuneConfig,
          log=print, label: str = "") -> float:
    """AdamW with linear warm-up and cosine decay; returns the last step's training loss."""
    sampler = RandomWindowSampler(data, batch_size, seq_len, seed=cfg.seed)
    opt = torch.optim.AdamW(decay_groups(model, 0.01), lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    model.train()
    loss = float("nan")
    for step in range(1, steps + 1):
        x, y = sampler.next_batch()
        out, _ = next_token_loss(_Logits(model), x, y, precision="fp32")
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = out.item()
        if step % max(1, steps // 5) == 0 or step == steps:
            log(f"[{label}] step {step}/{steps}: train loss {loss:.4f}")
    return loss


def run(cfg: FinetuneConfig, corpus=None, log=print, save: Optional[str] = None) -> Dict[str, float]:
    """The whole experiment; returns the measured losses (nats/byte) and times (s)."""
    if save:
        _check_new_folder(save)  # before the training, not after it
    corpus = corpus if corpus is not None else open_corpus("builtin", verbose=False)
    c, long = cfg.context, cfg.factor * cfg.context
    model = build_model(cfg)
    res: Dict[str, float] = {}
    t0 = time.time()
    train(model, corpus.train, c, cfg.batch_size, cfg.dense_steps, cfg, log, f"dense C={c}")
    res["dense_train_s"] = time.time() - t0
    ev = dict(windows=cfg.eval_windows, window_len=long)
    res["dense_at_C"] = evaluate(model, corpus.valid, c, **ev)
    res["dense_at_4C"] = evaluate(model, corpus.valid, long, **ev)
    if cfg.controls:
        res.update(_dense_controls(model, corpus, cfg, log, ev))
    w, r = cfg.pattern()
    use_dilated_attention(model, w, r)
    res["dilated_at_4C_before"] = evaluate(model, corpus.valid, long, **ev)
    t0 = time.time()
    train(model, corpus.train, long, max(1, cfg.batch_size // cfg.factor), cfg.finetune_steps, cfg, log,
          f"dilated {cfg.factor}C={long}")
    res["finetune_s"] = time.time() - t0
    res["dilated_at_4C_after"] = evaluate(model, corpus.valid, long, **ev)
    if save:
        save_atomically(model, save)
    log(report(cfg, res))
    return res


def _dense_controls(model, corpus, cfg: FinetuneConfig, log, ev) -> Dict[str, float]:
    """Copies of the dense model trained as many more steps, on as many bytes per step, as the
    dilated fine-tuning: at C (scored at C), and at 4C with dense attention (scored at 4C)."""
    c, long = cfg.context, cfg.factor * cfg.context
    at_c, at_long = copy.deepcopy(model), copy.deepcopy(model)
    train(at_c, corpus.train, c, cfg.batch_size, cfg.finetune_steps, cfg, log, f"control: dense C={c}")
    train(at_long, corpus.train, long, max(1, cfg.batch_size // cfg.factor), cfg.finetune_steps, cfg, log,
          f"control: dense {cfg.factor}C={long}")
    return {"control_dense_at_C": evaluate(at_c, corpus.valid, c, **ev),
            "control_dense_4C_at_4C": evaluate(at_long, corpus.valid, long, **ev)}


def _check_new_folder(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"--save {path!r} exists and is not an empty folder; name a new one")


def save_atomically(model, path: str) -> None:
    """``save_pretrained`` into a hidden folder beside ``path``, renamed to ``path`` once complete.

    ``path`` must be new (or an empty folder), so nothing is ever overwritten and a crash
    leaves no half-written model under that name.
    """
    _check_new_folder(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        model.save_pretrained(tmp)
        for name in os.listdir(tmp):
            fsync_path(os.path.join(tmp, name))
        if os.path.isdir(path):
            os.rmdir(path)
        replace_durably(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def report(cfg: FinetuneConfig, res: Dict[str, float]) -> str:
    c, long = cfg.context, cfg.factor * cfg.context
    w, r = cfg.pattern()
    return "\n".join([
        f"validation loss, nats/byte ({cfg.eval_windows} windows of {long} bytes):",
        f"  dense,   context {c:>5} (trained):               {res['dense_at_C']:.4f}",
        f"  dense,   context {long:>5} (untrained length):      {res['dense_at_4C']:.4f}",
        f"  dilated, context {long:>5}, before fine-tuning:   {res['dilated_at_4C_before']:.4f}",
        f"  dilated, context {long:>5}, after {cfg.finetune_steps} steps:    {res['dilated_at_4C_after']:.4f}",
        *([f"  control: dense trained {cfg.finetune_steps} more steps at {c}, at {c}: "
           f"{res['control_dense_at_C']:.4f}",
           f"  control: dense fine-tuned {cfg.finetune_steps} steps at {long}, at {long}: "
           f"{res['control_dense_4C_at_4C']:.4f}"] if "control_dense_at_C" in res else []),
        f"  (w = {w}, r = {r}; dense phase {res['dense_train_s']:.0f} s, fine-tuning {res['finetune_s']:.0f} s)"])


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`FinetuneConfig` field (``--dense-steps`` for ``dense_steps``), and ``--save``."""
    parser = argparse.ArgumentParser(prog="python -m longnet.hf.finetune", description=__doc__.split("\n")[0])
    for f in fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true")
            continue
        kind = _positive_float if isinstance(f.default, float) else \
            nonneg_int if f.name in ("dense_steps", "finetune_steps", "seed") else positive_int
        parser.add_argument(flag, type=kind, default=f.default)
    parser.add_argument("--save", type=output_dir, default=None,
                        help="folder to save_pretrained the fine-tuned model into")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    save = args.pop("save")
    try:
        cfg = FinetuneConfig(**args)
    except ValueError as e:
        parser.error(str(e))
    return run(cfg, save=save)


if __name__ == "__main__":
    main()
