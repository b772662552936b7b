"""The maths of LARS, TVLARS and LAMB, and the four paths that compute it.

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

``trust_ratio`` (written once, below) is 1 where a norm is 0, and for adapt=False groups.

Every path takes a step in three stages, so that the step is decided before anything is
written, and so that a sharded layer (FSDP2) is measured whole:

  1. measure  each layer's ||w|| and ||u|| (u: d, or g for the separate form, or LAMB's u),
              reading only. The optimizer then combines the shards of sharded layers (one
              all-reduce for all of them) and decides the step: any non-finite norm skips it.
              A norm is non-finite exactly when an entry is: device paths measure in float64,
              so no finite float32 or half-precision layer overflows, and the CPU host path
              re-measures a non-finite float32 norm in float64.
  2. scalars  ``lars_scalars`` / ``lamb_scalars``: trust ratio and step size of every layer
              at once, on vectors; zero on a skipped step.
  3. apply    the update: on a skipped step an exact no-op (weights, state and counters
              unchanged), selected on the device, so that no path waits for the decision.

Paths (chosen in one place, ``LayerwiseOptimizer._path``):
  single  ``_single_tensor_*``: one layer at a time, scalars on the device.
  multi   ``_multi_tensor_*``: ``torch._foreach_*`` ops on each (device, dtype) bucket, with a
          flat workspace so that per-layer scalars and the skip cost a bounded number of
          kernel launches, however many layers there are.
  fused   ``fused=True``: the single-tensor code compiled by ``torch.compile`` (generated
          kernels, not a hand-written one as torch's ``fused=True``).
  host    ``_host_*``, the CPU default: per-layer scalars as Python floats (free to read on
          the CPU) and torch's own fused SGD / AdamW kernels for the update.

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
    stats: bool = False  # telemetry wanted: every layer measured in full (see _host_lars_measure)

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
# Stage 2: the scalars, on vectors of layers (every path)
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
    """Stage 2's result for one group, vectors over its layers (bucket order) on one device.

    ``trust`` and ``step_size`` (the scalar that multiplies the layer's direction: lr*trust,
    lr*trust*phi for TVLARS) are telemetry. ``scale`` multiplies the direction on its way into
    the update (LARS: into the buffer), zero on a skipped step; ``ok`` is the step decision.
    """

    ok: Tensor
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
    return Scalars(ok, trust, step_size, torch.where(ok, into_buffer, 0.0))


def lamb_scalars(w_norm: Tensor, u_norm: Tensor, o: LAMBOptions, ok: Tensor) -> Scalars:
    lr = _on(o.lr, w_norm.device)
    if o.adapt:
        trust = trust_ratio(w_norm, u_norm, 1.0, clip_lr=1.0 if o.trust_clip else None,
                            max_weight_norm=o.max_weight_norm)
    else:
        trust = torch.ones_like(w_norm)
    step_size = lr * trust
    return Scalars(ok, trust, step_size, torch.where(ok, step_size, 0.0))


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


def _single_tensor_lars_measure(params, grads, o: LARSOptions, scratch=None, compiled: bool = False):
    flags = dict(decay=o.decay, coupled=o.coupled)
    consts = _numbers(compiled, params, o.weight_decay)
    norms = []
    for p, g in zip(params, grads):
        fn, tensors = _kernel(_lars_layer_norms, compiled, flags, p, g)
        norms.append(fn(*tensors, consts[p.device], ndt=norm_dtype(p.device)))
    return _stack_columns(norms), None


def _single_tensor_lars_apply(params, grads, bufs, steps, o: LARSOptions, s: Scalars, work=None, scratch=None,
                              compiled: bool = False) -> None:
    flags = dict(decay=o.decay, form=o.momentum_form)
    outer = 1.0 if o.momentum_form == LOOK_AHEAD else o.lr
    consts = _numbers(compiled, params, o.weight_decay, o.momentum, outer)
    for (p, g, buf, step), scale, ok in _per_layer(s, params, grads, bufs, steps):
        fn, tensors = _kernel(_lars_layer_update, compiled, flags, p, g, buf)
        fn(*tensors, step, ok, scale, consts[p.device])


def _single_tensor_lamb_measure(params, grads, ms, vs, steps, o: LAMBOptions, scratch=None, compiled: bool = False):
    flags = dict(decay=o.decay)
    consts = _numbers(compiled, params, o.beta1, o.beta2, o.eps, o.weight_decay)
    bcs = _bias_corrections_per_layer(steps, o, compiled)
    norms = []
    for p, g, m, v, bc in zip(params, grads, ms, vs, bcs):
        fn, tensors = _kernel(_lamb_layer_norms, compiled, flags, p, g, m, v)
        norms.append(fn(*tensors, bc, consts[p.device], ndt=norm_dtype(p.device)))
    return _stack_columns(norms), bcs


def _single_tensor_lamb_apply(params, grads, ms, vs, steps, o: LAMBOptions, s: Scalars, work, scratch=None,
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
# is built in one flat buffer, viewed layer by layer with each parameter's strides: the
# per-layer scalars become one elementwise multiply by a per-element expansion, and the skip
# one masked fill, whatever the number of layers.


@dataclass
class _Flat:
    """A flat buffer for a bucket and its per-layer views (each with its parameter's strides)."""

    data: Tensor
    views: list[Tensor]
    counts: Tensor  # elements per layer, on the device, for ``expand``

    @staticmethod
    def like(params: list[Tensor], scratch: Optional[dict] = None, role: str = "") -> "_Flat":
        """A buffer for ``params``; on the CPU kept in ``scratch`` between steps (a fresh one
        would be paged in again every step; an accelerator's caching allocator needs no help)."""
        sizes = [p.numel() for p in params]
        device = params[0].device
        if scratch is not None and device.type == "cpu":
            key = (role, device, params[0].dtype, tuple(sizes))
            if key not in scratch:
                scratch[key] = torch.empty(sum(sizes), dtype=params[0].dtype, device=device)
            data = scratch[key]
        else:
            data = torch.empty(sum(sizes), dtype=params[0].dtype, device=device)
        views, offset = [], 0
        for p, n in zip(params, sizes):
            stride = p.stride() if _dense(p) else _contiguous_strides(p.shape)
            views.append(data.as_strided(p.shape, stride, offset))
            offset += n
        return _Flat(data, views, _counts(tuple(sizes), device))

    def mul_(self, per_layer: Tensor) -> Tensor:
        """Each layer's elements times its entry of ``per_layer``."""
        return self._apply(per_layer, torch.Tensor.mul_, torch._foreach_mul_)

    def div_(self, per_layer: Tensor) -> Tensor:
        return self._apply(per_layer, torch.Tensor.div_, torch._foreach_div_)

    def _apply(self, per_layer: Tensor, op, foreach_op) -> Tensor:
        """On an accelerator one elementwise op with ``per_layer`` repeated over each layer's
        elements (in at least float32: a bfloat16 bias correction or trust ratio would be off by
        up to 0.4%); on the CPU, where every op is a loop anyway and that repetition is slow,
        one op per layer."""
        dtype = torch.promote_types(self.data.dtype, torch.float32)
        if self.data.device.type == "cpu" and not EXPAND_ON_CPU:
            foreach_op(self.views, list(per_layer.to(dtype).unbind()))
        else:
            op(self.data, torch.repeat_interleave(per_layer.to(dtype), self.counts, output_size=self.data.numel()))
        return self.data


# Tests set this to run the accelerator form of _Flat.mul_ / div_ on the CPU.
EXPAND_ON_CPU = False


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
    """Elements per layer as a device tensor, made once per bucket layout."""
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


def _multi_tensor_lars_measure(params, grads, o: LARSOptions, scratch: Optional[dict] = None):
    norms, work = [], []
    for a, b in _buckets(params):
        ps, gs = params[a:b], grads[a:b]
        d = _Flat.like(ps, scratch, "d")
        torch._foreach_copy_(d.views, gs)
        if o.decay:
            torch._foreach_add_(d.views, ps, alpha=o.weight_decay)
        device = ps[0].device
        u = d.views if o.coupled else gs
        norms.append(torch.stack([_norms(ps, device), _norms(u, device)]))
        work.append(((a, b), d))  # the bucket with its workspace: apply need not bucket again
    return torch.cat([n.to(norms[0].device) for n in norms], dim=1), work


def _multi_tensor_lars_apply(params, grads, bufs, steps, o: LARSOptions, s: Scalars, work,
                             scratch: Optional[dict] = None) -> None:
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
            new = _Flat.like(ps, scratch, "new")
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


def _multi_tensor_lamb_measure(params, grads, ms, vs, steps, o: LAMBOptions, scratch: Optional[dict] = None):
    norms, work = [], []
    for a, b in _buckets(params):
        ps, gs = params[a:b], grads[a:b]
        device = ps[0].device
        m, v, u = (_Flat.like(ps, scratch, role) for role in ("m", "v", "u"))
        torch._foreach_copy_(m.views, ms[a:b])
        m.data.mul_(o.beta1)
        torch._foreach_add_(m.views, gs, alpha=1.0 - o.beta1)
        torch._foreach_copy_(v.views, vs[a:b])
        v.data.mul_(o.beta2)
        torch._foreach_addcmul_(v.views, gs, gs, value=1.0 - o.beta2)
        u.data.copy_(m.data)
        denominator = _Flat.like(ps, scratch, "den")
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


def _multi_tensor_lamb_apply(params, grads, ms, vs, steps, o: LAMBOptions, s: Scalars, work, scratch=None) -> None:
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
# The host path (CPU default): Python-float scalars, torch's fused SGD / AdamW kernels
# =======================================================================================
#
#   LARS heavy-ball   _fused_sgd_(weight_decay=wd, momentum=mu, dampening=1-k, lr=L)
#                     buf = mu*buf + k*(g + wd*w);  w -= L*buf
#   Nesterov          the same call with nesterov=True and lr = L*k (w -= L*k*(d + mu*buf)),
#                     then w -= L*mu*(1-k)*buf: together w -= L*(k*d + mu*buf); layers of
#                     _LARGE elements or more take the compiled single-tensor update instead,
#                     the same in one pass
#   no momentum       _fused_sgd_(lr=L*k) without buffers
#   LAMB              _fused_adamw_(lr=lr*trust, weight_decay=wd): AdamW's decoupled decay
#                     lr*trust*wd*w is LAMB's lr*trust*(wd*w) term, and its bias-corrected
#                     direction is m_hat / (sqrt(v_hat) + eps); a constant step count of 1e30
#                     makes both corrections exactly 1 (bias_correction=False).
#
# with k = scale and L = lr (look-ahead: k = lr*trust*phi, L = 1). The kernels take
# 1 - dampening, which represents k to within 2^-54 absolutely: an error of at most 2^-54*|d|
# per element, below the rounding of k*d.
#
# Measuring reads each layer once, from the last (so that the update starts on data still in
# cache): layers of _LARGE elements or more by the single-tensor path's compiled kernel (the
# one fused=True uses; its 40 us of call overhead is then less than the extra reads of BLAS
# dots), smaller ones (in cache) by BLAS dots, ||w||^2, ||g||^2 and <g, w> (LAMB: the
# single-tensor code). A layer that does not adapt (trust 1) is measured by
# ||g|| alone, which decides the step, unless telemetry is on. Layers in a row that share
# their scalars (all of a group that does not adapt) are updated by one kernel call. Without
# a C++ compiler the kernels run eagerly. The
# coupled norm is ||g + wd*w||^2 = ||g||^2 + 2 wd <g,w> + wd^2 ||w||^2, computed exactly from
# g + wd*w when that sum cancels (< 1/16 of its terms) or is not finite. Other dtypes and
# non-contiguous layers take the single-tensor code.

_HOST_DTYPES = (torch.float32, torch.float64)
_NO_BIAS_CORRECTION_STEP = 1e30  # beta ** 1e30 == 0.0 for every beta in [0, 1)
_LARGE = 1 << 16


def _host_ok(p: Tensor, g: Optional[Tensor] = None, *state: Optional[Tensor]) -> bool:
    """Whether torch's fused kernels take these tensors as they are (float32/float64,
    contiguous, one dtype); the others take the single-tensor code."""
    if p.dtype not in _HOST_DTYPES or not p.is_contiguous():
        return False
    if g is not None and (g.dtype != p.dtype or not g.is_contiguous()):
        return False
    return all(t is None or (t.dtype == p.dtype and t.is_contiguous()) for t in state)


_EAGER_ONLY: set = set()  # (function, flags) whose compilation failed (no C++ compiler)


def _large_layer(fn, dtype: torch.dtype, **flags):
    """The single-tensor ``fn`` compiled for ``flags`` (the kernel fused=True uses), for
    large layers on the host path; ``fn`` itself, eagerly, where torch.compile cannot run."""
    key = (fn.__name__, tuple(sorted(flags.items())))
    if key in _EAGER_ONLY:
        return functools.partial(fn, **flags)
    compiled = _compile(fn, flags, dtype)

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception:  # no working compiler: the same maths, eagerly
            _EAGER_ONLY.add(key)
            return fn(*args, **kwargs, **flags)

    return call


def _dot(a: Tensor, b: Tensor) -> float:
    """<a, b> as a float: one BLAS dot, about twice as fast as ``vector_norm`` on the CPU."""
    return torch.dot(a.view(-1), b.view(-1)).item()


def _exact_norm(t: Tensor) -> float:
    return torch.linalg.vector_norm(t, dtype=torch.float64).item()


def _coupled_norm(p: Tensor, g: Tensor, gg: float, gw: float, ww: float, wd: float) -> float:
    """||g + wd*w|| from ||g||^2, <g, w> and ||w||^2; exactly from g + wd*w when the sum
    cancels (below 1/16 of its terms) or is not finite."""
    terms = gg + wd * wd * ww
    uu = terms + 2.0 * wd * gw
    if 16.0 * uu >= terms and math.isfinite(uu):
        return math.sqrt(uu)
    return _exact_norm(g + wd * p)


def _host_lars_measure(params, grads, o: LARSOptions, scratch=None):
    w_norms, u_norms = [0.0] * len(params), [0.0] * len(params)
    wd = o.weight_decay
    coupled = o.coupled and o.decay
    for i in reversed(range(len(params))):
        p, g = params[i], grads[i]
        if not _host_ok(p, g):
            w_norms[i], u_norms[i] = _lars_layer_norms(p, g, (wd,), ndt=torch.float64, decay=o.decay,
                                                       coupled=o.coupled).tolist()
            continue
        if not (o.adapt or o.stats):  # the skip decision needs ||g|| alone
            gg = _dot(g, g)
            u_norms[i] = math.sqrt(gg) if math.isfinite(gg) else _exact_norm(g)
            continue
        if p.numel() >= _LARGE:
            kernel = _large_layer(_lars_layer_norms, p.dtype, decay=o.decay, coupled=o.coupled)
            w_norms[i], u_norms[i] = kernel(p.view(-1), g.view(-1), _numbers(True, [p], wd)[p.device],
                                            ndt=torch.float64).tolist()
            continue
        gg, ww = _dot(g, g), _dot(p, p)
        gw = _dot(g, p) if coupled else 0.0
        w_norms[i] = math.sqrt(ww) if math.isfinite(ww) else _exact_norm(p)
        if coupled:
            u_norms[i] = _coupled_norm(p, g, gg, gw, ww, wd)
        else:
            u_norms[i] = math.sqrt(gg) if math.isfinite(gg) else _exact_norm(g)
    return torch.tensor([w_norms, u_norms], dtype=torch.float64), None


def _runs(scales: list[float], eligible) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive layers that ``eligible(i, j)`` lets share layer i's
    kernel call (same scalar, dtype, buffers): a group that does not adapt is one call."""
    runs, i = [], 0
    while i < len(scales):
        j = i + 1
        if eligible(i, i):
            while j < len(scales) and scales[j] == scales[i] and eligible(i, j):
                j += 1
        runs.append((i, j))
        i = j
    return runs


def _host_lars_apply(params, grads, bufs, steps, o: LARSOptions, s: Scalars, work=None, scratch=None) -> None:
    if not bool(s.ok):
        return
    lr = float(_on(o.lr, torch.device("cpu")))
    outer = 1.0 if o.momentum_form == LOOK_AHEAD else lr
    mu, wd = o.momentum, o.weight_decay
    scales = s.scale.tolist()
    one_pass = [buf is not None and o.momentum_form != HEAVY_BALL and p.numel() >= _LARGE
                for p, buf in zip(params, bufs)]
    host = [_host_ok(p, g, buf) for p, g, buf in zip(params, grads, bufs)]

    def eligible(i, j):
        return host[j] and not one_pass[j] and params[j].dtype == params[i].dtype

    counted = []
    for a, b in _runs(scales, eligible):
        k = scales[a]
        if not host[a]:
            _lars_layer_update(params[a], grads[a], bufs[a], steps[a], s.ok.reshape(1), s.scale[a:b], (wd, mu, outer),
                               decay=o.decay, form=o.momentum_form)
            continue
        ps, gs, bs = params[a:b], grads[a:b], bufs[a:b]
        if one_pass[a]:
            kernel = _large_layer(_lars_layer_update, ps[0].dtype, decay=o.decay, form=o.momentum_form)
            kernel(ps[0].view(-1), gs[0].view(-1), bs[0].view(-1), steps[a], s.ok.reshape(1), s.scale[a:b],
                   _numbers(True, ps, wd, mu, outer)[ps[0].device])
            continue  # the kernel counts the step
        if bs[0] is None:
            torch._fused_sgd_(ps, gs, [], weight_decay=wd, momentum=0.0, lr=outer * k, dampening=0.0,
                              nesterov=False, maximize=False, is_first_step=False)
        elif o.momentum_form == HEAVY_BALL:
            torch._fused_sgd_(ps, gs, bs, weight_decay=wd, momentum=mu, lr=outer, dampening=1.0 - k,
                              nesterov=False, maximize=False, is_first_step=False)
        else:
            # The kernel steps by outer*k*(d + mu*buf); the rest of outer*mu*buf follows.
            torch._fused_sgd_(ps, gs, bs, weight_decay=wd, momentum=mu, lr=outer * k, dampening=1.0 - k,
                              nesterov=True, maximize=False, is_first_step=False)
            if k != 1.0:
                torch._foreach_add_(ps, bs, alpha=-outer * mu * (1.0 - k))
        counted += steps[a:b]
    if counted:
        torch._foreach_add_(counted, 1.0)


def _host_lamb_measure(params, grads, ms, vs, steps, o: LAMBOptions, scratch=None):
    bc = torch.stack(lamb_bias_corrections(torch.stack(steps), o), dim=1) if steps else torch.zeros(0, 2)
    h = (o.beta1, o.beta2, o.eps, o.weight_decay)
    w_norms, u_norms = [0.0] * len(params), [0.0] * len(params)
    for i in reversed(range(len(params))):
        p, g, m, v = params[i], grads[i], ms[i], vs[i]
        if not (o.adapt or o.stats) and _host_ok(p, g):  # the skip decision needs ||g|| alone
            gg = _dot(g, g)
            u_norms[i] = math.sqrt(gg) if math.isfinite(gg) else _exact_norm(g)
        elif _host_ok(p, g, m, v) and p.numel() >= _LARGE:
            kernel = _large_layer(_lamb_layer_norms, p.dtype, decay=o.decay)
            w_norms[i], u_norms[i] = kernel(p.view(-1), g.view(-1), m.view(-1), v.view(-1), _static(bc[i]),
                                            _numbers(True, [p], *h)[p.device], ndt=torch.float64).tolist()
        else:
            w_norms[i], u_norms[i] = _lamb_layer_norms(p, g, m, v, bc[i], h, ndt=torch.float64,
                                                       decay=o.decay).tolist()
    return torch.tensor([w_norms, u_norms], dtype=torch.float64), bc


def _host_lamb_apply(params, grads, ms, vs, steps, o: LAMBOptions, s: Scalars, work, scratch=None) -> None:
    if not bool(s.ok):
        return
    bc = work
    gammas = s.scale.tolist()
    host = [_host_ok(p, g, m, v) for p, g, m, v in zip(params, grads, ms, vs)]

    def eligible(i, j):
        return host[j] and params[j].dtype == params[i].dtype

    no_bc = torch.tensor(_NO_BIAS_CORRECTION_STEP, dtype=torch.float32)
    for a, b in _runs(gammas, eligible):
        if not host[a]:
            _lamb_layer_update(params[a], grads[a], ms[a], vs[a], steps[a], s.ok.reshape(1), s.scale[a:b], bc[a],
                               (o.beta1, o.beta2, o.eps, o.weight_decay), decay=o.decay)
            continue
        torch._foreach_add_(steps[a:b], 1.0)
        torch._fused_adamw_(params[a:b], grads[a:b], ms[a:b], vs[a:b], [],
                            steps[a:b] if o.bias_correction else [no_bc] * (b - a), lr=gammas[a],
                            beta1=o.beta1, beta2=o.beta2, weight_decay=o.weight_decay, eps=o.eps,
                            amsgrad=False, maximize=False)


# =======================================================================================
# Dispatch: one table per algorithm
# =======================================================================================


def _by_device(tensors: list[Tensor]) -> dict:
    out: dict = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.device, []).append(i)
    return out


SINGLE, MULTI, FUSED, HOST = "single", "multi", "fused", "host"

_LARS = {
    SINGLE: (_single_tensor_lars_measure, _single_tensor_lars_apply),
    FUSED: (functools.partial(_single_tensor_lars_measure, compiled=True),
            functools.partial(_single_tensor_lars_apply, compiled=True)),
    MULTI: (_multi_tensor_lars_measure, _multi_tensor_lars_apply),
    HOST: (_host_lars_measure, _host_lars_apply),
}
_LAMB = {
    SINGLE: (_single_tensor_lamb_measure, _single_tensor_lamb_apply),
    FUSED: (functools.partial(_single_tensor_lamb_measure, compiled=True),
            functools.partial(_single_tensor_lamb_apply, compiled=True)),
    MULTI: (_multi_tensor_lamb_measure, _multi_tensor_lamb_apply),
    HOST: (_host_lamb_measure, _host_lamb_apply),
}


def lars_measure(params, grads, o: LARSOptions, path: str, scratch: Optional[dict] = None):
    """Stage 1: ([||w||; ||u||] as a [2, layers] float64 tensor, the path's workspace).
    ``scratch``: a dict the optimizer keeps for buffers worth reusing between steps."""
    return _LARS[path][0](params, grads, o, scratch)


def lars_apply(params, grads, bufs, steps, o: LARSOptions, s: Scalars, work, path: str,
               scratch: Optional[dict] = None) -> None:
    """Stage 3: the update of ``params``, their buffers and step counters, with ``s``."""
    _LARS[path][1](params, grads, bufs, steps, o, s, work, scratch)


def lamb_measure(params, grads, ms, vs, steps, o: LAMBOptions, path: str, scratch: Optional[dict] = None):
    return _LAMB[path][0](params, grads, ms, vs, steps, o, scratch)


def lamb_apply(params, grads, ms, vs, steps, o: LAMBOptions, s: Scalars, work, path: str,
               scratch: Optional[dict] = None) -> None:
    _LAMB[path][1](params, grads, ms, vs, steps, o, s, work, scratch)
