"""The maths of LARS, TVLARS and LAMB, one idea per piece.

Every layer-wise update here is the composition of four pieces:

    weight decay    d = g + wd * w                       (LARS, TVLARS; LAMB adds wd*w to u)
    trust ratio     trust_ratio(||w||, ||d||, ...)       (written once, shared by all three)
    learning rate   scale = lr * trust [* phi_t]         (phi_t: the TVLARS factor)
    momentum        heavy-ball, Nesterov, or Algorithm 1's look-ahead

Four paths compute the same update:
  * single tensor: one parameter at a time (``_lars_param`` / ``_lamb_param``);
  * ``_multi_tensor_*``: ``torch._foreach_*`` ops per (device, dtype) bucket;
  * fused: ``_lars_param`` / ``_lamb_param`` compiled by ``torch.compile`` with dynamic
    shapes, so one generated kernel (norms and update together) serves every parameter;
  * host-scalar (``_host_*``, CPU only, the CPU default): per-layer scalars as Python floats,
    the update by torch's fused SGD / AdamW kernels (see the section below).

Non-finite gradients: each device-side function takes ``ok``, a 0-d bool tensor on the device that is
False when any gradient of the optimizer is inf/NaN. The update is then an exact no-op
(gradients replaced by 0, momentum decay 1, step size 0), chosen with arithmetic instead of
an ``if`` so that no step ever waits for the device.

Every function returns per-parameter statistics ``[weight_norm, grad_norm, trust, step_size]``
as tensors on the device; the optimizer stacks them only when telemetry is on.
"""

from __future__ import annotations

import functools
import math
import types
from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

