"""Running the plan of ``longnet experiment``: training each run, evaluating each model.

Each run trains through :func:`longnet.training.trainer.train` into its own run folder
(``runs/<task>_<model>/``: log.csv, loss curve, the final checkpoint; its console output
goes to ``train.log`` there), and is then evaluated from that checkpoint on the test split.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ...config import TrainConfig, xpos_max_length
from ...model import LongNetLM
from ..checkpoint import load_model
from ..data import Corpus, RandomWindowSampler
from ..evaluate import (
    BoundarySpike,
    boundary_spike,
    evaluate_lm,
    passkey_by_distance,
    position_loss,
)
from ..checkpoint import ResumeState, checkpoint_steps, load_resume_state
from ..context import TrainContext
from ..runlock import FolderLock
from ..setup import TrainData, open_data
from ..trainer import train
from .plan import DENSE, PASSKEY, Run, Settings, passkey_distances

__all__ = ["Stopped", "train_run", "evaluate_lm_run", "evaluate_passkey_run", "eval_flops"]

FORWARD_SHARE = 1.0 / 3.0  # a forward pass costs about a third of a training step (docs/design.md §3: 1 + 2)


class Stopped(Exception):
    """A training run was stopped by a signal; ``code`` is its exit status (128 + the signal)."""

    def __init__(self, run: str, code: int):
        super().__init__(f"{run} was stopped (exit status {code})")
        self.code = code


class _Metered:
    """A sampler that calls ``on_batch()`` for every batch it hands out (the plan-wide progress
    bar); everything else (state_dict, ...) is the wrapped sampler's."""

    def __init__(self, sampler, on_batch: Callable[[], None]):
        self._sampler, self._on_batch = sampler, on_batch

    def next_batch(self):
        batch = self._sampler.next_batch()
        self._on_batch()
        return batch

    def __getattr__(self, name: str):
        return getattr(self._sampler, name)


def _train_config(run: Run, s: Settings, threads: int) -> TrainConfig:
    """The run's TrainConfig: the tiny preset's optimiser, the planned steps, no intermediate
    evaluation or checkpoint (the experiment evaluates the final checkpoint itself). It holds
    everything the run's data needs (the passkey weight and curriculum too), so the checkpoint
    alone resumes the run as planned."""
    passkey = run.task == PASSKEY
    return TrainConfig(seq_len=run.model.seq_len, batch_size=run.batch_size, max_steps=run.steps, lr=s.lr,
                       warmup_steps=max(1, round(s.warmup_fraction * run.steps)), eval_interval=0,
                       eval_windows=2, eval_batch_size=2, save_interval=0, keep_checkpoints=1, sample_tokens=0,
                       seed=s.seed, num_threads=threads, passkey_digits=s.passkey_digits,
                       passkey_answer_weight=s.passkey_weight if passkey else TrainConfig.passkey_answer_weight,
                       passkey_curriculum_steps=round(s.passkey_curriculum * run.steps) if passkey else 0)


def _run_data(run: Run, s: Settings, tcfg: TrainConfig, corpus: Corpus) -> Tuple[str, TrainData]:
    """(data spec, the ``data`` argument of ``train``) of a run: the passkey task exactly as
    ``longnet train --data passkey`` builds it from the same TrainConfig."""
    if run.task == PASSKEY:
        return "passkey", open_data("passkey", tcfg, None, verbose=False)
    sampler = RandomWindowSampler(corpus.train, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed)
    return corpus.name, TrainData(kind="corpus", sampler=sampler, corpus=corpus, description=corpus.description)


class _ExperimentContext(TrainContext):
    """One process, whose stop message names the experiment's resume command, not the run's."""

    def __init__(self, device: torch.device, resume_command: str):
        super().__init__(device)
        self._resume_command = resume_command

    def resume_command(self, out_dir: str) -> str:
        return self._resume_command


def _resume_state(run: Run, tcfg: TrainConfig, run_dir: str) -> Optional[ResumeState]:
    """The checkpoint an interrupted run continues from (None: train from the start), checked
    against the plan: a resumed experiment trains exactly what it planned."""
    if not checkpoint_steps(run_dir):
        return None
    state = load_resume_state(run_dir)
    saved = {**state.train_config.to_dict(), "num_threads": tcfg.num_threads}
    for what, a, b in (("model", state.model_config.to_dict(), run.model.config.to_dict()),
                       ("train", saved, tcfg.to_dict())):
        changed = [k for k in a if a[k] != b.get(k)]
        if changed:
            k = changed[0]
            raise ValueError(f"{state.dir} does not belong to this plan's run {run.name}: {what}.{k} is {a[k]!r} "
                             f"there and {b[k]!r} in the plan; move {run_dir} away to train it again")
    return state


