"""The single-tensor path (``foreach=False``): one layer at a time, every scalar kept on the
device; with ``fused=True`` the same per-layer functions compiled by ``torch.compile``.
Its per-layer functions are also what the host path uses for layers torch's fused kernels
do not take (half precision, channels_last).
"""

from __future__ import annotations

import functools
import types
from typing import Any, Optional

import torch
from torch import Tensor

from ._scalars import (HEAVY_BALL, LOOK_AHEAD, LAMBOptions, LARSOptions, PerDevice, Scalars, _on,
                       lamb_bias_corrections, norm_dtype, to_device)


# =======================================================================================
# The single-tensor path: one layer at a time (its code is also what fused=True compiles)
# =======================================================================================
#
# Each function takes its constants ``h`` as a tuple of Python floats when eager, a 1-D tensor
# when compiled; flags that change the code (decay, coupled, momentum form, ...) are keywords.


def _acc(t: Tensor) -> Tensor:
    """``t`` in the precision the arithmetic runs in: float32 for half-precision layers (each
    result is rounded once, when written), the tensor itself otherwise."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _eager_cpu(t: Tensor) -> bool:
    """Eager CPU code, where torch.where / masked_fill_ with a broadcast condition run
    unvectorised (about 4x a multiply); compiled and CUDA code select directly."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _keep(ok: Tensor, x: Tensor) -> Tensor:
    """``x`` when the step is taken, else 0 (``x`` may then hold inf or NaN)."""
    if _eager_cpu(x):
        return torch.nan_to_num_(x * ok.to(x.dtype), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.where(ok, x, 0.0)


def _keep_(ok: Tensor, x: Tensor) -> Tensor:
    """``_keep`` in place."""
    if _eager_cpu(x):
        return torch.nan_to_num_(x.mul_(ok.to(x.dtype)), nan=0.0, posinf=0.0, neginf=0.0)
    return x.masked_fill_(~ok, 0.0)


def _choose(ok: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` when the step is taken, else ``old`` (both finite); exact: lerp by 1 gives
    ``new``, by 0 ``old``."""
    if _eager_cpu(new):
        return torch.lerp(old.to(new.dtype), new, ok.to(new.dtype))
    return torch.where(ok, new, old)


def _lars_layer_norms(p: Tensor, g: Tensor, h, *, ndt: torch.dtype, decay: bool, coupled: bool) -> Tensor:
    """[||w||, ||u||] of one layer (u = g + wd*w, or g); ``h`` = (wd,)."""
    u = _acc(g) + h[0] * _acc(p) if decay and coupled else g
    return torch.stack([torch.linalg.vector_norm(p, dtype=ndt), torch.linalg.vector_norm(u, dtype=ndt)])


def _lars_layer_update(p: Tensor, g: Tensor, buf: Optional[Tensor], step: Tensor, ok: Tensor, scale: Tensor, h,
                       *, decay: bool, form: str) -> None:
    """buf = mu*buf + scale*d and w -= outer*buf (heavy-ball) or outer*(scale*d + mu*buf)
    (nesterov; look-ahead with outer = 1 and lr in ``scale``); a no-op unless ``ok``.
    ``h`` = (wd, mu, outer)."""
    wd, mu, outer = h[0], h[1], h[2]
    d = _keep(ok, _acc(g))  # finite, so that scale = 0 clears it; p.grad is never written
    if decay:
        d = d + wd * _acc(p)
    d = d * scale[0]
    if buf is None:
        update = d
    else:
        new = mu * _acc(buf) + d
        buf.copy_(_choose(ok, new, buf))
        update = _keep(ok, new if form == HEAVY_BALL else d + mu * new)
    p.sub_(outer * update)
    step.add_(ok[0].to(step.dtype))


def _lamb_layer_direction(p: Tensor, g: Tensor, m: Tensor, v: Tensor, bc: Tensor, h, *, decay: bool) -> tuple:
    """(m', v', u): the moments this step writes and LAMB's direction; writes nothing.
    ``bc`` = [1 - b1^t, sqrt(1 - b2^t)], ``h`` = (b1, b2, eps, wd)."""
    b1, b2, eps, wd = h[0], h[1], h[2], h[3]
    g = _acc(g)
    m_new = b1 * _acc(m) + (1.0 - b1) * g
    v_new = b2 * _acc(v) + (1.0 - b2) * g * g
    u = (m_new / bc[0]) / (v_new.sqrt() / bc[1] + eps)
    if decay:
        u = u + wd * _acc(p)
    return m_new, v_new, u


def _lamb_layer_norms(p, g, m, v, bc, h, *, ndt: torch.dtype, decay: bool) -> Tensor:
    _, _, u = _lamb_layer_direction(p, g, m, v, bc, h, decay=decay)
    return torch.stack([torch.linalg.vector_norm(p, dtype=ndt), torch.linalg.vector_norm(u, dtype=ndt)])


def _lamb_layer_update(p, g, m, v, step, ok, scale, bc, h, *, decay: bool) -> None:
    g = _keep(ok, _acc(g))
    m_new, v_new, u = _lamb_layer_direction(p, g, m, v, bc, h, decay=decay)
    m.copy_(_choose(ok, m_new, m))
    v.copy_(_choose(ok, v_new, v))
    p.sub_(u * scale[0])
    step.add_(ok[0].to(step.dtype))


# The per-layer scalars (scale, ok, bias corrections) and the constants ``h`` reach these
# functions as 1-D tensors (views): dynamo treats a 0-d CPU tensor input as a Python number
# and would read it in its guards.


def _kernel(fn, compiled: bool, flags: dict, *tensors: Optional[Tensor]) -> tuple:
    """(callable, tensors): ``fn`` compiled for ``flags`` with 1-D views of ``tensors``, or
    ``fn`` itself (eager) with them as they are; a layer that cannot be viewed flat (e.g.
    channels_last) runs eagerly under fused=True too, the same maths."""
    if compiled and all(t is None or t.is_contiguous() for t in tensors):
        return _compile(fn, flags, tensors[0].dtype), tuple(None if t is None else t.view(-1) for t in tensors)
    return functools.partial(fn, **flags), tensors


def _single_tensor_lars_measure(params, grads, o: LARSOptions, compiled: bool = False):
    flags = dict(decay=o.decay, coupled=o.coupled)
    consts = _numbers(compiled, params, o.weight_decay)
    norms = []
    for p, g in zip(params, grads):
        fn, tensors = _kernel(_lars_layer_norms, compiled, flags, p, g)
        norms.append(fn(*tensors, consts[p.device], ndt=norm_dtype(p.device)))
    return _stack_columns(norms), None


def _single_tensor_lars_apply(params, grads, bufs, steps, o: LARSOptions, s: Scalars, work=None,
                              compiled: bool = False) -> None:
    flags = dict(decay=o.decay, form=o.momentum_form)
    outer = 1.0 if o.momentum_form == LOOK_AHEAD else o.lr
    consts = _numbers(compiled, params, o.weight_decay, o.momentum, outer)
    for (p, g, buf, step), scale, ok in _per_layer(s, params, grads, bufs, steps):
        fn, tensors = _kernel(_lars_layer_update, compiled, flags, p, g, buf)
        fn(*tensors, step, ok, scale, consts[p.device])


def _single_tensor_lamb_measure(params, grads, ms, vs, steps, o: LAMBOptions, compiled: bool = False):
    flags = dict(decay=o.decay)
    consts = _numbers(compiled, params, o.beta1, o.beta2, o.eps, o.weight_decay)
    bcs = _bias_corrections_per_layer(steps, o, compiled)
    norms = []
    for p, g, m, v, bc in zip(params, grads, ms, vs, bcs):
        fn, tensors = _kernel(_lamb_layer_norms, compiled, flags, p, g, m, v)
        norms.append(fn(*tensors, bc, consts[p.device], ndt=norm_dtype(p.device)))
    return _stack_columns(norms), bcs


def _single_tensor_lamb_apply(params, grads, ms, vs, steps, o: LAMBOptions, s: Scalars, work,
                              compiled: bool = False) -> None:
    flags = dict(decay=o.decay)
    consts = _numbers(compiled, params, o.beta1, o.beta2, o.eps, o.weight_decay)
    for ((p, g, m, v, step), scale, ok), bc in zip(_per_layer(s, params, grads, ms, vs, steps), work):
        fn, tensors = _kernel(_lamb_layer_update, compiled, flags, p, g, m, v)
        fn(*tensors, step, ok, scale, bc, consts[p.device])


def _bias_corrections_per_layer(steps, o: LAMBOptions, compiled: bool = False) -> list:
    """Each layer's [1 - b1^t, sqrt(1 - b2^t)] (a 1-D view), computed once per device."""
    out = [None] * len(steps)
    for indices in _by_device(steps).values():
        bc = torch.stack(lamb_bias_corrections(torch.stack([steps[i] for i in indices]), o), dim=1)
        for i, row in zip(indices, bc.unbind()):
            out[i] = _static(row) if compiled else row
    return out


def _static(t: Tensor) -> Tensor:
    """``t`` marked as of fixed size for torch.compile: a small vector of constants whose
    length happened to equal a layer's would otherwise tie the two sizes in the guards, and
    recompile when they differ."""
    torch._dynamo.mark_static(t)
    return t


def _per_layer(s: Scalars, *lists):
    """Each layer's tensors with its ``scale`` and the decision, as 1-D views on its device."""
    scales, oks = PerDevice(s.scale), PerDevice(s.ok)
    cache: dict = {}
    for i, row in enumerate(zip(*lists)):
        device = row[0].device
        if device not in cache:
            cache[device] = (scales.on(device), oks.on(device).reshape(1))
        yield row, cache[device][0][i:i + 1], cache[device][1]


def _stack_columns(norms: list[Tensor]) -> Tensor:
    """[2, n] from n per-layer [w, u] pairs (on the first layer's device)."""
    if not norms:
        return torch.zeros(2, 0, dtype=torch.float64)
    device = norms[0].device
    return torch.stack([n.to(device) for n in norms], dim=1)


# -- fused=True: the same functions, compiled ----------------------------------------------

_compiled: dict[tuple, Any] = {}


def _compile(fn, flags: dict, dtype: torch.dtype):
    """``fn`` compiled once per process, set of ``flags`` and parameter dtype.

    Dynamic shapes let one generated kernel serve every layer (1-D views, see ``_kernel``).
    Every value arrives as a tensor, so nothing but the flags is specialised: inductor would
    otherwise bake a Python float into the kernel, and its on-disk cache hand that kernel to a
    configuration differing only in that value (issue 8). Each key compiles a fresh copy of
    ``fn``'s code: torch.compile caps the graphs kept per code object (8), and dtypes and the
    ranks of the layers viewed flat each take one.
    """
    key = (fn.__name__, tuple(sorted(flags.items())), dtype)
    if key not in _compiled:
        def bound(*args, **kwargs):
            return fn(*args, **kwargs, **flags)

        bound = types.FunctionType(bound.__code__.replace(), bound.__globals__, fn.__name__, None, bound.__closure__)
        _compiled[key] = torch.compile(bound, dynamic=True, fullgraph=True)
    return _compiled[key]


_constants: dict[tuple, Tensor] = {}


def _numbers(compiled: bool, params, *values) -> dict:
    """The constants ``h`` for each device of ``params``: a tuple of Python floats (a tensor
    value, e.g. a tensor lr, on that device), or for compiled code one 1-D tensor (made once
    per device and set of values, not every step)."""
    out = {}
    for p in params:
        if p.device in out:
            continue
        here = tuple(_on(v, p.device) for v in values)
        if not compiled:
            out[p.device] = here
            continue
        dt = norm_dtype(p.device)
        if any(torch.is_tensor(v) for v in here):  # a tensor lr: assembled on the device each step
            out[p.device] = _static(torch.stack([v.to(dt).reshape(()) if torch.is_tensor(v)
                                                 else torch.full((), v, dtype=dt, device=p.device) for v in here]))
            continue
        key = (p.device, dt, here)
        if key not in _constants:
            _constants[key] = _static(to_device(torch.tensor(here, dtype=dt), p.device))
        out[p.device] = _constants[key]
    return out


def _by_device(tensors: list[Tensor]) -> dict:
    out: dict = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.device, []).append(i)
    return out
