"""Shared test utilities: a loop-over-segments oracle and tolerance tables."""

import math

import torch

# (atol, rtol) per dtype for comparisons against a float64 reference.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}


def loop_reference(q, k, v, segment_lengths, dilation_rates, *, is_causal=False, scale=None):
    """SPEC.md §1-2 spelled out with Python loops: per pattern, head and segment, then merge.

    q, k, v: (B, N, H, D) float64. Returns (out, lse) like the op.
    """
    b, n, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    partials = []  # per pattern: (out (B,N,H,D), lse (B,N,H))
    for w, r in zip(segment_lengths, dilation_rates):
        o_i = torch.zeros_like(q)
        l_i = torch.full((b, n, h), -math.inf, dtype=q.dtype)
        for head in range(h):
            s = head % r
            for a in range(0, n, w):
                rows = list(range(a + s, min(a + w, n), r))
                if not rows:
                    continue
                idx = torch.tensor(rows)
                qs, ks, vs = q[:, idx, head], k[:, idx, head], v[:, idx, head]
                sc = qs @ ks.transpose(-1, -2) * scale
                if is_causal:
                    mask = idx[None, :] > idx[:, None]
                    sc = sc.masked_fill(mask, -math.inf)
                lse = torch.logsumexp(sc, -1)
                o_i[:, idx, head] = torch.softmax(sc, -1) @ vs
                l_i[:, idx, head] = lse
        partials.append((o_i, l_i))
    lses = torch.stack([l for _, l in partials])
    lse = torch.logsumexp(lses, 0)
    out = torch.zeros_like(q)
    for o_i, l_i in partials:
        wgt = torch.exp(l_i - lse).nan_to_num(0.0)  # rows no pattern keeps: -inf - -inf
        out += wgt[..., None] * o_i
    return out, lse
