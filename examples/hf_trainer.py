"""TVLARS (or LAMB) in the Hugging Face Trainer: a small GPT-2 built from a config (no
download) learns to count; the run is interrupted after 6 steps and resumed from its
checkpoint, and ends where an uninterrupted run ends.

    python examples/hf_trainer.py [--optimizer lamb]   (pip install "tvlars[transformers]"; CPU, seconds)
"""

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import tvlars

RECIPES = {  # the optimizer, and the Trainer's schedule for it
    # phi_t is TVLARS's schedule: the Trainer's must stay constant (its default decays to 0)
    "tvlars": (lambda model: tvlars.TVLARS(tvlars.param_groups(model, weight_decay=1e-4), lr=0.5,
                                           trust_coefficient=0.05, lam=1e-3),
               dict(lr_scheduler_type="constant")),
    "lamb": (lambda model: tvlars.LAMB(tvlars.param_groups(model, weight_decay=1e-2), lr=5e-2),
             dict(lr_scheduler_type="cosine", warmup_steps=3)),
}
# 8 sequences that count up from 0, 3, 6, ... (mod 32): one batch, seen every step
DATA = [{"input_ids": ids, "labels": ids} for ids in (torch.arange(8)[:, None] * 3 + torch.arange(16)) % 32]


def trainer(out: str, optimizer: str, max_steps: int) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0, initializer_range=0.1))
    build, schedule = RECIPES[optimizer]
    args = TrainingArguments(out, max_steps=max_steps, per_device_train_batch_size=8, logging_steps=3, save_steps=6,
                             max_grad_norm=0.0,  # no global clipping: the trust ratios bound every layer's step
                             report_to="none", disable_tqdm=True, seed=0, **schedule)
    return Trainer(model=model, args=args, train_dataset=DATA, optimizers=(build(model), None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=sorted(RECIPES), default="tvlars")
    name = parser.parse_args().optimizer
    with tempfile.TemporaryDirectory() as out:
        whole = trainer(out, name, 12)
        whole.train()
        print("loss every 3 steps:", [round(h["loss"], 3) for h in whole.state.log_history if "loss" in h])
        resumed = trainer(out, name, 12)
        resumed.train(resume_from_checkpoint=f"{out}/checkpoint-6")
        same = all(torch.equal(a, b) for a, b in zip(whole.model.parameters(), resumed.model.parameters()))
        print("resumed from step 6, the weights at step 12 are", "the same" if same else "DIFFERENT")
        # the Trainer's optimizer is accelerate's wrapper around the tvlars one
        print("steps skipped for non-finite gradients:", resumed.optimizer.optimizer.skipped_steps)


if __name__ == "__main__":
    main()
