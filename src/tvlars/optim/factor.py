r"""The time-varying factor phi_t of TVLARS (paper Eq. 4), as a function and as a scheduler:

$$
\phi_t = \frac{1}{\alpha + e^{\lambda (t - d)}} + \phi_{\min}
$$

with $\lambda$ = ``lam``, $d$ = ``delay``, $\alpha$ = ``alpha``, $\phi_{\min}$ = ``min_factor``.
phi_t only multiplies the step size, so it is also a learning-rate schedule in its own
right: ``TVFactorLR`` runs any optimizer (LAMB, LARS, SGD) "time-varying".

The paper's lam (1e-4) barely moves phi_t over a run of a few thousand steps, so TVLARS as
published never anneals. Given the run's length T instead (``total_steps``), lam and delay
follow from it (``anneal_factor_args``): a sigmoid centred on the middle of the run that
falls from 0.99 at the first step to 0.01 at the last,

$$
d = T / 2, \quad \lambda = 2 \ln 99 / T, \quad \text{so} \quad
\phi_0 = 0.99, \quad \phi_{T/2} = 0.5, \quad \phi_T = 0.01,
$$

with no warm-up and no setting beyond the run's own length. What it gives against warm-up
schedules and TVLARS as published is measured in docs/study.md ("A schedule without warm-up").
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.optim.lr_scheduler import LRScheduler


def check_factor_args(lam: float, delay: float, alpha: float, min_factor: float) -> None:
    if not lam >= 0.0:
        raise ValueError(f"invalid lam (decay coefficient): {lam}; must be >= 0")
    if not delay >= 0:
        raise ValueError(f"invalid delay: {delay}; must be >= 0 (steps)")
    if not alpha > 0.0:
        raise ValueError(f"invalid alpha: {alpha}; must be > 0")
    if not min_factor >= 0.0:
        raise ValueError(f"invalid min_factor: {min_factor}; must be >= 0")


#: phi_t of the annealing schedule at the first step is 1 - ANNEAL_END, at the last ANNEAL_END.
ANNEAL_END = 0.01


def anneal_factor_args(total_steps: float) -> dict:
    """``lam`` and ``delay`` of the phi_t that anneals a run of ``total_steps`` optimizer steps
    (module doc), for [tvlars.TVLARS][] or [tvlars.TVFactorLR][].

    Args:
        total_steps (float): the run's length T in optimizer steps, > 0.

    Returns:
        ``{"lam": 2 ln(99) / T, "delay": T / 2}``.
    """
    if not total_steps > 0:
        raise ValueError(f"invalid total_steps: {total_steps}; must be > 0")
    return dict(lam=2.0 * math.log(1.0 / ANNEAL_END - 1.0) / total_steps, delay=total_steps / 2.0)


def resolve_factor_args(lam: Optional[float], delay: Optional[float], total_steps: Optional[float],
                        default_lam: float) -> tuple[float, float]:
    """(lam, delay): from ``total_steps`` when it is given (then neither may be), else as given
    with the paper's defaults."""
    if total_steps is None:
        return (default_lam if lam is None else lam), (0 if delay is None else delay)
    if lam is not None or delay is not None:
        raise ValueError("invalid lam/delay: total_steps derives both; give total_steps or lam and delay")
    derived = anneal_factor_args(total_steps)
    return derived["lam"], derived["delay"]


def tv_factor(step: float, lam: float, delay: float = 0, alpha: float = 1.0, min_factor: float = 0.0) -> float:
    r"""phi_t of Eq. 4 at optimizer step ``step`` (the first step is 0).

    Bounds (Eq. 5): $\phi_{\min} \le \phi_t \le 1 / (\alpha + e^{-\lambda d}) + \phi_{\min}$.

    Args:
        step (float): $t$, the optimizer steps taken so far.
        lam (float): $\lambda$, how fast phi_t decays per step, >= 0.
        delay (float): $d$, in optimizer steps, >= 0.
        alpha (float): $\alpha$, > 0.
        min_factor (float): $\phi_{\min}$, the floor, >= 0.

    Returns:
        phi_t.
    """
    check_factor_args(lam, delay, alpha, min_factor)
    exponent = lam * (step - delay)
    # exp overflows past ~709; phi is then min_factor to double precision anyway.
    if exponent > 700.0:
        return float(min_factor)
    return 1.0 / (alpha + math.exp(exponent)) + min_factor


def tv_factor_tensor(step: torch.Tensor, lam: float, delay: float, alpha: float, min_factor: float) -> torch.Tensor:
    """Eq. 4 on a step-count tensor, so the optimizers never read the counter on the host.

    exp(inf) = inf gives 1 / inf = 0, the same limit that ``tv_factor`` returns.
    """
    step = step.to(torch.float64) if step.device.type != "mps" else step
    return 1.0 / (alpha + torch.exp(lam * (step - delay))) + min_factor


class TVFactorLR(LRScheduler):
    r"""Multiplies each group's base lr by phi_t, t = number of ``scheduler.step()`` calls.

    Call ``scheduler.step()`` once per optimizer step (not per epoch): the paper counts t in
    iterations, and ``delay`` is in steps as well. ``total_steps`` (instead of ``lam`` and
    ``delay``) anneals the run from 0.99 to 0.01 (module doc).

    Args:
        optimizer (torch.optim.Optimizer): any optimizer (LAMB, LARS, SGD, ...).
        lam (float or None): $\lambda$; None: the paper's 1e-4 (or derived from ``total_steps``).
        delay (float or None): $d$, in steps; None: 0 (or derived from ``total_steps``).
        alpha (float): $\alpha$, > 0.
        min_factor (float): $\phi_{\min}$, the floor, >= 0.
        last_epoch (int): torch's ``LRScheduler`` argument: -1 starts a new schedule.
        total_steps (float or None): the run's length T in optimizer steps: phi_t anneals from
            0.99 to 0.01; give it or ``lam`` and ``delay``, not both.
    """

    def __init__(self, optimizer, lam: Optional[float] = None, delay: Optional[float] = None, alpha: float = 1.0,
                 min_factor: float = 0.0, last_epoch: int = -1, *, total_steps: Optional[float] = None):
        lam, delay = resolve_factor_args(lam, delay, total_steps, default_lam=1e-4)
        check_factor_args(lam, delay, alpha, min_factor)
        self.lam, self.delay, self.alpha, self.min_factor = lam, delay, alpha, min_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return tv_factor(step, self.lam, self.delay, self.alpha, self.min_factor)

    def get_lr(self) -> list[float]:
        phi = self.factor(self.last_epoch)
        return [base_lr * phi for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()
