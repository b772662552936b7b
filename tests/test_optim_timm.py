"""Parity with timm's Lars and Lamb in the configurations where the two mean the same thing.

timm's Lars uses the separate trust form ||g|| + wd*||w|| + eps and adapts a group only when
its weight decay is non-zero or ``always_adapt``; its Lamb clips the global gradient norm
unless ``max_grad_norm=None`` and adapts under the same rule.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

timm_optim = pytest.importorskip("timm.optim")

from test_optim import STEPS, make_data, make_model  # noqa: E402

from tvlars import LAMB, LARS, param_groups  # noqa: E402

WD = 5e-3


def timm_groups(model, always_adapt):
    """timm expresses "no decay, no adaptation" as weight_decay=0 without always_adapt."""
    if always_adapt:
        return [{"params": list(model.parameters()), "weight_decay": WD}]
    return [{k: v for k, v in g.items() if k != "adapt"} for g in param_groups(model, WD)]


def ours_groups(model, always_adapt):
    if always_adapt:
        return [{"params": list(model.parameters()), "weight_decay": WD, "adapt": True}]
    return param_groups(model, WD)


CASES = {
    "lars": (LARS, dict(lr=0.1, trust_form="separate", eps=1e-8), timm_optim.Lars, dict(lr=0.1, momentum=0.9, eps=1e-8), False),
    "lars-always-adapt": (LARS, dict(lr=0.1, trust_form="separate", eps=1e-8),
                          timm_optim.Lars, dict(lr=0.1, momentum=0.9, eps=1e-8), True),
    "lars-nesterov": (LARS, dict(lr=0.1, trust_form="separate", eps=1e-8, nesterov=True),
                      timm_optim.Lars, dict(lr=0.1, momentum=0.9, eps=1e-8, nesterov=True), False),
    "larc": (LARS, dict(lr=0.1, trust_form="separate", eps=1e-8, trust_clip=True, trust_coefficient=0.05),
             timm_optim.Lars, dict(lr=0.1, momentum=0.9, eps=1e-8, trust_clip=True, trust_coeff=0.05), False),
    "lamb": (LAMB, dict(lr=1e-2), timm_optim.Lamb, dict(lr=1e-2, max_grad_norm=None), False),
    "lamb-always-adapt": (LAMB, dict(lr=1e-2), timm_optim.Lamb, dict(lr=1e-2, max_grad_norm=None), True),
    "lamb-no-bias-correction-clip": (
        LAMB, dict(lr=1e-2, bias_correction=False, trust_clip=True, betas=(0.8, 0.99)),
        timm_optim.Lamb, dict(lr=1e-2, bias_correction=False, trust_clip=True, betas=(0.8, 0.99), max_grad_norm=None),
        False),
}


@pytest.mark.parametrize("foreach", [None, False, True], ids=["default", "single", "foreach"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_timm(case, foreach):
    ours, kw, theirs, timm_kw, always_adapt = CASES[case]
    model = make_model()
    other = copy.deepcopy(model)
    opt = ours(ours_groups(model, always_adapt), **kw, foreach=foreach)
    ref = theirs(timm_groups(other, always_adapt), **timm_kw, always_adapt=always_adapt, foreach=bool(foreach))
    for x, y in make_data(STEPS):
        for m, o in ((model, opt), (other, ref)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
