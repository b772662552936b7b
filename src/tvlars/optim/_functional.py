"""The maths of LARS, TVLARS and LAMB, and the three paths that compute it.

Per parameter tensor ("layer") w with gradient g, as in the papers:

    LARS    d     = g + wd * w
            trust = eta * ||w|| / (||d|| + eps)                   trust_form="coupled"
                    eta * ||w|| / (||g|| + wd * ||w|| + eps)      trust_form="separate"
            gamma = lr * trust                                    (the layer's step size)
            buf   = mu * buf + trust * d;  w -= lr * buf          heavy-ball
                                           w -= lr * (trust * d + mu * buf)   nesterov
    TVLARS  LARS times phi_t:  gamma = lr * trust * phi_t  (paper Eq. 4), with Algorithm 1's
            look-ahead momentum  m' = w - gamma * d;  w = m' + mu * (m' - m),  which with
            buf = m - m' is   buf = mu * buf + gamma * d;  w -= gamma * d + mu * buf
            (variant="official": phi_t inside the trust ratio, both norms clamped to 10,
            heavy-ball momentum)
    LAMB    m, v  = Adam's moments;  u = m_hat / (sqrt(v_hat) + eps) + wd * w
            trust = min(||w||, max_weight_norm) / ||u||
            w    -= lr * trust * u

``trust_ratio`` (written once, below) is 1 where a norm is 0, and for adapt=False groups;
``lars_scalars`` / ``lamb_scalars`` turn the norms of all layers into their step sizes at
once, on vectors, for every path.

A step is decided before anything is written: if any gradient holds inf or NaN, nothing
changes. Each path is a pair (measure, apply):

  measure  reads only, and returns what decides the step: each layer's [||w||; ||u||] (u: d,
           or g for the separate form, or LAMB's u; on devices in float64, so that a norm is
           non-finite exactly when an entry is), or for LAMB on the host path each layer's
           ||g||. The optimizer combines the shards of sharded layers (FSDP2: one all-reduce
           for all) and decides: any non-finite value skips the step.
  apply    the scalars and the update; on a skipped step an exact no-op (weights, state and
           counters unchanged), selected on the device, so that no device path waits for the
           decision.

Paths (chosen in one place, ``LayerwiseOptimizer._path``):

  single  ``_single_tensor_*`` (foreach=False): one layer at a time, scalars on the device;
          with fused=True the same per-layer functions compiled by ``torch.compile``.
  multi   ``_multi_tensor_*`` (CUDA default, foreach=True): ``torch._foreach_*`` ops on each
          (device, dtype) bucket, with a flat workspace per bucket and step, so that per-layer
          scalars and the skip cost a bounded number of kernel launches however many layers.
  host    ``_host_*`` (CPU default, eager, nothing compiled): norms by BLAS dots, the scalars
          read as Python numbers (free on the CPU), torch's own fused SGD / AdamW kernels for
          the update; LAMB in chunks of layers (see there).

Nothing is kept between steps or between groups except immutable constants (element
counts, compiled kernels): every workspace is made for one bucket or chunk and step.

Constants (momentum, betas, weight decay, eps) enter eager kernels as Python numbers, which
kernels use at full precision (a 0-d tensor would be rounded to a bfloat16 layer's dtype);
only per-layer scalars and 0/1 masks are tensors. Compiled code receives every value as a
tensor, so that a kernel compiled for one configuration serves all (issue 8).
"""

from __future__ import annotations

import functools
import math
import types
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
    stats: bool = False  # telemetry wanted: every layer measured in full, adapted or not

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


