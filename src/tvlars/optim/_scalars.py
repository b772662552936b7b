"""The equations every path computes, on vectors of layers: the options of a group, the trust
ratio (written once), the per-layer scalars, and the bias corrections of LAMB. The maths
as a whole, and the paths, are described in ``_functional``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]

HEAVY_BALL, NESTEROV, LOOK_AHEAD = "heavy-ball", "nesterov", "look-ahead"


# =======================================================================================
# Options: one object per parameter group and step
# =======================================================================================


@dataclass(frozen=True)
class LARSOptions:
    """A LARS-family group's hyper-parameters. ``momentum_form``: heavy-ball, nesterov, or
    Algorithm 1's look-ahead (the step size lr * trust * phi inside the buffer).
    ``phi_in_ratio`` and ``max_norm``: the TVLARS authors' code (phi_t multiplies the trust
    coefficient only; both norms clamped)."""

    lr: Any  # a number, a tensor, or a PerDevice of either
    momentum: float
    weight_decay: float
    trust_coefficient: float
    eps: float
    trust_form: str
    trust_clip: bool
    adapt: bool
    momentum_form: str = HEAVY_BALL
    phi_in_ratio: bool = False
    max_norm: Optional[float] = None
    stats: bool = False  # telemetry wanted: ||u|| measured in full on layers that do not adapt too

    @property
    def decay(self) -> bool:
        return self.weight_decay != 0

    @property
    def buffered(self) -> bool:
        return self.momentum != 0

    @property
    def coupled(self) -> bool:
        """The trust ratio measures d = g + wd*w (else g, with wd*||w|| added)."""
        return self.trust_form == "coupled"


@dataclass(frozen=True)
class LAMBOptions:
    lr: Any
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction: bool
    trust_clip: bool
    adapt: bool
    max_weight_norm: Optional[float] = None
    stats: bool = False

    @property
    def decay(self) -> bool:
        return self.weight_decay != 0


def norm_dtype(device: torch.device) -> torch.dtype:
    """Norms are measured in float64 (exact for the non-finite decision, and free on
    accelerators, where a reduction is bound by memory), except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


# =======================================================================================
# The scalars, on vectors of layers (every path)
# =======================================================================================


def trust_ratio(w_norm: Tensor, u_norm: Tensor, coefficient: Scalar, *, eps: float = 0.0,
                extra: Optional[Tensor] = None, clip_lr: Optional[Scalar] = None,
                max_norm: Optional[float] = None, max_weight_norm: Optional[float] = None) -> Tensor:
    """``coefficient * ||w|| / (||u|| [+ extra] + eps)``, elementwise; 1 where a norm is 0.

    ``u`` is the direction measured (LARS: d, or g with ``extra = wd*||w||``; LAMB: u), so a
    zero-initialised layer or a layer with no gradient moves at the plain lr and nothing is
    ever inf or NaN. ``clip_lr``: LARC / LAMBC clipping ``min(ratio / clip_lr, 1)``.
    ``max_norm`` clamps both norms (the TVLARS authors' code, 10); ``max_weight_norm`` only
    ||w|| (the LAMB authors' ``min(||w||, 10)``), both before the zero test.
    """
    if max_norm is not None:
        w_norm, u_norm = w_norm.clamp(max=max_norm), u_norm.clamp(max=max_norm)
    if max_weight_norm is not None:
        w_norm = w_norm.clamp(max=max_weight_norm)
    denominator = u_norm if extra is None else u_norm + extra
    if eps:
        denominator = denominator + eps
    ratio = torch.where((w_norm > 0) & (u_norm > 0), coefficient * w_norm / denominator, 1.0)
    if clip_lr is not None:
        ratio = torch.clamp(ratio / clip_lr, max=1.0)
    return ratio


