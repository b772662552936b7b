"""The host path (CPU default): eager, nothing compiled; the decision and the per-layer
scalars read as Python numbers (free on the CPU), torch's own fused SGD / AdamW kernels for
the update.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._multi_tensor import _buckets
from ._scalars import HEAVY_BALL, LOOK_AHEAD, LAMBOptions, LARSOptions, Scalars, _on, lamb_bias_corrections, lamb_scalars
from ._single_tensor import _lamb_layer_norms, _lamb_layer_update, _lars_layer_norms, _lars_layer_update


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
# sum cancels (< 1/16 of its terms) or is not finite; a layer that does not adapt is measured
# by ||g|| alone (what the decision needs), unless telemetry is on.
#
#   LAMB              its ||u|| needs this step's moments, which no eager kernel computes
#                     without writing them. So LAMB decides on ||g|| first (a step with
#                     finite gradients is taken), then goes chunk by chunk: it makes wd*w,
#                     to which _fused_adamw_ (taking it as its "parameter", lr=-1, no decay)
#                     adds Adam's direction m_hat / (sqrt(v_hat) + eps) while it writes the
#                     moments: that is u; then ||w||, ||u|| and w -= lr*trust*u. A chunk
#                     that neither adapts nor records telemetry (trust 1) takes one
#                     _fused_adamw_(lr=lr, weight_decay=wd): AdamW's decoupled lr*wd*w is
#                     LAMB's lr*(wd*w) term. bias_correction=False: a step count of 1e30
#                     makes both corrections exactly 1. A chunk holds CHUNK_BYTES of layers
#                     (4 MB: 1 and 16 MB were slower on ResNet-50, 64 MB twice as slow), so
#                     that u is still in cache when it is used, and its workspace, made once
#                     per step, stays that small.
#
# A sum of squares that is not finite is measured again in float64, so that a finite layer
# never reads as non-finite. Layers of other dtypes or layouts (half precision, channels_last)
# take the single-tensor functions, with the same scalars.

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


def _host_lars_measure(params, grads, o: LARSOptions):
    n = len(params)
    w_norms, u_norms = [0.0] * n, [0.0] * n
    wd, measured = o.weight_decay, o.adapt or o.stats
    for i in reversed(range(n)):
        p, g = params[i], grads[i]
        if not _host_ok(p, g):
            w_norms[i], u_norms[i] = _lars_layer_norms(p, g, (wd,), ndt=torch.float64, decay=o.decay,
                                                       coupled=o.coupled).tolist()
            continue
        u_norms[i] = g_norm = _norm(g)
        if measured:
            w_norms[i] = _norm(p)
            if o.coupled and o.decay:
                u_norms[i] = _plus_decay_norm(g, p, g_norm, w_norms[i], wd)
    return torch.tensor([w_norms, u_norms], dtype=torch.float64), None


def _host_lars_apply(params, grads, bufs, steps, o: LARSOptions, s: Scalars) -> None:
    if not bool(s.ok):
        return
    lr = float(_on(o.lr, torch.device("cpu")))
    outer = 1.0 if o.momentum_form == LOOK_AHEAD else lr
    wd, mu = o.weight_decay, o.momentum
    counted = []
    for i, k in enumerate(s.scale.tolist()):
        p, g, buf = params[i], grads[i], bufs[i]
        if not _host_ok(p, g, buf):
            _lars_layer_update(p, g, buf, steps[i], s.ok.reshape(1), s.scale[i:i + 1], (wd, mu, outer),
                               decay=o.decay, form=o.momentum_form)
            continue  # it counts its step
        if buf is None:
            torch._fused_sgd_([p], [g], [], weight_decay=wd, momentum=0.0, lr=outer * k, dampening=0.0,
                              nesterov=False, maximize=False, is_first_step=False)
        elif o.momentum_form == HEAVY_BALL:
            torch._fused_sgd_([p], [g], [buf], weight_decay=wd, momentum=mu, lr=outer, dampening=1.0 - k,
                              nesterov=False, maximize=False, is_first_step=False)
        else:
            torch._fused_sgd_([p], [g], [buf], weight_decay=wd, momentum=mu, lr=outer * k, dampening=1.0 - k,
                              nesterov=True, maximize=False, is_first_step=False)
            if k != 1.0:
                p.add_(buf, alpha=-outer * mu * (1.0 - k))
        counted.append(steps[i])
    if counted:
        torch._foreach_add_(counted, 1.0)


def _norms(tensors: list[Tensor]) -> Tensor:
    """Each tensor's norm, a float64 vector: ``_norm`` (one BLAS dot) for the tensors torch's
    kernels take, float64 for the others. (One ``_foreach_norm`` per chunk was as fast on one
    thread and 1.4-1.5x slower on two: the CPU runs it as a parallel reduction per tensor.)"""
    return torch.tensor([_norm(t) if _host_ok(t) else torch.linalg.vector_norm(t, dtype=torch.float64).item()
                         for t in tensors], dtype=torch.float64)


def _host_grad_norms(grads: list[Tensor]) -> Tensor:
    """[1, layers]: ||g|| of every layer, what the host LAMB decides the step on."""
    return _norms(grads)[None]


def _chunks(params: list[Tensor], host: list[bool]) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive layers that torch's kernels take together: one
    (device, dtype) bucket, at most CHUNK_BYTES (a larger layer is a chunk of its own); a layer
    they do not take (``host`` False) is a chunk of its own."""
    ranges = []
    for a, b in _buckets(params):
        start, size = a, 0
        for i in range(a, b):
            n = params[i].numel() * params[i].element_size()
            if i > start and (size + n > CHUNK_BYTES or not host[i] or not host[i - 1]):
                ranges.append((start, i))
                start, size = i, 0
            size += n
        ranges.append((start, b))
    return ranges


