"""Batched two-view augmentation (tvlars.harness.ssl.augment)."""

import time
from dataclasses import replace

import pytest
import torch
import torchvision.transforms.functional as TF

from tvlars.errors import UserError
from tvlars.harness.ssl import augment as sa
from tvlars.harness.ssl.augment import OneViewAugment, TwoViewAugment, ViewConfig, reference_views

MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)
PLAIN = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _unnorm(v, mean=MEAN, std=STD):
    return v * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_dtype_and_range(size):
    x = torch.rand(24, 3, size, size)
    aug = TwoViewAugment(size, 3, MEAN, STD, preset="reference")
    v1, v2 = aug(x, _gen())
    for v in (v1, v2):
        assert v.shape == x.shape and v.dtype == torch.float32 and v.is_contiguous()
        u = _unnorm(v)
        assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5  # normalised output of [0, 1] images
    assert not torch.allclose(v1, v2)


def test_resizes_to_image_size():
    v1, v2 = TwoViewAugment(32, 3, MEAN, STD)(torch.rand(4, 3, 48, 40), _gen())
    assert v1.shape == (4, 3, 32, 32) and v2.shape == (4, 3, 32, 32)


def test_determinism_and_seed_dependence():
    x = torch.rand(16, 3, 32, 32)
    aug = TwoViewAugment(32, 3, MEAN, STD)
    a1, a2 = aug(x, _gen(5))
    torch.manual_seed(999)  # the global RNG plays no part
    b1, b2 = aug(x, _gen(5))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    c1, _ = aug(x, _gen(6))
    assert not torch.allclose(a1, c1)
    g = _gen(5)
    aug(x, g)
    d1, _ = aug(x, g)  # the generator advances
    assert not torch.allclose(a1, d1)


def test_global_batch_slices_match_one_process():
    x = torch.rand(12, 3, 32, 32)
    aug = TwoViewAugment(32, 3, MEAN, STD)
    full1, full2 = aug(x, _gen(3))
    for lo, hi in [(0, 5), (5, 12)]:  # two "ranks" with unequal shares
        p1, p2 = aug(x[lo:hi], _gen(3), global_batch=12, offset=lo)
        assert torch.allclose(p1, full1[lo:hi], atol=1e-6)
        assert torch.allclose(p2, full2[lo:hi], atol=1e-6)
    with pytest.raises(ValueError):
        aug(x[:5], _gen(3), global_batch=12, offset=10)


def test_input_conventions_uint8_and_normalized():
    x8 = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    xf = x8.float() / 255
    aug = TwoViewAugment(32, 3, MEAN, STD)
    a = aug(x8, _gen(1))
    b = aug(xf, _gen(1))
    xn = (xf - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)
    c = TwoViewAugment(32, 3, MEAN, STD, input_range="normalized")(xn, _gen(1))
    for u, v, w in zip(a, b, c):
        assert torch.allclose(u, v, atol=1e-6) and torch.allclose(u, w, atol=1e-4)


def test_crop_identity_and_flip():
    x = torch.rand(6, 3, 32, 32)
    ident = OneViewAugment(32, 3, (0,) * 3, (1,) * 3, PLAIN)
    assert torch.allclose(ident(x, _gen()), x, atol=1e-6)
    flip = OneViewAugment(32, 3, (0,) * 3, (1,) * 3, replace(PLAIN, flip_p=1.0))
    assert torch.allclose(flip(x, _gen()), x.flip(-1), atol=1e-6)


def test_crop_is_a_resized_sub_box():
    # a crop of the left half of a left-dark / right-bright image stays dark
    x = torch.zeros(4, 3, 32, 32)
    x[..., 16:] = 1.0
    boxes = sa._sample_boxes(1000, (0.08, 1.0), (3 / 4, 4 / 3), _gen())
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    area = w * h
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6
    assert ((w / h) >= 3 / 4 - 1e-4).all() and ((w / h) <= 4 / 3 + 1e-4).all()


