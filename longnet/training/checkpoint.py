"""Checkpoints of ``longnet train``: written atomically and durably, checked when read.

A run folder looks like::

    OUT/
      latest                      -> text: "checkpoints/step_00000300" (replaced atomically)
      checkpoints/step_00000300/  one complete checkpoint:
        model.safetensors         weights (tied weights stored once)
        config.json               {"model": LongNetConfig, "train": TrainConfig, "data": spec, "step": n, ...}
        trainer_state.pt          optimizer, scheduler, grad scaler and RNG states (loads with weights_only=True)
        data_state.json           the data sampler's state_dict()
      checkpoints/step_00000400/  a DCP checkpoint (FSDP runs, or --checkpoint-format dcp):
        dcp/                      torch.distributed.checkpoint files: {"model": weights, "optim": AdamW
                                  state}, each rank's shards; DCP reshards them on load to any world size
        config.json, trainer_state.pt (no optimizer: it is in dcp/), data_state.json   as above
      log.csv, loss_curve.png     (written by the trainer; tensorboard/ too when installed)

The data sampler draws the global batch on every rank (:mod:`longnet.distributed.training`),
so its state is one small JSON written by rank 0 and needs no resharding: any world size
resumes from it at the same batch.

Writing. A checkpoint folder is first written completely under a temporary name
(``checkpoints/.tmp-step_*``), every file fsynced, then renamed into place and the folder
fsynced, so a crash or Ctrl-C never leaves a half-written checkpoint under a ``step_*``
name; ``latest`` is updated only after that. Temporary folders left by a process that died
while saving are removed by the next save (and named by the loaders' errors until then).

A DCP checkpoint is written by every rank into the same temporary folder
(``checkpoints/.tmp-step_*-dcp``, on a filesystem all ranks share); rank 0 adds the small
files and renames it into place only after every rank's shards and DCP's ``.metadata`` are
written, so the same atomicity holds. ``longnet eval``/``generate`` and one-process resumes
read it directly (:func:`load_weights`); :func:`export_safetensors` writes the sharing format.

Reading. Every file is checked: a damaged or contradictory file raises
:class:`CheckpointError`, one line that names the file. :func:`load_resume_state` tries the
run's checkpoints newest first and falls back to the newest complete one.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from ..checks import check_int, one_line
from ..config import LongNetConfig, TrainConfig
from ..fileio import atomic_path, atomic_write_json, atomic_write_text, fsync_path, read_json, replace_durably
from .data import check_sampler_state

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "load_weights", "resolve_checkpoint",
           "load_trainer_state", "load_resume_state", "ResumeState", "update_metrics", "checkpoint_dir",
           "checkpoint_steps", "holds_checkpoints",
           "rng_state", "set_rng_state", "CheckpointError", "FILES", "DCP_FILES", "save_dcp_checkpoint",
           "load_dcp_state", "load_optimizer_state", "export_safetensors", "is_dcp"]

FORMAT = "longnet-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
FILES = ("model.safetensors", "config.json", "trainer_state.pt", "data_state.json")
DCP_FILES = ("dcp/.metadata", "config.json", "trainer_state.pt", "data_state.json")
_TMP_PREFIX, _OLD_PREFIX = ".tmp-step_", ".old-step_"
_TRAINER_KEYS = ("optimizer", "scheduler", "rng", "step")


class CheckpointError(ValueError):
    """A path that is not a complete, readable longnet checkpoint (the message names the file)."""


def checkpoint_dir(run_dir: str, step: int) -> str:
    """Where the checkpoint of ``step`` lives in ``run_dir``."""
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def rng_state() -> Dict[str, Any]:
    """Python and torch (CPU and every CUDA device) RNG states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


# ----------------------------------------------------------------------------- writing