def train_run(run: Run, s: Settings, corpus: Corpus, run_dir: str, device: torch.device, threads: int,
              advance: Callable[[float], None], resume_command: str = "", resume: bool = False) -> Dict[str, float]:
    """Train ``run`` into ``run_dir``; ``advance(flops)`` is called with each batch's FLOPs.
    ``resume``: continue from the run's checkpoint there, if it has one (a finished run is not
    trained again). ``resume_command`` is what a stopped run says to type to continue.

    Returns ``steps``, ``tokens``, ``train_flops`` (as counted for the budget) and ``wall_s``
    (training time from the run's log). Raises :class:`Stopped` when a signal stopped it.
    """
    tcfg = _train_config(run, s, threads)
    spec, data = _run_data(run, s, tcfg, corpus)
    per_batch = run.flops_per_token * tcfg.batch_size * tcfg.seq_len
    with FolderLock(run_dir):
        state = _resume_state(run, tcfg, run_dir) if resume else None
        if state is None or state.step < run.steps:
            if state is not None:
                data.sampler.load_state_dict(state.data_state)
                advance(per_batch * state.step)
            data.sampler = _Metered(data.sampler, lambda: advance(per_batch))
            ctx = _ExperimentContext(device, resume_command or f"longnet train --resume --out {run_dir}")
            with open(os.path.join(run_dir, "train.log"), "a" if state else "w", encoding="utf-8") as log, \
                    contextlib.redirect_stdout(log):
                code = train(model_config=run.model.config, train_config=tcfg, data_spec=spec, data=data,
                             out_dir=run_dir, device=device, progress=False, preset_name=run.name, resume=state,
                             dist_ctx=ctx)
            if code != 0:
                raise Stopped(run.name, code)
        else:
            advance(per_batch * run.steps)
    steps, wall = _logged_progress(os.path.join(run_dir, "log.csv"))
    tokens = steps * tcfg.batch_size * tcfg.seq_len
    return {"steps": steps, "tokens": tokens, "train_flops": tokens * run.flops_per_token, "wall_s": wall}


def _logged_progress(path: str) -> Tuple[int, float]:
    """(last step, its elapsed seconds) of the training rows of a run's log.csv."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") == "train"]
    if not rows:
        raise ValueError(f"{path} holds no training step")
    return int(rows[-1]["step"]), float(rows[-1]["elapsed_s"])


def _at_length(model: LongNetLM, kind: str, n: int) -> LongNetLM:
    """The model to evaluate at n tokens: itself, except that the dense model attends densely
    over all n tokens (as Table 2's Transformer is evaluated beyond its training length)."""
    if kind != DENSE or n <= model.config.segment_lengths[0]:
        return model
    wide = LongNetLM(dataclasses.replace(model.config, segment_lengths=(n,), dilation_rates=(1,)))
    wide.load_state_dict(model.state_dict())
    return wide.to(next(model.parameters()).device).eval()


def _bpb_at(model: LongNetLM, kind: str, data: np.ndarray, n: int, s: Settings, device) -> float:
    """Test bits-per-byte in windows of n bytes over the first ``eval_tokens`` bytes of the split
    (the same bytes at every length); NaN where XPOS cannot reach n."""
    if model.config.xpos and n > xpos_max_length(model.config.xpos_scale_base):
        return float("nan")
    windows = max(1, s.eval_tokens // n)
    res = evaluate_lm(_at_length(model, kind, n), data, n, max_windows=windows, batch_size=max(1, 8192 // n),
                      device=device)
    return res["bpb"]


def evaluate_lm_run(run: Run, s: Settings, corpus: Corpus, run_dir: str, device
                    ) -> Tuple[Dict[str, Any], np.ndarray, BoundarySpike]:
    """A model trained on the corpus, on the test split: bpb at each length of ``s.lengths``
    (``bpb@N`` keys), and the loss against query position at its training length with its
    boundary spike. Returns (result fields, the per-position losses (seq_len,), the spike)."""
    model = load_model(run_dir, map_location=device)
    out: Dict[str, Any] = {f"bpb@{n}": _bpb_at(model, run.model.kind, corpus.test, n, s, device)
                           for n in s.lengths}
    n = run.model.seq_len
    losses = position_loss(model, corpus.test, n, num_windows=max(1, s.position_tokens // n), seed=s.seed,
                           batch_size=max(1, 8192 // n), device=device)
    spike = boundary_spike(losses, run.model.period)
    out.update(spike=spike.spike, spike_period=spike.period, worst_residue=spike.worst(1)[0][0])
    return out, losses, spike


def evaluate_passkey_run(run: Run, s: Settings, run_dir: str, device) -> List[Dict[str, float]]:
    """Passkey retrieval of a model trained on the task, at each distance its length allows
    (:func:`passkey_distances`), ``passkey_sequences`` fixed sequences per distance."""
    model = load_model(run_dir, map_location=device)
    n = run.model.seq_len
    return passkey_by_distance(model, n, passkey_distances(n, s.passkey_digits), num_sequences=s.passkey_sequences,
                               key_digits=s.passkey_digits, batch_size=max(1, 8192 // n), seed=s.seed + 1,
                               device=device)


def eval_flops(run: Run, s: Settings) -> float:
    """Estimated FLOPs of evaluating ``run`` (forwards only), for the progress bar."""
    n = run.model.seq_len
    if run.task == PASSKEY:
        tokens = len(passkey_distances(n, s.passkey_digits)) * s.passkey_sequences * n
    else:
        tokens = len(s.lengths) * s.eval_tokens + s.position_tokens
    return FORWARD_SHARE * run.flops_per_token * tokens
