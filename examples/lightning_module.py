"""TVLARS, or LAMB with TVFactorLR per step, in a LightningModule: gradient accumulation,
bf16 mixed precision, one step whose gradients are infinite (skipped by the optimizer, and
by the schedule too, thanks to FollowOptimizerSteps), and a checkpoint resumed by the
Trainer that ends where an uninterrupted run ends.

    python examples/lightning_module.py [--optimizer lamb]   (pip install "tvlars[lightning]"; CPU, seconds)
"""

import argparse
import tempfile
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tvlars
from tvlars.integrations.lightning import FollowOptimizerSteps, steps_taken


class Classifier(FollowOptimizerSteps, L.LightningModule):
    def __init__(self, optimizer: str = "tvlars", bad_batch: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
        self.optimizer, self.bad_batch = optimizer, bad_batch

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        if self.current_epoch == 0 and batch_idx == self.bad_batch:
            loss = loss * float("inf")  # a blown-up batch: tvlars skips the step it belongs to
        return loss

    def configure_optimizers(self):
        groups = tvlars.param_groups(self, weight_decay=5e-4)  # 1-D tensors: no decay, no adaptation
        if self.optimizer == "tvlars":
            return tvlars.TVLARS(groups, lr=1.0, trust_coefficient=0.02, lam=1e-2, delay=8)  # phi_t is the schedule
        opt = tvlars.LAMB(groups, lr=5e-2)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": tvlars.TVFactorLR(opt, lam=1e-2, delay=8),
                                                   "interval": "step"}}


def fit(model: Classifier, epochs: int, **kw) -> L.Trainer:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen)
    y = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
    trainer = L.Trainer(max_epochs=epochs, accumulate_grad_batches=2, precision="bf16-mixed", accelerator="cpu",
                        devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the DataLoader has few workers": this one needs none
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32), **kw)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=["tvlars", "lamb"], default="tvlars")
    name = parser.parse_args().optimizer
    whole = Classifier(name)
    opt = fit(whole, 4).optimizers[0]
    print(f"{steps_taken(opt)} steps taken, {opt.skipped_steps} skipped; lr now {opt.param_groups[0]['lr']:.4g}")
    with tempfile.TemporaryDirectory() as out:
        fit(Classifier(name), 2).save_checkpoint(f"{out}/epoch2.ckpt")
        resumed = Classifier(name)
        fit(resumed, 4, ckpt_path=f"{out}/epoch2.ckpt", weights_only=True)
    same = all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))
    print("resumed after epoch 2, the weights after epoch 4 are", "the same" if same else "DIFFERENT")


if __name__ == "__main__":
    main()