def save_checkpoint(run_dir: str, *, model: torch.nn.Module, train_config: TrainConfig, data_spec: str,
                    step: int, optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None,
                    scaler=None, rng: Optional[Dict[str, Any]] = None, data_state: Optional[Dict] = None,
                    metrics: Optional[Dict[str, Any]] = None, keep: int = 2) -> str:
    """Write ``run_dir/checkpoints/step_<step>`` atomically and durably, point ``latest`` at it,
    prune old ones (keeping ``keep`` at or below ``step``). Returns the path.

    ``rng`` and ``data_state`` default to the current RNG state and nothing; pass the
    snapshot taken at the end of ``step`` when saving from an interrupt.
    """
    ckpt_root = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    _recover_stale(ckpt_root)
    final = checkpoint_dir(run_dir, step)
    tmp = tempfile.mkdtemp(dir=ckpt_root, prefix=f"{_TMP_PREFIX}{step:08d}-")
    try:
        _st_save_model(_unwrap(model), os.path.join(tmp, "model.safetensors"), metadata={"format": FORMAT})
        fsync_path(os.path.join(tmp, "model.safetensors"))
        meta = _meta(model, train_config, data_spec, step, metrics)
        small = _trainer_state(optimizer.state_dict() if optimizer is not None else None, scheduler, scaler, rng,
                               step)
        _write_small_files(tmp, meta, small, data_state)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(run_dir, ckpt_root, final, keep, step)
    return final


def _meta(model, train_config: TrainConfig, data_spec: str, step: int, metrics) -> Dict[str, Any]:
    """config.json of a checkpoint."""
    return {"format": FORMAT, "version": VERSION, "step": int(step), "data": data_spec,
            "model": _unwrap(model).config.to_dict(), "train": train_config.to_dict(), "metrics": metrics or {}}


