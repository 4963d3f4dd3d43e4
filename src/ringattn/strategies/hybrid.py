"""Hybrid context parallelism (USP; TransformerEngine's a2a+p2p): Ulysses inside, the ring across.

The 2-D ``DeviceMesh`` has a *ring* dimension of R ranks and a *ulysses* dimension of U ranks, found
by ``mesh_dim_names`` ("ring", "ulysses") or else by position (dim 0 = ring, dim 1 = ulysses). Put
the Ulysses dimension inside a node (fast all-to-all) and the ring across nodes (point-to-point,
overlapped with compute): ``init_device_mesh("cuda", (nodes, gpus_per_node),
mesh_dim_names=("ring", "ulysses"))``.

Positions (``layouts.hybrid_segments``; ``ringattn.shard(x, mesh=mesh, layout=...)`` produces them):
the layout splits the sequence over the R ring ranks into blocks of ``U * local_len``, and the U
Ulysses ranks of a ring rank hold consecutive rows of that block. The all-to-all inside the Ulysses
group therefore rebuilds exactly the ring block, in its own row order, for ``heads / U`` heads — which
is what ``ring_attention`` on the ring group with the same layout expects. A second all-to-all
returns output and lse to the sequence split. K/V heads are replicated as in Ulysses when
``kv_heads`` is not a multiple of U.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm
from ..layouts import mesh_coords, mesh_dims
from ..ring import ring_attention
from ..validate import call_number, out_of_step
from . import AllToAll, check_call, device_of, kv_replication


def _agree_on_mesh(desc: str, error: Exception | None, groups, device: torch.device) -> None:
    """Every mesh rank raises if any rank's check failed or descriptions differ.

    Two small all-reduces (over the Ulysses group, then the ring group) reach every rank of the mesh,
    so no rank enters the all-to-all or the ring while a peer has given up.
    """
    import zlib

    h = zlib.crc32(desc.encode()) & 0x7FFFFFFF
    n = call_number(groups[0])  # counted on the first group: every mesh rank is in one of them
    t = torch.tensor([h, -h, 1 if error is not None else 0, n, -n], dtype=torch.int64, device=device)
    for g in groups:
        if comm.group_rank_world(g)[1] > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g)
    if error is not None:
        raise error
    if int(t[2]):
        raise ValueError("another rank of the mesh rejected its arguments, so this call was abandoned")
    if int(t[3]) != -int(t[4]):
        raise out_of_step(f"from {-int(t[4])} to {int(t[3])}")
    if int(t[0]) != -int(t[1]):
        raise ValueError("ranks of the mesh disagree on the attention call (every rank must pass the same "
                         f"shapes, dtype, masks and layout); this rank: {desc}")


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mesh=None,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    layout: str = "contiguous",
    seq_len: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backward_exchange: str = "ring",
):
    """Exact attention: Ulysses all-to-all on the mesh's ulysses dim, ring attention on its ring dim.

    Same arguments and results as ``ring_attention`` with the shards made by
    ``ringattn.shard(x, mesh=mesh, layout=layout)``. Needs ``heads`` divisible by the Ulysses size.
    ``backward_exchange`` is the ring's (see ``ring_attention``).
    """
    if mesh is None:
        raise ValueError("strategy='hybrid' needs mesh=, a 2-D DeviceMesh with a ring and a ulysses dimension")
    ring_dim, uly_dim = mesh_dims(mesh)
    _, ring_world, _, uly_world = mesh_coords(mesh)
    ring_group, uly_group = mesh.get_group(ring_dim), mesh.get_group(uly_dim)
    error, spec, desc = None, None, ""
    try:
        # The layout is over the ring's blocks of U * local_len rows (zigzag: an even number).
        spec, _, desc = check_call(q, k, v, strategy="hybrid", world=ring_world, layout=layout, causal=causal,
                                   window=window, seq_len=seq_len, cu_seqlens=cu_seqlens,
                                   softmax_scale=softmax_scale, local_world=uly_world, block_rows=uly_world,
                                   backward_exchange=backward_exchange)
        desc += f" mesh={ring_world}x{uly_world}"
    except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear of it
        error = e
    _agree_on_mesh(desc, error, (uly_group, ring_group), device_of(q))
    s = comm.stats()
    if s is not None:
        s.calls += 1
    f = kv_replication(k.shape[2], uly_world)
    if f > 1:
        k, v = k.repeat_interleave(f, dim=2), v.repeat_interleave(f, dim=2)
    qh, kh, vh = (AllToAll.apply(t, uly_group, 2, 1) for t in (q, k, v))
    out, lse = ring_attention(qh, kh, vh, group=ring_group, causal=causal, window=window, layout=layout,
                              seq_len=spec.seq_len, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale,
                              return_lse=True, backward_exchange=backward_exchange)
    out, lse = AllToAll.apply(out, uly_group, 1, 2), AllToAll.apply(lse, uly_group, 2, 1)
    return (out, lse) if return_lse else out
