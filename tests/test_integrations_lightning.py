"""tvlars in Lightning: configure_optimizers with TVLARS, and LAMB with TVFactorLR stepped
per optimizer step, under gradient accumulation and bf16-mixed precision on the CPU; a
checkpoint resumed by the Trainer; schedules that skip with the optimizer
(tvlars.integrations.lightning.FollowOptimizerSteps), whether tvlars skipped the step or
an fp16 GradScaler did."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tvlars
from tvlars.integrations.lightning import FollowOptimizerSteps, steps_taken

BATCHES, ACCUMULATE = 8, 2  # per epoch: 4 optimizer steps
LAM, LAMB_LR = 1e-2, 5e-2


class Classifier(L.LightningModule):
    def __init__(self, optimizer="tvlars", bad_batch=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
        self.optimizer, self.bad_batch, self.losses, self.dtypes = optimizer, bad_batch, [], set()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.losses.append(loss.item())
        self.dtypes.add(logits.dtype)
        return loss * float("inf") if batch_idx == self.bad_batch else loss  # inf gradients: the step is skipped

    def configure_optimizers(self):
        groups = tvlars.param_groups(self, weight_decay=5e-4)
        if self.optimizer == "tvlars":
            return tvlars.TVLARS(groups, lr=2.0, lam=LAM)  # no scheduler: phi_t is the schedule
        opt = tvlars.LAMB(groups, lr=LAMB_LR)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": tvlars.TVFactorLR(opt, lam=LAM), "interval": "step"}}


class Following(FollowOptimizerSteps, Classifier):
    pass


def loader():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCHES * 32, 8, generator=gen)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=32)


def fit(model, epochs, precision="bf16-mixed", **kw):
    """``precision="16-mixed"``: fp16 autocast and a GradScaler on the CPU, which Lightning
    offers only through the plugin."""
    mixed = dict(precision=precision) if precision != "16-mixed" else dict(plugins=[MixedPrecision("16-mixed", "cpu")])
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, accumulate_grad_batches=ACCUMULATE,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **mixed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny loader's "few workers" advice
        trainer.fit(model, loader(), **kw)
    return trainer


@pytest.mark.parametrize("optimizer", ["tvlars", "lamb"])
def test_trains_with_accumulation_in_bf16_and_resumes_a_checkpoint_exactly(tmp_path, optimizer):
    whole = Following(optimizer)
    trainer = fit(whole, 3)
    opt = trainer.optimizers[0]
    assert steps_taken(opt) == 3 * BATCHES // ACCUMULATE and opt.skipped_steps == 0
    first, last = sum(whole.losses[:BATCHES]), sum(whole.losses[-BATCHES:])
    assert last < 0.95 * first, whole.losses
    assert whole.dtypes == {torch.bfloat16}
    if optimizer == "lamb":
        assert opt.param_groups[0]["lr"] == pytest.approx(LAMB_LR * tvlars.tv_factor(steps_taken(opt), LAM))

    fit(part := Following(optimizer), 1).save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = Following(optimizer)
    assert not torch.equal(resumed.net[0].weight, part.net[0].weight)
    fit(resumed, 3, ckpt_path=tmp_path / "epoch1.ckpt", weights_only=True)
    for (n, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("precision, skipped_by_tvlars", [("bf16-mixed", 1), ("16-mixed", 0)],
                         ids=["tvlars-skips", "grad-scaler-skips"])
def test_a_skipped_step_moves_the_schedule_only_without_follow_optimizer_steps(precision, skipped_by_tvlars):
    """Batches 2-3 make the second optimizer step, and their gradients are infinite: tvlars
    skips the step, or, under fp16, the GradScaler does without calling the optimizer.
    Lightning steps the scheduler all the same; FollowOptimizerSteps does not."""
    for module, ahead in ((Classifier, 1), (Following, 0)):
        trainer = fit(module("lamb", bad_batch=3), 1, precision)
        opt, scheduler = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
        assert opt.skipped_steps == skipped_by_tvlars and steps_taken(opt) == BATCHES // ACCUMULATE - 1
        assert scheduler.last_epoch == steps_taken(opt) + ahead
        assert opt.param_groups[0]["lr"] == pytest.approx(LAMB_LR * tvlars.tv_factor(scheduler.last_epoch, LAM))