def test_colour_ops_match_torchvision():
    x = torch.rand(5, 3, 9, 9)
    f = torch.tensor([0.6, 0.8, 1.0, 1.2, 1.4])
    for mine, theirs in [(sa._brightness, TF.adjust_brightness), (sa._contrast, TF.adjust_contrast),
                         (sa._saturation, TF.adjust_saturation)]:
        got = mine(x.clone(), f)
        want = torch.stack([theirs(x[i], float(f[i])) for i in range(5)])
        assert torch.allclose(got, want, atol=1e-4), mine.__name__
    shift = torch.tensor([-0.1, -0.05, 0.0, 0.05, 0.1])
    got = sa._hue(x, shift)
    want = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(5)])
    assert torch.allclose(got, want, atol=1e-4)
    gray = OneViewAugment(9, 3, (0,) * 3, (1,) * 3, replace(PLAIN, gray_p=1.0))(x, _gen())
    assert torch.allclose(gray, TF.rgb_to_grayscale(x, 3), atol=1e-5)


def test_blur_matches_torchvision_per_sample():
    x = torch.rand(3, 3, 16, 16)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    got = sa._blur(x, sigma, radius=6)
    for i in range(3):
        want = TF.gaussian_blur(x[i:i + 1], kernel_size=13, sigma=float(sigma[i]))
        assert torch.allclose(got[i:i + 1], want, atol=1e-5)
    const = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(sa._blur(const, torch.tensor([1.0, 2.0]), 3), const, atol=1e-6)


def test_reference_preset_is_asymmetric():
    aug = TwoViewAugment(32, 3, MEAN, STD, preset="reference")
    v1, v2 = aug.view1.view, aug.view2.view
    assert (v1.blur_p, v1.solarize_p) == (1.0, 0.0) and (v2.blur_p, v2.solarize_p) == (0.1, 0.2)
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue, v1.jitter_p, v1.gray_p) == (0.4, 0.4, 0.2, 0.1, 0.8, 0.2)
    # behaviour: a bright grey image stays >= 0.54 under every op but solarisation (-> <= 0.46)
    x = torch.full((1000, 3, 8, 8), 0.9)
    a1, a2 = TwoViewAugment(8, 3, (0,) * 3, (1,) * 3, preset="reference")(x, _gen(2))
    dark1 = (a1.amax(dim=(1, 2, 3)) < 0.5).float().mean().item()
    dark2 = (a2.amax(dim=(1, 2, 3)) < 0.5).float().mean().item()
    assert dark1 == 0.0  # solarisation never in view 1
    assert 0.15 < dark2 < 0.25  # p = 0.2 in view 2
    assert a1.min() >= 0.54 - 1e-5


def test_blur_probabilities_per_view():
    aug = TwoViewAugment(32, 3, MEAN, STD)
    n = 4000
    g = _gen(4)
    assert aug.view1.draw(n, g)["blur"].float().mean() == 1.0
    frac = aug.view2.draw(n, g)["blur"].float().mean().item()
    assert 0.08 < frac < 0.12


def test_small_preset_for_digits():
    x = torch.rand(64, 1, 8, 8)
    aug = TwoViewAugment(8, 1, (0.3,), (0.4,))
    assert aug.preset == "small"
    v1, v2 = aug(x, _gen())
    assert v1.shape == (64, 1, 8, 8) and v2.shape == (64, 1, 8, 8)
    u = v1 * 0.4 + 0.3
    assert u.min() >= -1e-6 and u.max() <= 1 + 1e-6
    assert not torch.allclose(v1, v2)
    assert torch.equal(aug(x, _gen(9))[0], aug(x, _gen(9))[0])


def test_gray_preset_for_28px_grey_images():
    aug = TwoViewAugment(28, 1, (0.29,), (0.35,))
    assert aug.preset == "gray"
    v1, v2 = aug.view1.view, aug.view2.view
    assert (v1.crop_scale, v1.flip_p, v1.jitter_p, v1.brightness, v1.contrast) == ((0.2, 1.0), 0.5, 0.8, 0.4, 0.4)
    assert (v1.saturation, v1.hue, v1.gray_p, v1.blur_p, v2.blur_p) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert (v1.solarize_p, v2.solarize_p) == (0.0, 0.2)
    # a flat bright image: brightness/contrast keep it >= 0.54; only view 2 is ever solarised
    x = torch.full((1000, 1, 28, 28), 0.9)
    a1, a2 = TwoViewAugment(28, 1, (0.0,), (1.0,), preset="gray")(x, _gen(3))
    assert a1.min() >= 0.54 - 1e-5
    dark2 = (a2.amax(dim=(1, 2, 3)) < 0.5).float().mean().item()
    assert 0.15 < dark2 < 0.25
    # contrast pulls a grey image towards its own mean (1 channel: the image is its own luma)
    ramp = torch.linspace(0, 1, 28).expand(1, 1, 28, 28).contiguous()
    assert torch.allclose(sa._contrast(ramp, torch.tensor([0.0])), torch.full_like(ramp, 0.5), atol=1e-6)
    # flips happen: a left-right ramp comes back reversed in about half the views
    ramps = torch.linspace(0, 1, 28).expand(400, 1, 28, 28).contiguous()
    view = TwoViewAugment(28, 1, (0.0,), (1.0,), preset="gray").view1
    p = view.draw(400, _gen(5))
    p["jitter"][:] = False
    out = view.apply(ramps, p)
    reversed_ = (out[:, 0, 14, 0] > out[:, 0, 14, -1]).float().mean().item()
    assert 0.4 < reversed_ < 0.6


