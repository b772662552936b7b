"""tvlars.harness.data.augment and tvlars.harness.data.loader: batched crop+flip, and the loaders'
determinism, epoch reseeding, rank slicing, drop_last and normalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tvlars.errors import UserError
from tvlars.harness.data.augment import RandomCropFlip, apply_crop_flip, random_crop_flip, sample_crop_flip
from tvlars.harness.data.loader import DeviceLoader, HostLoader, make_loader, rank_share

# --------------------------------------------------------------------------- augmentation


def test_crop_without_padding_or_flip_is_identity():
    x = torch.rand(5, 3, 7, 6)
    zeros = torch.zeros(5, dtype=torch.long)
    no_flip = torch.zeros(5, dtype=torch.bool)
    assert torch.equal(apply_crop_flip(x, 0, zeros, zeros, no_flip), x)


def test_flip_mirrors_horizontally():
    x = torch.rand(4, 2, 5, 6)
    zeros = torch.zeros(4, dtype=torch.long)
    flip = torch.tensor([True, False, True, False])
    out = apply_crop_flip(x, 0, zeros, zeros, flip)
    assert torch.equal(out[flip], x[flip].flip(-1))
    assert torch.equal(out[~flip], x[~flip])


def test_padding_zero_random_crop_is_identity_or_mirror():
    x = torch.rand(16, 3, 5, 5)
    out = random_crop_flip(x, 0, torch.Generator().manual_seed(0))
    for original, augmented in zip(x, out):
        assert torch.equal(augmented, original) or torch.equal(augmented, original.flip(-1))


def test_crops_are_windows_of_the_zero_padded_image():
    x = torch.rand(32, 3, 8, 8) + 1  # strictly positive, so padding shows as zeros
    padding = 3
    top, left, flip = sample_crop_flip(32, padding, torch.Generator().manual_seed(1), "cpu")
    out = apply_crop_flip(x, padding, top, left, flip)
    padded = F.pad(x, (padding,) * 4)
    for b in range(32):
        window = padded[b, :, top[b] : top[b] + 8, left[b] : left[b] + 8]
        assert torch.equal(out[b], window.flip(-1) if flip[b] else window)
    # Offsets cover 0..2*padding and about half the images are flipped.
    top, left, flip = sample_crop_flip(4000, padding, torch.Generator().manual_seed(2), "cpu")
    assert set(top.tolist()) == set(left.tolist()) == set(range(2 * padding + 1))
    assert 0.45 < flip.float().mean() < 0.55


def test_random_crop_flip_is_generator_driven():
    x = torch.rand(8, 3, 6, 6)
    first = random_crop_flip(x, 2, torch.Generator().manual_seed(5))
    again = random_crop_flip(x, 2, torch.Generator().manual_seed(5))
    other = random_crop_flip(x, 2, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    augment = RandomCropFlip(2)
    assert torch.equal(augment(x, torch.Generator().manual_seed(5)), first)


# --------------------------------------------------------------------------- loader helpers


def indexed_images(count: int, channels: int = 3, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose first two pixels spell their index (so a batch says which rows it holds)."""
    images = torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(count) // 256
    images[:, 0, 0, 1] = torch.arange(count) % 256
    labels = torch.arange(count) % 10
    return images, labels


UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def row_ids(x: torch.Tensor) -> list[int]:
    """Recover image indices from batches normalised with mean 0 and std 1."""
    pixels = (x[:, 0, 0, :2] * 255).round().long()
    return (pixels[:, 0] * 256 + pixels[:, 1]).tolist()


def make_device_loader(images, labels, **overrides) -> DeviceLoader:
    arguments = dict(batch_size=8, device="cpu", shuffle=True, drop_last=True, seed=0, **UNIT)
    arguments.update(overrides)
    return DeviceLoader(images, labels, **arguments)


def epoch_batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def batches_equal(first, second) -> bool:
    return len(first) == len(second) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, second)
    )


# --------------------------------------------------------------------------- DeviceLoader


def test_normalisation_and_labels():
    images, labels = indexed_images(10)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = DeviceLoader(images, labels, batch_size=5, mean=mean, std=std, device="cpu", shuffle=False, drop_last=False)
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (images[:5].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)
    assert torch.equal(y, labels[:5])


def test_each_epoch_is_a_permutation_reseeded_by_epoch_only():
    images, labels = indexed_images(40)
    loader = make_device_loader(images, labels)
    epoch3 = epoch_batches(loader, 3)
    ids = [i for x, _ in epoch3 for i in row_ids(x)]
    assert sorted(ids) == list(range(40)) and ids != list(range(40))
    assert not batches_equal(epoch_batches(loader, 4), epoch3)
    # Whatever happened before, an epoch's batches depend on (seed, epoch) only.
    assert batches_equal(epoch_batches(loader, 3), epoch3)
    fresh = make_device_loader(images, labels)
    assert batches_equal(epoch_batches(fresh, 3), epoch3)
    other_seed = make_device_loader(images, labels, seed=1)
    assert not batches_equal(epoch_batches(other_seed, 3), epoch3)


def test_no_shuffle_keeps_stored_order():
    images, labels = indexed_images(20)
    loader = make_device_loader(images, labels, shuffle=False, batch_size=6, drop_last=False)
    assert [i for x, _ in epoch_batches(loader, 5) for i in row_ids(x)] == list(range(20))


