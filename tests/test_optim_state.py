"""``optimizer.state`` holds parameters only, as in torch.optim (issue 8, point 2): the tools
that walk it (timm's optimizer tests, torch.distributed.checkpoint) work, counters resume bit
for bit, and a state_dict saved by tvlars 0.1.0 still loads."""

import copy
import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from test_optim import PATHS, WEIGHT_DECAY, make_data, make_model, train, trained

from tvlars import LAMB, LARS, TVLARS, param_groups

OPTIMIZERS = {"lars": (LARS, dict(lr=0.1, nesterov=True)),
              "tvlars": (TVLARS, dict(lr=0.1, lam=0.2, delay=3, min_factor=0.01)),
              "tvlars-official": (TVLARS, dict(lr=0.1, lam=0.2, variant="official")),
              "lamb": (LAMB, dict(lr=1e-2)),
              "lars-no-momentum": (LARS, dict(lr=0.1, momentum=0.0))}
FIXTURE = Path(__file__).parent / "data" / "optimizer_state_0.1.0.pt"


def skip_one_step(model, opt):
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_keys_are_the_parameters_and_counters_are_per_parameter(name, path):
    cls, kw = OPTIMIZERS[name]
    model = make_model()
    opt = cls(param_groups(model, WEIGHT_DECAY), **kw, **PATHS[path])
    data = make_data(4)
    train(model, opt, data[:3])
    skip_one_step(model, opt)
    params = {id(p): p for p in model.parameters()}
    assert all(isinstance(k, torch.Tensor) and params.get(id(k)) is k for k in opt.state)  # timm/DCP walk
    for p in model.parameters():
        assert opt.state[p]["step"].item() == 3 and opt.state[p]["skipped_steps"].item() == 1
        assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].ndim == 0
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_timm_style_state_dict_round_trip(name):
    """What timm's (and torch's) optimizer tests do: prime, load into an optimizer of cloned
    parameters, step both in lock step, compare the state_dicts; repeated param_groups."""
    cls, kw = OPTIMIZERS[name]
    torch.manual_seed(0)
    weight, bias, x = nn.Parameter(torch.randn(10, 5)), nn.Parameter(torch.randn(10)), torch.randn(5)

    def closure(opt, w, b):
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    def build(w, b):
        return cls([{"params": [w]}, {"params": [b], "lr": kw["lr"] / 2, "weight_decay": 1e-3}], **kw)

    opt = build(weight, bias)
    for _ in range(20):
        opt.step(functools.partial(closure, opt, weight, bias))
    weight_c, bias_c = nn.Parameter(weight.detach().clone()), nn.Parameter(bias.detach().clone())
    opt_c = build(weight_c, bias_c)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(20):
        opt.step(functools.partial(closure, opt, weight, bias))
        opt_c.step(functools.partial(closure, opt_c, weight_c, bias_c))
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    a, b = opt.state_dict(), opt_c.state_dict()
    assert a["param_groups"] == b["param_groups"]
    torch.testing.assert_close(a["state"], b["state"], rtol=0, atol=0)
    opt_c.param_groups.extend(opt_c.param_groups)
    assert opt.state_dict()["param_groups"][-1] == opt_c.state_dict()["param_groups"][-1]
    public = {k for k in opt.__dict__ if not k.startswith("_")}
    assert public == {k for k in copy.deepcopy(opt).__dict__ if not k.startswith("_")}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_distributed_checkpoint_state_dict_round_trip_is_bit_for_bit(name):
    """torch.distributed.checkpoint's get/set_optimizer_state_dict map state to parameter
    names, which needs parameter keys; no process group is needed for a plain module."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    cls, kw = OPTIMIZERS[name]
    data = make_data(12)
    straight = [p.detach().clone() for p in trained(cls, kw, data)[0].parameters()]
    model, opt = trained(cls, kw, data[:6])
    saved = copy.deepcopy((model.state_dict(), get_optimizer_state_dict(model, opt)))
    assert set(saved[1]["state"]) == {name for name, _ in model.named_parameters()}
    model = make_model(seed=3)
    opt = cls(param_groups(model, WEIGHT_DECAY), **kw)
    model.load_state_dict(saved[0])
    set_optimizer_state_dict(model, opt, saved[1])
    train(model, opt, data[6:])
    for a, b in zip(model.parameters(), straight):
        assert torch.equal(a, b)


def test_counters_survive_a_load_into_bfloat16_parameters():
    """torch's loader casts every state tensor but "step" to the parameter's dtype; the
    counters stay float32 so that they count exactly past 256."""
    p = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = LARS([p], lr=0.1)
    p.grad = torch.ones(3, dtype=torch.bfloat16)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["step"] = torch.tensor(1001.0)
    saved["state"][0]["skipped_steps"] = torch.tensor(301.0)
    opt.load_state_dict(saved)
    assert opt.state[p]["step"].dtype == opt.state[p]["skipped_steps"].dtype == torch.float32
    assert opt.state[p]["step"].item() == 1001 and opt.skipped_steps == 301


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_saved_by_0_1_0_loads_and_resumes(name):
    """tests/data/optimizer_state_0.1.0.pt (written by tvlars 0.1.0: tests/data/make_state_0_1_0.py)
    holds each optimizer after 7 steps and 1 skipped step, counters under state["counters"]."""
    cls, kw = OPTIMIZERS[name]
    saved = torch.load(FIXTURE, weights_only=False)[name]
    assert "counters" in saved["optimizer"]["state"]
    data = make_data()

    model, opt = trained(cls, kw, data[:7])
    skip_one_step(model, opt)
    train(model, opt, data[7:])
    straight = [p.detach().clone() for p in model.parameters()]

    model = make_model(seed=4)
    opt = cls(param_groups(model, WEIGHT_DECAY), **kw)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    assert all(isinstance(k, torch.Tensor) for k in opt.state)
    assert all(opt.state[p]["step"].item() == 7 for p in model.parameters())
    assert opt.skipped_steps == 1
    train(model, opt, data[7:])
    for a, b in zip(model.parameters(), straight):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert "counters" not in opt.state_dict()["state"]


def test_optimizer_pickled_by_0_1_0_unpickles_with_per_parameter_counters():
    """An optimizer object pickled by 0.1.0 carries state["counters"]; unpickling spreads it."""
    model = make_model()
    opt = TVLARS(param_groups(model, WEIGHT_DECAY), lr=0.1, lam=0.2)
    train(model, opt, make_data(2))
    state = opt.__getstate__()
    state["state"] = {p: {"momentum_buffer": s["momentum_buffer"]} for p, s in state["state"].items()}
    state["state"]["counters"] = {"step": torch.tensor(2.0), "skipped_steps": torch.tensor(0.0)}
    restored = TVLARS.__new__(TVLARS)
    restored.__setstate__(state)
    assert all(isinstance(k, torch.Tensor) for k in restored.state)
    assert all(restored.state[p]["step"].item() == 2 for p in model.parameters())


@pytest.mark.parametrize("how", ["state_dict", "pickle"])
@pytest.mark.parametrize("name", ["tvlars", "lamb"])
def test_state_saved_with_fused_true_loads_onto_the_default_path(name, how):
    """tvlars up to 0.1.0 took fused=True (a compiled path, since removed): what such an
    optimizer saved loads, runs on the default path and resumes as the straight run would.
    A new fused=True is refused."""
    cls, kw = OPTIMIZERS[name]
    data = make_data(8)
    straight = [p.detach().clone() for p in trained(cls, kw, data)[0].parameters()]
    model, opt = trained(cls, kw, data[:4])
    if how == "state_dict":
        saved = copy.deepcopy(opt.state_dict())
        for group in saved["param_groups"]:
            group["fused"] = True
        opt = cls(param_groups(model, WEIGHT_DECAY), **kw)
        opt.load_state_dict(saved)
    else:  # what unpickling an optimizer object does
        state = opt.__getstate__()
        for group in state["param_groups"]:
            group["fused"] = True
        opt = cls.__new__(cls)
        opt.__setstate__(state)
    assert all(group["fused"] is None for group in opt.param_groups)
    train(model, opt, data[4:])
    for a, b in zip(model.parameters(), straight):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="fused"):
        cls(param_groups(model, WEIGHT_DECAY), **kw, fused=True)
    with pytest.raises(ValueError, match="fused"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "fused": True})
