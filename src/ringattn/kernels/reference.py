"""Pure-torch tiled attention: any dtype, any device, any head dims. The backend of last resort.

Scores are computed in float32 (float64 for float64 input) one query tile at a time, so memory is
``tile x nk`` per head, never ``nq x nk``. GQA is done by viewing the query heads as
``(kv_heads, group)``: repeated K/V are never materialised.
"""

from __future__ import annotations

import torch

from ..scores import ALIBI, SOFTCAP
from .base import Capabilities, DenseMaskKernel, acc_dtype, empty_result, register

Q_TILE = 1024


def _causal_keep(q0: int, nq: int, nk: int, device) -> torch.Tensor:
    i = torch.arange(q0, q0 + nq, device=device)[:, None]
    return torch.arange(nk, device=device)[None, :] <= i


def _keys_seen(t1: int, nk: int, causal: bool, mask, bias):
    """Keys a query tile ending at row ``t1`` can see (top-left causal: ``j < t1``), and the mask and bias
    cut to them: a causal task then costs about half of its rectangle."""
    ke = min(nk, t1) if causal else nk
    if ke == nk:
        return ke, mask, bias
    return ke, None if mask is None else mask[:, :ke], None if bias is None else bias[..., :ke]


class ReferenceBackend(DenseMaskKernel):
    name = "reference"
    caps = Capabilities(takes_dlse=True, score_mods=frozenset({SOFTCAP, ALIBI}))

    def supports(self, q, k, v) -> bool:
        return True

    @staticmethod
    def _scores(q, k, scale, causal, mask, q0, bias=None, softcap=None):
        """q (b, t, kvh, g, d), k (b, nk, kvh, d) -> masked scores s (b, kvh, g, t, nk) in the accumulation
        dtype, and tanh(s / softcap) (None without a softcap), which the backward's chain rule needs."""
        acc = acc_dtype(q.dtype)
        s = torch.einsum("btkgd,bskd->bkgts", q.to(acc), k.to(acc)) * scale
        if bias is not None:  # (heads, 1 or nq, nk) -> (kvh, g, 1 or t, nk)
            b = bias.to(acc).view(k.shape[2], q.shape[3], bias.shape[1], -1)
            s = s + (b if b.shape[2] == 1 else b[:, :, q0:q0 + q.shape[1]])
        th = None
        if softcap is not None:
            th = torch.tanh(s / softcap)
            s = th * softcap
        keep = None
        if causal:
            keep = _causal_keep(q0, q.shape[1], k.shape[1], q.device)
        if mask is not None:
            m = mask[q0:q0 + q.shape[1]]
            keep = m if keep is None else keep & m
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        return s, th

    def forward_dense(self, q, k, v, *, scale, causal, mask, bias=None, softcap=None):
        b, nq, h, d = q.shape
        kvh = k.shape[2]
        if nq == 0 or k.shape[1] == 0:
            return empty_result(q, v)
        acc = acc_dtype(q.dtype)
        qg = q.view(b, nq, kvh, h // kvh, d)
        out = q.new_empty(b, nq, h, v.shape[-1])
        lse = torch.empty(b, h, nq, dtype=acc, device=q.device)
        for t0 in range(0, nq, Q_TILE):
            t1 = min(nq, t0 + Q_TILE)
            ke, mk, bk = _keys_seen(t1, k.shape[1], causal, mask, bias)
            s, _ = self._scores(qg[:, t0:t1], k[:, :ke], scale, causal, mk, t0, bk, softcap)
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = torch.exp(s - m)
            denom = p.sum(-1, keepdim=True)
            l_ = (m + torch.log(denom)).squeeze(-1)  # (b, kvh, g, t)
            p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
            o = torch.einsum("bkgts,bskd->btkgd", p, v[:, :ke].to(acc))
            out[:, t0:t1] = o.reshape(b, t1 - t0, h, -1).to(out.dtype)
            lse[:, :, t0:t1] = l_.reshape(b, h, t1 - t0)
        return out, lse

    def backward_dense(self, dout, q, k, v, out, lse, *, scale, causal, mask, dlse=None, bias=None, softcap=None):
        b, nq, h, d = q.shape
        kvh, g = k.shape[2], h // k.shape[2]
        acc = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        if nq == 0 or k.shape[1] == 0:
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        qg = q.view(b, nq, kvh, g, d)
        kf, vf = k.to(acc), v.to(acc)
        # Rows that see nothing anywhere have lse = -inf; +inf makes their P exactly 0.
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).to(acc)
        for t0 in range(0, nq, Q_TILE):
            t1 = min(nq, t0 + Q_TILE)
            ke, mk, bk = _keys_seen(t1, k.shape[1], causal, mask, bias)
            s, th = self._scores(qg[:, t0:t1], k[:, :ke], scale, causal, mk, t0, bk, softcap)
            lt = lse[:, :, t0:t1].reshape(b, kvh, g, t1 - t0, 1)
            p = torch.exp(s - lt)
            do = dout[:, t0:t1].to(acc).view(b, t1 - t0, kvh, g, -1)
            o = out[:, t0:t1].to(acc).view(b, t1 - t0, kvh, g, -1)
            delta = (do * o).sum(-1).permute(0, 2, 3, 1).unsqueeze(-1)  # (b, kvh, g, t, 1)
            if dlse is not None:  # d lse_i / d s_ij = P_ij: folds into D
                delta = delta - dlse[:, :, t0:t1].to(acc).reshape(b, kvh, g, t1 - t0, 1)
            dv[:, :ke] += torch.einsum("bkgts,btkgd->bskd", p, do)
            dp = torch.einsum("btkgd,bskd->bkgts", do, vf[:, :ke])
            ds = p * (dp - delta)
            if th is not None:  # d(cap tanh(x / cap)) / dx
                ds = ds * (1 - th * th)
            ds = ds * scale
            dq[:, t0:t1] = torch.einsum("bkgts,bskd->btkgd", ds, kf[:, :ke]).reshape(b, t1 - t0, h, d)
            dk[:, :ke] += torch.einsum("bkgts,btkgd->bskd", ds, qg[:, t0:t1].to(acc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


register(ReferenceBackend())
