"""Batched, on-device two-view augmentation for Barlow Twins.

The reference (facebookresearch/barlowtwins, ``main.py``, ``Transform``) augments each image
with PIL, one at a time, in DataLoader workers. Here every operation runs on a whole batch
of tensors on the device; per-sample random parameters are drawn as tensors from a
``torch.Generator``; there is no Python loop over the images.

Input and output convention
---------------------------
``aug(x, generator)`` takes **un-normalised images in [0, 1]**: float ``[N, C, H, W]``
(or uint8, divided by 255), on any device, and returns two views ``(v1, v2)``, float32,
``[N, C, S, S]`` with ``S = image_size``, **normalised** with the ``mean``/``std`` given to
the constructor (model-ready). With ``input_range="normalized"`` it instead takes images
already normalised with that same mean/std (what a ``DeviceLoader`` built with the dataset's
mean/std yields), un-normalises them and clamps to [0, 1] first.

Recommended wiring in ``tvlars ssl``: a ``DeviceLoader`` with ``mean=(0,)*C, std=(1,)*C``
and ``augment=None`` (see :func:`unit_loader_stats`) yields [0, 1] floats; pass each batch
to ``TwoViewAugment(..., mean=data.mean, std=data.std)``.

Determinism and DDP
-------------------
All random numbers come from ``generator`` (``None`` uses torch's global CPU generator),
drawn on the generator's device (a CPU generator is recommended: the draws are then the same
whatever the device of ``x``) in a fixed order that depends only on the number of rows
drawn for. The same generator state gives the same views. Under DDP, give every rank a
generator with the same seed and call ``aug(x_local, g, global_batch=B, offset=rank * b)``:
parameters are drawn for the whole global batch ``B`` and rows ``offset:offset+len(x)`` are
used, so N processes see exactly what one process holding the global batch sees.

On the CPU, operations that apply to some rows only (jitter ops, blur) work on those rows
(index select, less arithmetic); on other devices every row is computed and the result
selected with ``torch.where``, so no step waits on the host. Both give the same images.

Operations (``preset="reference"``, 3-channel images), in the reference's order, each view
independently:

1. random resized crop (scale 0.08-1, aspect 3/4-4/3, torchvision's 10-attempt rule with
   the whole image as fallback, continuous sub-pixel boxes) and horizontal flip (p=0.5),
   together as one affine resampling: ``affine_grid`` + bilinear ``grid_sample``;
2. colour jitter with p=0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a
   random order per image (as torchvision's ``ColorJitter``); hue is shifted by an exact,
   vectorised RGB -> HSV -> RGB round trip (not the YIQ approximation);
3. grayscale with p=0.2 (ITU-R 601 luma with torchvision's 0.2989 for red);
4. Gaussian blur, p=1.0 in view 1 and 0.1 in view 2, sigma ~ U(0.1, 2.0) * S / 224 (the
   reference's blur on 224-pixel crops, scaled to the image size: at 32 px it is slight;
   override with ``blur_sigma=``), a per-image separable kernel applied as a grouped
   convolution with reflect padding, radius ceil(3 * sigma_max);
5. solarisation (x >= 0.5 -> 1 - x), p=0.0 in view 1 and 0.2 in view 2;
6. normalisation with mean/std.

``preset="gray"`` (1-channel images of at least 16 px: Fashion-MNIST, MNIST): the
reference's pipeline with what a grey image has: random resized crop (scale 0.2-1: a 28 px
garment on a black ground leaves little in an 8 % crop), horizontal flip (p=0.5), brightness
and contrast jitter (0.4, 0.4, p=0.8; no saturation, hue or grayscale), solarisation p=0.0 in
view 1 and 0.2 in view 2, and no blur (at 28 px the reference's size-scaled sigma is below a
quarter of a pixel; solo-learn's CIFAR settings leave blur out too).

``preset="small"`` (1-channel 8x8 ``digits``, or any image too small for the above): random
resized crop (scale 0.6-1, aspect 3/4-4/3), no flip (digits are not mirror-symmetric), no
colour operations, Gaussian pixel noise (std 0.05), random erasing of a rectangle (p=0.25,
2-20 % of the area, filled with 0), clamped to [0, 1], then normalised.
``preset="auto"`` picks "small" below 16 px, else "gray" for 1-channel images and
"reference" for the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tvlars.errors import UserError
from tvlars.harness.data.transfer import to_device

__all__ = [
    "ViewConfig",
    "OneViewAugment",
    "TwoViewAugment",
    "reference_views",
    "gray_views",
    "small_views",
    "probe_view",
    "unit_loader_stats",
]

_LUMA = (0.2989, 0.587, 0.114)  # as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class ViewConfig:
    """Parameters of one view's augmentation pipeline (probabilities in [0, 1])."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    noise_std: float = 0.0
    erase_p: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 0.2)
    erase_ratio: tuple[float, float] = (0.3, 3.3)


