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

from typing import TYPE_CHECKING

import torch

from ..callspec import Topology
from ..comm import AllToAll
from ..cost_model import Estimate, Hardware, Problem
from ..layouts import kv_replication, mesh_coords, mesh_dims
from ..modes import Strategy
from . import ring
from .base import StrategyKind, register
from .ring import ring_cost
from .ulysses import ulysses_comm

if TYPE_CHECKING:
    from ..callspec import AttentionCall


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
    """Ulysses all-to-all on the mesh's ulysses dim, the ring on its ring dim; (out, lse), differentiable.

    The all-to-all rebuilds the ring block (``U * local_len`` rows, in its own row order) for
    ``heads / U`` heads: exactly what the ring over ``call.group`` (the ring dim) expects.
    """
    uly_group, uly_world = call.topo.head_group, call.topo.head_world
    f = kv_replication(k.shape[2], uly_world)
    if f > 1:
        k, v = k.repeat_interleave(f, dim=2), v.repeat_interleave(f, dim=2)
    qh, kh, vh = (AllToAll.apply(t, uly_group, 2, 1) for t in (q, k, v))
    out, lse = ring.run(qh, kh, vh, call.local_heads(q.shape[2]))
    return AllToAll.apply(out, uly_group, 1, 2), AllToAll.apply(lse, uly_group, 2, 1)


def topology(group, mesh) -> Topology:
    """The mesh's ring and Ulysses groups; misuse of ``group=`` / ``mesh=`` is an error at once."""
    if group is not None:
        raise ValueError("strategy='hybrid' takes its process groups from mesh=; leave group=None")
    if mesh is None:
        raise ValueError("strategy='hybrid' needs mesh=, a 2-D DeviceMesh with a ring and a ulysses dimension")
    ring_dim, uly_dim = mesh_dims(mesh)
    ring_rank, ring_world, uly_rank, uly_world = mesh_coords(mesh)
    ring_group, uly_group = mesh.get_group(ring_dim), mesh.get_group(uly_dim)
    # The layout is over the ring's blocks of U * local_len rows; two small agreements (the Ulysses group,
    # then the ring group) reach every rank of the mesh.
    return Topology(ring_group, ring_rank, ring_world, uly_world, uly_group, uly_world, uly_rank,
                    agree_over=(uly_group, ring_group), mesh=mesh)



# ---- the cost model's estimate ------------------------------------------------------------

def hybrid_mesh(p: Problem, hw: Hardware) -> tuple[int, int] | None:
    """(ring, ulysses): the largest Ulysses group inside a node that splits the heads, with R > 1."""
    if p.mesh is not None:
        return p.mesh
    for u in range(min(hw.node_size, p.world // 2), 1, -1):
        if p.world % u == 0 and p.heads % u == 0:
            return p.world // u, u
    return None


def estimate_hybrid(p: Problem, hw: Hardware) -> Estimate:
    mesh = hybrid_mesh(p, hw)
    if mesh is None or p.heads % mesh[1]:
        return Estimate("hybrid", False, "no 2-D mesh with 1 < ulysses <= node size dividing the heads")
    r, u = mesh
    a2a_s, a2a_bytes, kvh = ulysses_comm(p, hw, u, p.local_len, hw.link(u))
    ring_bw = hw.bandwidth if p.world > hw.node_size else hw.link(p.world)
    est = ring_cost(p, hw, r, u * p.local_len, p.heads // u, kvh // u, ring_bw)
    est.strategy = "hybrid"
    est.note = f"mesh {r} ring x {u} ulysses; " + est.note
    est.comm_bytes += a2a_bytes
    est.comm_s += a2a_s
    est.exposed_s += a2a_s
    est.time_s += a2a_s
    est.hidden = False
    est.memory_bytes += 2 * p.batch * p.local_len * (p.heads * p.head_dim + kvh * (p.head_dim + p.dv)) * p.dtype_bytes
    return est


# "auto" chooses it only where the call has a mesh (the shards were made for one).
STRATEGY = register(StrategyKind(Strategy.HYBRID, run, topology, ring.tasks_for, frozenset({"backward_exchange"}),
                                 estimate_hybrid, auto=False))