def _host_lamb_apply(params, grads, ms, vs, steps, o: LAMBOptions, ok: Tensor, g_norms: Tensor) -> Scalars:
    if not bool(ok):
        return lamb_scalars(torch.zeros_like(g_norms), g_norms, o, ok)
    lr = float(_on(o.lr, torch.device("cpu")))
    adam = dict(beta1=o.beta1, beta2=o.beta2, eps=o.eps, amsgrad=False, maximize=False)
    no_bc = torch.tensor(_NO_BIAS_CORRECTION_STEP, dtype=torch.float32)
    host = [_host_ok(*t) for t in zip(params, grads, ms, vs)]
    chunks = _chunks(params, host)
    # One workspace per step and dtype, as large as the largest chunk, reused chunk after chunk
    # (a fresh tensor per layer costs more page faults than the update costs time).
    workspace: dict = {}
    for a, b in chunks:
        if host[a]:
            n = sum(p.numel() for p in params[a:b])
            workspace[params[a].dtype] = max(workspace.get(params[a].dtype, 0), n)
    workspace = {dtype: torch.empty(n, dtype=dtype) for dtype, n in workspace.items()} if o.adapt or o.stats else {}
    parts = []
    for a, b in chunks:
        ps, gs, m, v, st = params[a:b], grads[a:b], ms[a:b], vs[a:b], steps[a:b]
        if not host[a]:  # one layer, by the single-tensor functions
            parts.append(_single_lamb_layer(ps[0], gs[0], m[0], v[0], st[0], o, ok))
            continue
        kernel_steps = st if o.bias_correction else [no_bc] * (b - a)
        if not (o.adapt or o.stats):  # trust 1: AdamW's step is LAMB's
            zeros = torch.zeros(b - a, dtype=torch.float64)
            parts.append(lamb_scalars(zeros, zeros, o, ok))
            torch._foreach_add_(st, 1.0)
            torch._fused_adamw_(ps, gs, m, v, [], kernel_steps, lr=lr, weight_decay=o.weight_decay, **adam)
            continue
        directions, offset = [], 0  # wd*w, to which the kernel adds Adam's direction: u
        for p in ps:
            directions.append(torch.mul(p, o.weight_decay, out=workspace[p.dtype][offset:offset + p.numel()].view(p.shape)))
            offset += p.numel()
        torch._foreach_add_(st, 1.0)
        torch._fused_adamw_(directions, gs, m, v, [], kernel_steps, lr=-1.0, weight_decay=0.0, **adam)
        s = lamb_scalars(_norms(ps), _norms(directions), o, ok)
        parts.append(s)
        for p, u, gamma in zip(ps, directions, s.scale.tolist()):
            p.add_(u, alpha=-gamma)
    fields = ("w_norm", "u_norm", "trust", "step_size", "scale")
    return Scalars(ok, *(torch.cat([getattr(p, f) for p in parts]) for f in fields))


def _single_lamb_layer(p, g, m, v, step, o: LAMBOptions, ok: Tensor) -> Scalars:
    """A layer torch's kernels do not take, measured and stepped by the single-tensor functions."""
    h = (o.beta1, o.beta2, o.eps, o.weight_decay)
    bc = torch.stack(lamb_bias_corrections(step.reshape(1), o), dim=1)[0]
    norms = _lamb_layer_norms(p, g, m, v, bc, h, ndt=torch.float64, decay=o.decay)
    s = lamb_scalars(norms[:1], norms[1:], o, ok)
    _lamb_layer_update(p, g, m, v, step, ok.reshape(1), s.scale, bc, h, decay=o.decay)
    return s
