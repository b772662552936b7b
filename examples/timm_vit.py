"""TVLARS through timm's optimizer factory: a small ViT (timm's config, no weights) with
layer-wise lr decay learns noisy class prototypes; prints the loss per epoch and the last
step's trust ratios of a few layers.

    python examples/timm_vit.py          (pip install "tvlars[timm]"; CPU, seconds)
"""

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import StepLRScheduler

import tvlars.integrations.timm  # noqa: F401  registers "tvlars", "tvlars-lars", "tvlars-lamb"

torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=64,
                          num_heads=2, num_classes=10)
# timm builds the groups (weight decay, lr_scale per block); tvlars adapts every tensor but the 1-D ones.
# A trust coefficient 100x the paper's 1e-3: a toy that learns in 20 steps, not thousands
opt = create_optimizer_v2(model, "tvlars", lr=0.5, trust_coefficient=0.1, weight_decay=5e-4,
                          layer_decay=0.75, lam=1e-2, delay=5, stats=True)
# only timm's schedulers apply lr_scale; a constant one applies it and leaves the schedule to phi_t
scheduler = StepLRScheduler(opt, decay_t=1, decay_rate=1.0)

labels = torch.randint(0, 10, (64,))
images = torch.randn(10, 3, 32, 32)[labels] + torch.randn(64, 3, 32, 32)  # a noisy prototype per class
step = 0
for epoch in range(5):
    losses = []
    for x, y in zip(images.split(16), labels.split(16)):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
        scheduler.step_update(step)
        losses.append(loss.item())
    print(f"epoch {epoch}  loss {sum(losses) / len(losses):.3f}")

names = {p: n for n, p in model.named_parameters()}
stats = opt.last_stats()
for p, trust, size in zip(stats.params, stats.trust_ratio, stats.step_size):
    if names[p] in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.1.norm1.weight", "head.weight"):
        print(f"{names[p]:26s} trust {trust:.2e}  step size {size:.2e}")
