"""Setting up a run of ``longnet train``: every check before anything is written.

:func:`prepare` turns the command's arguments into a :class:`TrainSetup`, the keyword
arguments of :func:`longnet.training.trainer.train`; :func:`open_data` opens the data as a
:class:`TrainData`. Where the process sits (one process or a device mesh) is chosen by the
command (:mod:`longnet.commands.train`), not here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..backends.registry import get_backend
from ..checks import check_int
from ..config import LongNetConfig, TrainConfig, apply_overrides, check_compatible, preset
from ..device import check_precision, compute_dtype, pick_device
from .checkpoint import ResumeState, load_resume_state
from .data import (VOCAB_SIZE, Corpus, DocumentSampler, PasskeyTask, RandomWindowSampler, document_starts,
                   open_corpus)
from .runfolder import check_out_dir
from .runlock import FolderLock

__all__ = ["TrainData", "TrainSetup", "prepare", "open_data", "check_settings", "NothingToDo", "is_rank0", "warn"]

# What --resume reports when a sampler setting changed since the checkpoint.
_SAMPLER_SETTINGS = {"seq_len": "train.seq_len", "batch_size": "train.batch_size",
                     "distance": "train.passkey_distance", "key_digits": "train.passkey_digits"}


@dataclass
class TrainData:
    """What a run trains on: ``sampler`` draws the batches (it is what a checkpoint saves).

    ``kind`` is "corpus" (with ``corpus``, whose valid split is evaluated) or "passkey"
    (with ``task``); ``loss_weights`` (N,) weights each position's loss, None for uniform.
    """

    kind: str
    sampler: Any
    description: str
    corpus: Optional[Corpus] = None
    task: Optional[PasskeyTask] = None
    loss_weights: Optional[Tensor] = None


@dataclass
class TrainSetup:
    """The checked keyword arguments of :func:`longnet.training.trainer.train`."""

    model_config: LongNetConfig
    train_config: TrainConfig
    data_spec: str
    data: TrainData
    out_dir: str
    device: torch.device
    resume: Optional[ResumeState] = None
    compile_model: bool = False
    progress: bool = True
    preset_name: str = ""
    lock: Optional[FolderLock] = None  # the run folder's, held until the command returns

    def kwargs(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}


class NothingToDo(Exception):
    """The request is already fulfilled (e.g. --resume of a finished run): say so, exit 0."""


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def warn(msg: str) -> None:
    print(f"[longnet] warning: {msg}", file=sys.stderr)


def prepare(args: argparse.Namespace) -> TrainSetup:
    """Every check of ``longnet train``'s arguments, before anything is written."""
    device = pick_device(args.device)
    if args.max_steps is not None:
        check_int("--max-steps", args.max_steps)
    if args.resume and not args.out:
        raise ValueError("--resume needs --out DIR, the folder of the run to continue")
    out = args.out or os.path.join("runs", f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_out_dir(out, args.resume)  # refuse what is plainly wrong before creating anything
    lock = FolderLock(out).acquire() if is_rank0() else None
    try:
        return _prepare_locked(args, device, out, lock)
    except BaseException:
        if lock is not None:
            lock.release(discard=True)  # nothing was written
        raise


def _prepare_locked(args: argparse.Namespace, device: torch.device, out: str,
                    lock: Optional[FolderLock]) -> TrainSetup:
    """The checks of :func:`prepare` that need the run folder to be this process's (``lock``)."""
    notes = [check_out_dir(out, args.resume, lock)]
    if lock is not None and lock.stale:
        notes.append(f"took over the lock of {out} from process {lock.stale}, which is no longer running")
    resume = load_resume_state(out) if args.resume else None
    mcfg, tcfg, data_spec = _configs(args, resume)
    check_settings(mcfg, tcfg, device, args.compile)
    if resume is not None:
        check_steps(resume, tcfg, out)
        notes += _changed_training(resume.train_config, tcfg)
        if getattr(args, "preset_given", False):
            notes.append(f"--preset {args.preset} matches the run's model; its training settings are not applied "
                         "on --resume (the run keeps its own; change one with --set train.FIELD=VALUE)")
        notes += [f"{e}; resuming from the older {resume.dir} (step {resume.step})" for e in resume.skipped]
    data = open_data(data_spec, tcfg, args.cache_dir, verbose=is_rank0())
    if resume is not None:
        notes += _restore_sampler(data.sampler, resume, data_spec, args.allow_data_change)
    for note in notes:
        if note and is_rank0():
            warn(note)
    return TrainSetup(model_config=mcfg, train_config=tcfg, data_spec=data_spec, data=data, out_dir=out,
                      device=device, resume=resume, compile_model=args.compile, progress=not args.no_progress,
                      preset_name=args.preset if resume is None else "resumed", lock=lock)


def _configs(args: argparse.Namespace, resume: Optional[ResumeState]) -> Tuple[LongNetConfig, TrainConfig, str]:
    overrides = list(args.overrides) + ([f"train.max_steps={args.max_steps}"] if args.max_steps is not None else [])
    if resume is None:
        mcfg, tcfg = apply_overrides(*preset(args.preset), overrides)
        return mcfg, tcfg, args.data if args.data is not None else "builtin"
    mcfg = resume.model_config
    if getattr(args, "preset_given", False):
        _refuse_model_change(mcfg, preset(args.preset)[0], f"--preset {args.preset}")
    new_m, tcfg = apply_overrides(mcfg, resume.train_config, overrides)
    _refuse_model_change(mcfg, new_m, "--set")
    data_spec = args.data if args.data is not None else (resume.data or "builtin")
    if data_spec != resume.data:
        raise ValueError(f"--data {data_spec!r} differs from the run's data {resume.data!r}; "
                         "a resumed run must use the same data")
    return mcfg, tcfg, data_spec


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _refuse_model_change(saved: LongNetConfig, given: LongNetConfig, source: str) -> None:
    """ValueError naming every model field where ``given`` differs from the checkpoint's ``saved``:
    a resumed run continues the saved weights and modules, so its model is fixed."""
    a, b = saved.to_dict(), given.to_dict()
    changed = [k for k in a if a[k] != b[k]]
    if changed:
        what = "; ".join(f"model.{k}: the checkpoint has {_shown(a[k])}, {source} gives {_shown(b[k])}"
                         for k in changed)
        raise ValueError(f"--resume cannot change the model ({what}); start a new run with a new --out instead"
                         + ("" if source == "--set" else f", or drop {source}"))


def _changed_training(saved: TrainConfig, now: TrainConfig) -> List[str]:
    """Notes on the training fields a resume changes (max_steps aside: extending a run is normal)."""
    a, b = saved.to_dict(), now.to_dict()
    return [f"train.{k} changed from {a[k]!r} to {b[k]!r} since the checkpoint; the run continues with the new "
            "value" for k in a if a[k] != b[k] and k != "max_steps"]


def check_settings(mcfg: LongNetConfig, tcfg: TrainConfig, device: torch.device, compile_model: bool) -> None:
    """Cross-checks of the settings against each other, the data and the device (raises ValueError)."""
    check_compatible(mcfg, tcfg)
    if mcfg.vocab_size < VOCAB_SIZE:
        raise ValueError(f"model.vocab_size={mcfg.vocab_size} is smaller than the byte vocabulary ({VOCAB_SIZE}): "
                         f"the data holds byte values 0..255; set model.vocab_size={VOCAB_SIZE} (or more)")
    check_precision(device, tcfg.precision)
    if mcfg.attention_backend is not None:
        # The attention inputs are (B, N, H, D) in the autocast dtype on this device.
        probe = torch.empty(1, 1, mcfg.n_heads, mcfg.head_dim, device=device,
                            dtype=compute_dtype(device, tcfg.precision))
        try:
            get_backend(mcfg.attention_backend, probe)
        except ValueError as e:
            raise ValueError(f"model.attention_backend={mcfg.attention_backend!r}: {e}") from None
    if compile_model and not hasattr(torch, "compile"):
        raise ValueError("--compile needs PyTorch >= 2.0")


def check_steps(resume: ResumeState, tcfg: TrainConfig, out: str) -> None:
    step = resume.step
    if tcfg.max_steps == step:
        raise NothingToDo(f"the run in {out} is already at step {step} of train.max_steps={step}; nothing to do "
                           f"(pass --max-steps N with N > {step} to train further)")
    if tcfg.max_steps < step:
        raise ValueError(f"--max-steps {tcfg.max_steps} is below step {step}, where the run in {out} is; nothing "
                         f"was changed (pass --max-steps N with N > {step} to train further)")


def _restore_sampler(sampler, resume: ResumeState, data_spec: str, allow_data_change: bool) -> List[str]:
    """Load the checkpoint's sampler state; returns warnings about changed settings."""
    diffs = sampler.state_differences(resume.data_state)
    if "data_size" in diffs and not allow_data_change:
        saved, now = diffs["data_size"]
        raise ValueError(f"the training data changed since the checkpoint: the train split of {data_spec} has "
                         f"{now:,} bytes now and had {saved:,}, so the run cannot draw the batches it would have "
                         "drawn; pass --allow-data-change to resume on the changed data anyway")
    notes = [f"{_SAMPLER_SETTINGS.get(k, 'the train split size')} changed from {a!r} to {b!r} since the "
             "checkpoint; the run continues from the saved sampler position with the new value, so its loss "
             "curve will differ from an uninterrupted run" for k, (a, b) in diffs.items()]
    sampler.load_state_dict(resume.data_state, strict=False)
    return notes


def open_data(spec: str, tcfg: TrainConfig, cache_dir: Optional[str], verbose: bool = True) -> TrainData:
    """The training data of ``spec``: a corpus with its window sampler, or the passkey task."""
    if spec == "passkey" and tcfg.pack_documents:
        raise ValueError("train.pack_documents=true packs the documents of a corpus; the passkey task has none "
                         "(set train.pack_documents=false)")
    if spec == "passkey":
        task = PasskeyTask(tcfg.seq_len, tcfg.passkey_distance or None, key_digits=tcfg.passkey_digits,
                           seed=tcfg.seed, batch_size=tcfg.batch_size, answer_weight=tcfg.passkey_answer_weight,
                           curriculum_steps=tcfg.passkey_curriculum_steps)
        return TrainData(kind="passkey", sampler=task, task=task, loss_weights=task.loss_weights(),
                         description=f"passkey task: seq_len {tcfg.seq_len}, distance "
                               f"{tcfg.passkey_distance or f'random in [{task.min_distance}, {task.max_distance}]'}, "
                               f"{tcfg.passkey_digits}-digit keys, answer weight {tcfg.passkey_answer_weight:g}"
                               + (f", curriculum over {tcfg.passkey_curriculum_steps} steps"
                                  if tcfg.passkey_curriculum_steps else ""))
    # The trainer prints the corpus description itself; the data module would repeat it on a first build.
    corpus = open_corpus(spec, cache_dir=cache_dir, verbose=False)
    if corpus.valid.size < tcfg.seq_len + 1:
        raise ValueError(f"the valid split of {spec!r} has {corpus.valid.size:,} bytes, fewer than train.seq_len + 1 "
                         f"= {tcfg.seq_len + 1}; use a smaller train.seq_len or more data")
    if tcfg.pack_documents:
        starts = document_starts(corpus.train, corpus.name)
        sampler = DocumentSampler(corpus.train, starts, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed)
        return TrainData(kind="corpus", sampler=sampler, corpus=corpus,
                         description=f"{corpus.description}; packed as {sampler.num_documents:,} whole documents "
                                     "(no attention across a document boundary)")
    sampler = RandomWindowSampler(corpus.train, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed)
    return TrainData(kind="corpus", sampler=sampler, corpus=corpus, description=corpus.description)
