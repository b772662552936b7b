"""LAMB (You et al. 2020): Adam's direction, scaled per layer by ||w|| / ||u||."""

from __future__ import annotations

from typing import Optional

import torch

from . import _functional as F
from ._base import LayerwiseOptimizer, check
from ._sharding import local


class LAMB(LayerwiseOptimizer):
    r"""LAMB with optional bias correction, LAMBC trust clipping and the authors' weight-norm cap.

    Per parameter tensor $w$ with gradient $g$, $t$ = this parameter's step, from 1:

    $$
    \begin{split}
    m &\leftarrow \beta_1 m + (1 - \beta_1)\, g, \qquad v \leftarrow \beta_2 v + (1 - \beta_2)\, g^2 \\
    u &= \frac{m / (1 - \beta_1^t)}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon} + \mathrm{wd}\, w \\
    \tau &= \frac{\min(\lVert w \rVert, c)}{\lVert u \rVert} \\
    w &\leftarrow w - \gamma\, \tau\, u
    \end{split}
    $$

    with $(\beta_1, \beta_2)$ = ``betas``, $c$ = ``max_weight_norm`` (None: no cap,
    $\tau = \lVert w \rVert / \lVert u \rVert$; the cybertronai / pytorch-optimizer LAMB the
    TVLARS authors ran caps $\lVert w \rVert$ at 10). $\tau = 1$ where either norm is 0 and in
    groups with ``adapt=False``; ``trust_clip=True`` (LAMBC) uses $\min(\tau, 1)$. Without bias
    correction the divisions by $1 - \beta^t$ are dropped. The first step moves each adapted
    layer by exactly $\gamma \lVert w \rVert$.

    Non-finite inputs skip the step: the [skip rule][skip-rule]. The default CPU path, eager, lets torch's fused
    AdamW kernel (``_fused_adamw_``) write the moments: for layers that adapt (or when
    ``stats`` is on) it adds Adam's direction to `wd*w` in a workspace, which is u, and one
    ``add_`` per layer takes the step `w -= lr * trust * u`; for a group that neither adapts
    nor records statistics (trust 1) it takes LAMB's step itself (AdamW's decoupled decay
    `lr*wd*w` is LAMB's `lr*(wd*w)` term).

    Args:
        params (iterable of Tensor or dict): parameters or parameter groups, as for any torch
            optimizer; [tvlars.param_groups][] builds the usual groups.
        lr (float or Tensor): the learning rate $\gamma$ (a tensor: as [tvlars.LARS][]).
        betas (tuple[float, float]): $(\beta_1, \beta_2)$, each in [0, 1).
        eps (float): added to $\sqrt{\hat v}$.
        weight_decay (float): $\mathrm{wd}$, added to Adam's direction.
        bias_correction (bool): divide the moments by $1 - \beta^t$.
        trust_clip (bool): LAMBC: the trust ratio becomes $\min(\tau, 1)$.
        foreach (bool or None): the execution path, as [tvlars.LARS][].
        fused (bool or None): as [tvlars.LARS][].
        stats (bool): record per-layer statistics, read with [last_stats][tvlars.LAMB.last_stats].
        max_weight_norm (float or None): the cap $c$ on $\lVert w \rVert$ in the trust ratio
            (the authors' 10); None: no cap.
    """

    _keys_since_0_1_0 = ("max_weight_norm",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 bias_correction=True, trust_clip=False, foreach: Optional[bool] = None,
                 fused: Optional[bool] = None, *, stats: bool = False, max_weight_norm: Optional[float] = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, trust_clip=trust_clip, max_weight_norm=max_weight_norm)
        super().__init__(params, defaults, foreach, fused, stats)

    def _validate(self, group: dict) -> None:
        super()._validate(group)
        b1, b2 = group["betas"]
        check("betas", group["betas"], 0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0, "each must be in [0, 1)")
        cap = group["max_weight_norm"]
        check("max_weight_norm", cap, cap is None or cap > 0, "must be None or > 0")

    def _plan(self, group, params, path):
        beta1, beta2 = group["betas"]
        options = F.LAMBOptions(lr=F.PerDevice(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                                weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
                                trust_clip=group["trust_clip"], adapt=group["adapt"],
                                max_weight_norm=group["max_weight_norm"], stats=self.stats)
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            steps.append(self._counters(p)[0])
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(local(state["exp_avg"]))
            exp_avg_sqs.append(local(state["exp_avg_sq"]))
        weights, grads = [local(p) for p in params], [local(p.grad) for p in params]

        def measure():
            return F.lamb_measure(weights, grads, exp_avgs, exp_avg_sqs, steps, options, path)

        def apply(ok, measured, work):
            return F.lamb_apply(weights, grads, exp_avgs, exp_avg_sqs, steps, options, ok, measured, work, path)

        return measure, apply
