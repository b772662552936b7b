"""The host path (CPU default): eager, nothing compiled; the decision and the per-layer
scalars read as Python numbers (free on the CPU), torch's own fused SGD / AdamW kernels for
the update.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._scalars import (HEAVY_BALL, LOOK_AHEAD, LAMBOptions, LARSOptions, Scalars, _on, buckets, lamb_bias_corrections,
                       lamb_scalars)
from ._single_tensor import _lamb_layer_direction, _lamb_layer_update, _lars_layer_norms, _lars_layer_update


# =======================================================================================
# The host path (CPU default, eager): scalars as Python numbers, torch's fused SGD / AdamW
# kernels for the update
# =======================================================================================
#
#   LARS heavy-ball   _fused_sgd_(weight_decay=wd, momentum=mu, dampening=1-k, lr=L)
#                     buf = mu*buf + k*(g + wd*w);  w -= L*buf
#   nesterov and      the same call with nesterov=True and lr = L*k (w -= L*k*(d + mu*buf)),
#   look-ahead        then w -= L*mu*(1-k)*buf: together w -= L*(k*d + mu*buf)
#   no momentum       _fused_sgd_(lr=L*k) without buffers
#
# with k = scale and L = lr (look-ahead: k = lr*trust*phi, L = 1). The kernels take
# 1 - dampening, which represents k to within 2^-54 absolutely: an error of at most 2^-54*|d|
# per element, below the rounding of k*d. LARS measures every layer first, last layer first,
# so that the update starts on data still in cache: ||g||^2, ||w||^2 and <g, w> by BLAS dots,
# ||g + wd*w||^2 = ||g||^2 + 2 wd <g,w> + wd^2 ||w||^2, computed from g + wd*w itself when that
# sum cancels (< 1/16 of its terms) or is not finite. Every layer's ||w|| and ||g|| are
# measured, adapted or not, because the decision reads them all (``_functional``); a layer that
# does not adapt skips the dot <g, w> unless telemetry is on (its trust is 1 whatever ||d|| is).
#
#   LAMB              its ||u|| needs this step's moments, which no eager kernel computes
#                     without writing them. So LAMB measures ||w|| and ||g|| of every layer
#                     first (the decision; ||w|| again serves the trust ratio), then goes chunk
#                     by chunk: it makes wd*w,
#                     to which _fused_adamw_ (taking it as its "parameter", lr=-1, no decay)
#                     adds Adam's direction m_hat / (sqrt(v_hat) + eps) while it writes the
#                     moments: that is u; then ||u|| and w -= lr*trust*u. A chunk
#                     that neither adapts nor records telemetry (trust 1) takes one
#                     _fused_adamw_(lr=lr, weight_decay=wd): AdamW's decoupled lr*wd*w is
#                     LAMB's lr*(wd*w) term. bias_correction=False: a step count of 1e30
#                     makes both corrections exactly 1. A chunk holds CHUNK_BYTES of layers
#                     (4 MB: 1 and 16 MB were slower on ResNet-50, 64 MB twice as slow), so
#                     that u is still in cache when it is used, and its workspace, made once
#                     per step, stays that small.
#
# A sum of squares that is not finite is measured again in float64, so that a norm is
# non-finite exactly when an entry is. Layers of other dtypes or layouts (half precision,
# channels_last) take the single-tensor functions, with the same scalars.

_HOST_DTYPES = (torch.float32, torch.float64)
_NO_BIAS_CORRECTION_STEP = 1e30  # beta ** 1e30 == 0.0 for every beta in [0, 1)
CHUNK_BYTES = 4 << 20


def _host_ok(p: Tensor, g: Optional[Tensor] = None, *state: Optional[Tensor]) -> bool:
    """Whether torch's fused kernels and BLAS take these tensors as they are (float32 or
    float64, contiguous, one dtype); the others take the single-tensor code."""
    if p.dtype not in _HOST_DTYPES or not p.is_contiguous():
        return False
    if g is not None and (g.dtype != p.dtype or not g.is_contiguous()):
        return False
    return all(t is None or (t.dtype == p.dtype and t.is_contiguous()) for t in state)


def _norm(x: Tensor) -> float:
    """||x|| of a host tensor: one BLAS dot, in float64 again if the sum of squares is not finite."""
    xx = torch.dot(x.view(-1), x.view(-1)).item()
    return math.sqrt(xx) if math.isfinite(xx) else torch.linalg.vector_norm(x, dtype=torch.float64).item()


def _plus_decay_norm(x: Tensor, p: Tensor, x_norm: float, w_norm: float, wd: float) -> float:
    """||x + wd*w|| from ||x||, ||w|| and one dot <x, w>; computed from x + wd*w itself when
    the expansion cancels (below 1/16 of its terms) or is not finite."""
    terms = x_norm * x_norm + wd * wd * w_norm * w_norm
    uu = terms + 2.0 * wd * torch.dot(x.view(-1), p.view(-1)).item()
    if 16.0 * uu >= terms and math.isfinite(uu):
        return math.sqrt(uu)
    return torch.linalg.vector_norm(x + wd * p, dtype=torch.float64).item()


def _host_lars_measure(params, grads, options: LARSOptions) -> tuple[Tensor, None]:
    """[||w||; ||u||] of every layer as a float64 [2, n] tensor (u: d = g + wd*w for the
    coupled form, else g)."""
    count = len(params)
    w_norms, u_norms = [0.0] * count, [0.0] * count
    weight_decay = options.weight_decay
    # A layer that neither adapts nor records telemetry needs only what the decision reads:
    # ||g|| then stands for ||u||.
    in_full = options.adapt or options.stats
    for i in reversed(range(count)):
        p, g = params[i], grads[i]
        if not _host_ok(p, g):
            w_norms[i], u_norms[i] = _lars_layer_norms(p, g, weight_decay=weight_decay, coupled=options.coupled,
                                                       dtype=torch.float64).tolist()
            continue
        g_norm = _norm(g)
        w_norms[i] = _norm(p)
        if in_full and options.coupled and options.decay:
            u_norms[i] = _plus_decay_norm(g, p, g_norm, w_norms[i], weight_decay)
        else:
            u_norms[i] = g_norm
    return torch.tensor([w_norms, u_norms], dtype=torch.float64), None


def _host_lars_apply(params, grads, bufs, steps, options: LARSOptions, scalars: Scalars) -> None:
    if not bool(scalars.ok):
        return
    lr = float(_on(options.lr, torch.device("cpu")))
    lr_outside = 1.0 if options.momentum_form == LOOK_AHEAD else lr
    weight_decay, momentum = options.weight_decay, options.momentum
    counted = []
    for i, scale in enumerate(scalars.scale.tolist()):
        p, g, buf = params[i], grads[i], bufs[i]
        if not _host_ok(p, g, buf):
            _lars_layer_update(p, g, buf, steps[i], scalars.ok, scalars.scale[i], weight_decay=weight_decay,
                               momentum=momentum, lr_outside=lr_outside, momentum_form=options.momentum_form)
            continue  # it counts its step
        if buf is None:
            torch._fused_sgd_([p], [g], [], weight_decay=weight_decay, momentum=0.0, lr=lr_outside * scale,
                              dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
        elif options.momentum_form == HEAVY_BALL:
            torch._fused_sgd_([p], [g], [buf], weight_decay=weight_decay, momentum=momentum, lr=lr_outside,
                              dampening=1.0 - scale, nesterov=False, maximize=False, is_first_step=False)
        else:
            torch._fused_sgd_([p], [g], [buf], weight_decay=weight_decay, momentum=momentum, lr=lr_outside * scale,
                              dampening=1.0 - scale, nesterov=True, maximize=False, is_first_step=False)
            if scale != 1.0:
                p.add_(buf, alpha=-lr_outside * momentum * (1.0 - scale))
        counted.append(steps[i])
    if counted:
        torch._foreach_add_(counted, 1.0)


def _float64_norm(t: Tensor) -> float:
    return torch.linalg.vector_norm(t, dtype=torch.float64).item()


def _norms(tensors: list[Tensor]) -> Tensor:
    """Each tensor's norm, a float64 vector: ``_norm`` (one BLAS dot) for the tensors torch's
    kernels take, float64 for the others. (One ``_foreach_norm`` per chunk was as fast on one
    thread and 1.4-1.5x slower on two: the CPU runs it as a parallel reduction per tensor.)"""
    return torch.tensor([_norm(t) if _host_ok(t) else _float64_norm(t) for t in tensors], dtype=torch.float64)


def _host_lamb_measure(params, grads, exp_avgs, exp_avg_sqs) -> tuple[Tensor, list[bool]]:
    """[||w||; ||g||] of every layer, what the decision reads, and which layers torch's kernels
    take. ||w|| is measured as the update measures it (a layer the kernels do not take: in
    float64), since it serves the trust ratio too."""
    on_kernels = [_host_ok(*tensors) for tensors in zip(params, grads, exp_avgs, exp_avg_sqs)]
    w_norms = [_norm(p) if kernels else _float64_norm(p) for p, kernels in zip(params, on_kernels)]
    return torch.stack([torch.tensor(w_norms, dtype=torch.float64), _norms(grads)]), on_kernels


def _chunks(params: list[Tensor], on_kernels: list[bool]) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive layers that torch's kernels take together: one
    (device, dtype) bucket, at most CHUNK_BYTES (a larger layer is a chunk of its own); a layer
    they do not take (``on_kernels`` False) is a chunk of its own."""
    ranges = []
    for first, end in buckets(params):
        start, size = first, 0
        for i in range(first, end):
            nbytes = params[i].numel() * params[i].element_size()
            if i > start and (size + nbytes > CHUNK_BYTES or not on_kernels[i] or not on_kernels[i - 1]):
                ranges.append((start, i))
                start, size = i, 0
            size += nbytes
        ranges.append((start, end))
    return ranges