def test_augmentation_is_deterministic_per_epoch():
    images, labels = indexed_images(24, size=8)
    loader = make_device_loader(images, labels, augment=RandomCropFlip(2))
    first = epoch_batches(loader, 1)
    assert batches_equal(epoch_batches(loader, 1), first)
    unaugmented = epoch_batches(make_device_loader(images, labels), 1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, unaugmented))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, unaugmented))  # same order


def plain_callable_augment(x, generator):
    """An augmentation without sample/apply: the loader must augment whole global batches."""
    return random_crop_flip(x, 2, generator)


@pytest.mark.parametrize("augment", [None, RandomCropFlip(2), plain_callable_augment])
@pytest.mark.parametrize(
    "count, batch_size, world_size, drop_last",
    [(40, 8, 2, True), (40, 8, 4, True), (42, 8, 2, False), (42, 8, 4, False), (41, 12, 4, False)],
)
def test_rank_shares_concatenate_to_the_single_process_batch(augment, count, batch_size, world_size, drop_last):
    images, labels = indexed_images(count, size=8)
    common = dict(batch_size=batch_size, drop_last=drop_last, augment=augment, seed=11)
    single = epoch_batches(make_device_loader(images, labels, **common), 2)
    ranks = [
        epoch_batches(make_device_loader(images, labels, rank=r, world_size=world_size, **common), 2)
        for r in range(world_size)
    ]
    assert all(len(batches) == len(single) for batches in ranks)
    for step, (x, y) in enumerate(single):
        shares = [batches[step] for batches in ranks]
        if step < len(single) - 1 or len(x) == batch_size:
            assert all(len(share_x) == batch_size // world_size for share_x, _ in shares)
        assert torch.equal(torch.cat([share_x for share_x, _ in shares]), x)
        assert torch.equal(torch.cat([share_y for _, share_y in shares]), y)


def test_rank_share_splits_partial_batches_evenly():
    assert [rank_share(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [rank_share(6, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert [rank_share(2, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_drop_last_semantics(drop_last):
    images, labels = indexed_images(21)
    loader = make_device_loader(images, labels, batch_size=8, drop_last=drop_last)
    batches = epoch_batches(loader, 0)
    assert len(loader) == len(batches) == (2 if drop_last else 3)
    assert [len(x) for x, _ in batches] == ([8, 8] if drop_last else [8, 8, 5])


def test_bad_batch_sizes_are_user_errors():
    images, labels = indexed_images(10)
    with pytest.raises(UserError, match="not divisible"):
        make_device_loader(images, labels, batch_size=9, world_size=2)
    with pytest.raises(UserError, match="larger than"):
        make_device_loader(images, labels, batch_size=16, drop_last=True)
    assert len(make_device_loader(images, labels, batch_size=16, drop_last=False)) == 1


def test_channels_last():
    images, labels = indexed_images(8, size=5)
    x, _ = next(iter(make_device_loader(images, labels, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- HostLoader


def make_host_loader(images, labels, **overrides) -> HostLoader:
    arguments = dict(batch_size=8, device="cpu", shuffle=True, drop_last=True, seed=0, **UNIT)
    arguments.update(overrides)
    return HostLoader(images, labels, **arguments)


def test_host_loader_normalises_and_reseeds_per_epoch():
    images, labels = indexed_images(32)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    plain = make_host_loader(images, labels, shuffle=False, mean=mean, std=std)
    x, y = next(iter(plain))
    expected = (images[:8].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6) and torch.equal(y, labels[:8])

    loader = make_host_loader(images, labels, augment=RandomCropFlip(1))
    epoch0 = epoch_batches(loader, 0)
    assert len(loader) == len(epoch0) == 4
    assert batches_equal(epoch_batches(loader, 0), epoch0)
    assert not batches_equal(epoch_batches(loader, 1), epoch0)


def test_host_loader_ranks_get_disjoint_shares():
    images, labels = indexed_images(32)
    ranks = [make_host_loader(images, labels, rank=r, world_size=2) for r in range(2)]
    ids = [[i for x, _ in epoch_batches(loader, 3) for i in row_ids(x)] for loader in ranks]
    assert all(len(x) == 4 for x, _ in epoch_batches(ranks[0], 3))
    assert sorted(ids[0] + ids[1]) == list(range(32))


def test_host_loader_with_worker_processes():
    images, labels = indexed_images(16)
    loader = make_host_loader(images, labels, shuffle=False, num_workers=1)
    assert [i for x, _ in epoch_batches(loader, 0) for i in row_ids(x)] == list(range(16))


# --------------------------------------------------------------------------- make_loader


def test_make_loader_chooses_the_path():
    images, labels = indexed_images(16)
    common = dict(batch_size=8, device="cpu", shuffle=True, drop_last=True, **UNIT)
    assert isinstance(make_loader(images, labels, **common), DeviceLoader)  # the CPU always fits
    assert isinstance(make_loader(images, labels, data_on_device=True, **common), DeviceLoader)
    assert isinstance(make_loader(images, labels, data_on_device=False, num_workers=0, **common), HostLoader)
    with pytest.raises(UserError, match="data_on_device"):
        make_loader(images, labels, data_on_device="sometimes", **common)


def test_loader_lengths_match_global_batches():
    images, labels = indexed_images(50)
    for drop_last in (True, False):
        loader = make_device_loader(images, labels, batch_size=16, drop_last=drop_last, world_size=4, rank=1)
        assert len(loader) == (50 // 16 if drop_last else math.ceil(50 / 16))
