"""The float64 dense reference every attention path is tested against, written independently of ringattn."""

from __future__ import annotations

import torch


def dense_mask(n: int, *, causal=False, window=None, seq_len=None, cu_seqlens=None, chunk_size=None) -> torch.Tensor:
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = torch.ones(n, n, dtype=torch.bool)
    if chunk_size is not None:
        keep &= (i // chunk_size) == (j // chunk_size)
    if seq_len is not None:
        keep &= j < seq_len
    if causal:
        keep &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            keep &= j >= i - left
        if right >= 0:
            keep &= j <= i + right
    if cu_seqlens is not None:
        doc = torch.full((n,), -1, dtype=torch.long)
        for d, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            doc[a:b] = d
        keep &= (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    return keep


def slices_mask(n: int, slices) -> torch.Tensor:
    """The union of MagiAttention-style slices ``((q0, q1), (k0, k1), kind)``; causal is bottom-right."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = torch.zeros(n, n, dtype=torch.bool)
    for (q0, q1), (k0, k1), kind in slices:
        r, c, extra = i - q0, j - k0, (k1 - k0) - (q1 - q0)
        m = (i >= q0) & (i < q1) & (j >= k0) & (j < k1)
        if kind in ("causal", "bi-causal"):
            m &= c <= r + extra
        if kind in ("inv-causal", "bi-causal"):
            m &= c >= r
        keep |= m
    return keep


def attention_ref(q, k, v, keep, scale=None, *, softcap=None, sinks=None, alibi_slopes=None):
    """q (b, n, h, d), k/v (b, n, kvh, *), keep (n, n) bool -> out (b, n, h, dv), lse (b, h, n), float64.

    Rows with nothing visible give out 0 and lse -inf (the sink, with sinks). Scores: ``scale * q.k``, then
    ``- slope_h * (i - j)`` (ALiBi), then ``softcap * tanh(s / softcap)``, then the mask; ``sinks`` (heads,)
    is one more logit column of every row, whose probability is dropped (as gpt-oss writes it).
    """
    q, k, v = q.double(), k.double(), v.double()
    h, kvh = q.shape[2], k.shape[2]
    nq, nk = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // kvh, dim=2)
    v = v.repeat_interleave(h // kvh, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if alibi_slopes is not None:
        dist = (torch.arange(nq)[:, None] + (nk - nq) - torch.arange(nk)[None, :]).double()
        s = s - alibi_slopes.double()[:, None, None] * dist
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        col = sinks.double()[None, :, None, None].expand(s.shape[0], h, nq, 1)
        s = torch.cat([s, col], dim=-1)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0)[..., None])
    if sinks is not None:
        p = p[..., :-1]
    return torch.einsum("bhij,bjhd->bihd", p, v), lse


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the reference's largest magnitude (finite entries)."""
    x, ref = x.double(), ref.double()
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(x)) or not torch.equal(x[~fin], ref[~fin]):
        return float("inf")
    if not fin.any():
        return 0.0
    scale = ref[fin].abs().max().clamp_min(1e-30)
    return float((x[fin] - ref[fin]).abs().max() / scale)


def grad_errors(model: torch.nn.Module, ref: torch.nn.Module, err=rel_err) -> dict[str, float]:
    """``{"grad NAME": err(model's gradient, ref's)}`` for every parameter the reference has a gradient for; a
    parameter with a gradient on one side only is an error (inf), not left out."""
    grads = dict(model.named_parameters())
    out = {}
    for n, p in ref.named_parameters():
        if p.grad is None and grads[n].grad is None:
            continue
        out[f"grad {n}"] = float("inf") if p.grad is None or grads[n].grad is None else err(grads[n].grad, p.grad)
    return out


TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
