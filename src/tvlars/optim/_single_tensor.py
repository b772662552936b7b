"""The single-tensor path (``foreach=False``): one layer at a time, every scalar kept on the
device, so that a step never reads the host. Its per-layer functions also serve the host
path for the layers torch's fused kernels do not take (half precision, channels_last).

Read against the algorithm box in ``_functional``: ``_lars_layer_norms`` and
``_single_tensor_lamb_measure`` measure [||w||, ||u||] (LAMB's u from ``_lamb_layer_direction``);
``_lars_layer_update`` / ``_lamb_layer_update`` apply the step with the layer's ``scale`` from
``_scalars`` (0 on a skipped step). Every write is selected by the step
decision ``ok`` (a 0-d bool tensor), so that a skipped step is an exact no-op without a host read.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._scalars import HEAVY_BALL, LOOK_AHEAD, LAMBOptions, LARSOptions, PerDevice, Scalars, _on, \
    lamb_bias_corrections, norm_dtype

# -- precision, and selecting by the step decision without a host read --------------------


def _widened(t: Tensor) -> Tensor:
    """``t`` in the precision the arithmetic runs in: float32 for half-precision layers (each
    result is rounded once, when written), the tensor itself otherwise."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _eager_cpu(t: Tensor) -> bool:
    """Eager CPU code, where torch.where / masked_fill_ with a broadcast condition run
    unvectorised (about 4x a multiply); compiled and CUDA code select directly."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _zero_if_skipped(ok: Tensor, x: Tensor) -> Tensor:
    """``x`` when the step is taken, else 0 (``x`` may then hold inf or NaN)."""
    if _eager_cpu(x):
        return torch.nan_to_num_(x * ok.to(x.dtype), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.where(ok, x, 0.0)


def _new_if_taken(ok: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` when the step is taken, else ``old`` (both finite); exact: lerp by 1 gives
    ``new``, by 0 ``old``."""
    if _eager_cpu(new):
        return torch.lerp(old.to(new.dtype), new, ok.to(new.dtype))
    return torch.where(ok, new, old)


# -- one layer -------------------------------------------------------------------------------


