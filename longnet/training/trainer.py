"""The training loop of ``longnet train`` (:func:`train`); the command itself, its flags and
its stopping rules are described in :mod:`longnet.commands.train`.

:func:`train` takes the checked :class:`longnet.training.setup.TrainSetup` fields and a
:class:`longnet.training.context.TrainContext` (one process, or a device mesh through
:class:`longnet.distributed.training.DistContext`), and calls its methods unconditionally,
so the loop never branches on "distributed or not".
"""

from __future__ import annotations

import functools
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checks import one_line
from ..config import (
    LongNetConfig,
    TrainConfig,
    lr_factor,
)
from ..model import LongNetLM
from .checkpoint import (
    CheckpointError,
    ResumeState,
    checkpoint_dir,
    load_dcp_state,
    load_optimizer_state,
    save_dcp_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    update_metrics,
)
from .context import TrainContext
from .setup import TrainData, warn
from .signals import StopFlag
from .optim import decay_groups
from .evaluate import evaluate_lm, evaluate_passkey, next_token_loss, weighted_loss
from .runfolder import NoLog, RunLog, plot_loss_curve
from .runlock import FolderLock

__all__ = ["train"]

LN2 = math.log(2.0)
def _after_step(step: int) -> None:
    """Called after every completed optimiser step (a seam for tests); does nothing."""


def _decode(tokens) -> str:
    return bytes(int(t) for t in tokens if 0 <= int(t) < 256).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class _Snapshot:
    """The state a checkpoint holds besides weights and optimizer, as of the end of ``step``."""

    step: int
    rng: Dict[str, Any]
    data: TrainData


def train(*, model_config: LongNetConfig, train_config: TrainConfig, data_spec: str, data: TrainData,
          out_dir: str, device: torch.device, resume: Optional[ResumeState] = None,
          compile_model: bool = False, progress: bool = True, preset_name: str = "",
          dist_ctx: Optional[TrainContext] = None) -> int:
    """The training loop. Returns 0 when done; when stopped by a signal, 128 + its number
    (Ctrl-C: 130) after saving a checkpoint.

    ``dist_ctx`` (a :class:`longnet.distributed.training.DistContext`) runs it on a device
    mesh: every rank calls ``train`` with the same arguments; rank 0 alone prints, logs
    and writes checkpoints. ``resume``: the checked checkpoint to continue from.
    """
    ctx = dist_ctx if dist_ctx is not None else TrainContext(device)
    # One owner per run folder (re-entrant: `longnet train` already holds it since its checks).
    lock = FolderLock(out_dir).acquire() if ctx.is_main else None
    try:
        trainer = _Trainer(model_config, train_config, data_spec, data, out_dir, ctx, resume=resume,
                           compile_model=compile_model, progress=progress, preset_name=preset_name)
        with StopFlag(debounce_s=ctx.debounce_s, quiet=not ctx.is_main) as stop:
            return trainer.run(stop)
    finally:
        if lock is not None:
            lock.release()


