"""Next-token loss over a sequence split across ranks.

The label of position ``i`` is token ``i + 1``, which for the last token of a shard lives on another
rank (the next block in ``contiguous``, the next rank in ``striped``, the other chunk in ``zigzag``).
So labels are shifted on the *global* sequence first and then sharded exactly like the inputs:
``shard_batch`` does it when every rank has the full sequences (the usual case: the data loader of a
context-parallel group yields whole sequences), ``sharded_labels`` when a rank only has its shard of the
tokens (one all-gather of the int tokens, no activation traffic).

Normalisation: the single-process loss is the mean over every valid label of the global batch. Each
rank returns ``sum of its token losses / N`` with ``N`` the number of valid labels over *all* ranks
(``count_labels``); the sum over ranks of these is the global loss, and the sum over ranks of the
parameter gradients is exactly its gradient (``sum_gradients``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt

from .. import comm
from ..layouts import check_layout, padded_len, shard, unshard

# The label that is never scored: PyTorch's cross_entropy default, and Hugging Face's.
IGNORE_INDEX = -100


def shift_labels(tokens: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels ``(b, s)`` for full sequences ``(b, s)``: the next token, ``ignore_index`` at the end."""
    return torch.cat([tokens[:, 1:], tokens.new_full((tokens.shape[0], 1), ignore_index)], dim=1)


def shard_batch(inputs: torch.Tensor, labels: torch.Tensor, *, group=None, layout: str = "contiguous",
                mesh=None, ignore_index: int = IGNORE_INDEX, cu_seqlens=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This rank's ``(inputs, labels)`` of full, already-shifted ``(b, s)`` sequences, and ``s``.

    The sequence is padded to a multiple of W (2W for zigzag): padding inputs are 0 and padding
    labels ``ignore_index``, so padding never counts in the loss; pass the returned ``s`` as ``seq_len``.
    With ``mesh`` (the hybrid strategy's 2-D DeviceMesh) the split is ``ringattn.shard(.., mesh=mesh)``.
    ``cu_seqlens`` (the documents, for the balanced layout) as ``ringattn.shard`` takes them.
    """
    check_layout(layout)
    if inputs.shape != labels.shape or inputs.dim() != 2:
        raise ValueError(f"inputs and labels must both be (batch, seq), got {tuple(inputs.shape)} and "
                         f"{tuple(labels.shape)}")
    world = mesh.size() if mesh is not None else comm.group_rank_world(group)[1]
    s = inputs.shape[1]
    total = padded_len(s, world, layout)
    if total != s:
        labels = torch.cat([labels, labels.new_full((labels.shape[0], total - s), ignore_index)], dim=1)
    kw = {"mesh": mesh} if mesh is not None else {"group": group}
    kw["cu_seqlens"] = cu_seqlens
    return shard(inputs, layout=layout, **kw), shard(labels, layout=layout, **kw), s


@torch.no_grad()
def sharded_labels(local_tokens: torch.Tensor, *, group=None, layout: str = "contiguous",
                   seq_len: int | None = None) -> torch.Tensor:
    """Next-token labels of this rank's shard ``(b, local_len)`` when only the shard is at hand.

    Gathers the int tokens of the group (cheap next to activations), shifts globally and reshards.
    """
    full = unshard(local_tokens, group=group, layout=layout, dim=1, seq_len=seq_len)
    labels = shift_labels(full)
    _, world = comm.group_rank_world(group)
    total = world * local_tokens.shape[1]
    pad = labels.new_full((labels.shape[0], total - labels.shape[1]), IGNORE_INDEX)
    labels = torch.cat([labels, pad], dim=1)
    return shard(labels, group=group, layout=layout)


def count_labels(labels: torch.Tensor, group=None) -> int:
    """Valid (non-ignored) labels summed over ``group`` (None: every rank of the default group)."""
    n = (labels != IGNORE_INDEX).sum().to(torch.int64).reshape(1)
    if comm.group_rank_world(group)[1] > 1:
        if dist.get_backend(group) == "nccl" and n.device.type != "cuda":
            n = n.cuda()
        dist.all_reduce(n, group=group)
    return int(n.item())


def _loss_sum(head, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(h).float() if h.dtype in (torch.float16, torch.bfloat16) else head(h)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def loss_sum(head, h: torch.Tensor, labels: torch.Tensor, *, chunk: int = 0) -> torch.Tensor:
    """Sum of token cross-entropies of ``head(h)`` against ``labels`` (``IGNORE_INDEX`` skipped).

    ``chunk`` > 0 computes logits ``chunk`` tokens at a time and recomputes them in backward, so the
    ``(tokens x vocab)`` logits of the whole local sequence never exist at once (blockwise loss).
    """
    if not chunk or h.shape[1] <= chunk or not torch.is_grad_enabled():
        return _loss_sum(head, h, labels)
    total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    for hc, lc in zip(h.split(chunk, dim=1), labels.split(chunk, dim=1)):
        total = total + ckpt.checkpoint(_loss_sum, head, hc, lc, use_reentrant=False)
    return total


def sharded_loss(model, tokens: torch.Tensor, labels: torch.Tensor, *, n_labels: int, group=None, mesh=None,
                 seq_len: int | None = None, chunk: int = 0) -> torch.Tensor:
    """This rank's share of the global mean next-token loss: ``sum of local token losses / n_labels``.

    ``tokens`` and ``labels`` are this rank's shards (``shard_batch``); ``n_labels`` the valid labels
    over all ranks (``count_labels``). Summing the result, and the parameter gradients, over every rank
    gives the single-process loss and gradient.
    """
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1 (valid labels over all ranks), got {n_labels}")
    h = model.hidden(tokens, group=group, mesh=mesh, seq_len=seq_len)
    return loss_sum(model.logits, h, labels, chunk=chunk) / n_labels


def sum_gradients(model: torch.nn.Module, *, group=None, with_value: torch.Tensor | None = None
                  ) -> torch.Tensor | None:
    """Sum every parameter's ``.grad`` over the ranks of ``group``: the ranks hold partial gradients.

    A parameter without a gradient counts as zero (and gets one), so every rank ends with the same
    gradients. One all-reduce per parameter dtype; ``with_value`` (a scalar such as the loss) rides
    along in the first and its sum is returned.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    _, world = comm.group_rank_world(group)
    value = None if with_value is None else with_value.detach().reshape(1)
    for i, dtype in enumerate(sorted({p.dtype for p in params}, key=str)):
        ps = [p for p in params if p.dtype == dtype]
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
        if i == 0 and value is not None:
            parts.append(value.to(dtype))
        flat = torch.cat(parts)
        if world > 1:
            try:
                dist.all_reduce(flat, group=group)
            except RuntimeError as e:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
                raise comm.PeerError(f"ringattn: the gradient all-reduce failed; a peer rank probably died or "
                                     f"timed out: {comm.first_line(e)}") from e
        off = 0
        for p in ps:
            g = flat[off:off + p.numel()].view_as(p)
            off += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        if i == 0 and value is not None:
            value = flat[-1]
    if value is not None and not params:
        if world > 1:
            dist.all_reduce(value, group=group)
        value = value[0]
    return value
