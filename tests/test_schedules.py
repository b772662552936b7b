"""Learning-rate schedules: values at key steps, per-optimizer-step stepping, state_dict."""

import math
from types import SimpleNamespace

import pytest
import torch

from tvlars.harness.schedules import Schedule, build_schedule, lr_factor


def _lrs(kind, total, warmup, lr=2.0, min_lr=0.0, power=2.0):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = build_schedule(opt, kind, total_steps=total, warmup_steps=warmup, min_lr=min_lr, power=power)
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])  # the lr the next optimizer step uses
        opt.step()
        sched.step()
    return used


def test_warmup_is_linear_from_zero_and_reaches_target_at_T():
    lrs = _lrs("warmup-cosine", total=100, warmup=20, lr=2.0)
    # gamma_t = target * t / T for t = 1..T (the first step is not wasted at lr 0)
    for t in (1, 5, 10, 20):
        assert lrs[t - 1] == pytest.approx(2.0 * t / 20)


def test_cosine_decays_to_the_floor():
    lrs = _lrs("warmup-cosine", total=100, warmup=20, lr=2.0, min_lr=0.2)
    # halfway through the decay: q = 1/2 -> (target + min) / 2
    assert lrs[20 + 40 - 1] == pytest.approx((2.0 + 0.2) / 2)
    assert lrs[-1] == pytest.approx(0.2)  # the last step uses the floor
    decay = lrs[20:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    # gamma_t = target*q + min*(1-q), q = (1+cos(pi*s/S))/2
    s, S = 30, 80
    q = (1 + math.cos(math.pi * s / S)) / 2
    assert lrs[20 + s - 1] == pytest.approx(2.0 * q + 0.2 * (1 - q))


def test_without_warmup_starts_at_target():
    lrs = _lrs("warmup-cosine", total=10, warmup=0, lr=1.0)
    assert lrs[0] == pytest.approx(1.0 * (1 + math.cos(math.pi / 10)) / 2)
    assert lrs[-1] == pytest.approx(0.0)


def test_poly_and_constant():
    lrs = _lrs("poly", total=20, warmup=0, lr=1.0, power=2.0)
    assert lrs[9] == pytest.approx((1 - 10 / 20) ** 2)
    assert lrs[-1] == pytest.approx(0.0)
    lrs = _lrs("poly", total=30, warmup=10, lr=1.0, min_lr=0.1, power=1.0)
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[19] == pytest.approx(0.9 * 0.5 + 0.1)
    lrs = _lrs("constant", total=30, warmup=10, lr=3.0)
    assert lrs[4] == pytest.approx(1.5) and lrs[9:] == [pytest.approx(3.0)] * 21


def test_none_is_no_scheduler_and_unknown_is_an_error():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert build_schedule(opt, "none", total_steps=10, warmup_steps=0) is None
    assert lr_factor(5, kind="none", total_steps=10, warmup_steps=0) == 1.0
    with pytest.raises(ValueError):
        build_schedule(opt, "step", total_steps=10, warmup_steps=0)


def test_state_dict_resumes_exactly():
    def make():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        return opt, build_schedule(opt, "warmup-cosine", total_steps=50, warmup_steps=10, min_lr=0.01)

    opt, sched = make()
    for _ in range(17):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["last_epoch"] == 17
    opt2, sched2 = make()
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    for _ in range(20):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    assert isinstance(Schedule("poly", 10, 0)(3), float)


def test_warmup_epochs_convert_with_steps_per_epoch():
    """The harness converts --warmup-epochs with steps per epoch (optimizer steps, not micro-batches)."""
    from tvlars.harness.optimizers import build_scheduler, scheduler_kwargs

    args = SimpleNamespace(tv_factor=False, schedule="warmup-cosine", warmup_epochs=2.0, final_lr=0.0, power=2.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=4.0)
    sched = build_scheduler(opt, **scheduler_kwargs(args, steps_per_epoch=5, total_steps=50))
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[9] == pytest.approx(4.0)  # warm-up ends after 2 epochs x 5 steps
    assert lrs[0] == pytest.approx(0.4)
    assert lrs[10] < 4.0