def reference_views(image_size: int, blur_sigma: Optional[tuple[float, float]] = None) -> tuple[ViewConfig, ViewConfig]:
    """The reference's asymmetric pair (blur 1.0 / 0.1, solarisation 0.0 / 0.2)."""
    if blur_sigma is None:
        f = image_size / 224.0
        blur_sigma = (0.1 * f, 2.0 * f)
    base = ViewConfig(blur_sigma=tuple(blur_sigma))
    return replace(base, blur_p=1.0, solarize_p=0.0), replace(base, blur_p=0.1, solarize_p=0.2)


def gray_views() -> tuple[ViewConfig, ViewConfig]:
    """The reference's pair without colour or blur, for 1-channel images (module docstring)."""
    base = ViewConfig(crop_scale=(0.2, 1.0), saturation=0.0, hue=0.0, gray_p=0.0, blur_p=0.0)
    return replace(base, solarize_p=0.0), replace(base, solarize_p=0.2)


def small_views() -> tuple[ViewConfig, ViewConfig]:
    """Reduced pair for tiny 1-channel images: crop, noise, erasing; no flip, no colour."""
    v = ViewConfig(
        crop_scale=(0.6, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0,
        solarize_p=0.0, noise_std=0.05, erase_p=0.25,
    )
    return v, v


def probe_view() -> ViewConfig:
    """Random resized crop + flip only: the reference's linear-probe training transform."""
    return ViewConfig(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def unit_loader_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` that make a DeviceLoader yield un-normalised [0, 1] floats."""
    return (0.0,) * channels, (1.0,) * channels


# ----------------------------------------------------------------------------- helpers


def _rand(shape, generator) -> Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=dev)


def _randn(shape, generator) -> Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=dev)


def _uniform(n, lo, hi, generator) -> Tensor:
    return lo + (hi - lo) * _rand((n,), generator)


def _sample_boxes(n: int, scale, ratio, generator, attempts: int = 10) -> Tensor:
    """Random-resized-crop boxes ``[n, 4]`` = (x0, y0, w, h) as fractions of the image."""
    u = _rand((n, attempts, 4), generator)
    area = scale[0] + (scale[1] - scale[0]) * u[..., 0]
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u[..., 1])
    w = torch.sqrt(area * aspect)
    h = torch.sqrt(area / aspect)
    valid = (w <= 1.0) & (h <= 1.0)
    first = valid.float().argmax(dim=1)  # first valid attempt (0 if none)
    any_valid = valid.any(dim=1)
    idx = first.unsqueeze(1)
    w = torch.where(any_valid, w.gather(1, idx).squeeze(1), torch.ones(n, device=w.device))
    h = torch.where(any_valid, h.gather(1, idx).squeeze(1), torch.ones(n, device=w.device))
    ux = u[..., 2].gather(1, idx).squeeze(1)
    uy = u[..., 3].gather(1, idx).squeeze(1)
    x0 = ux * (1.0 - w)
    y0 = uy * (1.0 - h)
    return torch.stack([x0, y0, w, h], dim=1)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def _rgb_to_hsv(x: Tensor):
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hr = (g - b) / safe
    hg = 2.0 + (b - r) / safe
    hb = 4.0 + (r - g) / safe
    h = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return h, s, v


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    # c_n = v - v * s * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1 for r, g, b
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6.0 * h) % 6.0
        out.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, dim=1)


def _per(t: Tensor) -> Tensor:
    return t.view(-1, 1, 1, 1)


def _brightness(x, f):
    return (x * _per(f)).clamp_(0.0, 1.0)


def _contrast(x, f):
    m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (_per(f) * x + (1.0 - _per(f)) * m).clamp_(0.0, 1.0)


def _saturation(x, f):
    return (_per(f) * x + (1.0 - _per(f)) * _gray(x)).clamp_(0.0, 1.0)


def _hue(x, shift):
    h, s, v = _rgb_to_hsv(x)
    h = (h + shift.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(h, s, v).clamp_(0.0, 1.0)


def _blur(x: Tensor, sigma: Tensor, radius: int, mask: Optional[Tensor] = None) -> Tensor:
    """Per-sample separable Gaussian blur (grouped convolution, reflect padding).

    Rows where ``mask`` is false get the identity kernel (exactly unchanged)."""
    n, c, hh, ww = x.shape
    radius = max(1, min(radius, hh - 1, ww - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2.0 * sigma.view(-1, 1).to(x.dtype) ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # [n, K]
    if mask is not None:
        delta = (t == 0).to(x.dtype).view(1, -1)
        k = torch.where(mask.view(-1, 1), k, delta)
    k = k.repeat_interleave(c, dim=0)  # [n*c, K]
    K = k.shape[1]
    y = x.reshape(1, n * c, hh, ww)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, K, 1), groups=n * c)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, K), groups=n * c)
    return y.view(n, c, hh, ww)


# ----------------------------------------------------------------------------- one view


class OneViewAugment:
    """One augmentation pipeline (:class:`ViewConfig`), batched; see the module docstring.

    ``aug(x, generator=None, *, global_batch=None, offset=0) -> Tensor`` (normalised).
    ``draw(n, generator)`` returns the parameter dict for ``n`` rows; ``apply(x01, params)``
    applies it to un-normalised [0, 1] images and returns [0, 1] images (not normalised).
    ``sample(n, generator, device)`` / ``apply`` are the ``DeviceLoader``'s augmentation
    protocol, so ``DeviceLoader(..., augment=OneViewAugment(..., probe_view()))`` gives the
    linear probe's random-resized-crop + flip training batches (the loader normalises).
    """

    def __init__(self, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float],
                 view: ViewConfig, *, input_range: str = "unit"):
        if image_size <= 0 or channels <= 0:
            raise UserError(f"augmentation: bad image size {image_size} or channels {channels}")
        if len(mean) != channels or len(std) != channels:
            raise UserError(f"augmentation: mean/std need {channels} values, got {len(mean)}/{len(std)}")
        if any(s <= 0 for s in std):
            raise UserError("augmentation: std values must be positive")
        if input_range not in ("unit", "normalized"):
            raise UserError(f"augmentation: input_range must be 'unit' or 'normalized', got {input_range!r}")
        # brightness and contrast act on any number of channels; the rest need colour
        colour = view.gray_p > 0 or (view.jitter_p > 0 and (view.saturation > 0 or view.hue > 0))
        if colour and channels != 3:
            raise UserError(f"augmentation: saturation/hue jitter and grayscale need 3 channels, got {channels}")
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.view = view
        self.input_range = input_range
        self.blur_radius = max(1, math.ceil(3.0 * view.blur_sigma[1]))
        #: None: select rows by indexing on the CPU, by masks elsewhere (True/False force it)
        self.sync_free: Optional[bool] = None
        self._host_mean_std = tuple(torch.tensor(v, dtype=torch.float64) for v in (self.mean, self.std))
        self._stats_cache: dict = {}

    # -- parameters
    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> dict:
        """Per-sample parameters for ``n`` rows; always the same number of draws for ``n``."""
        v = self.view
        S, C = self.image_size, self.channels
        p = {}
        p["box"] = _sample_boxes(n, v.crop_scale, v.crop_ratio, generator)
        p["flip"] = _rand((n,), generator) < v.flip_p
        p["jitter"] = _rand((n,), generator) < v.jitter_p
        p["order"] = torch.argsort(_rand((n, 4), generator), dim=1)
        p["bright"] = _uniform(n, max(0.0, 1 - v.brightness), 1 + v.brightness, generator)
        p["contr"] = _uniform(n, max(0.0, 1 - v.contrast), 1 + v.contrast, generator)
        p["sat"] = _uniform(n, max(0.0, 1 - v.saturation), 1 + v.saturation, generator)
        p["hue"] = _uniform(n, -v.hue, v.hue, generator)
        p["gray"] = _rand((n,), generator) < v.gray_p
        p["blur"] = _rand((n,), generator) < v.blur_p
        p["sigma"] = _uniform(n, v.blur_sigma[0], v.blur_sigma[1], generator)
        p["solar"] = _rand((n,), generator) < v.solarize_p
        if v.noise_std > 0:
            p["noise"] = _randn((n, C, S, S), generator) * v.noise_std
        p["erase"] = _rand((n,), generator) < v.erase_p
        p["erase_box"] = _sample_erase(n, S, v.erase_scale, v.erase_ratio, generator)
        return p

    @staticmethod
    def slice_params(params: dict, start: int, stop: int, device) -> dict:
        """Rows ``start:stop`` of every parameter, on ``device`` in one non-blocking copy."""
        keys = list(params)
        return dict(zip(keys, to_device([params[k][start:stop] for k in keys], device)))

    # -- the DeviceLoader's augmentation protocol: sample(n, generator, device) -> tuple of
    #    per-row tensors (sliced by the loader for this rank), apply(x01, params) -> x01
    def sample(self, n: int, generator: Optional[torch.Generator], device) -> tuple:
        p = self.draw(n, generator)
        return tuple(to_device([p[k] for k in sorted(p)], device))

    # -- application
    def to_unit(self, x: Tensor) -> Tensor:
        """The input as float32 in [0, 1] (see ``input_range``)."""
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        x = x.float()
        if self.input_range == "normalized":
            m, s = self._mean_std(x.device, x.dtype)
            x = x * s + m
        return x.clamp(0.0, 1.0)

    def normalize(self, x: Tensor) -> Tensor:
        m, s = self._mean_std(x.device, x.dtype)
        return (x - m) / s

    def _mean_std(self, device, dtype) -> tuple[Tensor, Tensor]:
        """mean and std as [1, C, 1, 1] tensors, built once per device and dtype: building
        them in every call would be a host-to-device copy in every training step."""
        key = (torch.device(device), dtype)
        cached = self._stats_cache.get(key)
        if cached is None:
            host = [t.to(dtype).view(1, -1, 1, 1) for t in self._host_mean_std]
            cached = self._stats_cache[key] = tuple(to_device(host, device))
        return cached

    @torch.no_grad()
    def apply(self, x: Tensor, p: dict) -> Tensor:
        """Apply drawn parameters to un-normalised [0, 1] float images; returns [0, 1]."""
        v = self.view
        if not isinstance(p, dict):  # the tuple from sample()
            keys = sorted(self.draw(0, torch.Generator()))
            p = dict(zip(keys, p))
        n, c = x.shape[0], x.shape[1]
        if c != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {c}")
        S = self.image_size
        # CPU: operate on the selected rows only (less work); other devices: compute for
        # every row and select with torch.where (no host synchronisation, same result)
        sync_free = x.device.type != "cpu" if self.sync_free is None else self.sync_free
        # 1. crop + flip as one affine resampling (output pixel centres span the box)
        x0, y0, w, h = p["box"].unbind(1)
        sx = torch.where(p["flip"], -w, w)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = sx
        theta[:, 0, 2] = 2 * x0 + w - 1
        theta[:, 1, 1] = h
        theta[:, 1, 2] = 2 * y0 + h - 1
        grid = F.affine_grid(theta, [n, c, S, S], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # 2. colour jitter in a random order per image
        if v.jitter_p > 0:
            ops = (
                (_brightness, p["bright"], v.brightness > 0),
                (_contrast, p["contr"], v.contrast > 0),
                (_saturation, p["sat"], v.saturation > 0),
                (_hue, p["hue"], v.hue > 0),
            )
            for pos in range(4):
                for op_id, (fn, arg, on) in enumerate(ops):
                    if not on:
                        continue
                    chosen = p["jitter"] & (p["order"][:, pos] == op_id)
                    if sync_free:
                        x = torch.where(chosen.view(-1, 1, 1, 1), fn(x, arg), x)  # fn returns a new tensor
                    else:
                        sel = torch.nonzero(chosen).squeeze(1)
                        if sel.numel():
                            x[sel] = fn(x[sel], arg[sel])
        # 3. grayscale
        if v.gray_p > 0:
            x = torch.where(p["gray"].view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
        # 4. blur
        if v.blur_p > 0:
            if sync_free:
                x = _blur(x, p["sigma"], self.blur_radius, mask=p["blur"])
            else:
                sel = torch.nonzero(p["blur"]).squeeze(1)
                if sel.numel():
                    x[sel] = _blur(x[sel], p["sigma"][sel], self.blur_radius)
        # 5. solarisation
        if v.solarize_p > 0:
            x = torch.where(p["solar"].view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
        # small preset: noise and erasing
        if "noise" in p:
            x = (x + p["noise"].to(x.dtype)).clamp_(0.0, 1.0)
        if v.erase_p > 0:
            ex0, ey0, ew, eh = p["erase_box"].unbind(1)
            ar = torch.arange(S, device=x.device)
            inx = (ar.view(1, -1) >= ex0.view(-1, 1)) & (ar.view(1, -1) < (ex0 + ew).view(-1, 1))
            iny = (ar.view(1, -1) >= ey0.view(-1, 1)) & (ar.view(1, -1) < (ey0 + eh).view(-1, 1))
            m = iny.view(n, 1, S, 1) & inx.view(n, 1, 1, S) & p["erase"].view(n, 1, 1, 1)
            x = x.masked_fill(m, 0.0)
        return x

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None, *,
                 global_batch: Optional[int] = None, offset: int = 0) -> Tensor:
        n = x.shape[0]
        total = n if global_batch is None else int(global_batch)
        if offset < 0 or offset + n > total:
            raise ValueError(f"rows {offset}:{offset + n} outside the global batch of {total}")
        p = self.slice_params(self.draw(total, generator), offset, offset + n, x.device)
        return self.normalize(self.apply(self.to_unit(x), p)).contiguous()


def _sample_erase(n: int, S: int, scale, ratio, generator) -> Tensor:
    """Erasing rectangles ``[n, 4]`` = (x0, y0, w, h) in integer pixels (as floats)."""
    u = _rand((n, 4), generator)
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * S * S
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u[:, 1])
    w = torch.sqrt(area * aspect).round().clamp(1, S)
    h = torch.sqrt(area / aspect).round().clamp(1, S)
    x0 = torch.floor(u[:, 2] * (S - w + 1))
    y0 = torch.floor(u[:, 3] * (S - h + 1))
    return torch.stack([x0, y0, w, h], dim=1)


# ----------------------------------------------------------------------------- two views


class TwoViewAugment:
    """Two asymmetric views per image, batched on the device.

    ``TwoViewAugment(image_size, channels, mean, std, preset="auto", *, input_range="unit",
    blur_sigma=None)``; ``aug(x, generator=None, *, global_batch=None, offset=0) -> (v1, v2)``.
    ``x``: [N, C, H, W] images in [0, 1] (float, or uint8) -- or normalised with mean/std
    when ``input_range="normalized"``. ``v1``, ``v2``: float32 ``[N, C, S, S]`` normalised
    with mean/std. View 1's parameters are drawn before view 2's, from the same generator.
    """

    PRESETS = ("auto", "reference", "gray", "small")

    def __init__(self, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float],
                 preset: str = "auto", *, input_range: str = "unit",
                 blur_sigma: Optional[tuple[float, float]] = None,
                 views: Optional[tuple[ViewConfig, ViewConfig]] = None):
        if preset not in self.PRESETS:
            raise UserError(f"augmentation preset {preset!r}: expected one of {', '.join(self.PRESETS)}")
        if preset == "auto":
            preset = "small" if image_size < 16 else "gray" if channels == 1 else "reference"
        if views is None:
            views = {"reference": lambda: reference_views(image_size, blur_sigma),
                     "gray": gray_views, "small": small_views}[preset]()
        self.preset = preset
        self.view1 = OneViewAugment(image_size, channels, mean, std, views[0], input_range=input_range)
        self.view2 = OneViewAugment(image_size, channels, mean, std, views[1], input_range=input_range)

    @property
    def image_size(self) -> int:
        return self.view1.image_size

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None, *,
                 global_batch: Optional[int] = None, offset: int = 0) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        total = n if global_batch is None else int(global_batch)
        if offset < 0 or offset + n > total:
            raise ValueError(f"rows {offset}:{offset + n} outside the global batch of {total}")
        p1 = OneViewAugment.slice_params(self.view1.draw(total, generator), offset, offset + n, x.device)
        p2 = OneViewAugment.slice_params(self.view2.draw(total, generator), offset, offset + n, x.device)
        x01 = self.view1.to_unit(x)
        v1 = self.view1.normalize(self.view1.apply(x01, p1)).contiguous()
        v2 = self.view2.normalize(self.view2.apply(x01, p2)).contiguous()
        return v1, v2
