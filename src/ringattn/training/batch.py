"""Next-token labels of a sequence split across ranks: shift on the whole sequence, then shard.

The label of position ``i`` is token ``i + 1``, which for the last token of a shard lives on another
rank (the next block in ``contiguous``, the next rank in ``striped``, the other chunk in ``zigzag``).
So labels are shifted on the *global* sequence first and then sharded exactly like the inputs:
``shard_batch`` does it when every rank has the full sequences (the usual case: the data loader of a
context-parallel group yields whole sequences), ``sharded_labels`` when a rank only has its shard of the
tokens (one all-gather of the int tokens, no activation traffic). ``count_labels`` is the global number
of scored labels, the normaliser of the loss over ranks (``training.loss``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm
from ..layouts import check_layout, padded_len
from ..sharding import shard, unshard

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
