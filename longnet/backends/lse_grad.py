"""The one home of the lse gradient: how an exact backward takes a gradient flowing into lse.

Layouts: out and dout are (B, N, H, D) (or any (..., D) rows), lse and dlse
the matching (B, N, H) rows, in the accumulation dtype.

Why it needs care: d lse_i / d s_ij = P_ij, so a gradient dlse adds
P_ij dlse_i to dS_ij = P_ij (dP_ij - delta_i). That is the same as replacing
the row term delta_i = rowsum(dO_i * O_i) by delta_i - dlse_i. Every flash
backward (PyTorch's CPU and CUDA kernels, the math path) computes delta from
the (dout, out) it is given, so the lse gradient can be carried without
touching the head dim (the CUDA flash kernel needs D % 8 == 0, so an extra
column would drop it to the math path):

* Fold (one pass): out'_i = O_i - dlse_i dO_i / |dO_i|^2 has
  rowsum(dO_i * out'_i) = delta_i - dlse_i exactly, and dv = P^T dO does not
  read out. It needs dO_i != 0 and a correction that fits out's dtype
  (|dlse_i| / max|dO_i| must not overflow, which matters for float16).
* Second pass (the rows the fold cannot take, e.g. dout None or zero rows):
  the same backward with zero values (dP = 0) and, on every column,
  dO''_i = a_i, out''_i = -sign(dlse_i) a_i with a_i = sqrt(|dlse_i| / D),
  so delta''_i = -dlse_i and dS'' = P dlse. Its dq and dk are added; its dv
  is not a gradient and is dropped.

Both are exact up to rounding in the inputs' dtype (the same rounding as
casting dlse to that dtype).

Sequence parallelism cannot choose a second pass from one rank's data (every
rank must run the same collectives), and a second pass would double its
backward traffic, so it carries dlse in extra head-dim columns instead
(:func:`lse_columns`): dlse on dout, ones on v (dP gains dlse), zeros on out,
q and k. It pads to the next multiple of 8, which keeps the CUDA flash kernel
for head dims up to 248; the extra columns are dropped before any gradient
is sent, so the traffic is unchanged.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .numerics import acc_dtype

__all__ = ["LsePasses", "backward_inputs", "backward_grads", "lse_columns"]

# lse_columns pads the head dim to a multiple of this (what the CUDA flash kernels need).
_COLUMN_MULTIPLE = 8


class LsePasses(NamedTuple):
    """The passes of an exact backward (see the module docstring).

    ``do``/``out``: dout and (folded) out of the main pass; ``do`` is None when
    no gradient reached out and nothing needs the pass. ``lse_do``/``lse_out``:
    dout and out of the zero-values pass, or None when there is none.
    """

    do: Optional[Tensor]
    out: Tensor
    lse_do: Optional[Tensor]
    lse_out: Optional[Tensor]


def _fold(do: Tensor, dlse: Tensor, out: Tensor) -> Tuple[Tensor, Tensor]:
    """(out', rest): out with dlse folded into every row that can take it, and the dlse left over.

    Rows are scaled by their largest |dO| first, so |dO|^2 cannot underflow.
    A row keeps its out (and its dlse goes to ``rest``) when dO is zero there
    or when the folded row is not finite in out's dtype.
    """
    acc = acc_dtype(out.dtype)
    g, dl = do.to(acc), dlse.to(acc)
    m = g.abs().amax(-1)
    nonzero = m > 0
    u = g / torch.where(nonzero, m, 1).unsqueeze(-1)
    coef = torch.where(nonzero, dl / (m * (u * u).sum(-1)), 0)
    folded = (out.to(acc) - coef.unsqueeze(-1) * u).to(out.dtype)
    ok = (nonzero | (dl == 0)) & torch.isfinite(folded).all(-1)
    return torch.where(ok.unsqueeze(-1), folded, out), torch.where(ok, 0, dlse)


def _lse_pass(rest: Tensor, out: Tensor) -> Tuple[Tensor, Tensor]:
    """(dO'', out'') of the zero-values pass: rowsum(dO'' * out'') = -rest, split evenly over D columns."""
    a = (rest.abs() / out.shape[-1]).sqrt().unsqueeze(-1)
    do = a.expand(out.shape).to(out.dtype).contiguous()
    return do, (-torch.sign(rest).unsqueeze(-1) * a).expand(out.shape).to(out.dtype).contiguous()


def _any_left(rest: Tensor) -> bool:
    """Whether any row still has an lse gradient for the second pass (reads one flag from the device)."""
    return bool((rest != 0).any())


def backward_inputs(dout: Optional[Tensor], dlse: Optional[Tensor], out: Tensor) -> LsePasses:
    """The passes that give the exact gradient for (dout, dlse) of (out, lse) on one device.

    See the module docstring. The second pass runs only when some row needs
    it, which costs one device-to-host read of a flag when dlse is given.
    """
    # contiguous(): autograd may hand over an expanded (stride-0) gradient, which kernels refuse.
    do = dout.contiguous() if dout is not None else None
    rest = dlse
    if dlse is not None:
        if do is not None:
            out, rest = _fold(do, dlse, out)
        if not _any_left(rest):
            rest = None
    if do is None and rest is None:
        do = torch.zeros_like(out)
    lse_do, lse_out = _lse_pass(rest, out) if rest is not None else (None, None)
    return LsePasses(do, out, lse_do, lse_out)


def backward_grads(run: Callable[[Tensor, Tensor, bool], Sequence[Tensor]], passes: LsePasses,
                   dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in ``dtype`` from the passes of :func:`backward_inputs`.

    ``run(do, out, zero_values)`` is the mixture's backward without an lse
    gradient at the given dout and out, returning fresh (dq, dk, dv) in the
    accumulation dtype; ``zero_values=True`` runs it with every value tensor
    (v, and gathered values in sequence parallelism) replaced by zeros.
    """
    grads = list(run(passes.do, passes.out, False)) if passes.do is not None else None
    if passes.lse_do is not None:
        dq, dk, dv = run(passes.lse_do, passes.lse_out, True)
        if grads is None:
            grads = [dq, dk, dv.zero_()]
        else:
            grads[0].add_(dq)
            grads[1].add_(dk)
    # One at a time, dropping each accumulator once converted: at 1M tokens in bf16 the three
    # fp32 accumulators are 9 GiB, and converting all before freeing any would add 4.5 GiB.
    converted = []
    while grads:
        converted.append(grads.pop(0).to(dtype))
    return tuple(converted)


def _pad(x: Tensor, first, width: int) -> Tensor:
    """x (..., D) with ``width`` more columns: ``first`` (a (...) tensor or a number) in the first, zeros after."""
    extra = x.new_zeros((*x.shape[:-1], width))
    extra[..., 0] = first
    return torch.cat([x, extra], -1)


def lse_columns(dout: Optional[Tensor], dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                gathered: Sequence[Tensor] = ()):
    """(do, q, k, v, out, gathered) with dlse carried in extra head-dim columns; see the module docstring.

    One pass, whatever the data. ``gathered``: stacked (2, ..., D) keys and
    values (sequence parallelism), padded like k and v. Without dlse nothing
    is padded. The gradients of the first D columns are the exact (dq, dk, dv).
    """
    do = dout if dout is not None else torch.zeros_like(out)
    if dlse is not None:
        width = _COLUMN_MULTIPLE - q.shape[-1] % _COLUMN_MULTIPLE
        do = _pad(do, dlse.to(do.dtype), width)
        q, k, v, out = _pad(q, 0.0, width), _pad(k, 0.0, width), _pad(v, 1.0, width), _pad(out, 0.0, width)
        gathered = [torch.cat([_pad(kv[:1], 0.0, width), _pad(kv[1:], 1.0, width)]) for kv in gathered]
    # contiguous(): autograd may hand over an expanded (stride-0) gradient, which kernels refuse.
    return do.contiguous(), q, k, v, out, list(gathered)
