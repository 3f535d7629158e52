"""Variable-length batches: flash-attn's packed convention and the padded one, and the moves between them.

Layouts:

* packed: x (T, ...) holding B sequences back to back; ``cu_seqlens`` (B + 1,) int32 on x's
  device, cumulative: sequence b is rows [cu_seqlens[b], cu_seqlens[b + 1]), cu_seqlens[0] = 0
  and cu_seqlens[B] = T. A sequence may be empty.
* padded: x (B, N, ...) with ``key_padding_mask`` (B, N) bool, True = a real token.

:func:`unpad` and :func:`pad` convert between them (differentiable; :func:`pad` puts 0, or
``fill``, on padding); :func:`cu_seqlens_from_lengths` builds cu_seqlens. ``longnet.dilated_attention``
takes either layout directly (``cu_seqlens=`` or ``key_padding_mask=``), each sequence segmented
from its own first token, exactly as if run alone (docs/design.md §1-2).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backends.varlen_ops import check_cu_seqlens
from .checks import check_int

__all__ = ["unpad", "pad", "cu_seqlens_from_lengths", "check_cu_seqlens", "check_varlen_args"]


def cu_seqlens_from_lengths(lengths: Union[Sequence[int], Tensor], device=None) -> Tensor:
    """(B + 1,) int32 cumulative sequence starts [0, L_0, L_0 + L_1, ...] from B lengths (each >= 0)."""
    if isinstance(lengths, Tensor):
        if lengths.ndim != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be a 1-D integer tensor, got {lengths.dtype} of shape "
                             f"{tuple(lengths.shape)}")
        device = lengths.device if device is None else device
        lengths = lengths.tolist()
    values = [check_int(f"lengths[{i}]", n, minimum=0) for i, n in enumerate(lengths)]
    cu = torch.zeros(len(values) + 1, dtype=torch.int64)
    if values:
        cu[1:] = torch.tensor(values, dtype=torch.int64).cumsum(0)
    if int(cu[-1]) > 2**31 - 1:
        raise ValueError(f"the lengths sum to {int(cu[-1])} tokens, more than int32 cu_seqlens can hold")
    cu = cu.to(torch.int32)
    return cu if device is None else cu.to(device)


def _check_mask(key_padding_mask: Tensor, batch_shape: Tuple[int, ...], device: torch.device) -> None:
    if not isinstance(key_padding_mask, Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor (B, N) of bool, got "
                        f"{type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = a real token), got {key_padding_mask.dtype}")
    if tuple(key_padding_mask.shape) != tuple(batch_shape):
        raise ValueError(f"key_padding_mask must have shape (B, N) = {tuple(batch_shape)}, got "
                         f"{tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask must be on q's device {device}, got {key_padding_mask.device}")


def _check_cu_meta(cu_seqlens: Tensor, device: torch.device) -> None:
    """Type, dtype, shape and device of cu_seqlens (its values are checked where they are read)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor (B + 1,) of int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() == 0:
        raise ValueError(f"cu_seqlens must be 1-D with B + 1 >= 1 values, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on q's device {device}, got {cu_seqlens.device}")


def check_varlen_args(q: Tensor, cu_seqlens: Optional[Tensor], max_seqlen, key_padding_mask: Optional[Tensor],
                      group=None) -> None:
    """One-line errors for the varlen arguments of ``dilated_attention`` (no device sync).

    The values of cu_seqlens (start 0, non-decreasing, end at T) are checked by the backend
    when it reads them (:func:`check_cu_seqlens`), so this stays traceable.
    """
    if cu_seqlens is not None and key_padding_mask is not None:
        raise ValueError("pass cu_seqlens (packed (T, H, D) input) or key_padding_mask (padded (B, N, H, D) "
                         "input), not both")
    if max_seqlen is not None:
        if cu_seqlens is None:
            raise ValueError("max_seqlen is only meaningful with cu_seqlens")
        check_int("max_seqlen", max_seqlen, minimum=0)
    if group is not None:
        raise ValueError("cu_seqlens / key_padding_mask with group= (sequence parallelism) is not supported: "
                         "sequence parallelism splits one long sequence across ranks; run each rank's "
                         "variable-length batch without a group")
    if cu_seqlens is not None:
        _check_cu_meta(cu_seqlens, q.device)
    else:
        _check_mask(key_padding_mask, tuple(q.shape[:2]), q.device)


def unpad(x: Tensor, key_padding_mask: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
    """(packed (T, ...), indices (T,) int64 into the flattened (B x N), cu_seqlens (B + 1,) int32, max_seqlen).

    x is (B, N, ...); each row's real tokens (True in ``key_padding_mask`` (B, N)) are kept
    in order, so a row with holes becomes one sequence of its real tokens. Differentiable in x.
    """
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError(f"x must be a tensor (B, N, ...), got {getattr(x, 'shape', type(x).__name__)}")
    _check_mask(key_padding_mask, tuple(x.shape[:2]), x.device)
    lengths = key_padding_mask.sum(1)
    indices = key_padding_mask.reshape(-1).nonzero().squeeze(1)
    packed = x.reshape(-1, *x.shape[2:]).index_select(0, indices)
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return packed, indices, cu_seqlens_from_lengths(lengths), max_seqlen


def pad(packed: Tensor, indices: Tensor, batch: int, seqlen: int, fill: float = 0.0) -> Tensor:
    """(B, N, ...) with packed (T, ...) rows put back at ``indices`` (from :func:`unpad`), ``fill`` elsewhere.

    Differentiable in ``packed``; padding positions get no gradient.
    """
    if indices.ndim != 1 or indices.numel() != packed.shape[0]:
        raise ValueError(f"indices must be 1-D with one index per packed row ({packed.shape[0]}), got shape "
                         f"{tuple(indices.shape)}")
    out = packed.new_full((batch * seqlen, *packed.shape[1:]), fill)
    return out.index_copy(0, indices, packed).view(batch, seqlen, *packed.shape[1:])
