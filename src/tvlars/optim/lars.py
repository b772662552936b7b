"""LARS (You, Gitman, Ginsburg 2017): heavy-ball SGD with a layer-wise trust ratio."""

from __future__ import annotations

from typing import Optional

import torch

from . import _functional as F
from ._base import LayerwiseOptimizer, check
from ._sharding import local

TRUST_FORMS = ("coupled", "separate")


class LARS(LayerwiseOptimizer):
    r"""LARS with optional Nesterov momentum and LARC trust clipping.

    Per parameter tensor ("layer") $w$ with gradient $g$:

    $$
    \begin{split}
    d &= g + \mathrm{wd}\, w \\
    \tau &= \frac{\eta \lVert w \rVert}{\lVert d \rVert + \epsilon}
      \quad \text{or} \quad
      \frac{\eta \lVert w \rVert}{\lVert g \rVert + \mathrm{wd} \lVert w \rVert + \epsilon} \\
    b &\leftarrow \mu b + \tau d, \qquad b_0 = 0 \\
    w &\leftarrow w - \gamma b \quad \text{or, with Nesterov,} \quad w - \gamma (\tau d + \mu b)
    \end{split}
    $$

    with $\gamma$ = ``lr``, $\mathrm{wd}$ = ``weight_decay``, $\eta$ = ``trust_coefficient``,
    $\mu$ = ``momentum``, $\epsilon$ = ``eps``. The first trust ratio $\tau$ is
    ``trust_form="coupled"`` (the paper's), the second ``"separate"`` (You et al., timm).
    $\tau = 1$ where $\lVert w \rVert$ or the measured gradient norm is 0, and in groups with
    ``adapt=False``; ``trust_clip=True`` (LARC) uses $\min(\tau / \gamma, 1)$ instead.

    Use [tvlars.param_groups][] to keep biases and norm weights out of weight decay
    (``weight_decay=0``) and out of adaptation (``adapt=False``).

    Args:
        params (iterable of Tensor or dict): parameters or parameter groups, as for any torch
            optimizer; [tvlars.param_groups][] builds the usual groups.
        lr (float or Tensor): the learning rate $\gamma$; a tensor is copied once per step to
            each device the parameters live on.
        momentum (float): $\mu$, in [0, 1).
        weight_decay (float): $\mathrm{wd}$, added to the gradient before the trust ratio.
        trust_coefficient (float): $\eta$, > 0.
        eps (float): added to the trust ratio's denominator.
        nesterov (bool): Nesterov momentum instead of heavy-ball (needs momentum > 0).
        trust_clip (bool): LARC: the trust ratio becomes $\min(\tau / \gamma, 1)$.
        trust_form (str): ``"coupled"`` (the paper's) or ``"separate"`` (You et al., timm).
        foreach: the execution path, all exact. Default (None): on the CPU, per-layer scalars
            computed on the host and torch's fused SGD kernel doing the update, eagerly (fastest
            there); on CUDA the multi-tensor path. ``True``: multi-tensor (``torch._foreach_*``;
            to fuse its kernels, ``torch.compile`` the training step); ``False``: one tensor at a
            time with no host reads.
        fused: None or False, as torch's optimizers take it; ``True`` raises ``ValueError``
            (tvlars has no fused kernel of its own).
        stats: record per-layer statistics, read with [last_stats][tvlars.LARS.last_stats].

    A non-finite value in any gradient or weight of the step skips the whole step (the
    [skip rule][skip-rule]; ``skipped_steps`` counts them). ``p.grad`` is never written.
    """

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3,
                 eps=0.0, nesterov=False, trust_clip=False, trust_form="coupled",
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, *, stats: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov,
                        trust_clip=trust_clip, trust_form=trust_form)
        super().__init__(params, defaults, foreach, fused, stats)

    def _validate(self, group: dict) -> None:
        super()._validate(group)
        mu = group["momentum"]
        check("momentum", mu, 0.0 <= mu < 1.0, "must be in [0, 1)")
        check("trust_coefficient", group["trust_coefficient"], group["trust_coefficient"] > 0.0, "must be > 0")
        check("trust_form", group["trust_form"], group["trust_form"] in TRUST_FORMS, f"must be one of {TRUST_FORMS}")
        check("nesterov", group["nesterov"], not group["nesterov"] or mu > 0, "Nesterov needs momentum > 0")

    def _buffers(self, group: dict, params: list) -> list:
        if group["momentum"] == 0:
            return [None] * len(params)
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(local(state["momentum_buffer"]))
        return bufs

    def _options(self, group: dict) -> F.LARSOptions:
        return F.LARSOptions(
            lr=F.PerDevice(group["lr"]), momentum=group["momentum"], weight_decay=group["weight_decay"],
            trust_coefficient=group["trust_coefficient"], eps=group["eps"], trust_form=group["trust_form"],
            trust_clip=group["trust_clip"], adapt=group["adapt"],
            momentum_form=F.NESTEROV if group["nesterov"] else F.HEAVY_BALL, stats=self.stats)

    def _phi(self, group: dict, steps: list, device: torch.device) -> Optional[torch.Tensor]:
        """The per-layer factor that multiplies the step (TVLARS's phi_t); LARS has none."""
        return None

    def _plan(self, group, params, path):
        options = self._options(group)
        weights, grads = [local(p) for p in params], [local(p.grad) for p in params]
        bufs = self._buffers(group, params)
        steps = [self._counters(p)[0] for p in params]

        def measure():
            return F.lars_measure(weights, grads, options, path)

        def apply(ok, measured, work):
            phi = self._phi(group, steps, measured.device)
            return F.lars_apply(weights, grads, bufs, steps, options, ok, measured, phi, work, path)

        return measure, apply
