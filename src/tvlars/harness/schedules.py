"""Learning-rate schedules, stepped once per OPTIMIZER step.

The paper's schedules (docs/paper.md section 2, Appendix A of the paper):

* ``warmup-cosine``: linear warm-up from 0 to the target lr over ``warmup_steps``
  (gamma_t = target * t / T), then cosine decay to the floor ``min_lr``:
  gamma_t = target * q + min_lr * (1 - q), q = (1 + cos(pi * s / S)) / 2, where s counts
  the steps after warm-up and S = total_steps - warmup_steps.
* ``poly``: the same warm-up, then polynomial decay
  gamma_t = (target - min_lr) * (1 - s / S) ** power + min_lr.
* ``constant``: the same warm-up, then the target lr.
* ``none``: no scheduler at all (TVLARS: phi_t replaces it).

Convention: t = 1, 2, ..., total_steps numbers the optimizer steps, and gamma_t is the
learning rate *used by* step t. So with warm-up the first step uses target / T (never a
wasted step at lr 0), step T uses the target and the last step uses ``min_lr``.

The scheduler is a :class:`~torch.optim.lr_scheduler.LambdaLR` whose lambda is a small
picklable object (:class:`Schedule`), so ``scheduler.state_dict()`` holds everything
(including the step counter ``last_epoch`` = number of optimizer steps taken) and a
resumed run continues exactly. Call ``scheduler.step()`` after every ``optimizer.step()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("warmup-cosine", "poly", "constant", "none")


def lr_factor(t: int, *, kind: str, total_steps: int, warmup_steps: int, min_ratio: float = 0.0,
              power: float = 2.0) -> float:
    """Multiplier of the target lr for optimizer step ``t`` (1-based); see the module doc."""
    if kind == "none":
        return 1.0
    if kind not in KINDS:
        raise ValueError(f"unknown schedule {kind!r}; choose from {', '.join(KINDS)}")
    t = max(int(t), 1)
    if warmup_steps > 0 and t <= warmup_steps:
        return t / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max((t - warmup_steps) / span, 0.0), 1.0)
    if kind == "warmup-cosine":
        q = 0.5 * (1.0 + math.cos(math.pi * progress))
        return q + min_ratio * (1.0 - q)
    # poly
    return (1.0 - min_ratio) * (1.0 - progress) ** power + min_ratio


@dataclass
class Schedule:
    """Picklable lambda for LambdaLR: ``Schedule(...)(steps_done)`` -> lr factor.

    LambdaLR calls it with ``last_epoch`` = the number of optimizer steps already taken,
    so the value set after k steps is the factor of step t = k + 1.
    """

    kind: str
    total_steps: int
    warmup_steps: int
    min_ratio: float = 0.0
    power: float = 2.0

    def __call__(self, steps_done: int) -> float:
        return lr_factor(steps_done + 1, kind=self.kind, total_steps=self.total_steps,
                         warmup_steps=self.warmup_steps, min_ratio=self.min_ratio, power=self.power)


def build_schedule(optimizer, kind: str, *, total_steps: int, warmup_steps: int, min_lr: float = 0.0,
                   power: float = 2.0):
    """A LambdaLR for ``kind`` (None for "none"). ``min_lr`` is absolute (same units as lr)."""
    if kind == "none":
        return None
    if kind not in KINDS:
        raise ValueError(f"unknown schedule {kind!r}; choose from {', '.join(KINDS)}")
    from torch.optim.lr_scheduler import LambdaLR

    base = optimizer.param_groups[0]["lr"]
    base = float(base) if not hasattr(base, "item") else float(base.item())
    min_ratio = (min_lr / base) if base > 0 else 0.0
    return LambdaLR(optimizer, Schedule(kind, int(total_steps), int(warmup_steps), float(min_ratio), float(power)))