def _trainer_state(optimizer_state, scheduler, scaler, rng, step: int) -> Dict[str, Any]:
    """trainer_state.pt of a checkpoint (the optimizer is None when DCP holds it)."""
    return {"optimizer": optimizer_state, "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "rng": rng if rng is not None else rng_state(), "step": int(step)}


def _write_small_files(tmp: str, meta: Dict[str, Any], small: Dict[str, Any], data_state) -> None:
    """config.json, trainer_state.pt and data_state.json into ``tmp``, durably, then ``tmp`` itself."""
    atomic_write_json(os.path.join(tmp, "config.json"), meta)
    torch.save(small, os.path.join(tmp, "trainer_state.pt"))
    fsync_path(os.path.join(tmp, "trainer_state.pt"))
    atomic_write_json(os.path.join(tmp, "data_state.json"), data_state)
    os.chmod(tmp, 0o755)
    fsync_path(tmp)


def _publish(run_dir: str, ckpt_root: str, final: str, keep: int, step: int) -> None:
    """Point ``latest`` at a checkpoint now in place, and prune the old ones."""
    atomic_write_text(os.path.join(run_dir, "latest"), f"checkpoints/{os.path.basename(final)}\n")
    _prune(ckpt_root, keep, step)


def _move_into_place(tmp: str, final: str) -> None:
    if not os.path.exists(final):
        replace_durably(tmp, final)
        return
    # Same step saved again (e.g. a signal right after a periodic save): swap it out. A crash
    # between the two renames leaves the old copy in .old-*, which _recover_stale puts back.
    name = os.path.basename(final)
    old = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=f"{_OLD_PREFIX}{name[5:]}-")
    replace_durably(final, os.path.join(old, name))
    replace_durably(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _recover_stale(ckpt_root: str) -> None:
    """Remove what a process that died while saving left behind; put back a swapped-out checkpoint."""
    for name in _stale_saves(ckpt_root):
        path = os.path.join(ckpt_root, name)
        if name.startswith(_OLD_PREFIX):
            for inner in os.listdir(path):
                target = os.path.join(ckpt_root, inner)
                if _STEP_DIR.match(inner) and not os.path.exists(target) and _is_complete(os.path.join(path, inner)):
                    replace_durably(os.path.join(path, inner), target)
        shutil.rmtree(path, ignore_errors=True)


def _stale_saves(ckpt_root: str) -> List[str]:
    if not os.path.isdir(ckpt_root):
        return []
    return sorted(n for n in os.listdir(ckpt_root) if n.startswith((_TMP_PREFIX, _OLD_PREFIX))
                  and os.path.isdir(os.path.join(ckpt_root, n)))


def _is_complete(path: str) -> bool:
    return any(all(os.path.isfile(os.path.join(path, f)) for f in files) for files in (FILES, DCP_FILES))


def is_dcp(ckpt: str) -> bool:
    """Whether the checkpoint folder ``ckpt`` holds DCP files (else model.safetensors)."""
    return os.path.isfile(os.path.join(ckpt, "dcp", ".metadata"))


def _step_dirs(ckpt_root: str, complete: bool = True) -> List[Tuple[int, str]]:
    """(step, name) of the ``step_*`` folders (only complete ones by default), oldest first."""
    out = []
    if os.path.isdir(ckpt_root):
        for name in os.listdir(ckpt_root):
            m = _STEP_DIR.match(name)
            if m and (not complete or _is_complete(os.path.join(ckpt_root, name))):
                out.append((int(m.group(1)), name))
    return sorted(out)


def checkpoint_steps(run_dir: str) -> List[int]:
    """Steps of the complete checkpoint folders of ``run_dir``, oldest first."""
    return [s for s, _ in _step_dirs(os.path.join(run_dir, "checkpoints"))]


def holds_checkpoints(run_dir: str) -> bool:
    """Whether ``run_dir`` has a checkpoint folder, complete or not (it is then a run folder)."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    return bool(_step_dirs(ckpt_root, complete=False) or _stale_saves(ckpt_root))


def _prune(ckpt_root: str, keep: int, step: int) -> None:
    # Checkpoints past ``step`` exist only when a resume fell back past damaged ones; they are
    # replaced when the run reaches their step, never deleted here.
    dirs = [name for s, name in _step_dirs(ckpt_root) if s <= step]
    for name in dirs[:max(0, len(dirs) - keep)]:
        shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)


def update_metrics(ckpt: str, metrics: Dict[str, Any]) -> None:
    """Record ``metrics`` in the checkpoint's config.json (atomically)."""
    path = os.path.join(ckpt, "config.json")
    meta = _read_json(path)
    meta["metrics"] = dict(metrics)
    atomic_write_json(path, meta)


# ----------------------------------------------------------------------------- reading


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder for ``path``: a checkpoint folder, or a run folder (its latest)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint path must be a string, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; pass the --out folder of a "
                              "`longnet train` run or one of its checkpoints/step_* folders")
    if os.path.isfile(os.path.join(path, "config.json")) and (
            os.path.isfile(os.path.join(path, "model.safetensors")) or is_dcp(path)):
        return path
    target = _latest_target(path)
    if target is not None and _is_complete(target):
        return target
    found = _step_dirs(os.path.join(path, "checkpoints"))
    if found:
        return os.path.join(path, "checkpoints", found[-1][1])
    raise CheckpointError(_no_checkpoint_message(path))


def _latest_target(run_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(run_dir, "latest"), encoding="utf-8") as f:
            return os.path.join(run_dir, f.read().strip())
    except (OSError, UnicodeDecodeError):
        return None


def _no_checkpoint_message(path: str) -> str:
    msg = (f"no checkpoint in {path!r}: expected model.safetensors + config.json there, or a run folder "
           "with checkpoints/step_*/ (written by `longnet train --out DIR`)")
    stale = _stale_saves(os.path.join(path, "checkpoints"))
    if stale:
        msg += (f"; {os.path.join(path, 'checkpoints', stale[0])} is an incomplete save (the process died while "
                "writing it): start the run again without --resume, which removes it")
    return msg


