"""tvlars in the Hugging Face Trainer, as README.md shows it: tvlars's optimizer handed over
with ``optimizers=(optimizer, None)`` and the Trainer's own schedule, on a small GPT-2 built
from a config (nothing downloaded: HF_HUB_OFFLINE).

Also the claims README.md makes about the Trainer: its own decay split decays batch-norm
weights, and what global gradient clipping (``max_grad_norm``) does to LARS and LAMB.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

import tvlars  # noqa: E402

STEPS = 8

# 8 sequences, one batch: each step sees them all, so the loss falls step after step
DATA = [{"input_ids": ids, "labels": ids} for ids in (torch.arange(8)[:, None] * 3 + torch.arange(16)) % 32]


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0, initializer_range=0.1))


# README's two recipes: TVLARS on a constant schedule (phi_t is its schedule), LAMB with warm-up
RECIPES = {
    "tvlars": (lambda model: tvlars.TVLARS(tvlars.param_groups(model, weight_decay=1e-4), lr=0.5,
                                           trust_coefficient=0.05, lam=1e-3), dict(lr_scheduler_type="constant")),
    "lamb": (lambda model: tvlars.LAMB(tvlars.param_groups(model, weight_decay=1e-2), lr=5e-2),
             dict(lr_scheduler_type="linear", warmup_steps=2)),
}


def trainer(out, name):
    model = gpt2()
    optimizer, schedule = RECIPES[name]
    args = TrainingArguments(str(out), max_steps=STEPS, per_device_train_batch_size=8, logging_steps=1,
                             save_steps=STEPS // 2, max_grad_norm=0.0, report_to="none", use_cpu=True,
                             dataloader_pin_memory=False, disable_tqdm=True, seed=0, **schedule)
    return Trainer(model=model, args=args, train_dataset=DATA, optimizers=(optimizer(model), None))


@pytest.mark.parametrize("name", ["tvlars", "lamb"])
def test_trainer_trains_and_resumes_a_checkpoint_exactly(tmp_path, name):
    whole = trainer(tmp_path, name)
    whole.train()
    losses = [h["loss"] for h in whole.state.log_history if "loss" in h]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.3, losses
    lrs = [h["learning_rate"] for h in whole.state.log_history if "learning_rate" in h]
    assert lrs == [0.5] * STEPS if name == "tvlars" else lrs[0] < lrs[1] > lrs[-1]  # constant; warm-up, decay
    assert whole.optimizer.optimizer.skipped_steps == 0  # the Trainer's optimizer is accelerate's wrapper

    resumed = trainer(tmp_path, name)  # the Trainer loads optimizer.pt with weights_only=True
    resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{STEPS // 2}"))
    assert resumed.state.global_step == STEPS
    for (n, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    assert resumed.optimizer.state_dict()["param_groups"] == whole.optimizer.state_dict()["param_groups"]


def test_the_trainers_own_split_decays_batch_norm_weights(tmp_path):
    """Why README hands the Trainer tvlars's groups: its name patterns miss batch norm."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.LayerNorm(2))
    decayed = trainer(tmp_path, "tvlars").get_decay_parameter_names(net)
    assert "1.weight" in decayed and "4.weight" not in decayed  # batch norm decayed, layer norm not
    undecayed = {n for g in tvlars.param_groups(net, 1e-4) if g["weight_decay"] == 0 for n, p in net.named_parameters()
                 if any(p is q for q in g["params"])}
    assert {"1.weight", "4.weight"} <= undecayed


def one_step(cls, kw, max_norm):
    """A small model after one step of ``cls``, its gradients clipped to ``max_norm`` first (None: not clipped)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    opt = cls(tvlars.param_groups(model, kw.pop("weight_decay")), **kw)
    x = torch.randn(32, 6, dtype=torch.float64)
    nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
    if max_norm is not None:
        factor = max_norm / float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        assert factor < 0.1  # clipping is on
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    return [(p.ndim, w, p.detach() - w) for p, w in zip(model.parameters(), before)]


def test_what_global_clipping_does_to_layer_wise_steps():
    """README's max_grad_norm paragraph, checked in float64 on one step."""
    # LARS without weight decay (and eps=0): adapted layers step the same, clipped or not;
    # the 1-D parameters (adapt=False: plain SGD) step by the clipping factor less
    lars = dict(lr=1.0, momentum=0.9, weight_decay=0.0)
    for (ndim, _, clipped), (_, _, free) in zip(one_step(tvlars.LARS, dict(lars), 0.01), one_step(tvlars.LARS, dict(lars), None)):
        if ndim > 1:
            torch.testing.assert_close(clipped, free, rtol=1e-12, atol=0)
        else:
            assert clipped.norm() < 0.1 * free.norm()
    # with weight decay, clipping shifts adapted layers' direction towards the decay
    lars["weight_decay"] = 0.1
    changed = [(c - f).norm() / f.norm() for (ndim, _, c), (_, _, f)
               in zip(one_step(tvlars.LARS, dict(lars), 0.01), one_step(tvlars.LARS, dict(lars), None)) if ndim > 1]
    assert min(changed) > 1e-3
    # LAMB: every adapted layer moves by lr * ||w||, clipped or not
    for ndim, w, step in one_step(tvlars.LAMB, dict(lr=1e-2, weight_decay=1e-2), 0.01):
        if ndim > 1:
            torch.testing.assert_close(step.norm(), 1e-2 * w.norm(), rtol=1e-12, atol=0)