@dataclass
class Scalars:
    """The scalars of a group's layers, vectors (bucket order) on one device.

    ``w_norm``, ``u_norm`` (the norm in the trust ratio's denominator), ``trust`` and
    ``step_size`` (the scalar that multiplies the layer's direction: lr*trust, lr*trust*phi
    for TVLARS) are telemetry. ``scale`` multiplies the direction on its way into the update
    (LARS: into the buffer), zero on a skipped step; ``ok`` is the step decision.
    """

    ok: Tensor
    w_norm: Tensor
    u_norm: Tensor
    trust: Tensor
    step_size: Tensor
    scale: Tensor


def lars_scalars(w_norm: Tensor, u_norm: Tensor, options: LARSOptions, ok: Tensor,
                 phi: Optional[Tensor] = None) -> Scalars:
    """LARS, and TVLARS as LARS times phi_t (``phi``, per layer)."""
    lr = _on(options.lr, w_norm.device)
    if options.adapt:
        coefficient = options.trust_coefficient * phi if options.phi_in_ratio else options.trust_coefficient
        extra = options.weight_decay * w_norm if not options.coupled and options.decay else None
        trust = trust_ratio(w_norm, u_norm, coefficient, eps=options.eps, extra=extra,
                            clip_lr=lr if options.trust_clip else None, max_norm=options.max_norm)
    else:
        trust = torch.ones_like(w_norm)
    scale = trust * phi if phi is not None and not options.phi_in_ratio else trust
    step_size = lr * scale
    # Look-ahead keeps the step size, lr included, in the buffer; the other forms keep lr out.
    into_buffer = step_size if options.momentum_form == LOOK_AHEAD else scale
    return Scalars(ok, w_norm, u_norm, trust, step_size, torch.where(ok, into_buffer, 0.0))


def lamb_scalars(w_norm: Tensor, u_norm: Tensor, options: LAMBOptions, ok: Tensor) -> Scalars:
    lr = _on(options.lr, w_norm.device)
    if options.adapt:
        trust = trust_ratio(w_norm, u_norm, 1.0, clip_lr=1.0 if options.trust_clip else None,
                            max_weight_norm=options.max_weight_norm)
    else:
        trust = torch.ones_like(w_norm)
    step_size = lr * trust
    return Scalars(ok, w_norm, u_norm, trust, step_size, torch.where(ok, step_size, 0.0))


def lamb_bias_corrections(steps: Tensor, options: LAMBOptions) -> tuple[Tensor, Tensor]:
    """``1 - b1^t`` and ``sqrt(1 - b2^t)`` per layer for the step t = step + 1 being taken
    (also when it is skipped, so that both stay > 0 and u finite)."""
    t = steps.to(norm_dtype(steps.device)) + 1.0
    if not options.bias_correction:
        return torch.ones_like(t), torch.ones_like(t)
    return 1.0 - torch.pow(options.beta1, t), torch.sqrt(1.0 - torch.pow(options.beta2, t))


def buckets(params: list[Tensor]) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of ``params`` sharing device and dtype (the optimizer
    orders each group's layers so)."""
    ranges, start = [], 0
    for i in range(1, len(params) + 1):
        if i == len(params) or (params[i].device, params[i].dtype) != (params[start].device, params[start].dtype):
            ranges.append((start, i))
            start = i
    return ranges


class PerDevice:
    """A tensor with one copy per device, made on first use: a tensor lr given on one GPU
    serves parameters on every GPU, and the skip decision every device. Numbers pass as they
    are. The optimizer makes one per group and step."""

    def __init__(self, value: Scalar):
        self.value, self._copies = value, {}

    def on(self, device: torch.device) -> Scalar:
        value = self.value
        if not torch.is_tensor(value) or value.device == device:
            return value
        if device not in self._copies:
            self._copies[device] = to_device(value, device) if value.device.type == "cpu" else value.to(device)
        return self._copies[device]


def _on(value, device: torch.device) -> Scalar:
    """A hyper-parameter (number, tensor or ``PerDevice``) for use on ``device``."""
    if not isinstance(value, PerDevice):
        value = PerDevice(value)
    return value.on(device)


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor copied to ``device`` without blocking: from pinned memory on CUDA (a
    copy from pageable memory waits for the device)."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
