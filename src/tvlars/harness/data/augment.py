"""Batched, on-device data augmentation: the paper's random crop with zero padding and
horizontal flip, for a whole batch at once with no per-image Python work.

Randomness comes from a caller-supplied ``torch.Generator``. The random draws are made on
the generator's device (normally the CPU) and the few integers per image are then moved
to the images' device, so the same generator state gives the same augmentation on every
device type. The move is one non-blocking copy from pinned memory
(:func:`tvlars.harness.data.transfer.to_device`): the host never waits for the device in a step.

An augmentation, as :class:`tvlars.harness.data.loader.DeviceLoader` uses it, is a callable
``(x, generator) -> x`` on float images in [0, 1] units (before normalisation, so zero
padding is black as in torchvision's ``RandomCrop(padding=...)``). Augmentations that
also offer ``sample(batch_size, generator, device)`` and ``apply(x, params)`` let the
loader draw the randomness for a whole global batch and apply only this rank's slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tvlars.harness.data.transfer import to_device


def sample_crop_flip(
    batch_size: int, padding: int, generator: torch.Generator, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image random crop offsets (top, left) in ``[0, 2 * padding]`` and flip flags.

    Each returned tensor has ``batch_size`` rows, so a batch's parameters can be sliced
    like the batch itself.
    """
    draw_device = generator.device
    top = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator, device=draw_device)
    left = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator, device=draw_device)
    flip = torch.rand(batch_size, generator=generator, device=draw_device) < 0.5
    top, left, flip = to_device([top, left, flip], device)
    return top, left, flip


def apply_crop_flip(
    x: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Crop each image of ``x`` [B, C, H, W] from its zero-padded copy at (top, left),
    then mirror it horizontally where ``flip`` is true.

    ``unfold`` views every possible crop of every image without copying
    ([B, C, 2p+1, 2p+1, H, W]); one advanced-indexing gather picks each image's crop.
    This is about 3x faster on the CPU than indexing pixel by pixel.
    """
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    crops = padded.unfold(2, height, 1).unfold(3, width, 1)
    cropped = crops[torch.arange(batch, device=x.device), :, top, left]  # [B, C, H, W]
    return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped)


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the original size from the image zero-padded by ``padding`` pixels
    on each side, then a horizontal flip with probability 1/2, for every image of ``x``
    [B, C, H, W] independently (torchvision's RandomCrop(size, padding) +
    RandomHorizontalFlip, batched)."""
    top, left, flip = sample_crop_flip(x.shape[0], padding, generator, x.device)
    return apply_crop_flip(x, padding, top, left, flip)


class RandomCropFlip:
    """:func:`random_crop_flip` as an augmentation object for the loaders.

    ``RandomCropFlip(4)(x, generator)`` augments a batch; ``sample``/``apply`` split the
    random draw from its use so a loader can draw for a global batch and apply a slice.
    """

    def __init__(self, padding: int = 4):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = padding

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_crop_flip(x, self.padding, generator)

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device | str):
        return sample_crop_flip(batch_size, self.padding, generator, device)

    def apply(self, x: torch.Tensor, params) -> torch.Tensor:
        return apply_crop_flip(x, self.padding, *params)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding})"
