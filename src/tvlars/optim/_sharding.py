"""Whole-layer norms for parameters sharded as DTensors (FSDP2's ``fully_shard``, HSDP, TP).

The trust ratio needs the norm of the whole layer, not of this rank's shard. Each rank
measures its shard; the squared norms of all sharded layers of a step then travel in one
all-reduce per mesh (sum over the mesh dimensions that shard them), so every rank gets the
same whole-layer norms, takes the same skip decision, and reports the same telemetry. The
update itself is elementwise and runs on the local shards.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._scalars import to_device

try:
    import torch.distributed as dist
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate
    except ImportError:  # torch 2.4: DTensor was private (torch.distributed._tensor)
        from torch.distributed._tensor import DTensor, Partial, Replicate
except ImportError:  # torch built without distributed
    dist = DTensor = Partial = Replicate = None


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The tensor the update writes: a DTensor's local shard (an alias of its data), else ``t``."""
    if is_distributed(t):
        return t.to_local()
    return t


def is_distributed(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def shard_key(p: Tensor) -> Optional[tuple]:
    """(mesh, mesh dimensions that shard ``p``) for a sharded DTensor; None for a whole tensor.

    A mesh dimension splits ``p`` unless it replicates it: not only ``Shard`` but every sharding
    placement torch has or will add counts, such as ``_StridedShard``, which FSDP2 uses for a
    dimension tensor parallelism already shards and which is no ``Shard`` (nor ``is_shard()``)
    in torch 2.14. Leaving one out would take the trust ratio from a partial norm."""
    if not is_distributed(p):
        return None
    placements = p.placements
    if any(isinstance(pl, Partial) for pl in placements):
        raise ValueError("parameters with Partial placements are not supported (reduce them first)")
    dims = tuple(i for i, pl in enumerate(placements) if not isinstance(pl, Replicate))
    return (p.device_mesh, dims) if dims else None


def combine(norms: list[Tensor], keys: list[list[Optional[tuple]]]) -> list[Tensor]:
    """Whole-layer norms: ``norms[g]`` is group g's [2, layers] tensor of local norms and
    ``keys[g]`` the layers' shard keys. Layers that are not sharded keep their norms."""
    flat_keys = [k for ks in keys for k in ks]
    # in order of first appearance, the same on every rank: a set's order follows hashes that
    # differ between processes (a mesh's dimension names), and ranks that all-reduce over
    # different groups in different orders deadlock
    distinct = list(dict.fromkeys(k for k in flat_keys if k is not None))
    if not distinct:
        return norms
    device = norms[0].device
    sizes = [n.shape[1] for n in norms]
    whole = torch.cat([n.to(device) for n in norms], dim=1)
    for key in distinct:
        mesh, dims = key
        every = all(k == key for k in flat_keys)
        squares = whole * whole
        if not every:  # only this key's layers contribute; the others are added as 0
            mask = to_device(torch.tensor([k == key for k in flat_keys]), device)
            squares = torch.where(mask, squares, 0.0)
        for dim in dims:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        whole = squares.sqrt() if every else torch.where(mask, squares.sqrt(), whole)
    return [part.to(n.device) for part, n in zip(whole.split(sizes, dim=1), norms)]
