"""Batches of normalised, augmented images on the training device.

Two loaders with one interface (construct, ``set_epoch(epoch)``, iterate over
``(x, y)`` pairs already on ``device``, ``len()``):

:class:`DeviceLoader`
    the fast path. The whole uint8 split is moved to the device once; every batch is an
    index gather, a cast, a batched augmentation and a normalisation, all on the device.
    ``batch_size`` is the GLOBAL batch and each rank yields its share of every global
    batch, with the randomness drawn for the whole global batch, so N processes together
    see exactly the batches that one process sees (which is what lets a distributed run
    be compared with a single-process run step for step).
:class:`HostLoader`
    the ordinary path for splits that do not fit on the device: a torch ``DataLoader``
    over the uint8 CPU tensors with a ``DistributedSampler`` (re-seeded each epoch by
    ``set_epoch``), batches copied to the device and augmented and normalised there.

:func:`make_loader` picks one. ``augment`` is ``None`` or a callable ``(x, generator) -> x``
on float32 images in [0, 1] units, applied before normalisation (see
:mod:`tvlars.harness.data.augment`).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from tvlars.errors import UserError
from tvlars.harness.data.transfer import to_device

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

# Independent random streams derived from (seed, epoch).
_PERMUTATION_STREAM = 0
_AUGMENTATION_STREAM = 1

#: ``make_loader(data_on_device="auto")`` keeps a CUDA split on the device when its bytes
#: are at most this fraction of the device's free memory, leaving the rest for the model,
#: activations and optimizer state.
DEVICE_MEMORY_FRACTION = 0.25


def derived_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative integers, e.g. (seed, epoch, stream).

    numpy's SeedSequence hashes the whole tuple, so nearby keys give unrelated streams.
    """
    state = np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def rank_share(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The [start, stop) rows of a global batch of ``rows`` that belong to ``rank``.

    Contiguous blocks, so the ranks' shares concatenated in rank order are the global
    batch. A full batch splits exactly (rows is a multiple of world_size); a last partial
    batch splits as evenly as possible, the first ``rows % world_size`` ranks taking one
    row more (a rank may get zero rows when ``rows < world_size``).
    """
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _no_batches(batch_size: int, count: int) -> UserError:
    return UserError(f"batch size {batch_size} is larger than the {count} images, "
                     "so dropping the last partial batch leaves no batches")


def _check_arguments(images, labels, batch_size, mean, std, rank, world_size, seed) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("images must be a uint8 tensor [N, C, H, W]")
    if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be a tensor [{images.shape[0]}] (one per image)")
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need one value per channel ({channels})")
    if min(std) <= 0:
        raise ValueError("std must be positive")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    if batch_size % world_size:
        raise UserError(
            f"global batch size {batch_size} is not divisible by the {world_size} processes"
        )
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")


def _normalisation(mean: Sequence[float], std: Sequence[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(mean), 1, 1)
    return (
        torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
        torch.tensor(std, dtype=torch.float32, device=device).view(shape),
    )


class DeviceLoader:
    """The whole split on ``device``; yields this rank's share of each global batch.

    Epoch ``e`` (set by :meth:`set_epoch`; 0 until then) visits the images in an order
    that depends only on ``(seed, e)`` (in stored order when ``shuffle`` is false) and
    draws its augmentation from a generator seeded by ``(seed, e)`` too, so iterating an
    epoch twice gives identical batches, whatever happened before.

    Global batch ``k`` is rows ``[k * batch_size, (k + 1) * batch_size)`` of the epoch's
    order; this rank yields rows ``[rank * b, (rank + 1) * b)`` of it with
    ``b = batch_size // world_size`` (which must divide evenly). With ``drop_last`` false
    the last, partial global batch is split as evenly as possible across ranks (see
    :func:`rank_share`). Augmentations with ``sample``/``apply`` (like
    :class:`~tvlars.harness.data.augment.RandomCropFlip`) have their parameters drawn for the
    global batch and sliced; any other callable is applied to the whole global batch,
    whose rows are then sliced, which gives the same result at ``world_size`` times the
    augmentation work.

    ``len(loader)`` is the number of global batches per epoch, the same on every rank.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        shuffle: bool,
        drop_last: bool,
        augment: Augment | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        channels_last: bool = False,
    ):
        _check_arguments(images, labels, batch_size, mean, std, rank, world_size, seed)
        if drop_last and len(images) < batch_size:
            raise _no_batches(batch_size, len(images))
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, dtype=torch.int64)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.channels_last = channels_last
        self.epoch = 0
        self._mean, self._std = _normalisation(mean, std, self.device)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        count = len(self.images)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def _order(self) -> torch.Tensor:
        count = len(self.images)
        if not self.shuffle:
            return torch.arange(count, device=self.device)
        generator = derived_generator(self.seed, self.epoch, _PERMUTATION_STREAM)
        return to_device([torch.randperm(count, generator=generator)], self.device)[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        generator = derived_generator(self.seed, self.epoch, _AUGMENTATION_STREAM)
        for batch in range(len(self)):
            global_rows = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            start, stop = rank_share(len(global_rows), self.rank, self.world_size)
            rows = global_rows[start:stop]
            x = self.images.index_select(0, rows).to(torch.float32).div_(255)
            if self.augment is not None:
                x = self._augment_share(x, global_rows, start, stop, generator)
            x = x.sub_(self._mean).div_(self._std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels.index_select(0, rows)

    def _augment_share(self, x, global_rows, start, stop, generator) -> torch.Tensor:
        """Augment this rank's rows exactly as they would be augmented in the whole batch."""
        if hasattr(self.augment, "sample") and hasattr(self.augment, "apply"):
            params = self.augment.sample(len(global_rows), generator, self.device)
            return self.augment.apply(x, tuple(p[start:stop] for p in params))
        if self.world_size == 1:
            return self.augment(x, generator)
        whole = self.images.index_select(0, global_rows).to(torch.float32).div_(255)
        return self.augment(whole, generator)[start:stop]


class _IndexedImages(Dataset):
    """uint8 images and labels, fetched a whole batch per call (``__getitems__``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]):
        rows = torch.as_tensor(indices)
        return self.images.index_select(0, rows), self.labels.index_select(0, rows)


def _already_collated(batch):
    """``__getitems__`` returns a finished batch; a module-level function so workers can pickle it."""
    return batch


class HostLoader:
    """A torch ``DataLoader`` over the CPU split; augmentation and normalisation on ``device``.

    Sharding follows ``DistributedSampler`` (the usual DDP recipe), not
    :class:`DeviceLoader`'s global-batch slicing: each rank draws ``batch_size //
    world_size`` images per batch from its strided share of the permutation seeded by
    ``seed + epoch``; with ``drop_last`` false the sampler pads the ranks' shares to equal
    length by repeating images and the last batch per rank may be short. Augmentation is
    drawn per rank from ``(seed, epoch, rank)``. ``len()`` is this rank's number of batches
    (the same on every rank). ``pin_memory`` defaults to true for CUDA devices.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        shuffle: bool,
        drop_last: bool,
        augment: Augment | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        channels_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ):
        _check_arguments(images, labels, batch_size, mean, std, rank, world_size, seed)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.augment = augment
        self.rank = rank
        self.seed = seed
        self.channels_last = channels_last
        self.epoch = 0
        self._mean, self._std = _normalisation(mean, std, self.device)
        dataset = _IndexedImages(images, labels.to(torch.int64))
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self._pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.loader = DataLoader(
            dataset,
            batch_size=self.local_batch_size,
            sampler=self.sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=self._pin,
            collate_fn=_already_collated,
            persistent_workers=num_workers > 0,
        )
        if len(self.loader) == 0:
            raise _no_batches(batch_size, len(images))

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = derived_generator(self.seed, self.epoch, _AUGMENTATION_STREAM, self.rank)
        for images, labels in self.loader:
            x = images.to(self.device, non_blocking=self._pin).to(torch.float32).div_(255)
            if self.augment is not None:
                x = self.augment(x, generator)
            x = x.sub_(self._mean).div_(self._std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels.to(self.device, non_blocking=self._pin)


def fits_on_device(num_bytes: int, device: torch.device | str) -> bool:
    """Whether ``num_bytes`` of data fit comfortably in ``device`` memory.

    CUDA: at most :data:`DEVICE_MEMORY_FRACTION` of the currently free memory. Other
    devices (the CPU, where the "device" copy is the data itself) always fit.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return num_bytes <= DEVICE_MEMORY_FRACTION * free


def make_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    device: torch.device | str,
    data_on_device: bool | str = "auto",
    num_workers: int = 0,
    pin_memory: bool | None = None,
    **loader_arguments,
) -> DeviceLoader | HostLoader:
    """A :class:`DeviceLoader` when ``data_on_device`` is true, or "auto" and the split
    :func:`fits_on_device`; else a :class:`HostLoader` (which alone uses ``num_workers``
    and ``pin_memory``). ``loader_arguments`` are the loaders' other shared keywords."""
    if data_on_device not in ("auto", True, False):
        raise UserError(f"data_on_device must be 'auto', true or false, got {data_on_device!r}")
    if data_on_device == "auto":
        size = images.numel() * images.element_size() + labels.numel() * 8
        data_on_device = fits_on_device(size, device)
    if data_on_device:
        return DeviceLoader(images, labels, device=device, **loader_arguments)
    return HostLoader(
        images, labels, device=device, num_workers=num_workers, pin_memory=pin_memory, **loader_arguments
    )
