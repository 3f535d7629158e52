"""Dense attention primitives that return (out, lse), and their exact backward.

Layout everywhere: q, k, v, out, grads are (Z, H, L, D) with any strides whose
last dimension is contiguous (so strided views of a larger (B, N, H, D)
tensor can be passed without copies). lse is (Z, H, L), float32 (float64 for
float64 inputs).

Which kernel runs:
- CPU, at least 16 query rows, and fp32/bf16/fp16 (x86 with oneDNN) or causal fp32/fp64 of at
  most 4,096 query rows: longnet's own flash kernel (:mod:`.cpu_flash`: AVX-512 products,
  masked scores skipped at a finer grain); ``LONGNET_CPU_KERNEL=aten`` turns it off.
- CPU otherwise: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward
  (fp64, fp32, bf16, fp16).
- CUDA, fp16/bf16, head dim <= 256 and a multiple of 8, compute capability >= 8.0:
  ``aten._scaled_dot_product_flash_attention`` and its backward.
- CUDA otherwise, fp32/fp16/bf16 with a head dim that is a multiple of 16 bytes (fp32 inputs,
  and half inputs on GPUs older than sm80): ``aten._scaled_dot_product_efficient_attention``
  and its backward; its lse is padded to a multiple of 32 rows and is sliced (and padded
  again for the backward).
- Anything else: a query-chunked math implementation (``math_fwd``/``math_bwd``).

Causal calls must be square (as many keys as queries): the mask is then the plain lower
triangle for every kernel. FlashAttention-2 aligns a non-square causal mask bottom-right and
gives +inf lse to rows with no visible key, the others align it top-left with -inf.
On CUDA, inputs whose base address or strides are not multiples of 16 bytes are copied first:
the CUDA kernels load 16-byte vectors along the head dim.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import cpu_flash
from .numerics import acc_dtype

aten = torch.ops.aten

# Query rows per chunk in the math path: bounds its (chunk x L) score matrix.
_MATH_CHUNK = 1024
# Several attention kernels index with 32 bits or launch one block row per (batch, head): keep
# every call under these by chunking over Z and H (docs/design.md §7).
MAX_ELEMENTS = 2**31 - 1
MAX_BATCH_HEADS = 65535


def _call_chunks(tensors) -> list:
    """(z-slice, h-slice) pairs covering (Z, H) with each call under the limits above.

    Every tensor is (Z, H, L_i, ...); the longest sets the chunk size (keys may be longer
    than queries when sequence parallelism gathers them).
    """
    z, h = tensors[0].shape[:2]
    per_head = max(1, max(t[0, 0].numel() for t in tensors))
    h_step = max(1, min(h, MAX_ELEMENTS // per_head, MAX_BATCH_HEADS))
    z_step = max(1, min(z, MAX_ELEMENTS // (per_head * h_step), MAX_BATCH_HEADS // h_step))
    return [(slice(i, min(i + z_step, z)), slice(j, min(j + h_step, h)))
            for i in range(0, z, z_step) for j in range(0, h, h_step)]


def _chunked(fn, tensors):
    """Run ``fn`` on (Z, H) chunks of ``tensors`` (each (Z, H, ...)) and assemble its outputs.

    Outputs are laid out (Z, L, H, ...) in memory, as the flash kernels return them.
    """
    chunks = _call_chunks(tensors)
    if len(chunks) == 1:
        return fn(*tensors)
    z, h = tensors[0].shape[:2]
    results = None
    for zs, hs in chunks:
        parts = fn(*(t[zs, hs] for t in tensors))
        if results is None:
            results = [torch.empty((z, p.shape[2], h, *p.shape[3:]), dtype=p.dtype, device=p.device)
                       .transpose(1, 2) for p in parts]
        for r, p in zip(results, parts):
            r[zs, hs].copy_(p)
    return tuple(results)


def math_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
    """Reference-quality (out, lse) for (Z, H, L, D) inputs, computed in fp32/fp64."""
    acc = acc_dtype(q.dtype)
    L, S = q.shape[-2], k.shape[-2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
    kf, vf = k.to(acc), v.to(acc)
    for i in range(0, L, _MATH_CHUNK):
        j = min(i + _MATH_CHUNK, L)
        s = torch.matmul(q[..., i:j, :].to(acc), kf.transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(i, j, device=q.device)[:, None]
            cols = torch.arange(S, device=q.device)[None, :]
            s = s.masked_fill(cols > rows, float("-inf"))
        m = torch.logsumexp(s, dim=-1)
        lse[..., i:j] = m
        out[..., i:j, :] = torch.matmul(torch.exp(s - m[..., None]), vf).to(q.dtype)
    return out, lse


def math_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             causal: bool, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradient of attention given the (possibly merged) out and lse; see docs/design.md §7."""
    acc = acc_dtype(q.dtype)
    L, S = q.shape[-2], k.shape[-2]
    kf, vf = k.to(acc), v.to(acc)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for i in range(0, L, _MATH_CHUNK):
        j = min(i + _MATH_CHUNK, L)
        qi = q[..., i:j, :].to(acc)
        doi = do[..., i:j, :].to(acc)
        s = torch.matmul(qi, kf.transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(i, j, device=q.device)[:, None]
            cols = torch.arange(S, device=q.device)[None, :]
            s = s.masked_fill(cols > rows, float("-inf"))
        p = torch.exp(s - lse[..., i:j, None].to(acc))
        dv += torch.matmul(p.transpose(-1, -2), doi)
        dp = torch.matmul(doi, vf.transpose(-1, -2))
        delta = (doi * out[..., i:j, :].to(acc)).sum(-1, keepdim=True)
        ds = p * (dp - delta) * scale
        dq[..., i:j, :] = torch.matmul(ds, kf)
        dk += torch.matmul(ds.transpose(-1, -2), qi)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# FlashAttention-2 in PyTorch runs on Ampere (sm80) and newer.
FLASH_MIN_CAPABILITY = (8, 0)
# Efficient attention pads its lse to a multiple of this many rows.
_EFFICIENT_LSE_ALIGN = 32


def cuda_capability(device) -> Tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (CPU-only tests replace this)."""
    return tuple(torch.cuda.get_device_capability(device))


def _cuda_flash_ok(q: Tensor) -> bool:
    d = q.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0
            and cuda_capability(q.device) >= FLASH_MIN_CAPABILITY)


def _cuda_efficient_ok(q: Tensor) -> bool:
    # Its kernels load 16-byte vectors along the head dim; bfloat16 needs sm80 like flash.
    if (q.shape[-1] * q.element_size()) % 16:
        return False
    return q.dtype in (torch.float32, torch.float16) or (
        q.dtype == torch.bfloat16 and cuda_capability(q.device) >= FLASH_MIN_CAPABILITY)


CUDA_KERNELS = ("flash", "efficient", "math")


def cuda_kernel(q: Tensor) -> str:
    """Which kernel a CUDA call on q (Z, H, L, D) runs: "flash", "efficient" or "math".

    ``LONGNET_CUDA_KERNEL=efficient`` (or ``math``) skips the kernels before it in that
    order, e.g. to validate efficient attention on half inputs (``longnet selftest --gpu``).
    """
    first = os.environ.get("LONGNET_CUDA_KERNEL", "flash")
    if first not in CUDA_KERNELS:
        raise ValueError(f"LONGNET_CUDA_KERNEL must be one of {CUDA_KERNELS}, got {first!r}")
    if first == "flash" and _cuda_flash_ok(q):
        return "flash"
    return "efficient" if first != "math" and _cuda_efficient_ok(q) else "math"


def _address(x: Tensor) -> int:
    if is_fake(x):  # no address (FakeTensorMode, tracing); allocations themselves are aligned
        return x.storage_offset() * x.element_size()
    return x.data_ptr()


def aligned16(x: Tensor) -> Tensor:
    """x itself when its address and every stride but the last are multiples of 16 bytes, else a copy.

    The CUDA kernels load 16-byte vectors along the head dim (PyTorch checks
    only stride(-1)); a view such as ``x[..., 1:65]`` would fault with
    "misaligned address".
    """
    item = x.element_size()
    ok = _address(x) % 16 == 0 and all((st * item) % 16 == 0 for st, n in zip(x.stride()[:-1], x.shape[:-1])
                                       if n > 1)
    return x if ok else x.contiguous()


def _check_square(q: Tensor, k: Tensor, causal: bool) -> None:
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal attention needs as many keys as queries (a square mask), got "
                         f"{q.shape[-2]} queries and k with {k.shape[-2]} rows")


def _efficient_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return out, lse[..., :q.shape[-2]]


def _efficient_bwd(do, q, k, v, out, lse, causal, scale):
    L = q.shape[-2]
    padded = torch.zeros((*lse.shape[:-1], -(-L // _EFFICIENT_LSE_ALIGN) * _EFFICIENT_LSE_ALIGN),
                         dtype=torch.float32, device=lse.device)
    padded[..., :L] = lse
    # Dropout is 0, so the seed and offset (CPU int64 scalars outside graph capture) are never read.
    seed, offset = (torch.empty((), dtype=torch.int64) for _ in range(2))
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        do, q, k, v, None, out, padded, seed, offset, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv


def attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
             force_math: bool = False) -> Tuple[Tensor, Tensor]:
    """(out (Z, H, L, D), lse (Z, H, L)) of softmax(q k^T * scale [+ causal mask]) v.

    k, v are (Z, H, S, D); causal calls need S == L (the lower triangle).
    """
    _check_square(q, k, causal)
    return _chunked(lambda a, b, c: _attn_fwd(a, b, c, causal, scale, force_math), (q, k, v))


def _attn_fwd(q, k, v, causal, scale, force_math):
    if not force_math:
        if q.device.type == "cpu":
            if cpu_flash.wanted(q, k, causal):
                return cpu_flash.fwd(q, k, v, causal, scale)
            return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        kind = cuda_kernel(q) if q.device.type == "cuda" else "math"
        if kind != "math":
            q, k, v = (aligned16(x) for x in (q, k, v))
        if kind == "flash":
            res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
            return res[0], res[1]
        if kind == "efficient":
            return _efficient_fwd(q, k, v, causal, scale)
    return math_fwd(q, k, v, causal, scale)


def attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             causal: bool, scale: float, force_math: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for ``attn_fwd``, given the out and lse to differentiate at.

    Passing a *merged* out and lse yields this partial's share of the exact
    gradient of the merged attention (docs/design.md §7). Causal calls need S == L.
    """
    _check_square(q, k, causal)
    return _chunked(lambda *t: _attn_bwd(*t, causal, scale, force_math), (q, k, v, do, out, lse))


def _attn_bwd(q, k, v, do, out, lse, causal, scale, force_math):
    if not force_math:
        if q.device.type == "cpu":
            if cpu_flash.wanted(q, k, causal):
                return cpu_flash.bwd(do, q, k, v, out, lse, causal, scale)
            return aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do, q, k, v, out, lse.to(acc_dtype(q.dtype)).contiguous(), 0.0, causal, scale=scale)
        kind = cuda_kernel(q) if q.device.type == "cuda" else "math"
        if kind != "math":
            do, q, k, v, out = (aligned16(x) for x in (do, q, k, v, out))
        if kind == "flash":
            return aten._scaled_dot_product_flash_attention_backward(
                do, q, k, v, out, lse.float().contiguous(), *flash_forward_state(q, k), 0.0, causal,
                *flash_rng_state(q.device), scale=scale)
        if kind == "efficient":
            return _efficient_bwd(do, q, k, v, out, lse, causal, scale)
    return math_bwd(do, q, k, v, out, lse, causal, scale)


def flash_forward_state(q: Tensor, k: Tensor) -> tuple:
    """(cum_seq_q, cum_seq_k, max_q, max_k) exactly as ``aten._scaled_dot_product_flash_attention`` returns them.

    For dense (Z, H, L, D) inputs the forward returns undefined cum_seq
    tensors (None in Python) and max_q = L, max_k = S; its backward switches
    to the variable-length kernel whenever cum_seq_q is a defined tensor, so
    these must be passed back as they are. The backward recomputes each
    partial from q, k, so the equivalent values are rebuilt here rather than
    saved from the forward.
    """
    return None, None, q.shape[-2], k.shape[-2]


def flash_rng_state(device: torch.device) -> Tuple[Tensor, Tensor]:
    """(philox_seed, philox_offset) as the CUDA flash forward returns them for dropout_p = 0.

    Its ``rng_state`` (2,) and ``unused`` () uint64 tensors are left
    uninitialised without dropout, and the backward reads them only when
    dropout_p > 0 (PyTorch's ``mha_fwd``/``mha_bwd``).
    """
    return (torch.empty(2, dtype=torch.uint64, device=device),
            torch.empty((), dtype=torch.uint64, device=device))