def test_bad_configuration():
    with pytest.raises(UserError):
        TwoViewAugment(8, 1, (0.5,), (0.5,), preset="reference")  # colour ops need RGB
    with pytest.raises(UserError, match="3 channels"):
        TwoViewAugment(28, 1, (0.5,), (0.5,), views=reference_views(28))
    with pytest.raises(UserError):
        TwoViewAugment(32, 3, MEAN, STD, preset="fancy")
    with pytest.raises(UserError):
        TwoViewAugment(32, 3, (0.5,), STD)


def _count_aten_ops(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


@pytest.mark.parametrize("preset,channels,size", [("reference", 3, 32), ("gray", 1, 28), ("small", 1, 8)])
def test_no_python_loop_over_the_batch(preset, channels, size):
    # a vectorised pipeline issues the same number of tensor operations for any batch size
    aug = TwoViewAugment(size, channels, (0.5,) * channels, (0.25,) * channels, preset=preset)
    aug(torch.rand(2, channels, size, size), _gen(0))  # builds the cached mean/std tensors
    counts = [_count_aten_ops(lambda: aug(torch.rand(n, channels, size, size), _gen(0))) for n in (128, 512)]
    assert counts[0] == counts[1], counts


def test_speed_512_images_well_under_a_second():
    x = torch.rand(512, 3, 32, 32)
    aug = TwoViewAugment(32, 3, MEAN, STD)
    g = _gen()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: robust to other load on the machine
    try:
        aug(x[:32], g)  # warm-up
        best = float("inf")
        for _ in range(2):
            t = time.process_time()
            aug(x, g)
            best = min(best, time.process_time() - t)
    finally:
        torch.set_num_threads(threads)
    assert best < 0.5, f"512 images took {best:.3f} s of CPU"


def test_one_view_plugs_into_the_device_loader_across_ranks():
    from tvlars.harness.data.loader import DeviceLoader

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 12, 12), dtype=torch.uint8, generator=g)
    labels = torch.arange(24)
    aug = OneViewAugment(12, 3, MEAN, STD, sa.probe_view())

    def batches(rank, world):
        loader = DeviceLoader(images, labels, batch_size=8, mean=MEAN, std=STD, device="cpu", shuffle=True,
                              drop_last=True, augment=aug, rank=rank, world_size=world, seed=3)
        loader.set_epoch(1)
        return list(loader)

    one = batches(0, 1)
    two = [batches(0, 2), batches(1, 2)]
    for k, (x, y) in enumerate(one):
        assert torch.allclose(torch.cat([two[0][k][0], two[1][k][0]]), x, atol=1e-6)
        assert torch.equal(torch.cat([two[0][k][1], two[1][k][1]]), y)
    # the loader normalised: un-normalised values lie in [0, 1]
    u = _unnorm(torch.cat([x for x, _ in one]))
    assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5


def test_sync_free_path_matches_the_indexing_path():
    # the mask-based path used off the CPU gives the same views as the CPU's row selection
    x = torch.rand(64, 3, 32, 32)
    aug = TwoViewAugment(32, 3, MEAN, STD, blur_sigma=(0.5, 1.5))
    a1, a2 = aug(x, _gen(8))
    aug.view1.sync_free = aug.view2.sync_free = True
    b1, b2 = aug(x, _gen(8))
    assert torch.allclose(a1, b1, atol=1e-5) and torch.allclose(a2, b2, atol=1e-5)