def _read_json(path: str):
    try:
        return read_json(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _read_config(ckpt: str) -> Dict[str, Any]:
    path = os.path.join(ckpt, "config.json")
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is damaged: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a longnet checkpoint (config.json format={meta.get('format')!r})")
    if "step" not in meta:
        raise CheckpointError(f"{path} is damaged: it has no 'step'")
    try:
        step = check_int("'step'", meta["step"], minimum=0)
    except ValueError as e:
        raise CheckpointError(f"{path} is damaged: {e}") from None
    try:
        mcfg, tcfg = LongNetConfig.from_dict(meta.get("model")), TrainConfig.from_dict(meta.get("train"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged: {one_line(e)}") from None
    return {"dir": ckpt, "step": step, "data": meta.get("data"), "model_config": mcfg, "train_config": tcfg,
            "metrics": meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}}


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Metadata of the checkpoint at ``path``: dict with ``dir``, ``step``, ``data``,
    ``model_config`` (LongNetConfig), ``train_config`` (TrainConfig), ``metrics``."""
    return _read_config(resolve_checkpoint(path))


def load_weights(model: torch.nn.Module, ckpt: str, *, device="cpu") -> None:
    """Load ``ckpt``'s weights (model.safetensors, or the model part of its DCP files) into
    ``model`` (built from its config.json), checked."""
    if is_dcp(ckpt):
        _load_dcp_weights(model, ckpt)
        model.to(device)
        return
    path = os.path.join(ckpt, "model.safetensors")
    expected = model.state_dict()
    try:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                if name in expected and tuple(expected[name].shape) != shape:
                    raise CheckpointError(
                        f"{os.path.join(ckpt, 'config.json')} contradicts {path}: {name} has shape {shape} in "
                        f"the weights but {tuple(expected[name].shape)} for the configured model")
        _st_load_model(model, path, strict=True, device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path} is damaged or does not match config.json: {one_line(e)}") from None
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{path} is damaged: {name} holds non-finite values")


def load_model(path: str, *, map_location="cpu"):
    """A :class:`longnet.model.LongNetLM` with the weights of the checkpoint at ``path``, in eval mode."""
    from ..model import LongNetLM
    info = load_checkpoint(path)
    model = LongNetLM(info["model_config"])
    load_weights(model, info["dir"], device=map_location)
    return model.to(map_location).eval()


def _read_trainer_state(ckpt: str, step: int, n_params: Optional[int] = None) -> Dict[str, Any]:
    path = os.path.join(ckpt, "trainer_state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # noqa: BLE001  (torch.load raises many types on damaged files)
        raise CheckpointError(f"{path} is damaged: torch.load cannot read it ({type(e).__name__}: "
                              f"{one_line(e, 120)})") from None
    if not isinstance(state, dict) or any(k not in state for k in _TRAINER_KEYS):
        raise CheckpointError(f"{path} is damaged: expected a dict with {', '.join(_TRAINER_KEYS)}")
    if state["step"] != step:
        raise CheckpointError(f"{path} is for step {state['step']!r}, but config.json says step {step}")
    rng = state["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or "python" not in rng:
        raise CheckpointError(f"{path} is damaged: its 'rng' entry is not an RNG state")
    opt = state["optimizer"]
    if n_params is not None and opt is not None:
        groups = opt.get("param_groups") if isinstance(opt, dict) else None
        count = sum(len(g.get("params", ())) for g in groups) if isinstance(groups, list) else -1
        if count != n_params:
            raise CheckpointError(f"{path} does not match the model: its optimizer state covers {count} "
                                  f"parameters, the model has {n_params}")
    return state


def _read_data_state(ckpt: str) -> Dict[str, Any]:
    path = os.path.join(ckpt, "data_state.json")
    state = _read_json(path)
    try:
        check_sampler_state(state)
    except ValueError as e:
        raise CheckpointError(f"{path} is damaged: {e}") from None
    return state


def load_trainer_state(path: str, *, map_location="cpu") -> Tuple[Dict[str, Any], Optional[Dict]]:
    """(trainer state dict, data sampler state) of the checkpoint at ``path``."""
    ckpt = resolve_checkpoint(path)
    state = _read_trainer_state(ckpt, _read_config(ckpt)["step"])
    return state, _read_data_state(ckpt)


# ----------------------------------------------------------------------------- resuming


@dataclass
class ResumeState:
    """A checkpoint read whole and checked: what ``longnet train --resume`` continues from.

    ``model`` is a CPU :class:`longnet.model.LongNetLM` holding the weights; ``skipped``
    holds one line per newer checkpoint that was damaged and passed over.
    """

    dir: str
    step: int
    data: Optional[str]
    model_config: LongNetConfig
    train_config: TrainConfig
    metrics: Dict[str, Any]
    model: torch.nn.Module
    trainer_state: Dict[str, Any]
    data_state: Dict[str, Any]
    skipped: List[str] = field(default_factory=list)
    # A DCP checkpoint: ``model`` is freshly initialised and the trainer loads weights and
    # optimizer state from here after sharding (:func:`load_dcp_state`), on every rank.
    dcp_dir: Optional[str] = None


def _candidates(run_dir: str) -> List[str]:
    """Checkpoint folders of a run, newest step first (``latest``'s target first among equals)."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    found = [os.path.join(ckpt_root, name) for _, name in reversed(_step_dirs(ckpt_root, complete=False))]
    target = _latest_target(run_dir)
    if target is not None and os.path.isdir(target) and os.path.normpath(target) not in map(os.path.normpath, found):
        found.insert(0, target)
    return found


def _load_whole(ckpt: str) -> ResumeState:
    from ..model import LongNetLM
    dcp_dir = ckpt if os.path.isdir(os.path.join(ckpt, "dcp")) else None
    missing = [f for f in (DCP_FILES if dcp_dir else FILES) if not os.path.isfile(os.path.join(ckpt, f))]
    if missing:
        raise CheckpointError(f"{ckpt} is incomplete: {', '.join(missing)} missing")
    info = _read_config(ckpt)
    model = LongNetLM(info["model_config"])
    if dcp_dir is not None:
        state = _read_trainer_state(ckpt, info["step"])
        return ResumeState(ckpt, info["step"], info["data"], info["model_config"], info["train_config"],
                           info["metrics"], model, state, _read_data_state(ckpt), dcp_dir=dcp_dir)
    load_weights(model, ckpt)
    n_params = len({id(p) for p in model.parameters() if p.requires_grad})
    state = _read_trainer_state(ckpt, info["step"], n_params)
    return ResumeState(ckpt, info["step"], info["data"], info["model_config"], info["train_config"],
                       info["metrics"], model, state, _read_data_state(ckpt))


def load_resume_state(run_dir: str) -> ResumeState:
    """The newest checkpoint of ``run_dir`` whose files are all intact, read whole.

    Newer damaged checkpoints are passed over (listed in ``skipped``). Raises
    :class:`CheckpointError` naming the damaged file when none is intact.
    """
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"--out {run_dir!r} does not exist; --resume continues the run in an existing "
                              "--out folder")
    errors: List[str] = []
    for ckpt in _candidates(run_dir):
        try:
            state = _load_whole(ckpt)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        state.skipped = errors
        return state
    if not errors:
        raise CheckpointError(_no_checkpoint_message(run_dir))
    more = f" (and {len(errors) - 1} older checkpoint(s) are damaged too)" if len(errors) > 1 else ""
    raise CheckpointError(errors[0] + more)


# ----------------------------------------------------------------------------- DCP


def _no_dist() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it "assumes" one process when no group exists; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class PendingSave:
    """A DCP save in flight (``async_save``) or done; :meth:`finish` completes it: waits for
    the shards, then rank 0 writes the small files and moves the folder into place."""

    def __init__(self, future, finish_fn):
        self._future, self._finish_fn, self._path = future, finish_fn, None

    def finish(self) -> str:
        """Complete the save (once); returns the checkpoint folder."""
        if self._future is not None:
            self._future.result()
            self._future = None
        if self._finish_fn is not None:
            self._path, self._finish_fn = self._finish_fn(), None
        return self._path


def save_dcp_checkpoint(run_dir: str, *, ctx, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        train_config: TrainConfig, data_spec: str, step: int, scheduler=None, scaler=None,
                        rng: Optional[Dict[str, Any]] = None, data_state: Optional[Dict] = None,
                        metrics: Optional[Dict[str, Any]] = None, keep: int = 2,
                        async_group=None) -> PendingSave:
    """Every rank writes its shards of ``{"model", "optim"}`` (``get_state_dict``) with DCP.

    ``ctx`` (a :class:`~longnet.training.context.TrainContext`) gives ``is_main`` and
    ``barrier``. With ``async_group`` (a gloo group) the shards are written by
    ``dcp.async_save`` in the background; the checkpoint becomes ``latest`` only when
    :meth:`PendingSave.finish` has run, so an interrupted save never does.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    ckpt_root = os.path.join(run_dir, "checkpoints")
    tmp = os.path.join(ckpt_root, f"{_TMP_PREFIX}{step:08d}-dcp")
    if ctx.is_main:
        os.makedirs(ckpt_root, exist_ok=True)
        _recover_stale(ckpt_root)
        os.makedirs(tmp)
    ctx.barrier()
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    target = os.path.join(tmp, "dcp")
    meta = _meta(model, train_config, data_spec, step, metrics)
    small = _trainer_state(None, scheduler, scaler, rng, step)

    def finish() -> str:
        final = checkpoint_dir(run_dir, step)
        if not ctx.is_main:
            return final
        try:
            for name in os.listdir(target):
                fsync_path(os.path.join(target, name))
            fsync_path(target)
            _write_small_files(tmp, meta, small, data_state)
            _move_into_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish(run_dir, ckpt_root, final, keep, step)
        return final

    if async_group is not None:
        return PendingSave(dcp.async_save(state, checkpoint_id=target, process_group=async_group), finish)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=target, no_dist=_no_dist())
    return PendingSave(None, finish)


def load_dcp_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], ckpt: str) -> None:
    """Load ``ckpt``'s DCP weights (and AdamW state, with ``optimizer``) into ``model`` as it is
    sharded now: DCP reshards from the world size that saved it. Collective when a process
    group is initialised (every rank calls it), plain reads in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
    path = os.path.join(ckpt, "dcp")
    try:
        if optimizer is None:
            state = {"model": get_model_state_dict(model)}
        else:
            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optim": osd}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path, no_dist=_no_dist())
    except (RuntimeError, ValueError, KeyError, OSError, CheckpointException) as e:
        raise CheckpointError(f"{path} is damaged or does not match config.json: {one_line(e, 300)}") from None
    if optimizer is None:
        return
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _load_dcp_weights(model: torch.nn.Module, ckpt: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    path = os.path.join(ckpt, "dcp")
    state = {"model": model.state_dict()}  # views of the parameters: DCP loads into them in place
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path, no_dist=True)
    except (RuntimeError, ValueError, KeyError, OSError, CheckpointException) as e:
        raise CheckpointError(f"{path} is damaged or does not match config.json: {one_line(e, 300)}") from None
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{path} is damaged: {name} holds non-finite values")


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Load an unsharded optimizer's ``state_dict()`` (from a safetensors checkpoint) into
    ``optimizer``; when ``model``'s parameters are FSDP shards (DTensors) the full state is
    keyed by parameter name and each rank keeps its shard (``set_optimizer_state_dict``)."""
    from torch.distributed.tensor import DTensor
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    fqn = {"state": {order[i]: v for i, v in state["state"].items()},
           "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, fqn, options=StateDictOptions(full_state_dict=True))


def export_safetensors(path: str, out: str) -> str:
    """Write the weights of the checkpoint at ``path`` (DCP or not) as one safetensors file
    ``out`` (tied weights once), the format to share; returns ``out``."""
    model = load_model(path)
    with atomic_path(out) as tmp:
        _st_save_model(model, tmp, metadata={"format": FORMAT})
    return out
