"""Device, precision and machine helpers shared by training, evaluation and benchmarks.

One rule each: which device ``--device`` names, which autocast dtype a precision means on a
device, and how a machine is named in reports.
"""

from __future__ import annotations

import contextlib
import os
import platform
from contextlib import nullcontext

import torch

__all__ = ["pick_device", "compute_dtype", "autocast_context", "check_precision", "machine_name", "memory_bytes"]


def pick_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; otherwise cpu, cuda or cuda:N that exists here."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The autocast dtype of ``precision`` on ``device``: "auto" is bf16 on CUDA and fp32 on CPU."""
    if precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return torch.float16 if precision == "fp16" else torch.float32


def autocast_context(device: torch.device, precision: str = "auto"):
    """Autocast to :func:`compute_dtype` (nothing for fp32)."""
    dtype = compute_dtype(device, precision)
    return nullcontext() if dtype == torch.float32 else torch.autocast(torch.device(device).type, dtype=dtype)


def check_precision(device: torch.device, precision: str) -> None:
    """Raise ValueError when ``precision`` cannot run on ``device`` (before any work starts)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16 but this GPU has no bf16 support; use train.precision=fp16 or fp32")
    if precision == "fp16" and not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"train.precision=fp16 needs fp16 autocast, which torch does not offer on {device.type}; "
                         "use train.precision=fp32")


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {torch.get_num_threads()} threads"


def memory_bytes(device: torch.device) -> int:
    """Total memory of the device (physical RAM for CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
