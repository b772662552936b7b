"""The multi-tensor path (CUDA default, ``foreach=True``): ``torch._foreach_*`` ops on each
(device, dtype) bucket of a group, a bounded number of kernel launches however many layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._scalars import (HEAVY_BALL, LOOK_AHEAD, LAMBOptions, LARSOptions, PerDevice, Scalar, Scalars, _on,
                       lamb_bias_corrections, norm_dtype, to_device)
from ._single_tensor import _keep_


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


def add_scalar_(tensors: list[Tensor], value: Tensor) -> None:
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
        add_scalar_(st, ok.to(torch.float32))


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
        add_scalar_(steps[a:b], ok.to(torch.float32))