def _host_lamb_apply(params, grads, exp_avgs, exp_avg_sqs, steps, options: LAMBOptions, ok: Tensor,
                     measured: Tensor, on_kernels: list[bool]) -> Scalars:
    """The update from ``measured`` = [||w||; ||g||] and the decision ``ok``."""
    w_norms = measured[0]
    if not bool(ok):
        return lamb_scalars(w_norms, measured[1], options, ok)
    lr = float(_on(options.lr, torch.device("cpu")))
    adam = dict(beta1=options.beta1, beta2=options.beta2, eps=options.eps, amsgrad=False, maximize=False)
    no_bias_correction = torch.tensor(_NO_BIAS_CORRECTION_STEP, dtype=torch.float32)
    directions_needed = options.adapt or options.stats
    chunks = _chunks(params, on_kernels)
    # One workspace per step and dtype, as large as the largest chunk, reused chunk after chunk
    # (a fresh tensor per layer costs more page faults than the update costs time).
    sizes: dict = {}
    for start, end in chunks:
        if on_kernels[start]:
            elements = sum(p.numel() for p in params[start:end])
            sizes[params[start].dtype] = max(sizes.get(params[start].dtype, 0), elements)
    workspace = {dtype: torch.empty(n, dtype=dtype) for dtype, n in sizes.items()} if directions_needed else {}
    parts = []
    for start, end in chunks:
        chunk_params, chunk_grads, chunk_steps = params[start:end], grads[start:end], steps[start:end]
        chunk_exp_avgs, chunk_exp_avg_sqs = exp_avgs[start:end], exp_avg_sqs[start:end]
        if not on_kernels[start]:  # one layer, by the single-tensor functions
            parts.append(_single_lamb_layer(chunk_params[0], chunk_grads[0], chunk_exp_avgs[0], chunk_exp_avg_sqs[0],
                                            chunk_steps[0], options, ok, w_norms[start:end]))
            continue
        kernel_steps = chunk_steps if options.bias_correction else [no_bias_correction] * (end - start)
        if not directions_needed:  # trust 1: AdamW's step is LAMB's
            parts.append(lamb_scalars(w_norms[start:end], torch.zeros(end - start, dtype=torch.float64), options, ok))
            torch._foreach_add_(chunk_steps, 1.0)
            torch._fused_adamw_(chunk_params, chunk_grads, chunk_exp_avgs, chunk_exp_avg_sqs, [], kernel_steps, lr=lr,
                                weight_decay=options.weight_decay, **adam)
            continue
        directions, offset = [], 0  # wd*w, to which the kernel adds Adam's direction: u
        for p in chunk_params:
            out = workspace[p.dtype][offset:offset + p.numel()].view(p.shape)
            directions.append(torch.mul(p, options.weight_decay, out=out))
            offset += p.numel()
        torch._foreach_add_(chunk_steps, 1.0)
        torch._fused_adamw_(directions, chunk_grads, chunk_exp_avgs, chunk_exp_avg_sqs, [], kernel_steps, lr=-1.0,
                            weight_decay=0.0, **adam)
        scalars = lamb_scalars(w_norms[start:end], _norms(directions), options, ok)
        parts.append(scalars)
        for p, u, step_size in zip(chunk_params, directions, scalars.scale.tolist()):
            p.add_(u, alpha=-step_size)
    fields = ("w_norm", "u_norm", "trust", "step_size", "scale")
    return Scalars(ok, *(torch.cat([getattr(part, field) for part in parts]) for field in fields))


def _single_lamb_layer(p, g, exp_avg, exp_avg_sq, step, options: LAMBOptions, ok: Tensor, w_norm: Tensor) -> Scalars:
    """A layer torch's kernels do not take, stepped by the single-tensor functions."""
    bias_corrections = [c[0] for c in lamb_bias_corrections(step.reshape(1), options)]
    _, _, u = _lamb_layer_direction(p, g, exp_avg, exp_avg_sq, *bias_corrections, options)
    scalars = lamb_scalars(w_norm, torch.linalg.vector_norm(u, dtype=torch.float64).reshape(1), options, ok)
    _lamb_layer_update(p, g, exp_avg, exp_avg_sq, step, ok, scalars.scale[0], *bias_corrections, options)
    return scalars
