"""Checkpoints of ``longnet train``: written atomically, loadable on any device.

A run folder looks like::

    OUT/
      latest                      -> text: "checkpoints/step_00000300" (replaced atomically)
      checkpoints/step_00000300/  one complete checkpoint:
        model.safetensors         weights (tied weights stored once)
        config.json               {"model": LongNetConfig, "train": TrainConfig, "data": spec, "step": n, ...}
        trainer_state.pt          optimizer, scheduler and RNG states (torch.save, loads with weights_only=True)
        data_state.json           the data sampler's state_dict()
      log.csv, loss_curve.png     (written by the trainer)

A checkpoint folder is first written completely under a temporary name inside
``checkpoints/`` and then renamed into place, so a crash or Ctrl-C never leaves a
half-written checkpoint under a ``step_*`` name; ``latest`` is updated only after that
(temporary file + ``os.replace``). Loaders accept the run folder (they follow ``latest``,
or take the highest complete ``step_*``) or a checkpoint folder itself.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from ..config import LongNetConfig, TrainConfig
from ..fileio import atomic_write_json, atomic_write_text

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "resolve_checkpoint", "rng_state",
           "set_rng_state", "atomic_write_text", "atomic_write_json", "CheckpointError"]

FORMAT = "longnet-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FILES = ("model.safetensors", "config.json", "trainer_state.pt", "data_state.json")


class CheckpointError(ValueError):
    """A path that is not a (complete) longnet checkpoint."""


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


def save_checkpoint(run_dir: str, *, model: torch.nn.Module, train_config: TrainConfig, data_spec: str,
                    step: int, optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None,
                    rng: Optional[Dict[str, Any]] = None, data_state: Optional[Dict] = None,
                    metrics: Optional[Dict[str, Any]] = None, keep: int = 2) -> str:
    """Write ``run_dir/checkpoints/step_<step>`` atomically, point ``latest`` at it, prune old ones.

    ``rng`` and ``data_state`` default to the current RNG state and nothing; pass the
    snapshot taken at the end of ``step`` when saving from an interrupt. Returns the path.
    """
    model = _unwrap(model)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step_{step:08d}"
    final = os.path.join(ckpt_root, name)
    tmp = tempfile.mkdtemp(dir=ckpt_root, prefix=f".tmp-{name}-")
    try:
        _st_save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "version": VERSION, "step": int(step), "data": data_spec,
                "model": model.config.to_dict(), "train": train_config.to_dict(),
                "metrics": metrics or {}}
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng if rng is not None else rng_state(), "step": int(step)},
                   os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "data_state.json"), "w", encoding="utf-8") as f:
            json.dump(data_state, f)
        os.chmod(tmp, 0o755)
        if os.path.exists(final):
            # Same step saved again (e.g. Ctrl-C right after a periodic save): swap it out.
            old = tempfile.mkdtemp(dir=ckpt_root, prefix=f".old-{name}-")
            os.replace(final, os.path.join(old, name))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(os.path.join(run_dir, "latest"), f"checkpoints/{name}\n")
    _prune(ckpt_root, keep, protect=name)
    return final


def _step_dirs(ckpt_root: str):
    out = []
    if os.path.isdir(ckpt_root):
        for name in os.listdir(ckpt_root):
            m = _STEP_DIR.match(name)
            if m and all(os.path.isfile(os.path.join(ckpt_root, name, f)) for f in _FILES):
                out.append((int(m.group(1)), name))
    return sorted(out)


def _prune(ckpt_root: str, keep: int, protect: str) -> None:
    dirs = [name for _, name in _step_dirs(ckpt_root)]
    for name in dirs[:max(0, len(dirs) - keep)]:
        if name != protect:
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder for ``path``: a checkpoint folder, or a run folder (its latest)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint path must be a string, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; pass the --out folder of a "
                              "`longnet train` run or one of its checkpoints/step_* folders")
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            target = os.path.join(path, f.read().strip())
        if os.path.isfile(os.path.join(target, "model.safetensors")):
            return target
    found = _step_dirs(os.path.join(path, "checkpoints"))
    if found:
        return os.path.join(path, "checkpoints", found[-1][1])
    raise CheckpointError(f"no checkpoint in {path!r}: expected model.safetensors + config.json there, or a "
                          "run folder with checkpoints/step_*/ (written by `longnet train --out DIR`)")


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Metadata of the checkpoint at ``path``: dict with ``dir``, ``step``, ``data``,
    ``model_config`` (LongNetConfig), ``train_config`` (TrainConfig), ``metrics``."""
    ckpt = resolve_checkpoint(path)
    try:
        with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {os.path.join(ckpt, 'config.json')}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a longnet checkpoint (config.json format={meta.get('format')!r})")
    return {"dir": ckpt, "step": int(meta["step"]), "data": meta.get("data"),
            "model_config": LongNetConfig.from_dict(meta["model"]),
            "train_config": TrainConfig.from_dict(meta["train"]), "metrics": meta.get("metrics", {})}


def load_model(path: str, *, map_location="cpu"):
    """A :class:`longnet.model.LongNetLM` with the weights of the checkpoint at ``path``, in eval mode."""
    from ..model import LongNetLM
    info = load_checkpoint(path)
    model = LongNetLM(info["model_config"])
    _st_load_model(model, os.path.join(info["dir"], "model.safetensors"), strict=True, device=str(map_location))
    return model.to(map_location).eval()


def load_trainer_state(path: str, *, map_location="cpu") -> Tuple[Dict[str, Any], Optional[Dict]]:
    """(trainer state dict, data sampler state) of the checkpoint at ``path``."""
    ckpt = resolve_checkpoint(path)
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location=map_location, weights_only=True)
    with open(os.path.join(ckpt, "data_state.json"), encoding="utf-8") as f:
        data_state = json.load(f)
    return state, data_state