def lars_scalars(w_norm: Tensor, u_norm: Tensor, o: LARSOptions, ok: Tensor, phi: Optional[Tensor] = None) -> Scalars:
    """LARS, and TVLARS as LARS times phi_t (``phi``, per layer)."""
    lr = _on(o.lr, w_norm.device)
    if o.adapt:
        coefficient = o.trust_coefficient * phi if o.phi_in_ratio else o.trust_coefficient
        extra = o.weight_decay * w_norm if not o.coupled and o.decay else None
        trust = trust_ratio(w_norm, u_norm, coefficient, eps=o.eps, extra=extra,
                            clip_lr=lr if o.trust_clip else None, max_norm=o.max_norm)
    else:
        trust = torch.ones_like(w_norm)
    scale = trust * phi if phi is not None and not o.phi_in_ratio else trust
    step_size = lr * scale
    # Look-ahead keeps the step size, lr included, in the buffer; the other forms keep lr out.
    into_buffer = step_size if o.momentum_form == LOOK_AHEAD else scale
    return Scalars(ok, w_norm, u_norm, trust, step_size, torch.where(ok, into_buffer, 0.0))


def lamb_scalars(w_norm: Tensor, u_norm: Tensor, o: LAMBOptions, ok: Tensor) -> Scalars:
    lr = _on(o.lr, w_norm.device)
    if o.adapt:
        trust = trust_ratio(w_norm, u_norm, 1.0, clip_lr=1.0 if o.trust_clip else None,
                            max_weight_norm=o.max_weight_norm)
    else:
        trust = torch.ones_like(w_norm)
    step_size = lr * trust
    return Scalars(ok, w_norm, u_norm, trust, step_size, torch.where(ok, step_size, 0.0))


def lamb_bias_corrections(steps: Tensor, o: LAMBOptions) -> tuple[Tensor, Tensor]:
    """``1 - b1^t`` and ``sqrt(1 - b2^t)`` per layer for the step t = step + 1 being taken
    (also when it is skipped, so that both stay > 0 and u finite)."""
    t = steps.to(norm_dtype(steps.device)) + 1.0
    if not o.bias_correction:
        return torch.ones_like(t), torch.ones_like(t)
    return 1.0 - torch.pow(o.beta1, t), torch.sqrt(1.0 - torch.pow(o.beta2, t))


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


# =======================================================================================
# The multi-tensor path: torch._foreach_* over a flat workspace per (device, dtype) bucket
# =======================================================================================
#
# torch has no multi-tensor kernel that takes a list of device scalars (lists of 0-d tensors
# fall back to one launch per tensor), nor a multi-tensor select. So each bucket's direction
# is built in one flat buffer, made for this step and viewed layer by layer with each
# parameter's strides: the per-layer scalars become one elementwise multiply by a per-element
# expansion, and the skip one masked fill, whatever the number of layers.