class _Trainer:
    """One run: the model, optimizer and data of ``train``, and the loop over steps."""

    def __init__(self, mcfg: LongNetConfig, tcfg: TrainConfig, data_spec: str, data: TrainData, out_dir: str,
                 ctx: TrainContext, *, resume: Optional[ResumeState], compile_model: bool, progress: bool,
                 preset_name: str):
        self.mcfg, self.tcfg, self.data_spec, self.data, self.out_dir, self.ctx = mcfg, tcfg, data_spec, data, \
            out_dir, ctx
        self.device, self.sampler, self.progress = ctx.device, data.sampler, progress
        self.is_passkey = data.kind == "passkey"
        self.title = (f"{preset_name}: {mcfg.n_layers}L d={mcfg.d_model} H={mcfg.n_heads} "
                      f"{mcfg.pattern}, "
                      f"{data_spec}")
        if tcfg.num_threads:
            torch.set_num_threads(tcfg.num_threads)
        if tcfg.pack_documents and ctx.world_size > 1:
            raise ValueError("train.pack_documents=true runs in one process: its batches carry cu_seqlens over "
                             "the whole batch, which data and sequence sharding do not split")
        self._build(resume)
        self.weights = self._shard_weights(data.loss_weights)
        self.fwd = torch.compile(self.train_module) if compile_model else self.train_module
        # Only now is anything written: every check and every read of the checkpoint has passed.
        if ctx.is_main:
            os.makedirs(out_dir, exist_ok=True)
        self.log = RunLog(out_dir, resume.step if resume is not None else None, warn) if ctx.is_main else NoLog()
        self.tok_rate: Optional[float] = None

    def _build(self, resume: Optional[ResumeState]) -> None:
        tcfg = self.tcfg
        torch.manual_seed(tcfg.seed)  # the same initial weights on every rank
        random.seed(tcfg.seed)
        self.model = (resume.model if resume is not None else LongNetLM(self.mcfg)).to(self.device)
        # Under DDP self.model stays the unwrapped module; FSDP shards it in place, so the
        # optimizer is built after this, on the shards.
        self.train_module = self.ctx.prepare(self.model)
        self.pending = None  # a DCP save still being written (async_save)
        self.optimizer = torch.optim.AdamW(decay_groups(self.model, tcfg.weight_decay), lr=tcfg.lr,
                                           betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, tcfg.warmup_steps, tcfg.max_steps, tcfg.lr_power, tcfg.min_lr_ratio))
        # fp16 needs loss scaling; for other precisions the scaler does nothing.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tcfg.precision == "fp16")
        step = 0
        if resume is not None:
            self._restore(resume)
            step = resume.step
        self.snap: Optional[_Snapshot] = _Snapshot(step, rng_state(), self.sampler.state_dict())
        self.saved: Optional[_Snapshot] = None  # the snapshot last written as a checkpoint

    def _restore(self, resume: ResumeState) -> None:
        tcfg, state = self.tcfg, resume.trainer_state
        try:
            if resume.dcp_dir is not None:
                load_dcp_state(self.model, self.optimizer, resume.dcp_dir)  # resharded to this mesh
            else:
                load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{os.path.join(resume.dir, 'trainer_state.pt')} does not fit the model: "
                                  f"{one_line(e)}") from None
        # The lambda follows the (possibly changed) max_steps and lr; LambdaLR keeps its step count.
        factor = lr_factor(self.scheduler.last_epoch, tcfg.warmup_steps, tcfg.max_steps, tcfg.lr_power,
                           tcfg.min_lr_ratio)
        self.scheduler.base_lrs = [tcfg.lr] * len(self.optimizer.param_groups)
        for g in self.optimizer.param_groups:
            g["initial_lr"] = tcfg.lr
            g["lr"] = tcfg.lr * factor
        set_rng_state(state["rng"])

    # ------------------------------------------------------------------ output

    def _say(self, msg: str) -> None:
        if self.ctx.is_main:
            tqdm.write(msg) if self.progress else print(msg)

    def _announce(self) -> None:
        mcfg, tcfg, ctx = self.mcfg, self.tcfg, self.ctx
        lines = [f"[longnet] data: {self.data.description}",
                 f"[longnet] model: {self.model.num_parameters():,} parameters, {mcfg.n_layers} layers, d_model "
                 f"{mcfg.d_model}, {mcfg.n_heads} heads, {mcfg.pattern}; device "
                 f"{self.device}, {torch.get_num_threads()} CPU threads"]
        mesh = ctx.describe(tcfg.batch_size, tcfg.seq_len)
        lines += [f"[longnet] {mesh}"] if mesh else []
        lines.append(f"[longnet] training {tcfg.max_steps} steps of {tcfg.tokens_per_step:,} tokens (batch "
                     f"{tcfg.batch_size} x seq_len {tcfg.seq_len} x accum {tcfg.grad_accum}), peak lr {tcfg.lr:g}, "
                     f"precision {tcfg.precision}; run folder {self.out_dir}"
                     + (f"; resuming at step {self.snap.step}" if self.snap.step else ""))
        if ctx.is_main:
            print("\n".join(lines))

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def _close_log(self) -> Optional[str]:
        self.log.close()
        return plot_loss_curve(self.log.rows, os.path.join(self.out_dir, "loss_curve.png"), self.title)

    # ------------------------------------------------------------------ the run

    def run(self, stop: StopFlag) -> int:
        self._announce()
        self.t_start, self.elapsed_before = time.perf_counter(), self.log.elapsed()
        self.bar = tqdm(total=self.tcfg.max_steps, initial=self.snap.step, desc="train", unit="step",
                        dynamic_ncols=True, disable=not self.progress or not self.ctx.is_main, mininterval=0.5)
        try:
            status = self._loop(stop)
            self.bar.close()
            if status != "stopped":
                self._save()  # before the final evaluation: from here on a signal loses nothing
                status = "stopped" if stop.agree(self.ctx.any_rank(*stop.votes())) else status
            if status == "stopped":
                return self._stopped(stop.exit_code)
            stop.abort_on_signal()
            return self._finish(status)
        except KeyboardInterrupt:
            self.bar.close()
            return self._interrupted(stop.exit_code)

    def _loop(self, stop: StopFlag) -> str:
        """Steps until done ("done"), the time limit ("time limit") or a stop request ("stopped")."""
        tcfg = self.tcfg
        while self.snap.step < tcfg.max_steps:
            self._train_step()
            step = self.snap.step
            _after_step(step)
            if tcfg.eval_interval and step % tcfg.eval_interval == 0 and step < tcfg.max_steps:
                self._log_eval(self._evaluate())
            if tcfg.save_interval and step % tcfg.save_interval == 0 and step < tcfg.max_steps:
                self._save(wait=False)
            time_up = bool(tcfg.time_limit_s) and time.perf_counter() - self.t_start >= tcfg.time_limit_s
            time_up, *votes = self.ctx.any_rank(time_up, *stop.votes())  # every rank decides alike
            if stop.agree(votes):
                return "stopped"
            if time_up and step < tcfg.max_steps:
                self._say(f"time limit of {tcfg.time_limit_s:g} s reached at step {step}")
                return "time limit"
        return "done"

    def _train_step(self) -> None:
        tcfg, ctx = self.tcfg, self.ctx
        t0 = time.perf_counter()
        ctx.seed_step(tcfg.seed, self.snap.step)
        loss_sum = 0.0
        for micro in range(tcfg.grad_accum):
            # A document sampler adds cu_seqlens (train.pack_documents): attention within each document.
            x, y, *cu = self.sampler.next_batch()
            x, y = ctx.shard_batch(x, y)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with ctx.accumulate(self.train_module, sync=micro == tcfg.grad_accum - 1):
                loss, plain = self._loss(x, y, cu[0].to(self.device) if cu else None)
                self.scaler.scale(loss / tcfg.grad_accum).backward()
            loss_sum += plain
        # Taken before the update, which changes neither the RNG nor the sampler.
        pending = _Snapshot(self.snap.step + 1, rng_state(), self.sampler.state_dict())
        # The mean over the mesh (every rank scores the same number of tokens).
        loss_val = ctx.all_reduce_sum([loss_sum])[0] / ctx.world_size / tcfg.grad_accum
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"loss is {loss_val} at step {pending.step}; lower train.lr "
                                     "or raise train.warmup_steps")
        lr = self.optimizer.param_groups[0]["lr"]
        gnorm = self._update(pending)
        self._record(loss_val, gnorm, lr, time.perf_counter() - t0)

    def _shard_weights(self, weights: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-position loss weights (seq_len,) as this process's part of a batch (B_local, N_local)."""
        if weights is None:
            return None
        full = weights.expand(self.tcfg.batch_size, -1)
        return self.ctx.shard_batch(full, full)[0].to(self.device)

    def _loss(self, x: torch.Tensor, y: torch.Tensor,
              cu_seqlens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, float]:
        """(loss to minimise, plain mean loss for the log) of a micro-batch x, y (B, N), packed into
        the sequences of ``cu_seqlens`` if given. With loss weights (the passkey task's, mean 1
        over a sequence) it minimises their weighted mean."""
        reduction = "mean" if self.weights is None else "none"
        fwd = self.fwd if cu_seqlens is None else functools.partial(self.fwd, cu_seqlens=cu_seqlens)
        loss, _ = next_token_loss(fwd, x, y, precision=self.tcfg.precision, reduction=reduction)
        if self.weights is None:
            return loss, float(loss.detach())
        per_token = loss.view_as(y)
        return weighted_loss(per_token, self.weights), float(per_token.detach().mean())

    def _update(self, pending: _Snapshot) -> float:
        """The optimiser update; ``self.snap`` is None while the weights are in flux."""
        self.snap = None  # an interrupt now saves nothing: the weights are neither step k nor k + 1
        self.scaler.unscale_(self.optimizer)
        clip = self.tcfg.grad_clip if self.tcfg.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.snap = pending  # one store: weights, step, RNG and sampler state agree again
        return float(gnorm)

    def _record(self, loss: float, gnorm: float, lr: float, seconds: float) -> None:
        step, tcfg = self.snap.step, self.tcfg
        rate = tcfg.tokens_per_step / seconds
        self.tok_rate = rate if self.tok_rate is None else 0.8 * self.tok_rate + 0.2 * rate
        self.log.write(step=step, split="train", loss=loss, bpb=loss / LN2, lr=lr, grad_norm=gnorm,
                       tokens_per_s=rate, elapsed_s=self._elapsed())
        self.bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{loss / LN2:.3f}", tok_s=f"{self.tok_rate:,.0f}",
                             refresh=False)
        self.bar.update(1)
        if not self.progress and (step % 10 == 0 or step == 1):
            self._say(f"step {step}/{tcfg.max_steps}: loss {loss:.4f}, bpb {loss / LN2:.4f}, lr {lr:.3g}, "
                      f"{rate:,.0f} tok/s")

    def _evaluate(self) -> Dict[str, float]:
        tcfg = self.tcfg
        if self.is_passkey:
            return evaluate_passkey(self.ctx.full_sequence(self.model), self.data.task, tcfg.eval_windows,
                                    batch_size=tcfg.eval_batch_size, seed=tcfg.seed + 1, device=self.device,
                                    precision=tcfg.precision)
        return evaluate_lm(self.model, self.data.corpus.valid, tcfg.seq_len, max_windows=tcfg.eval_windows,
                           batch_size=tcfg.eval_batch_size, precision=tcfg.precision, ctx=self.ctx)

    def _log_eval(self, res: Dict[str, float]) -> None:
        step = self.snap.step
        self.log.write(step=step, split="valid", loss=res["loss"], bpb=res["bpb"], elapsed_s=self._elapsed(),
                       accuracy=res.get("accuracy", ""))
        msg = f"step {step}: val loss {res['loss']:.4f}, val bpb {res['bpb']:.4f}"
        if self.is_passkey:
            msg += f", passkey accuracy {res['accuracy']:.3f} (digits {res['digit_accuracy']:.3f})"
        self._say(msg)

    def _save(self, collective: bool = True, wait: bool = True) -> str:
        """Checkpoint the last completed step (once). Every rank holds the same weights, optimizer
        and sampler state (the sampler draws the global batch everywhere), so rank 0's copy is
        the run's; the weights are the unwrapped model's, with nothing about the mesh. DCP
        checkpoints (FSDP) are written by every rank; ``wait=False`` lets an async one finish
        in the background (it becomes ``latest`` at the next save)."""
        snap = self.snap
        path = checkpoint_dir(self.out_dir, snap.step)
        if self.saved is snap:
            if wait:
                self._finish_pending()
            return path
        if collective:
            self.ctx.barrier()
        if self.ctx.checkpoint_format == "dcp":
            self._finish_pending()
            self.pending = save_dcp_checkpoint(
                self.out_dir, ctx=self.ctx, model=self.model, optimizer=self.optimizer, train_config=self.tcfg,
                data_spec=self.data_spec, step=snap.step, scheduler=self.scheduler, scaler=self.scaler,
                rng=snap.rng, data_state=snap.data, keep=self.tcfg.keep_checkpoints,
                async_group=None if wait else getattr(self.ctx, "async_group", None))
            if wait or getattr(self.ctx, "async_group", None) is None:
                self._finish_pending()  # a blocking save is complete now: make it latest
        elif self.ctx.is_main:
            save_checkpoint(self.out_dir, model=self.model, train_config=self.tcfg, data_spec=self.data_spec,
                            step=snap.step, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                            rng=snap.rng, data_state=snap.data, keep=self.tcfg.keep_checkpoints)
        self.saved = snap
        if collective:
            self.ctx.barrier()  # nobody reads a checkpoint rank 0 is still writing
        return path

    def _finish_pending(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.finish()

    def _stopped(self, code: int) -> int:
        path = self._save()
        if self.ctx.is_main:
            self._close_log()
            print(f"[longnet] stopped at step {self.snap.step}; checkpoint {path}. Continue with:\n"
                  f"  {self.ctx.resume_command(self.out_dir)}", file=sys.stderr)
        return code

    def _interrupted(self, code: int) -> int:
        # No collective here: other ranks may be anywhere (or gone). Rank 0's weights are
        # complete unless it was inside an optimiser update.
        if not self.ctx.is_main:
            return code
        if self.snap is None or self.ctx.shards_parameters:
            msg = (f"interrupted {'during an optimiser update' if self.snap is None else 'with sharded weights'}; "
                   f"no checkpoint written (the latest one stays in {self.out_dir})")
        else:
            path = self._save(collective=False)
            msg = (f"interrupted; saved step {self.snap.step} to {path}. Continue with:\n"
                   f"  {self.ctx.resume_command(self.out_dir)}")
        self._close_log()
        print(f"\n[longnet] {msg}", file=sys.stderr)
        return code

    def _finish(self, status: str) -> int:
        """Final evaluation (its metrics go into the saved checkpoint), loss curve, sample."""
        elapsed = self._elapsed()
        final = self._evaluate()
        self._log_eval(final)
        path = checkpoint_dir(self.out_dir, self.snap.step)
        metrics = {"val_loss": final["loss"], "val_bpb": final["bpb"], "elapsed_s": elapsed}
        if self.is_passkey:
            metrics["passkey_accuracy"] = final["accuracy"]
        solo = self.ctx.solo_model(self.model)  # collective under FSDP
        if self.ctx.is_main:
            update_metrics(path, metrics)
            png = self._close_log()
            print(f"[longnet] {status}: {self.snap.step} steps in {elapsed:.0f} s; final val bpb {final['bpb']:.4f} "
                  f"(loss {final['loss']:.4f} nats/byte)"
                  + (f", passkey accuracy {final['accuracy']:.3f}" if self.is_passkey else ""))
            print(f"[longnet] checkpoint: {path}")
            print(f"[longnet] log: {self.log.path}" + (f", loss curve: {png}" if png else ""))
            # Sampling is sequential decoding by one process: rank 0 runs it on the unwrapped
            # model with the single-device attention (the other ranks wait at the barrier).
            with self.ctx.single_device(solo):
                _sample_at_end(solo, self.data, self.tcfg, self.device, self.is_passkey)
        self.ctx.barrier()
        return 0


def _sample_at_end(model, data: TrainData, tcfg: TrainConfig, device: torch.device, is_passkey: bool) -> None:
    if tcfg.sample_tokens and not is_passkey:
        valid = data.corpus.valid
        prompt = torch.from_numpy(valid[:min(64, valid.size)].astype("int64"))
        gen = torch.Generator().manual_seed(tcfg.seed)
        out = model.generate(prompt.to(device), tcfg.sample_tokens, temperature=0.8, top_k=40,
                             generator=gen if device.type == "cpu" else None)
        text = _decode(out.tolist())
        print("[longnet] sample (prompt: the first 64 bytes of the validation split; temperature 0.8, top-k 40):")
        print("-" * 60)
        print(text)
        print("-" * 60)
    elif is_passkey:
        x, y, mask = data.task.batch(1, np.random.default_rng(tcfg.seed + 7))
        prompt = x[0, :int(mask[0].nonzero()[0]) + 1]
        out = model.generate(prompt.to(device), data.task.key_digits, temperature=0)
        print(f"[longnet] passkey example: expected {_decode(y[0][mask[0]].tolist())!r}, "
              f"model answered {_decode(out[prompt.numel():].tolist())!r}")