def _norm_pair(w: Tensor, u: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.stack([torch.linalg.vector_norm(w, dtype=dtype), torch.linalg.vector_norm(u, dtype=dtype)])


def _lars_layer_norms(p: Tensor, g: Tensor, *, weight_decay: float, coupled: bool, dtype: torch.dtype) -> Tensor:
    """[||w||, ||u||] of one layer: u = d = g + wd*w for the coupled trust form, else g."""
    u = _widened(g) + weight_decay * _widened(p) if weight_decay and coupled else g
    return _norm_pair(p, u, dtype)


def _lars_layer_update(p: Tensor, g: Tensor, buf: Optional[Tensor], step: Tensor, ok: Tensor, scale: Tensor, *,
                       weight_decay: float, momentum: float, lr_outside, momentum_form: str) -> None:
    """buf = mu*buf + scale*d, then w -= lr_outside * buf (heavy-ball) or
    lr_outside * (scale*d + mu*buf) (nesterov, and look-ahead, whose lr is inside ``scale``
    and ``lr_outside`` 1); without a buffer w -= lr_outside * scale*d. ``scale`` is 0 on a
    skipped step, and every write then keeps the old value. ``p.grad`` is never written."""
    d = _widened(g) + weight_decay * _widened(p) if weight_decay else _widened(g)
    # 0 on a skipped step, where g or w may hold inf or NaN: the buffer and w then keep their values
    d = _zero_if_skipped(ok, d) * scale
    if buf is None:
        update = d
    else:
        new_buf = momentum * _widened(buf) + d
        buf.copy_(_new_if_taken(ok, new_buf, buf))
        update = _zero_if_skipped(ok, new_buf if momentum_form == HEAVY_BALL else d + momentum * new_buf)
    p.sub_(lr_outside * update)
    step.add_(ok.to(step.dtype))


def _lamb_layer_direction(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, bias_correction1: Tensor,
                          bias_correction2_sqrt: Tensor, options: LAMBOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(m', v', u): the moments this step writes and LAMB's direction; writes nothing."""
    beta1, beta2 = options.beta1, options.beta2
    g = _widened(g)
    new_exp_avg = beta1 * _widened(exp_avg) + (1.0 - beta1) * g
    new_exp_avg_sq = beta2 * _widened(exp_avg_sq) + (1.0 - beta2) * g * g
    u = (new_exp_avg / bias_correction1) / (new_exp_avg_sq.sqrt() / bias_correction2_sqrt + options.eps)
    if options.decay:
        u = u + options.weight_decay * _widened(p)
    return new_exp_avg, new_exp_avg_sq, u


def _lamb_layer_update(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, ok: Tensor,
                       scale: Tensor, bias_correction1: Tensor, bias_correction2_sqrt: Tensor,
                       options: LAMBOptions) -> None:
    """The moments, and w -= scale * u (``scale`` = lr * trust, 0 on a skipped step)."""
    g = _zero_if_skipped(ok, _widened(g))  # finite, so that the moments keep their values on a skipped step
    new_exp_avg, new_exp_avg_sq, u = _lamb_layer_direction(p, g, exp_avg, exp_avg_sq, bias_correction1,
                                                           bias_correction2_sqrt, options)
    exp_avg.copy_(_new_if_taken(ok, new_exp_avg, exp_avg))
    exp_avg_sq.copy_(_new_if_taken(ok, new_exp_avg_sq, exp_avg_sq))
    p.sub_(_zero_if_skipped(ok, u * scale))  # u holds wd*w, which a non-finite weight makes non-finite
    step.add_(ok.to(step.dtype))


# -- the path: every layer of a group ---------------------------------------------------------


def _single_tensor_lars_measure(params, grads, options: LARSOptions) -> tuple[Tensor, None]:
    norms = [_lars_layer_norms(p, g, weight_decay=options.weight_decay, coupled=options.coupled,
                               dtype=norm_dtype(p.device))
             for p, g in zip(params, grads)]
    return _as_columns(norms), None


def _single_tensor_lars_apply(params, grads, bufs, steps, options: LARSOptions, scalars: Scalars, work=None) -> None:
    scales, decision = PerDevice(scalars.scale), PerDevice(scalars.ok)
    for i, (p, g, buf, step) in enumerate(zip(params, grads, bufs, steps)):
        device = p.device
        lr_outside = 1.0 if options.momentum_form == LOOK_AHEAD else _on(options.lr, device)
        _lars_layer_update(p, g, buf, step, decision.on(device), scales.on(device)[i],
                           weight_decay=options.weight_decay, momentum=options.momentum, lr_outside=lr_outside,
                           momentum_form=options.momentum_form)


def _single_tensor_lamb_measure(params, grads, exp_avgs, exp_avg_sqs, steps,
                                options: LAMBOptions) -> tuple[Tensor, list]:
    """The norms, and each layer's bias corrections (what apply needs again)."""
    corrections = _bias_corrections_per_layer(steps, options)
    norms = []
    for p, g, exp_avg, exp_avg_sq, (bc1, bc2_sqrt) in zip(params, grads, exp_avgs, exp_avg_sqs, corrections):
        _, _, u = _lamb_layer_direction(p, g, exp_avg, exp_avg_sq, bc1, bc2_sqrt, options)
        norms.append(_norm_pair(p, u, norm_dtype(p.device)))
    return _as_columns(norms), corrections


def _single_tensor_lamb_apply(params, grads, exp_avgs, exp_avg_sqs, steps, options: LAMBOptions, scalars: Scalars,
                              corrections: list) -> None:
    scales, decision = PerDevice(scalars.scale), PerDevice(scalars.ok)
    for i, (p, g, exp_avg, exp_avg_sq, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        device = p.device
        _lamb_layer_update(p, g, exp_avg, exp_avg_sq, step, decision.on(device), scales.on(device)[i],
                           *corrections[i], options)


def _bias_corrections_per_layer(steps: list[Tensor], options: LAMBOptions) -> list[tuple[Tensor, Tensor]]:
    """Each layer's (1 - b1^t, sqrt(1 - b2^t)), 0-d on its device, computed once per device."""
    corrections: list = [None] * len(steps)
    by_device: dict = {}
    for i, step in enumerate(steps):
        by_device.setdefault(step.device, []).append(i)
    for indices in by_device.values():
        bc1, bc2_sqrt = lamb_bias_corrections(torch.stack([steps[i] for i in indices]), options)
        for i, first, second in zip(indices, bc1.unbind(), bc2_sqrt.unbind()):
            corrections[i] = (first, second)
    return corrections


def _as_columns(norms: list[Tensor]) -> Tensor:
    """[2, n] from n per-layer [||w||, ||u||] pairs (on the first layer's device)."""
    if not norms:
        return torch.zeros(2, 0, dtype=torch.float64)
    device = norms[0].device
    return torch.stack([n.to(device) for n in norms], dim=1)