Scalar = Union[float, Tensor]


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms of half-precision tensors are accumulated in float32; float64 stays float64."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def trust_ratio(
    w_norm: Tensor,
    u_norm: Tensor,
    coefficient: Scalar,
    *,
    eps: float = 0.0,
    extra: Optional[Tensor] = None,
    clip_lr: Optional[Scalar] = None,
    max_norm: Optional[float] = None,
    max_weight_norm: Optional[float] = None,
) -> Tensor:
    """``coefficient * ||w|| / (||u|| [+ extra] + eps)``, elementwise over norm tensors.

    ``u`` is the direction whose size is measured (LARS: g + wd*w, or g with
    ``extra = wd*||w||``; LAMB: the Adam update). The ratio is 1 where either norm is 0, so a
    fresh zero-initialised layer or a layer with no gradient still moves at the plain lr
    and nothing is ever inf or NaN. ``clip_lr`` is LARC / LAMBC clipping:
    ``min(ratio / clip_lr, 1)``. ``max_norm`` clamps both norms first (the TVLARS
    authors' code clamps them to 10), ``max_weight_norm`` only ||w|| (the LAMB authors'
    ``min(||w||, max)``, applied before the zero test, so a clamp to 0 gives 1).
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


def _zero_if_skipped(g: Tensor, okf: Tensor) -> Tensor:
    """A fresh copy of g, or zeros on a skipped step (okf = 0); exact when okf = 1.

    Eager CPU ``torch.where`` with a 0-d condition is unvectorised (about 5x a multiply), so
    eager code multiplies and clears the NaN that 0 * inf makes; compiled code, where the
    NaN test is the unvectorised part, selects instead.
    """
    if torch.compiler.is_compiling():
        return torch.where(okf > 0, g, 0.0)
    return torch.nan_to_num_(g * okf, nan=0.0, posinf=0.0, neginf=0.0)


def lars_scale(
    w_norm: Tensor,
    u_norm: Tensor,
    *,
    lr: Scalar,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    trust_form: str,
    trust_clip: bool,
    adapt: bool,
    max_norm: Optional[float],
    factor: Optional[Tensor],
    factor_in_ratio: bool,
) -> tuple[Tensor, Tensor]:
    """The multiplier of the direction d for LARS-type updates, and the trust ratio.

    Returns ``(scale, trust)`` where the layer moves by ``lr * scale * d`` (before momentum).
    ``factor`` (phi_t) multiplies every layer's step (TVLARS, Algorithm 1) or, with
    ``factor_in_ratio``, only the ratio branch (the authors' code, which leaves excluded and
    zero-norm layers at the plain lr).
    """
    if adapt:
        coefficient = trust_coefficient * factor if factor is not None and factor_in_ratio else trust_coefficient
        extra = weight_decay * w_norm if trust_form == "separate" and weight_decay else None
        trust = trust_ratio(w_norm, u_norm, coefficient, eps=eps, extra=extra,
                            clip_lr=lr if trust_clip else None, max_norm=max_norm)
    else:
        trust = torch.ones_like(w_norm)
    scale = trust * factor if factor is not None and not factor_in_ratio else trust
    return scale, trust


# ---------------------------------------------------------------------------------------
# LARS family (LARS and TVLARS)
#
# momentum forms (buf starts at 0):
#   heavy-ball    buf = mu*buf + s*d;          w -= lr*buf
#   nesterov      buf = mu*buf + s*d;          w -= lr*(s*d + mu*buf)
#   look-ahead    Algorithm 1: m' = w - lr*s*d; w' = m' + mu*(m' - m), m_0 = w_0.
#                 With buf = m - m' this is exactly Nesterov with lr inside the buffer:
#                 buf = mu*buf + lr*s*d;  w -= lr*s*d + mu*buf  ("lr_in_buffer").
#                 So TVLARS keeps no copy of the weights, and a mid-run lr change
#                 does not rescale the momentum already accumulated (nor stop it).
# ---------------------------------------------------------------------------------------


def _lars_param(
    p: Tensor, g: Tensor, buf: Optional[Tensor], step: Tensor, ok: Tensor, lr: Scalar, factor: Optional[Tensor],
    *, momentum: float, weight_decay: float, trust_coefficient: float, eps: float,
    trust_form: str, trust_clip: bool, adapt: bool, max_norm: Optional[float],
    factor_in_ratio: bool, nesterov: bool, lr_in_buffer: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ndt = norm_dtype(p.dtype)
    okf = ok.to(ndt)
    d = _zero_if_skipped(g, okf)  # a fresh tensor: p.grad is never written
    g_norm = torch.linalg.vector_norm(d, dtype=ndt) if trust_form == "separate" else None
    if weight_decay:
        d.add_(p, alpha=weight_decay)
    u_norm = g_norm if g_norm is not None else torch.linalg.vector_norm(d, dtype=ndt)
    w_norm = torch.linalg.vector_norm(p, dtype=ndt)
    scale, trust = lars_scale(
        w_norm, u_norm, lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
        eps=eps, trust_form=trust_form, trust_clip=trust_clip, adapt=adapt, max_norm=max_norm,
        factor=factor, factor_in_ratio=factor_in_ratio)
    step_size = lr * scale
    inner, outer = (step_size, okf) if lr_in_buffer else (scale, lr * okf)
    d.mul_(inner * okf)
    if buf is None:
        p.sub_(d.mul_(outer))
    else:
        buf.mul_(okf * momentum + (1.0 - okf)).add_(d)
        update = d.add_(buf, alpha=momentum).mul_(outer) if nesterov else buf.mul(outer)
        p.sub_(update)
    step.add_(okf)
    return w_norm, u_norm, trust, step_size


def _multi_tensor_lars(
    params: list[Tensor], grads: list[Tensor], bufs: list[Optional[Tensor]], steps: list[Tensor], ok: Tensor,
    lr: Scalar, factors: Optional[list[Tensor]], *, momentum: float, weight_decay: float, trust_coefficient: float,
    eps: float, trust_form: str, trust_clip: bool, adapt: bool, max_norm: Optional[float],
    factor_in_ratio: bool, nesterov: bool, lr_in_buffer: bool, want_stats: bool,
) -> list[tuple[list[Tensor], Tensor]]:
    records = []
    buckets = _group_tensors_by_device_and_dtype([params, grads, bufs, steps, factors or [None] * len(params)])
    for (device, dtype), ((ps, gs, bs, st, fs), _) in buckets.items():
        ndt = norm_dtype(dtype)
        okf = ok.to(device=device, dtype=ndt)
        fac = torch.stack(fs).to(ndt) if factors is not None else None
        d = [_zero_if_skipped(g, okf) for g in gs]
        g_norms = torch.stack(torch._foreach_norm(d, dtype=ndt)) if trust_form == "separate" else None
        if weight_decay:
            torch._foreach_add_(d, ps, alpha=weight_decay)
        u_norms = g_norms if g_norms is not None else torch.stack(torch._foreach_norm(d, dtype=ndt))
        w_norms = torch.stack(torch._foreach_norm(ps, dtype=ndt))
        scale, trust = lars_scale(
            w_norms, u_norms, lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
            eps=eps, trust_form=trust_form, trust_clip=trust_clip, adapt=adapt, max_norm=max_norm,
            factor=fac, factor_in_ratio=factor_in_ratio)
        step_size = lr * scale
        inner, outer = (step_size, okf) if lr_in_buffer else (scale, lr * okf)
        torch._foreach_mul_(d, list((inner * okf).unbind()))
        if bs[0] is None:
            update = d
        else:
            torch._foreach_mul_(bs, okf * momentum + (1.0 - okf))
            torch._foreach_add_(bs, d)
            if nesterov:
                torch._foreach_add_(d, bs, alpha=momentum)
                update = d
            else:
                update = torch._foreach_mul(bs, outer)
                outer = None
        if outer is not None:
            torch._foreach_mul_(update, outer)
        torch._foreach_sub_(ps, update)
        torch._foreach_add_(st, [okf.to(st[0].dtype)] * len(st))
        if want_stats:
            records.append((ps, torch.stack([w_norms, u_norms, trust, step_size])))
    return records


# ---------------------------------------------------------------------------------------
# LAMB
#   m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
#   u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + wd*w
#   w -= lr * trust_ratio(||w||, ||u||, 1) * u
# ---------------------------------------------------------------------------------------


def _lamb_param(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, ok: Tensor, lr: Scalar,
    bc1: Optional[Tensor], bc2_sqrt: Optional[Tensor],
    *, beta1: float, beta2: float, eps: float, weight_decay: float, trust_clip: bool, adapt: bool,
    max_weight_norm: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ndt = norm_dtype(p.dtype)
    okf = ok.to(ndt)
    gs = _zero_if_skipped(g, okf)
    m.mul_(okf * beta1 + (1.0 - okf)).add_(gs, alpha=1.0 - beta1)
    v.mul_(okf * beta2 + (1.0 - okf)).addcmul_(gs, gs, value=1.0 - beta2)
    u = _lamb_direction(p, m, v, bc1, bc2_sqrt, eps=eps, weight_decay=weight_decay)
    w_norm = torch.linalg.vector_norm(p, dtype=ndt)
    u_norm = torch.linalg.vector_norm(u, dtype=ndt)
    trust = (trust_ratio(w_norm, u_norm, 1.0, clip_lr=1.0 if trust_clip else None, max_weight_norm=max_weight_norm)
             if adapt else torch.ones_like(w_norm))
    step_size = lr * trust
    p.sub_(u.mul_(step_size * okf))
    step.add_(okf)
    return w_norm, u_norm, trust, step_size


def bias_corrections(step: Tensor, ndt: torch.dtype, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """``1 - b1^t`` and ``sqrt(1 - b2^t)`` for the step t = step + 1 being taken.

    Also on a skipped step, so that they are > 0 and u stays finite. Computed outside the
    compiled kernel, which would otherwise evaluate the powers once per element.
    """
    t = step.to(ndt) + 1.0
    return 1.0 - beta1 ** t, torch.sqrt(1.0 - beta2 ** t)


def _lamb_direction(p, m, v, bc1, bc2_sqrt, *, eps, weight_decay):
    if bc1 is not None:
        u = m / bc1
        denominator = v.sqrt().div_(bc2_sqrt).add_(eps)
    else:
        u = m.clone()
        denominator = v.sqrt().add_(eps)
    u.div_(denominator)
    if weight_decay:
        u.add_(p, alpha=weight_decay)
    return u


def _multi_tensor_lamb(
    params: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], steps: list[Tensor],
    ok: Tensor, lr: Scalar, *, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction: bool, trust_clip: bool, adapt: bool, want_stats: bool, max_weight_norm: Optional[float] = None,
) -> list[tuple[list[Tensor], Tensor]]:
    records = []
    buckets = _group_tensors_by_device_and_dtype([params, grads, ms, vs, steps])
    for (device, dtype), ((ps, gs, m_, v_, st), _) in buckets.items():
        ndt = norm_dtype(dtype)
        okf = ok.to(device=device, dtype=ndt)
        g0 = [_zero_if_skipped(g, okf) for g in gs]
        torch._foreach_mul_(m_, okf * beta1 + (1.0 - okf))
        torch._foreach_add_(m_, g0, alpha=1.0 - beta1)
        torch._foreach_mul_(v_, okf * beta2 + (1.0 - okf))
        torch._foreach_addcmul_(v_, g0, g0, value=1.0 - beta2)
        denominator = torch._foreach_sqrt(v_)
        if bias_correction:
            bc1, bc2_sqrt = bias_corrections(torch.stack(st), ndt, beta1, beta2)
            u = torch._foreach_div(m_, list(bc1.unbind()))
            torch._foreach_div_(denominator, list(bc2_sqrt.unbind()))
        else:
            u = torch._foreach_mul(m_, 1.0)
        torch._foreach_add_(denominator, eps)
        torch._foreach_div_(u, denominator)
        if weight_decay:
            torch._foreach_add_(u, ps, alpha=weight_decay)
        w_norms = torch.stack(torch._foreach_norm(ps, dtype=ndt))
        u_norms = torch.stack(torch._foreach_norm(u, dtype=ndt))
        trust = (trust_ratio(w_norms, u_norms, 1.0, clip_lr=1.0 if trust_clip else None,
                             max_weight_norm=max_weight_norm)
                 if adapt else torch.ones_like(w_norms))
        step_size = lr * trust
        torch._foreach_mul_(u, list((step_size * okf).unbind()))
        torch._foreach_sub_(ps, u)
        torch._foreach_add_(st, [okf.to(st[0].dtype)] * len(st))
        if want_stats:
            records.append((ps, torch.stack([w_norms, u_norms, trust, step_size])))
    return records


# ---------------------------------------------------------------------------------------
# Host-scalar path (CPU only)
#
# On the CPU a 0-d tensor is read for free (there is no device to wait for), so the
# per-layer scalars (norms, trust ratio, step size) are computed as Python floats and
# torch's own fused SGD / AdamW kernels do the one memory pass of the update:
#
#   LARS heavy-ball   _fused_sgd_(weight_decay=wd, momentum=mu, dampening=1-k, lr=L)
#                     buf = mu*buf + k*(g + wd*w);  w -= L*buf
#   Nesterov          the same call with nesterov=True and lr = L*k (w -= L*k*(d + mu*buf)),
#                     then w -= L*mu*(1-k)*buf: together w -= L*(k*d + mu*buf)
#   no momentum       _fused_sgd_(lr=L*k) without buffers
#   LAMB              _fused_adamw_(lr=lr*trust, weight_decay=wd): AdamW's decoupled decay
#                     lr*trust*wd*w is LAMB's lr*trust*(wd*w) term, and its bias-corrected
#                     direction is m_hat / (sqrt(v_hat) + eps); a constant step count of 1e30
#                     makes both corrections exactly 1 (bias_correction=False).
#
# with k = trust [* phi] and L = lr (or k = lr*phi*trust, L = 1 with the step size in the
# buffer, TVLARS Algorithm 1). The kernels take 1 - dampening, which represents k to within
# 2^-54 absolutely: an error of at most 2^-54 * |d| per element, below the rounding of k*d.
# Two phases: ``host_grad_norms`` reads every gradient, the caller decides the non-finite
# policy, then each layer is measured and updated at once (its data still in cache). The
# coupled LARS norm is ||g + wd*w||^2 = ||g||^2 + 2 wd <g,w> + wd^2 ||w||^2; when that sum
# cancels (it is < 1/16 of its terms) the norm is computed exactly from g + wd*w instead.
# LAMB's ||u|| (u from the new moments) comes from a compiled read-only reduction (eager
# fallback without a compiler). Other dtypes and non-contiguous layers take the
# single-tensor code, with ``ok`` True.
# ---------------------------------------------------------------------------------------

_HOST_DTYPES = (torch.float32, torch.float64)
_NO_BIAS_CORRECTION_STEP = 1e30  # beta ** 1e30 == 0.0 for every beta in [0, 1)


def _host_ok(p: Tensor, g: Optional[Tensor] = None, *state: Optional[Tensor]) -> bool:
    """Whether the host path's kernels take these tensors as they are (float32/float64,
    contiguous, one dtype); the others take the single-tensor code."""
    if p.dtype not in _HOST_DTYPES or not p.is_contiguous():
        return False
    if g is not None and (g.dtype != p.dtype or not g.is_contiguous()):
        return False
    return all(t is None or (t.dtype == p.dtype and t.is_contiguous()) for t in state)


def _host_trust(w_norm: float, u_norm: float, coefficient: float, *, eps: float = 0.0,
                extra: Optional[float] = None, clip_lr: Optional[float] = None,
                max_norm: Optional[float] = None, max_weight_norm: Optional[float] = None) -> float:
    """``trust_ratio`` on Python floats (same branches, same order of operations)."""
    if max_norm is not None:
        w_norm, u_norm = min(w_norm, max_norm), min(u_norm, max_norm)
    if max_weight_norm is not None:
        w_norm = min(w_norm, max_weight_norm)
    denominator = u_norm if extra is None else u_norm + extra
    if eps:
        denominator = denominator + eps
    ratio = coefficient * w_norm / denominator if w_norm > 0 and u_norm > 0 else 1.0
    if clip_lr is not None:
        ratio = min(ratio / clip_lr, 1.0) if clip_lr != 0 else 1.0  # torch: ratio / 0 = inf -> 1
    return ratio


def _sum_sq(t: Tensor) -> float:
    """sum(t^2) as a float: one BLAS dot, about twice as fast as ``vector_norm`` on the CPU
    and no less accurate (both sum in t's dtype, unscaled, so both overflow to inf alike)."""
    t = t.view(-1)
    return torch.dot(t, t).item()


def host_grad_norms(grads: list[Tensor]) -> list[float]:
    """Phase 1 of the host-scalar path (reads only): each gradient's norm, which the caller
    tests for the non-finite policy before anything is written."""
    # Last layer first: the update then starts on the gradients this left in cache.
    norms = [math.sqrt(_sum_sq(g)) if _host_ok(g) else torch.linalg.vector_norm(g, dtype=norm_dtype(g.dtype)).item()
             for g in reversed(grads)]
    return norms[::-1]


def _coupled_norm(p: Tensor, g: Tensor, g_norm: float, w_norm: float, gw: float, weight_decay: float) -> float:
    """||g + wd*w|| from ||g||, ||w|| and <g, w>, exact fallback on cancellation."""
    terms = g_norm * g_norm + weight_decay * weight_decay * w_norm * w_norm
    uu = terms + 2.0 * weight_decay * gw
    if not 16.0 * uu >= terms or not math.isfinite(uu):
        return torch.linalg.vector_norm(torch.add(g, p, alpha=weight_decay)).item()
    return math.sqrt(uu)


def _host_lars(
    params: list[Tensor], grads: list[Tensor], bufs: list[Optional[Tensor]], steps: list[Tensor],
    grad_norms: list[float], lr: Scalar, factors: Optional[list[Tensor]], *, momentum: float, weight_decay: float,
    trust_coefficient: float, eps: float, trust_form: str, trust_clip: bool, adapt: bool,
    max_norm: Optional[float], factor_in_ratio: bool, nesterov: bool, lr_in_buffer: bool,
    want_stats: bool,
) -> list[tuple[list[Tensor], Tensor]]:
    options = dict(momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                   eps=eps, trust_form=trust_form, trust_clip=trust_clip, adapt=adapt,
                   max_norm=max_norm, factor_in_ratio=factor_in_ratio, nesterov=nesterov,
                   lr_in_buffer=lr_in_buffer)
    lr_f = lr.item() if torch.is_tensor(lr) else float(lr)
    facs = torch.stack(factors).tolist() if factors is not None else [None] * len(params)
    separate = trust_form == "separate"
    clip_lr = lr_f if trust_clip else None
    need_norms = adapt or want_stats
    mu, wd = momentum, weight_decay
    ok = torch.ones((), dtype=torch.bool)  # the caller checked every gradient finite
    rows = []
    for p, g, buf, g_norm, fac, fac_t, step in zip(params, grads, bufs, grad_norms, facs, factors or facs, steps):
        if not _host_ok(p, g, buf):
            fac_t = fac_t.to(norm_dtype(p.dtype)) if fac_t is not None else None
            row = _lars_param(p, g, buf, step, ok, lr, fac_t, **options)
            if want_stats:
                rows.append([t.item() for t in row])
            continue
        if need_norms:
            # <g, w> first: it brings w (and g) into cache for the sum of squares and the update.
            gw = torch.dot(g.view(-1), p.view(-1)).item() if wd and not separate else 0.0
            w_norm = math.sqrt(_sum_sq(p))
            u_norm = g_norm if separate or not wd else _coupled_norm(p, g, g_norm, w_norm, gw, wd)
        else:
            w_norm = u_norm = 0.0
        coefficient = trust_coefficient * fac if fac is not None and factor_in_ratio else trust_coefficient
        if adapt:
            trust = _host_trust(w_norm, u_norm, coefficient, eps=eps,
                                extra=wd * w_norm if separate and wd else None,
                                clip_lr=clip_lr, max_norm=max_norm)
        else:
            trust = 1.0
        scale = trust * fac if fac is not None and not factor_in_ratio else trust
        step_size = lr_f * scale
        k, outer = (step_size, 1.0) if lr_in_buffer else (scale, lr_f)
        if buf is None:
            torch._fused_sgd_([p], [g], [], weight_decay=wd, momentum=0.0, lr=outer * k, dampening=0.0,
                              nesterov=False, maximize=False, is_first_step=False)
        else:
            # Nesterov: the kernel steps by outer*k*(d + mu*buf); the rest of outer*mu*buf follows.
            torch._fused_sgd_([p], [g], [buf], weight_decay=wd, momentum=mu, lr=outer * k if nesterov else outer,
                              dampening=1.0 - k, nesterov=nesterov, maximize=False, is_first_step=False)
            if nesterov and k != 1.0:
                p.add_(buf, alpha=-outer * mu * (1.0 - k))
        step.add_(1.0)
        if want_stats:
            rows.append([w_norm, u_norm, trust, step_size])
    return _host_records(params, rows, want_stats)


def _host_records(params, rows, want_stats):
    if not want_stats or not params:
        return []
    return [(params, torch.tensor(rows, dtype=torch.float64).T.contiguous())]


def _lamb_sums(g: Tensor, m: Tensor, v: Tensor, w: Tensor, s: Tensor) -> Tensor:
    """[||u||^2, ||w||^2] with u from the moments this step will write; reads only.

    ``s`` = [beta1, beta2, bc1, bc2_sqrt, eps, weight_decay] (float64), a tensor so that
    one compiled kernel serves every configuration and step.
    """
    ndt = norm_dtype(w.dtype)
    b1, b2, bc1, bc2_sqrt, eps, wd = s.to(ndt).unbind()
    m = m + (1.0 - b1) * (g - m)
    v = v * b2 + (1.0 - b2) * g * g
    u = (m / bc1) / (v.sqrt() / bc2_sqrt + eps) + wd * w
    return torch.stack([(u * u).sum(dtype=ndt), (w * w).sum(dtype=ndt)])


_lamb_sums_compiled: list = []


def _lamb_reduction():
    """The compiled ``_lamb_sums`` (one kernel for every layer), or the eager function where
    torch.compile is unavailable (no C++ compiler)."""
    if not _lamb_sums_compiled:
        _lamb_sums_compiled.append(torch.compile(_lamb_sums, dynamic=True, fullgraph=True))
    return _lamb_sums_compiled[0]


def _host_lamb(
    params: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], steps: list[Tensor],
    lr: Scalar, *, beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: bool,
    trust_clip: bool, adapt: bool, want_stats: bool, max_weight_norm: Optional[float] = None,
) -> list[tuple[list[Tensor], Tensor]]:
    options = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                   trust_clip=trust_clip, adapt=adapt, max_weight_norm=max_weight_norm)
    lr_f = lr.item() if torch.is_tensor(lr) else float(lr)
    need_norms = adapt or want_stats
    no_bc = None
    ok = torch.ones((), dtype=torch.bool)  # the caller checked every gradient finite
    rows = []
    for p, g, m, v, step in zip(params, grads, ms, vs, steps):
        if not _host_ok(p, g, m, v) or step.device.type != "cpu":
            bc = bias_corrections(step, norm_dtype(p.dtype), beta1, beta2) if bias_correction else (None, None)
            row = _lamb_param(p, g, m, v, step, ok, lr, *bc, **options)
            if want_stats:
                rows.append([t.item() for t in row])
            continue
        if need_norms:
            if bias_correction:
                t = step.item() + 1.0
                bc1, bc2_sqrt = 1.0 - beta1 ** t, math.sqrt(1.0 - beta2 ** t)
            else:
                bc1 = bc2_sqrt = 1.0
            s = torch.tensor([beta1, beta2, bc1, bc2_sqrt, eps, weight_decay], dtype=torch.float64)
            uu, ww = _lamb_norms(g, m, v, p, s)
            u_norm, w_norm = math.sqrt(uu), math.sqrt(ww)
        else:
            u_norm = w_norm = 0.0
        trust = (_host_trust(w_norm, u_norm, 1.0, clip_lr=1.0 if trust_clip else None,
                             max_weight_norm=max_weight_norm) if adapt else 1.0)
        step_size = lr_f * trust
        step.add_(1.0)
        if bias_correction:
            kernel_step = step
        else:
            if no_bc is None:
                no_bc = torch.tensor(_NO_BIAS_CORRECTION_STEP, dtype=torch.float32)
            kernel_step = no_bc
        torch._fused_adamw_([p], [g], [m], [v], [], [kernel_step], lr=step_size, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        if want_stats:
            rows.append([w_norm, u_norm, trust, step_size])
    return _host_records(params, rows, want_stats)


def _lamb_norms(g, m, v, p, s):
    reduction = _lamb_reduction()
    if reduction is not _lamb_sums:
        try:
            return reduction(g.view(-1), m.view(-1), v.view(-1), p.view(-1), s).tolist()
        except Exception:  # no working compiler: the same sums, eagerly
            _lamb_sums_compiled[0] = _lamb_sums
    return _lamb_sums(g, m, v, p, s).tolist()


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------

_compiled: dict[tuple, object] = {}


def _fused(fn, options: dict):
    """``fn`` with ``options`` bound, compiled once per process and configuration.

    Dynamic shapes let one kernel serve every layer. Binding the options (rather than passing
    them as keywords) cuts the per-call guard cost about sixfold. Each configuration compiles a
    fresh copy of ``fn``'s code: torch.compile caps the graphs kept per code object (8 by
    default), and LARS, TVLARS, weight-decay/adapt groups and dtypes would otherwise share it.
    """
    key = (fn.__name__, tuple(sorted(options.items())))
    if key not in _compiled:
        def bound(*args):
            return fn(*args, **options)

        bound = types.FunctionType(bound.__code__.replace(), bound.__globals__, fn.__name__, None, bound.__closure__)
        # The hyper-parameters must be constants of the graph. By default (specialize_float=False)
        # dynamo lifts Python floats to graph inputs, inductor still bakes the traced value into
        # the generated kernel, and its on-disk cache then serves that kernel to a configuration
        # that differs only in that float (a momentum of 0.9 used for 0.5, issue 8).
        _compiled[key] = torch._dynamo.config.patch(specialize_float=True)(
            torch.compile(bound, dynamic=True, fullgraph=True))
    return _compiled[key]


def _per_param(fn, fused: bool, lr: Scalar, ref: Tensor, options: dict):
    """The per-parameter update with ``options`` bound, ``(eager, chosen, lr)``: ``chosen`` is
    the compiled update (fused) or the eager one, ``lr`` the lr to pass either."""
    eager = functools.partial(fn, **options)
    if not fused:
        return eager, eager, lr
    # A Python-float lr would be baked into the compiled code and recompile at every change.
    if not torch.is_tensor(lr):
        lr = torch.tensor(lr, dtype=torch.float64).to(ref.device)
    return eager, _fused(fn, options), lr


def _flat(fused: bool, *tensors: Optional[Tensor]) -> tuple:
    """1-D views for the compiled kernel, so that 1-D, 2-D and 4-D layers share one graph.

    Non-contiguous tensors (e.g. channels_last weights) cannot be viewed flat; they take the
    eager per-parameter code, which is the same maths.
    """
    if fused and all(t is None or t.is_contiguous() for t in tensors):
        return tuple(None if t is None else t.view(-1) for t in tensors)
    return tensors


def _stack_records(params, rows, want_stats):
    if not want_stats or not params:
        return []
    return [(params, torch.stack([torch.stack([r[i].to(torch.float64) for r in rows])
                                  for i in range(4)]))]


def lars(
    params: list[Tensor], grads: list[Tensor], bufs: list[Optional[Tensor]], steps: list[Tensor], ok: Tensor, *,
    lr: Scalar, factors: Optional[list[Tensor]] = None, momentum: float, weight_decay: float,
    trust_coefficient: float, eps: float, trust_form: str, trust_clip: bool, adapt: bool,
    max_norm: Optional[float] = None, factor_in_ratio: bool = False, nesterov: bool = False,
    lr_in_buffer: bool = False, foreach: bool = False, fused: bool = False, want_stats: bool = False,
    grad_norms: Optional[list[float]] = None,
) -> list[tuple[list[Tensor], Tensor]]:
    """One LARS-type update of ``params`` in place (functional form of LARS and TVLARS).

    ``bufs`` holds momentum buffers (all None when momentum is 0), ``steps`` the per-parameter
    step counters (incremented unless the step is skipped), ``factors`` phi_t per parameter
    (TVLARS). Returns telemetry
    records ``(params, [4, n] tensor)`` when ``want_stats``. ``grad_norms`` (CPU only: the
    :func:`host_grad_norms` of these gradients, already checked finite by the caller)
    selects the host-scalar path; ``ok`` must then be True.
    """
    options = dict(momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                   eps=eps, trust_form=trust_form, trust_clip=trust_clip, adapt=adapt,
                   max_norm=max_norm, factor_in_ratio=factor_in_ratio, nesterov=nesterov,
                   lr_in_buffer=lr_in_buffer)
    if grad_norms is not None:
        return _host_lars(params, grads, bufs, steps, grad_norms, lr, factors, want_stats=want_stats, **options)
    if foreach and not fused:
        return _multi_tensor_lars(params, grads, bufs, steps, ok, lr, factors, want_stats=want_stats, **options)
    eager, fn, lr = _per_param(_lars_param, fused, lr, params[0], options)
    rows, oks = [], {}
    for p, g, buf, step, fac in zip(params, grads, bufs, steps, factors or [None] * len(params)):
        if p.device not in oks:
            oks[p.device] = ok.to(p.device)
        fac = fac.to(norm_dtype(p.dtype)) if fac is not None else None
        tensors = _flat(fused, p, g, buf)
        update = fn if tensors[0] is not p else eager  # not flattened: the eager code
        rows.append(update(*tensors, step, oks[p.device], lr, fac))
    return _stack_records(params, rows, want_stats)


def lamb(
    params: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], steps: list[Tensor],
    ok: Tensor, *, lr: Scalar, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction: bool, trust_clip: bool, adapt: bool, max_weight_norm: Optional[float] = None,
    foreach: bool = False, fused: bool = False, want_stats: bool = False, grad_norms: Optional[list[float]] = None,
) -> list[tuple[list[Tensor], Tensor]]:
    """One LAMB update of ``params`` in place; ``steps`` are per-parameter step counters.
    ``grad_norms`` selects the host-scalar path, as in :func:`lars`."""
    options = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                   trust_clip=trust_clip, adapt=adapt, max_weight_norm=max_weight_norm)
    if grad_norms is not None:
        return _host_lamb(params, grads, ms, vs, steps, lr, bias_correction=bias_correction,
                          want_stats=want_stats, **options)
    if foreach and not fused:
        return _multi_tensor_lamb(params, grads, ms, vs, steps, ok, lr, bias_correction=bias_correction,
                                  want_stats=want_stats, **options)
    eager, fn, lr = _per_param(_lamb_param, fused, lr, params[0], options)
    rows = []
    for p, g, m, v, s in zip(params, grads, ms, vs, steps):
        bc = bias_corrections(s, norm_dtype(p.dtype), beta1, beta2) if bias_correction else (None, None)
        tensors = _flat(fused, p, g, m, v)
        update = fn if tensors[0] is not p else eager  # not flattened: the eager code
        rows.append(update(*tensors, s, ok.to(p.device), lr, *bc))
    return _stack_records(params, rows, want_stats)