@dataclass
class _Flat:
    """A flat buffer for a bucket and its per-layer views (each with its parameter's strides)."""

    data: Tensor
    views: list[Tensor]
    counts: Tensor  # elements per layer, on the device, for ``expand``

    @staticmethod
    def like(params: list[Tensor]) -> "_Flat":
        sizes = [p.numel() for p in params]
        device = params[0].device
        data = torch.empty(sum(sizes), dtype=params[0].dtype, device=device)
        views, offset = [], 0
        for p, n in zip(params, sizes):
            stride = p.stride() if _dense(p) else _contiguous_strides(p.shape)
            views.append(data.as_strided(p.shape, stride, offset))
            offset += n
        return _Flat(data, views, _counts(tuple(sizes), device))

    def mul_(self, per_layer: Tensor) -> Tensor:
        """Each layer's elements times its entry of ``per_layer``: one op with ``per_layer``
        repeated over each layer's elements, in at least float32 (a bfloat16 bias correction
        or trust ratio would be off by up to 0.4%)."""
        return self.data.mul_(self._expand(per_layer))

    def div_(self, per_layer: Tensor) -> Tensor:
        return self.data.div_(self._expand(per_layer))

    def _expand(self, per_layer: Tensor) -> Tensor:
        dtype = torch.promote_types(self.data.dtype, torch.float32)
        return torch.repeat_interleave(per_layer.to(dtype), self.counts, output_size=self.data.numel())


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense in some dimension order (contiguous, channels_last, ...)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda x: x[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


_counts_cache: dict[tuple, Tensor] = {}


def _counts(sizes: tuple, device: torch.device) -> Tensor:
    """Elements per layer as a device tensor, made once per (device, sizes) and never
    written: a step on the device then copies nothing from the host."""
    key = (device, sizes)
    if key not in _counts_cache:
        _counts_cache[key] = to_device(torch.tensor(sizes, dtype=torch.int64), device)
    return _counts_cache[key]


def _buckets(params: list[Tensor]) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of ``params`` sharing device and dtype (the optimizer
    orders each group's layers so)."""
    ranges, start = [], 0
    for i in range(1, len(params) + 1):
        if i == len(params) or (params[i].device, params[i].dtype) != (params[start].device, params[start].dtype):
            ranges.append((start, i))
            start = i
    return ranges


def _norms(tensors: list[Tensor], device: torch.device) -> Tensor:
    return torch.stack(torch._foreach_norm(tensors, dtype=norm_dtype(device)))


def _add_scalar_(tensors: list[Tensor], value: Tensor) -> None:
    """tensors += value (0-d, on their device) in one launch: the List overload; passing the
    0-d tensor itself selects the Scalar overload, which reads it on the host."""
    torch._foreach_add_(tensors, [value.to(tensors[0].dtype)] * len(tensors))


def _multi_tensor_lars_measure(params, grads, o: LARSOptions):
    norms, work = [], []
    for a, b in _buckets(params):
        ps, gs = params[a:b], grads[a:b]
        d = _Flat.like(ps)
        torch._foreach_copy_(d.views, gs)
        if o.decay:
            torch._foreach_add_(d.views, ps, alpha=o.weight_decay)
        device = ps[0].device
        u = d.views if o.coupled else gs
        norms.append(torch.stack([_norms(ps, device), _norms(u, device)]))
        work.append(((a, b), d))  # the bucket with its direction: apply need not build it again
    return torch.cat([n.to(norms[0].device) for n in norms], dim=1), work


def _multi_tensor_lars_apply(params, grads, bufs, steps, o: LARSOptions, s: Scalars, work) -> None:
    scales, oks = PerDevice(s.scale), PerDevice(s.ok)
    for (a, b), d in work:
        ps, bs, st = params[a:b], bufs[a:b], steps[a:b]
        device = ps[0].device
        ok = oks.on(device)
        skip = ~ok
        _keep_(ok, d.data)
        d.mul_(scales.on(device)[a:b])  # d = scale * (g + wd*w), 0 when skipped
        outer = -1.0 if o.momentum_form == LOOK_AHEAD else _neg(o.lr, device)
        if o.buffered:
            # The new buffer (mu*buf + d), kept where ok: buf*(1-ok) + new*ok, exact for ok in {0, 1}.
            new = _Flat.like(ps)
            torch._foreach_copy_(new.views, bs)
            _keep_(ok, new.data.mul_(o.momentum).add_(d.data))
            torch._foreach_mul_(bs, skip.to(ps[0].dtype))
            torch._foreach_add_(bs, new.views)
            if o.momentum_form == HEAVY_BALL:
                _add_(ps, new, outer)
            else:
                d.data.add_(new.data, alpha=o.momentum)
                _add_(ps, d, outer)
        else:
            _add_(ps, d, outer)
        _add_scalar_(st, ok.to(torch.float32))


def _neg(lr, device) -> Scalar:
    return -_on(lr, device)


def _add_(params: list[Tensor], flat: _Flat, alpha: Scalar) -> None:
    """params += alpha * flat (one launch; a tensor alpha first scales the buffer)."""
    if torch.is_tensor(alpha):
        flat.data.mul_(alpha)
        alpha = 1.0
    torch._foreach_add_(params, flat.views, alpha=alpha)


def _multi_tensor_lamb_measure(params, grads, ms, vs, steps, o: LAMBOptions):
    norms, work = [], []
    for a, b in _buckets(params):
        ps, gs = params[a:b], grads[a:b]
        device = ps[0].device
        m, v, u, denominator = (_Flat.like(ps) for _ in range(4))
        torch._foreach_copy_(m.views, ms[a:b])
        m.data.mul_(o.beta1)
        torch._foreach_add_(m.views, gs, alpha=1.0 - o.beta1)
        torch._foreach_copy_(v.views, vs[a:b])
        v.data.mul_(o.beta2)
        torch._foreach_addcmul_(v.views, gs, gs, value=1.0 - o.beta2)
        u.data.copy_(m.data)
        torch.sqrt(v.data, out=denominator.data)
        if o.bias_correction:
            bc1, bc2_sqrt = lamb_bias_corrections(torch.stack(steps[a:b]), o)
            u.div_(bc1)
            denominator.div_(bc2_sqrt)
        u.data.div_(denominator.data.add_(o.eps))
        if o.decay:
            torch._foreach_add_(u.views, ps, alpha=o.weight_decay)
        norms.append(torch.stack([_norms(ps, device), _norms(u.views, device)]))
        work.append(((a, b), (m, v, u)))
    return torch.cat([n.to(norms[0].device) for n in norms], dim=1), work


def _multi_tensor_lamb_apply(params, grads, ms, vs, steps, o: LAMBOptions, s: Scalars, work) -> None:
    scales, oks = PerDevice(s.scale), PerDevice(s.ok)
    for (a, b), (m, v, u) in work:
        ps = params[a:b]
        device = ps[0].device
        ok = oks.on(device)
        skip = ~ok
        _keep_(ok, u.data)
        u.mul_(scales.on(device)[a:b])
        torch._foreach_sub_(ps, u.views)
        keep = skip.to(ps[0].dtype)  # moments: old*(1-ok) + new*ok, exact for ok in {0, 1}
        for state, new in ((ms[a:b], m), (vs[a:b], v)):
            _keep_(ok, new.data)
            torch._foreach_mul_(state, keep)
            torch._foreach_add_(state, new.views)
        _add_scalar_(steps[a:b], ok.to(torch.float32))


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
#                     finite gradients is taken), then goes chunk by chunk: a workspace
#                     holds wd*w, to which _fused_adamw_ (the workspace as its "parameter",
#                     lr=-1, no decay) adds Adam's direction m_hat / (sqrt(v_hat) + eps)
#                     while it writes the moments: the workspace is u; then w -= lr*trust*u.
#                     A chunk that neither adapts nor records telemetry (trust 1) takes one
#                     _fused_adamw_(lr=lr, weight_decay=wd): AdamW's decoupled lr*wd*w is
#                     LAMB's lr*(wd*w) term. bias_correction=False: a step count of 1e30
#                     makes both corrections exactly 1. A chunk holds CHUNK_BYTES of layers,
#                     so that the workspace stays small and a chunk is still in cache for its
#                     update.
#
# A norm whose sum of squares is not finite is measured again in float64, so that a finite
# layer never reads as non-finite. Layers of other dtypes or layouts (half precision,
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


def _runs(scales: list[float], eligible) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive layers that ``eligible(i)`` lets share a kernel call
    when their scalars are equal: a group that does not adapt is one call."""
    runs, i = [], 0
    while i < len(scales):
        j = i + 1
        if eligible(i):
            while j < len(scales) and scales[j] == scales[i] and eligible(j):
                j += 1
        runs.append((i, j))
        i = j
    return runs


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
    scales = s.scale.tolist()
    host = [_host_ok(p, g, buf) and p.dtype == params[0].dtype for p, g, buf in zip(params, grads, bufs)]
    counted = []
    for i, j in _runs(scales, lambda i: host[i] and params[i].dtype == params[0].dtype):
        if not host[i]:
            _lars_layer_update(params[i], grads[i], bufs[i], steps[i], s.ok.reshape(1), s.scale[i:j], (wd, mu, outer),
                               decay=o.decay, form=o.momentum_form)
            continue  # it counts its step
        ps, gs, bs, k = params[i:j], grads[i:j], bufs[i:j], scales[i]
        if bs[0] is None:
            torch._fused_sgd_(ps, gs, [], weight_decay=wd, momentum=0.0, lr=outer * k, dampening=0.0,
                              nesterov=False, maximize=False, is_first_step=False)
        elif o.momentum_form == HEAVY_BALL:
            torch._fused_sgd_(ps, gs, bs, weight_decay=wd, momentum=mu, lr=outer, dampening=1.0 - k,
                              nesterov=False, maximize=False, is_first_step=False)
        else:
            torch._fused_sgd_(ps, gs, bs, weight_decay=wd, momentum=mu, lr=outer * k, dampening=1.0 - k,
                              nesterov=True, maximize=False, is_first_step=False)
            if k != 1.0:
                torch._foreach_add_(ps, bs, alpha=-outer * mu * (1.0 - k))
        counted += steps[i:j]
    if counted:
        torch._foreach_add_(counted, 1.0)


def _host_grad_norms(grads: list[Tensor]) -> Tensor:
    """[1, layers]: ||g|| of every layer, what the host LAMB decides the step on."""
    norms = [_norm(g) if _host_ok(g) else torch.linalg.vector_norm(g, dtype=torch.float64).item() for g in grads]
    return torch.tensor([norms], dtype=torch.float64)


def _chunks(params: list[Tensor]) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive layers of one (device, dtype) bucket holding at most
    CHUNK_BYTES (a larger layer is a chunk of its own)."""
    ranges = []
    for a, b in _buckets(params):
        start, size = a, 0
        for i in range(a, b):
            n = params[i].numel() * params[i].element_size()
            if i > start and size + n > CHUNK_BYTES:
                ranges.append((start, i))
                start, size = i, 0
            size += n
        ranges.append((start, b))
    return ranges


def _host_lamb_apply(params, grads, ms, vs, steps, o: LAMBOptions, ok: Tensor, g_norms: Tensor) -> Scalars:
    if not bool(ok):
        return lamb_scalars(torch.zeros_like(g_norms), g_norms, o, ok)
    lr = float(_on(o.lr, torch.device("cpu")))
    h = (o.beta1, o.beta2, o.eps, o.weight_decay)
    adam = dict(beta1=o.beta1, beta2=o.beta2, eps=o.eps, amsgrad=False, maximize=False)
    no_bc = torch.tensor(_NO_BIAS_CORRECTION_STEP, dtype=torch.float32)
    parts = []
    for a, b in _chunks(params):
        ps, gs, m, v, st = params[a:b], grads[a:b], ms[a:b], vs[a:b], steps[a:b]
        n = b - a
        host = [_host_ok(*t) for t in zip(ps, gs, m, v)]
        if not (o.adapt or o.stats) and all(host):  # trust 1: AdamW's step is LAMB's
            zeros = torch.zeros(n, dtype=torch.float64)
            parts.append(lamb_scalars(zeros, zeros, o, ok))
            torch._foreach_add_(st, 1.0)
            torch._fused_adamw_(ps, gs, m, v, [], st if o.bias_correction else [no_bc] * n, lr=lr,
                                weight_decay=o.weight_decay, **adam)
            continue
        bc = torch.stack(lamb_bias_corrections(torch.stack(st), o), dim=1)  # for the single-tensor layers
        hosted = [i for i in range(n) if host[i]]
        w_norms, u_norms = [0.0] * n, [0.0] * n
        if hosted:
            workspace = _Flat.like([ps[i] for i in hosted])
            directions = workspace.views  # wd*w, to which the kernel adds Adam's direction: u
            torch._foreach_copy_(directions, [ps[i] for i in hosted])
            workspace.data.mul_(o.weight_decay)
            counted = [st[i] for i in hosted]
            torch._foreach_add_(counted, 1.0)
            torch._fused_adamw_(directions, [gs[i] for i in hosted], [m[i] for i in hosted], [v[i] for i in hosted],
                                [], counted if o.bias_correction else [no_bc] * len(hosted), lr=-1.0,
                                weight_decay=0.0, **adam)
            for i, u in zip(hosted, directions):
                w_norms[i], u_norms[i] = _norm(ps[i]), _norm(u)
        for i in range(n):
            if not host[i]:
                w_norms[i], u_norms[i] = _lamb_layer_norms(ps[i], gs[i], m[i], v[i], bc[i], h, ndt=torch.float64,
                                                           decay=o.decay).tolist()
        s = lamb_scalars(torch.tensor(w_norms, dtype=torch.float64), torch.tensor(u_norms, dtype=torch.float64), o, ok)
        parts.append(s)
        gammas = s.scale.tolist()
        where = {i: k for k, i in enumerate(hosted)}
        for i, j in _runs(gammas, lambda i: host[i]):
            if not host[i]:
                _lamb_layer_update(ps[i], gs[i], m[i], v[i], st[i], ok.reshape(1), s.scale[i:j], bc[i], h,
                                   decay=o.decay)
                continue
            torch._foreach_add_(ps[i:j], directions[where[i]:where[i] + j - i], alpha=-gammas[i])
    fields = ("w_norm", "u_norm", "trust", "step_size", "scale")
    return Scalars(ok, *(torch.cat([getattr(p, f) for p in parts]) for f in fields))


# =======================================================================================
# Dispatch
# =======================================================================================


def _by_device(tensors: list[Tensor]) -> dict:
    out: dict = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.device, []).append(i)
    return out


SINGLE, MULTI, FUSED, HOST = "single", "multi", "fused", "host"


def lars_measure(params, grads, o: LARSOptions, path: str) -> tuple[Tensor, Any]:
    """Reads only: (what decides the step, the path's workspace for ``lars_apply``)."""
    if path == HOST:
        return _host_lars_measure(params, grads, o)
    if path == MULTI:
        return _multi_tensor_lars_measure(params, grads, o)
    return _single_tensor_lars_measure(params, grads, o, compiled=path == FUSED)


def lars_apply(params, grads, bufs, steps, o: LARSOptions, ok: Tensor, measured: Tensor, phi: Optional[Tensor],
               work, path: str) -> Scalars:
    """The update of ``params``, their buffers and step counters from the whole-layer
    ``measured`` norms, times ``phi`` per layer (TVLARS); returns the scalars it used."""
    s = lars_scalars(measured[0], measured[1], o, ok, phi)
    if path == HOST:
        _host_lars_apply(params, grads, bufs, steps, o, s)
    elif path == MULTI:
        _multi_tensor_lars_apply(params, grads, bufs, steps, o, s, work)
    else:
        _single_tensor_lars_apply(params, grads, bufs, steps, o, s, work, compiled=path == FUSED)
    return s


def lamb_measure(params, grads, ms, vs, steps, o: LAMBOptions, path: str) -> tuple[Tensor, Any]:
    if path == HOST:
        return _host_grad_norms(grads), None
    if path == MULTI:
        return _multi_tensor_lamb_measure(params, grads, ms, vs, steps, o)
    return _single_tensor_lamb_measure(params, grads, ms, vs, steps, o, compiled=path == FUSED)


def lamb_apply(params, grads, ms, vs, steps, o: LAMBOptions, ok: Tensor, measured: Tensor, work, path: str) -> Scalars:
    if path == HOST:
        return _host_lamb_apply(params, grads, ms, vs, steps, o, ok, measured[0])
    s = lamb_scalars(measured[0], measured[1], o, ok)
    if path == MULTI:
        _multi_tensor_lamb_apply(params, grads, ms, vs, steps, o, s, work)
    else:
        _single_tensor_lamb_apply(params, grads, ms, vs, steps, o, s, work, compiled=path == FUSED)
    return s
