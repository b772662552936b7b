"""The time-varying factor phi_t of TVLARS (paper Eq. 4), as a function and as a scheduler.

    phi_t = 1 / (alpha + exp(lam * (t - delay))) + min_factor

phi_t only multiplies the step size, so it is also a learning-rate schedule in its own
right: ``TVFactorLR`` runs any optimizer (LAMB, LARS, SGD) "time-varying".
"""

from __future__ import annotations

import math

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


def tv_factor(step: float, lam: float, delay: float = 0, alpha: float = 1.0, min_factor: float = 0.0) -> float:
    """phi_t of Eq. 4 at optimizer step ``step`` (the first step is 0).

    Bounds (Eq. 5): ``min_factor <= phi_t <= 1 / (alpha + exp(-lam * delay)) + min_factor``.
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
    """Multiplies each group's base lr by phi_t, t = number of ``scheduler.step()`` calls.

    Call ``scheduler.step()`` once per optimizer step (not per epoch): the paper counts t in
    iterations, and ``delay`` is in steps as well.
    """

    def __init__(self, optimizer, lam: float, delay: float = 0, alpha: float = 1.0,
                 min_factor: float = 0.0, last_epoch: int = -1):
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
