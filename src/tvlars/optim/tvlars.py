"""TVLARS (Do et al., "Revisiting LARS for large batch training"): LARS whose step is
scaled by the time-varying factor phi_t of Eq. 4 instead of a warm-up schedule."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import _functional as F
from ._base import LayerwiseOptimizer, check
from .factor import check_factor_args, resolve_factor_args, tv_factor_tensor
from .lars import LARS

VARIANTS = ("paper", "official")

# The authors' published code (docs/paper.md section 1): phi = 1 / (0.1 + exp(lam * t)), t from 1,
# both norms clamped to 10 before the ratio.
OFFICIAL_ALPHA = 0.1
OFFICIAL_MAX_NORM = 10.0


class TVLARS(LARS):
    r"""LARS plus a time-varying factor phi_t (paper Eq. 4) and a momentum form.

    $\phi_t = 1 / (\alpha + e^{\lambda (t - d)}) + \phi_{\min}$, $t$ = optimizer steps taken
    so far (the first step is $t = 0$; skipped steps do not count), $d$ = ``delay`` in steps;
    lam and delay default to the paper's 1e-4 and 0. ``total_steps=T`` instead derives them from
    the run's length, $d = T/2$, $\lambda = 2 \ln 99 / T$: phi_t falls from 0.99 to 0.01 over the
    run, centred on its middle, an anneal with no warm-up and no setting beyond the run's
    length (``tvlars.optim.factor``; how it compares with other schedules: docs/study.md). As
    torch's Adam counts its bias-correction step, t is counted per parameter
    (``state[p]["step"]``): a parameter that had no gradient for a while is behind.

    ``variant="paper"`` is Algorithm 1:

    $$
    \begin{split}
    \phi_t &= \frac{1}{\alpha + e^{\lambda (t - d)}} + \phi_{\min} \\
    \gamma_t &= \gamma\, \phi_t\, \tau \\
    m' &= w - \gamma_t (g + \mathrm{wd}\, w), \qquad m_0 = w_0 \\
    w &\leftarrow m' + \mu (m' - m)
    \end{split}
    $$

    with $\lambda$ = ``lam``, $\alpha$ = ``alpha``, $\phi_{\min}$ = ``min_factor`` and $\tau$
    LARS's trust ratio ([tvlars.LARS][]; 1 in groups with ``adapt=False``, so they step by
    $\gamma \phi_t (g + \mathrm{wd}\, w)$),
    computed as Nesterov momentum with the step size inside the buffer, which is the same
    recurrence without a copy of the weights. Unlike torch's SGD, the look-ahead keeps
    moving by momentum when lr drops to 0 mid-run (lr = 0 from the start leaves w unchanged).

    ``variant="official"`` reproduces the authors' code: alpha = 0.1, t counted from 1, no
    floor (leave ``alpha`` and ``min_factor`` at their defaults), and ``delay`` as their
    classification script applies it: phi = 1 (plain LARS) for the first ``delay`` steps,
    then ``1 / (0.1 + exp(lam * t))`` with t NOT shifted by the delay, so phi drops from 1
    to below 0.91 at the switch;
    heavy-ball momentum, both norms clamped to 10, phi_t inside the trust ratio (so
    adapt=False and zero-norm layers step at the plain lr); ``trust_ratio`` in
    [last_stats][tvlars.TVLARS.last_stats] then includes phi_t. Unlike that code, the step counter is saved in
    the optimizer state.

    No learning-rate scheduler is needed: phi_t is the schedule.

    Args:
        params (iterable of Tensor or dict): parameters or parameter groups, as for any torch
            optimizer; [tvlars.param_groups][] builds the usual groups.
        lr (float or Tensor): the learning rate $\gamma$ (a tensor: as [tvlars.LARS][]).
        momentum (float): $\mu$, in [0, 1).
        weight_decay (float): $\mathrm{wd}$, added to the gradient before the trust ratio.
        trust_coefficient (float): $\eta$ of LARS's trust ratio, > 0.
        lam (float or None): $\lambda$, how fast phi_t decays per step; None: the paper's 1e-4
            (or derived from ``total_steps``).
        delay (float or None): $d$, in optimizer steps; None: 0 (or derived from ``total_steps``).
        alpha (float): $\alpha$, > 0 (the paper's 1).
        min_factor (float): $\phi_{\min}$, the floor phi_t never goes under.
        variant (str): ``"paper"`` (Algorithm 1) or ``"official"`` (the authors' code).
        foreach (bool or None): the execution path, as [tvlars.LARS][].
        fused (bool or None): as [tvlars.LARS][].
        stats (bool): record per-layer statistics, read with [last_stats][tvlars.TVLARS.last_stats].
        total_steps (float or None): the run's length T in optimizer steps: phi_t anneals from
            0.99 to 0.01 (TVLARS-anneal); give it or ``lam`` and ``delay``, not both.
    """

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3,
                 lam=None, delay=None, alpha=1.0, min_factor=0.0, variant="paper",
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, *, stats: bool = False,
                 total_steps: Optional[float] = None):
        check("variant", variant, variant in VARIANTS, f"must be one of {VARIANTS}")
        check("total_steps", total_steps, total_steps is None or variant == "paper",
              "the annealing phi_t is the paper variant's")
        lam, delay = resolve_factor_args(lam, delay, total_steps, default_lam=1e-4)
        if variant == "official":
            check("alpha/min_factor", (alpha, min_factor), (alpha, min_factor) == (1.0, 0.0),
                  "variant='official' fixes alpha=0.1 and min_factor=0")
            alpha = OFFICIAL_ALPHA
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=0.0, nesterov=False, trust_clip=False,
                        trust_form="coupled", lam=lam, delay=delay, alpha=alpha, min_factor=min_factor,
                        variant=variant)
        # LARS's own constructor would validate groups before the TVLARS keys are in the defaults.
        LayerwiseOptimizer.__init__(self, params, defaults, foreach, fused, stats)

    def _validate(self, group: dict) -> None:
        super()._validate(group)
        check("variant", group["variant"], group["variant"] in VARIANTS, f"must be one of {VARIANTS}")
        check_factor_args(group["lam"], group["delay"], group["alpha"], group["min_factor"])
        if group["variant"] == "official":
            check("alpha/min_factor", (group["alpha"], group["min_factor"]),
                  (group["alpha"], group["min_factor"]) == (OFFICIAL_ALPHA, 0.0),
                  f"variant='official' fixes alpha={OFFICIAL_ALPHA} and min_factor=0")

    def _options(self, group: dict) -> F.LARSOptions:
        """LARS's options with TVLARS's momentum form (and the authors' ratio for "official")."""
        options = super()._options(group)
        if group["variant"] == "official":
            return dataclasses.replace(options, momentum_form=F.HEAVY_BALL, phi_in_ratio=True,
                                       max_norm=OFFICIAL_MAX_NORM)
        return dataclasses.replace(options, momentum_form=F.LOOK_AHEAD)

    def _phi(self, group: dict, steps: list, device: torch.device) -> torch.Tensor:
        """phi_t of Eq. 4 per layer, t = its step counter. The authors' code counts t from 1,
        and gates: plain LARS (phi = 1) for the first ``delay`` steps, then phi of t unshifted."""
        step = torch.stack([s.to(device) for s in steps])
        if group["variant"] != "official":
            return tv_factor_tensor(step, group["lam"], group["delay"], group["alpha"], group["min_factor"])
        phi = tv_factor_tensor(step + 1.0, group["lam"], 0, group["alpha"], 0.0)
        return torch.where(step >= group["delay"], phi, 1.0) if group["delay"] > 0 else phi
