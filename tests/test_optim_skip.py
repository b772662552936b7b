"""The skip rule, the same on every path (issue 26): a non-finite value in any gradient or any
weight of the step, on any layer, adapted or not, in any group, skips the whole step: weights,
state and ``step`` counters unchanged, ``skipped_steps`` counting it; the run then goes on as
if the step had never been asked for. Poisoned positions are drawn by hypothesis; the cases
the issue found path-dependent are plain tests too."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tvlars import LAMB, LARS, TVLARS, param_groups

PATHS = {"default": dict(), "single": dict(foreach=False), "foreach": dict(foreach=True)}
OPTIMIZERS = {
    "lars": (LARS, dict(lr=0.1)),
    "lars-separate-nesterov": (LARS, dict(lr=0.1, trust_form="separate", nesterov=True, eps=1e-6)),
    "tvlars": (TVLARS, dict(lr=0.1, lam=0.1)),
    "tvlars-official": (TVLARS, dict(lr=0.1, lam=0.1, variant="official")),
    "lamb": (LAMB, dict(lr=1e-2)),
}
NON_FINITE = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


def build(cls, kw, path):
    """A small model whose parameters fill four groups: decayed and adapted (0.weight),
    adapted only (2.weight), decayed only (0.bias) and neither (1.weight, 1.bias, 2.bias)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    groups = param_groups(model, 1e-2, exclude_from_decay=lambda name, p: name.startswith(("1.", "2.")))
    assert len(groups) == 4
    return model, cls(groups, **kw, **PATHS[path])


def backward(model, step):
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def snapshot(model, opt):
    weights = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    return weights, state


def assert_identical(a, b):
    """Bit for bit, NaN included (a poisoned weight keeps its NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def run(name, path, clean_steps, poisons):
    """``clean_steps`` steps, then one with ``poisons`` [(parameter index, "grad"/"weight",
    value, flat position)], then the poisoned weights restored and one clean step. Returns the
    snapshot before and after the poisoned step, the skipped count after it, and the final
    weights."""
    cls, kw = OPTIMIZERS[name]
    model, opt = build(cls, kw, path)
    params = list(model.parameters())
    for step in range(clean_steps):
        backward(model, step)
        opt.step()
    backward(model, clean_steps)
    restore = []
    with torch.no_grad():
        for index, target, value, position in poisons:
            p = params[index]
            tensor = p.grad if target == "grad" else p
            position %= tensor.numel()
            if target == "weight":
                restore.append((p, position, p.view(-1)[position].item()))
            tensor.view(-1)[position] = value
    before = snapshot(model, opt)
    opt.step()
    after = snapshot(model, opt)
    skipped = opt.skipped_steps
    with torch.no_grad():
        for p, position, value in reversed(restore):
            p.view(-1)[position] = value
    backward(model, clean_steps + 1)
    opt.step()
    return before, after, skipped, [p.detach().clone() for p in params], opt


def check(name, clean_steps, poisons):
    results = {path: run(name, path, clean_steps, poisons) for path in PATHS}
    for path, (before, after, skipped, _, opt) in results.items():
        assert skipped == 1, path
        for a, b in zip(before[0], after[0]):
            assert_identical(a, b)
        for a, b in zip(before[1], after[1]):  # the state, step counters included
            for key in b:
                if key == "skipped_steps":
                    assert b[key].item() == 1
                elif key in a:
                    assert_identical(a[key], b[key])
                else:  # state made on a first step that was skipped: its initial value
                    assert not b[key].any(), key
        assert all(s["step"].item() == clean_steps + 1 for s in opt.state.values())  # the control step was taken
    # the paths agree after the skipped step and after the control step (to rounding: the
    # paths round differently), the poison in the same places
    first = results["default"]
    for path, (_, after, _, final, _) in results.items():
        for a, b in zip(first[1][0] + first[3], after[0] + final):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, equal_nan=True)


def check_leaves_no_trace(name, path, clean_steps, poisons):
    """The control: a run that never saw the poisoned step ends where the poisoned run ends."""
    cls, kw = OPTIMIZERS[name]
    model, opt = build(cls, kw, path)
    for step in range(clean_steps):
        backward(model, step)
        opt.step()
    backward(model, clean_steps + 1)
    opt.step()
    poisoned_final = run(name, path, clean_steps, poisons)[3]
    for a, b in zip(poisoned_final, model.parameters()):
        assert_identical(a, b.detach())


PARAMETERS = 6  # 0.weight, 0.bias, 1.weight, 1.bias, 2.weight, 2.bias
poison = st.tuples(st.integers(0, PARAMETERS - 1), st.sampled_from(["grad", "weight"]),
                   st.sampled_from(list(NON_FINITE.values())), st.integers(0, 10**6))


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(list(OPTIMIZERS)), clean_steps=st.integers(0, 2),
       poisons=st.lists(poison, min_size=1, max_size=2))
def test_any_non_finite_gradient_or_weight_skips_the_step_alike_on_every_path(name, clean_steps, poisons):
    check(name, clean_steps, poisons)


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(list(OPTIMIZERS)), path=st.sampled_from(list(PATHS)), clean_steps=st.integers(0, 2),
       poison=poison)
def test_a_skipped_step_leaves_no_trace(name, path, clean_steps, poison):
    check_leaves_no_trace(name, path, clean_steps, [poison])


# The issue's table: before the rule, the CPU default path stepped on these and the device paths skipped.
# (parameter index, what, value): 1.weight is a LayerNorm weight (adapt=False), 0.weight adapted.
TABLE = [("lars", (2, "weight", math.nan)), ("tvlars", (2, "weight", math.nan)),
         ("lamb", (0, "weight", math.inf)), ("lamb", (2, "weight", math.nan))]


@pytest.mark.parametrize("name,poisoned", TABLE, ids=["lars-nan-unadapted-weight", "tvlars-nan-unadapted-weight",
                                                      "lamb-inf-adapted-weight", "lamb-nan-unadapted-weight"])
def test_the_issues_cases_skip_on_every_path(name, poisoned):
    index, target, value = poisoned
    check(name, clean_steps=1, poisons=[(index, target, value, 0)])


def test_a_clean_step_is_taken_on_every_path():
    """The control for the tests above: without poison nothing is skipped."""
    for name in OPTIMIZERS:
        for path in PATHS:
            cls, kw = OPTIMIZERS[name]
            model, opt = build(cls, kw, path)
            backward(model, 0)
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            assert opt.skipped_steps == 0
            assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters())), (name, path)
