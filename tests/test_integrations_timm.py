"""tvlars in timm's optimizer registry, on a real timm ViT built from its config (no weights).

timm builds the groups (weight decay, and lr_scale with layer decay); tvlars.integrations.timm
sets adaptation as tvlars.param_groups does. The reference here is built by hand: timm's own
groups, each parameter adapted as tvlars.param_groups adapts it.
"""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2, list_optimizers, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import StepLRScheduler

import tvlars
import tvlars.integrations.timm  # noqa: F401  (registers the names)

WD = 5e-3
OPTIMIZERS = {
    "tvlars": (tvlars.TVLARS, dict(lr=2.0, lam=0.5, delay=1)),
    "tvlars-lars": (tvlars.LARS, dict(lr=2.0, trust_form="separate", eps=1e-8)),
    "tvlars-lamb": (tvlars.LAMB, dict(lr=1e-2, betas=(0.9, 0.99))),
}


def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=64, num_heads=2, num_classes=10)
    return model.double()


def train(model, opt, steps=3):
    gen = torch.Generator().manual_seed(1)
    scheduler = StepLRScheduler(opt, decay_t=1, decay_rate=1.0)  # what train.py's --sched constant builds
    for step in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
        F.cross_entropy(model(x), torch.randint(0, 10, (4,), generator=gen)).backward()
        opt.step()
        opt.zero_grad()
        scheduler.step_update(step + 1)


def by_hand(model, timm_groups):
    adapt = {p: g["adapt"] for g in tvlars.param_groups(model, WD) for p in g["params"]}
    return [{**g, "params": [p], "adapt": adapt[p]} for g in timm_groups for p in g["params"]]


def settings(model, opt):
    """Parameter name -> (weight_decay, adapt, lr, lr_scale) of its group."""
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: (g["weight_decay"], g["adapt"], g["lr"], g.get("lr_scale"))
            for g in opt.param_groups for p in g["params"]}


def test_the_names_are_registered_beside_timms_own():
    assert {"tvlars", "tvlars-lars", "tvlars-lamb"} <= set(list_optimizers())
    assert timm.optim.get_optimizer_class("lars", bind_defaults=False) is timm.optim.Lars
    assert timm.optim.get_optimizer_class("lamb", bind_defaults=False) is timm.optim.Lamb
    assert type(create_optimizer_v2(vit(), "lookahead_tvlars", lr=1.0)).__name__ == "Lookahead"


@pytest.mark.parametrize("layer_decay", [None, 0.75], ids=["weight-decay-groups", "layer-decay"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_create_optimizer_v2_steps_like_the_same_groups_built_by_hand(name, layer_decay):
    cls, kw = OPTIMIZERS[name]
    model = vit()
    ours = copy.deepcopy(model)
    opt = create_optimizer_v2(ours, name, weight_decay=WD, layer_decay=layer_decay, **kw)
    assert type(opt) is cls
    if layer_decay is None:
        groups = param_groups_weight_decay(model, WD, no_weight_decay_list=model.no_weight_decay())
    else:
        groups = param_groups_layer_decay(model, WD, layer_decay=layer_decay, no_weight_decay_list=model.no_weight_decay())
    ref = cls(by_hand(model, groups), **kw)
    assert settings(ours, opt) == settings(model, ref)
    decay, adapt, lr, scale = settings(ours, opt)["pos_embed"]  # timm exempts it from decay: adapted all the same
    assert (decay, adapt) == (0.0, True) and lr == kw["lr"]  # lr_scale is not applied until timm's scheduler runs
    assert settings(ours, opt)["blocks.0.norm1.weight"][:2] == (0.0, False)  # 1-D: as tvlars.param_groups
    train(ours, opt)
    train(model, ref)
    for (n, a), b in zip(ours.named_parameters(), model.parameters()):
        assert torch.equal(a, b), n
    if layer_decay is not None:  # timm's scheduler applied lr_scale: the first block steps at 0.75**2 of the head's lr
        lrs = {n: s[2] for n, s in settings(ours, opt).items()}
        assert lrs["blocks.0.attn.qkv.weight"] == pytest.approx(lrs["head.weight"] * 0.75 ** 2)


def test_the_multi_tensor_path_takes_timms_layer_decay_groups():
    """The two paths agree to the last bit or two in float64 on any groups."""
    model = vit()
    ours = copy.deepcopy(model)
    opt = create_optimizer_v2(ours, "tvlars", lr=2.0, weight_decay=WD, layer_decay=0.75, lam=0.5, foreach=True)
    groups = param_groups_layer_decay(model, WD, layer_decay=0.75, no_weight_decay_list=model.no_weight_decay())
    ref = tvlars.TVLARS(by_hand(model, groups), lr=2.0, lam=0.5, foreach=False)
    train(ours, opt)
    train(model, ref)
    for a, b in zip(ours.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)


def test_groups_that_set_adapt_are_kept():
    model = vit()
    opt = create_optimizer_v2(model, "tvlars-lars", lr=1.0, param_group_fn=lambda m: tvlars.param_groups(
        m, WD, exclude_from_adaptation=False))
    assert all(g["adapt"] for g in opt.param_groups)
