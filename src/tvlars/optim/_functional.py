"""The maths of LARS, TVLARS and LAMB, and the dispatch to the three paths that compute it
(``_single_tensor``, ``_multi_tensor``, ``_host``; the scalars all share are in ``_scalars``).

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

``trust_ratio`` (written once, in ``_scalars``) is 1 where a norm is 0, and for adapt=False groups;
``lars_scalars`` / ``lamb_scalars`` turn the norms of all layers into their step sizes at
once, on vectors, for every path.

The skip rule, one for every path: a step is decided before anything is written, from every
gradient and every weight the step reads, on every layer, adapted or not; if any of them holds
inf or NaN, nothing changes (weights, state, ``step`` counters) and ``skipped_steps`` counts
the step. So a step never writes from a non-finite input, and a run does not behave otherwise
because it moved from a CPU to a GPU. Each path is a pair (measure, apply):

  measure  reads only, and returns what decides the step: each layer's [||w||; ||u||] (u: d,
           or g for the separate form, or LAMB's u, each of which holds every entry of g), or
           for LAMB on the host path each layer's [||w||; ||g||]. Norms are taken in float64
           (float32 on MPS), so that a finite layer never reads as non-finite. The
           optimizer combines the shards of sharded layers (FSDP2: one all-reduce for all) and
           decides: any non-finite norm skips the step.
  apply    the scalars and the update; on a skipped step an exact no-op (weights, state and
           counters unchanged), selected on the device, so that no device path waits for the
           decision.

Paths (chosen in one place, ``LayerwiseOptimizer._path``):

  single  ``_single_tensor`` (foreach=False): one layer at a time, scalars on the device.
  multi   ``_multi_tensor`` (CUDA default, foreach=True): ``torch._foreach_*`` ops on each
          (device, dtype) bucket, a bounded number of kernel launches however many layers;
          what ``torch.compile`` over a training step fuses.
  host    ``_host`` (CPU default, eager, nothing compiled): norms by BLAS dots, the scalars
          read as Python numbers (free on the CPU), torch's own fused SGD / AdamW kernels for
          the update; LAMB in chunks of layers (see there).

Nothing is kept between steps or between groups: every workspace is made for one bucket (one
dtype of a group, on the host path) and step.

Constants (momentum, betas, weight decay, eps) enter kernels as Python numbers, which kernels
use at full precision (a 0-d tensor would be rounded to a bfloat16 layer's dtype); only
per-layer scalars, a tensor lr and the 0/1 decision are tensors.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ._host import _host_lamb_apply, _host_lamb_measure, _host_lars_apply, _host_lars_measure
from ._multi_tensor import (_multi_tensor_lamb_apply, _multi_tensor_lamb_measure, _multi_tensor_lars_apply,
                            _multi_tensor_lars_measure, add_scalar_)
from ._scalars import (HEAVY_BALL, LOOK_AHEAD, NESTEROV, LAMBOptions, LARSOptions, PerDevice, Scalars, lamb_scalars,
                       lars_scalars)
from ._single_tensor import (_single_tensor_lamb_apply, _single_tensor_lamb_measure, _single_tensor_lars_apply,
                             _single_tensor_lars_measure)

# What the optimizer classes use: the options and scalars, the paths, and the dispatch below.
__all__ = ["HEAVY_BALL", "LOOK_AHEAD", "NESTEROV", "LAMBOptions", "LARSOptions", "PerDevice", "Scalars",
           "lamb_scalars", "lars_scalars", "SINGLE", "MULTI", "HOST", "lars_measure", "lars_apply",
           "lamb_measure", "lamb_apply", "add_scalar_"]


SINGLE, MULTI, HOST = "single", "multi", "host"


def lars_measure(params, grads, options: LARSOptions, path: str) -> tuple[Tensor, Any]:
    """Reads only: (what decides the step, the path's workspace for ``lars_apply``)."""
    if path == HOST:
        return _host_lars_measure(params, grads, options)
    if path == MULTI:
        return _multi_tensor_lars_measure(params, grads, options)
    return _single_tensor_lars_measure(params, grads, options)


def lars_apply(params, grads, bufs, steps, options: LARSOptions, ok: Tensor, measured: Tensor,
               phi: Optional[Tensor], work, path: str) -> Scalars:
    """The update of ``params``, their buffers and step counters from the whole-layer
    ``measured`` norms, times ``phi`` per layer (TVLARS); returns the scalars it used."""
    scalars = lars_scalars(measured[0], measured[1], options, ok, phi)
    if path == HOST:
        _host_lars_apply(params, grads, bufs, steps, options, scalars)
    elif path == MULTI:
        _multi_tensor_lars_apply(params, grads, bufs, steps, options, scalars, work)
    else:
        _single_tensor_lars_apply(params, grads, bufs, steps, options, scalars, work)
    return scalars


def lamb_measure(params, grads, exp_avgs, exp_avg_sqs, steps, options: LAMBOptions, path: str) -> tuple[Tensor, Any]:
    if path == HOST:
        return _host_lamb_measure(params, grads, exp_avgs, exp_avg_sqs)
    if path == MULTI:
        return _multi_tensor_lamb_measure(params, grads, exp_avgs, exp_avg_sqs, steps, options)
    return _single_tensor_lamb_measure(params, grads, exp_avgs, exp_avg_sqs, steps, options)


def lamb_apply(params, grads, exp_avgs, exp_avg_sqs, steps, options: LAMBOptions, ok: Tensor, measured: Tensor,
               work, path: str) -> Scalars:
    if path == HOST:  # measured is [||w||; ||g||]: ||u|| is known only once the moments are written
        return _host_lamb_apply(params, grads, exp_avgs, exp_avg_sqs, steps, options, ok, measured, work)
    scalars = lamb_scalars(measured[0], measured[1], options, ok)
    if path == MULTI:
        _multi_tensor_lamb_apply(params, grads, exp_avgs, exp_avg_sqs, steps, options, scalars, work)
    else:
        _single_tensor_lamb_apply(params, grads, exp_avgs, exp_avg_sqs, steps, options, scalars, work)
    return scalars
