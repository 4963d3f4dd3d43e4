"""FSDP2 over the data-parallel ranks, ring attention over the context: one ("dp", "cp") DeviceMesh.

``fully_shard`` shards parameters, gradients and optimizer state over the mesh's ``dp`` dimension, one
unit per decoder layer. Along ``cp`` the ranks hold the same parameter shards and different tokens of
the same sequences, so a parameter's gradient is the *sum* of the cp ranks' parts. Divide the loss by the
global number of scored tokens (every rank's): then the gradient is the sum over all ranks. FSDP2
reduce-scatters over dp as a mean, and ``sync_context_gradients`` sums each local gradient shard over cp
and undoes that mean (FSDP2's own divide factor would take a reduce op gloo lacks).

Checkpoints go through ``ringattn.training.checkpoint`` (torch.distributed.checkpoint), which reshards on load:
a run saved on one mesh resumes on another, e.g. (dp=2, cp=2) on 4 ranks to (dp=1, cp=2) on 2.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def context_mesh(dp: int, cp: int, device_type: str | None = None) -> DeviceMesh:
    """The ("dp", "cp") mesh over every rank: ``dp * cp`` must be the world size."""
    world = dist.get_world_size()
    if dp < 1 or cp < 1 or dp * cp != world:
        raise ValueError(f"dp x cp must be the number of ranks ({world}), got {dp} x {cp}")
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    return init_device_mesh(device_type, (dp, cp), mesh_dim_names=("dp", "cp"))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: ringattn's ``model.layers``, or a transformers model's
    ``get_decoder().layers``."""
    for owner in (model, getattr(model, "model", None),
                  model.get_decoder() if hasattr(model, "get_decoder") else None):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
    raise ValueError(f"{type(model).__name__} has no decoder-layer ModuleList (.layers); pass layers= to "
                     "shard_model")


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, *,
                layers: torch.nn.ModuleList | None = None) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the rest of the model, over ``mesh["dp"]``; in place."""
    dp = mesh["dp"]
    for layer in decoder_layers(model) if layers is None else layers:
        fully_shard(layer, mesh=dp)
    fully_shard(model, mesh=dp)
    return model


def sync_context_gradients(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    """Sum each parameter's gradient over ``mesh["cp"]`` (each context rank gave the part of its tokens)
    and over ``mesh["dp"]`` (FSDP2 reduce-scattered a mean there): with the loss divided by every rank's
    scored tokens, the gradient of the global mean.

    Call after ``backward`` (FSDP2 has reduce-scattered over dp by then) and before the optimizer step.
    """
    cp, dp = mesh["cp"], mesh["dp"].size()
    for p in model.parameters():
        if p.grad is None:
            continue
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        if dp > 1:
            grad.mul_(dp)
        if cp.size() > 1:
            dist.all_reduce(grad, group=cp.get_group())
