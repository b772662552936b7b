"""Lightning schedules that stay in step with a tvlars optimizer.

Lightning steps every ``interval: "step"`` scheduler after every optimizer step it asked
for, taken or not: tvlars skips a step whose gradients hold inf or NaN (no weight, state or
counter changes), and an fp16 ``GradScaler`` skips one without calling the optimizer, yet
the schedule moves on, so ``TVFactorLR`` runs ahead of phi_t's t and a warm-up ends early.
[FollowOptimizerSteps][tvlars.integrations.lightning.FollowOptimizerSteps] makes the schedule count the steps the optimizer took.

The mixin only overrides a LightningModule hook, so this module imports no Lightning and
serves ``lightning.pytorch`` and ``pytorch_lightning`` modules alike.
"""

from __future__ import annotations

import torch

from tvlars import LAMB, LARS

STEP = "step"  # the per-parameter counter of steps taken (README: "What you can rely on")


def steps_taken(optimizer: torch.optim.Optimizer) -> int:
    """Steps a tvlars optimizer has taken, skipped ones not counted: the largest of its
    per-parameter counters (one host read).

    Args:
        optimizer: a tvlars optimizer ([tvlars.LARS][], [tvlars.LAMB][], [tvlars.TVLARS][]).
    """
    counts = [s[STEP] for s in optimizer.state.values() if STEP in s]
    if not counts:
        return 0
    return int(torch.stack([c.to(counts[0].device) for c in counts]).max().item())


class FollowOptimizerSteps:
    """A LightningModule mixin (``class Model(FollowOptimizerSteps, L.LightningModule)``)
    whose schedulers of tvlars optimizers step only when the optimizer took its step.

    Lightning calls ``lr_scheduler_step`` once per optimizer step for ``interval: "step"``
    schedulers; a scheduler has then been stepped ``last_epoch`` times, which equals the
    optimizer's steps taken unless the last step was skipped. Plateau schedulers (given a
    metric) and other optimizers' schedulers step as Lightning steps them.
    """

    def lr_scheduler_step(self, scheduler, metric) -> None:
        optimizer = getattr(scheduler, "optimizer", None)
        if (metric is None and isinstance(optimizer, (LARS, LAMB))
                and steps_taken(optimizer) <= scheduler.last_epoch):
            return
        super().lr_scheduler_step(scheduler, metric)
