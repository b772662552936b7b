"""Host-to-device copies that never make the host wait.

The harness draws its random numbers (permutations, augmentation parameters) on CPU
generators, so that a seed gives the same batches on every device type, and then needs
those few tensors on the training device in every step. A plain ``tensor.to("cuda")``
from ordinary (pageable) memory is a blocking copy: the host waits for the device to
drain its queue, once per tensor. :func:`to_device` instead packs all of a step's
tensors into one pinned staging buffer and sends it with a single ``non_blocking`` copy;
torch's pinned-memory allocator keeps the buffer alive until the copy has run.

    to_device(tensors, device) -> list[Tensor]
        the tensors on ``device``, same dtypes, shapes and values (bit for bit)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Each tensor starts at a multiple of this many bytes in the staging buffer, so that its
# bytes can be viewed as its own dtype again on the device.
_ALIGN = 16


def to_device(tensors: Sequence[Tensor], device: torch.device | str) -> list[Tensor]:
    """``tensors`` (CPU) on ``device`` in one non-blocking copy (pinned on CUDA).

    Tensors already on ``device`` are returned as they are. The results are views of one
    device buffer; they do not overlap, so writing to one never changes another.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if all(t.device == device for t in tensors):
        return list(tensors)
    if any(t.device.type != "cpu" for t in tensors):  # device to device: already asynchronous
        return [t.to(device, non_blocking=True) for t in tensors]
    pieces = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    offsets, total = [], 0
    for piece in pieces:
        offsets.append(total)
        total += -(-piece.numel() // _ALIGN) * _ALIGN
    staging = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=device.type == "cuda")
    for piece, start in zip(pieces, offsets):
        staging[start:start + piece.numel()].copy_(piece)
    on_device = staging.to(device, non_blocking=True)
    return [on_device[start:start + piece.numel()].view(t.dtype).view(t.shape)
            for t, piece, start in zip(tensors, pieces, offsets)]
