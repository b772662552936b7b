"""torch.optim behaviours users rely on, the non-finite policy, telemetry, phi_t and groups."""

import math
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tvlars
from tvlars import LAMB, LARS, TVLARS, LayerStats, TVFactorLR, anneal_factor_args, param_groups, tv_factor

OPTIMIZERS = [(LARS, dict(lr=0.1, weight_decay=1e-2, nesterov=True)),
              (TVLARS, dict(lr=0.1, weight_decay=1e-2, lam=0.1)),
              (TVLARS, dict(lr=0.1, weight_decay=1e-2, variant="official")),
              (LAMB, dict(lr=1e-2, weight_decay=1e-2))]
IDS = ["lars", "tvlars", "tvlars-official", "lamb"]
# dict(): the default path, on the CPU the host-scalar path (torch's fused SGD / AdamW kernels).
EAGER = [dict(), dict(foreach=False), dict(foreach=True)]
EAGER_IDS = ["default", "single", "foreach"]
DEVICE_SIDE = EAGER[1:]  # paths that never read the host, on any device


def model_and_loss(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    x = torch.randn(7, 5, dtype=dtype)
    y = torch.randint(0, 3, (7,))
    return model, lambda: F.cross_entropy(model(x).float(), y)


def backward(loss_fn, model):
    for p in model.parameters():
        p.grad = None
    loss_fn().backward()


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- torch.optim behaviours ---------------------------------------------------------------


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_closure_is_called_and_its_loss_returned(cls, kw):
    model, loss_fn = model_and_loss()
    opt = cls(model.parameters(), **kw)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    before = snapshot(model)
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert not same(before, snapshot(model))


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_step_without_grads_is_a_no_op(cls, kw):
    model, _ = model_and_loss()
    opt = cls(model.parameters(), **kw)
    before = snapshot(model)
    assert opt.step() is None
    assert same(before, snapshot(model)) and len(opt.state) == 0


@pytest.mark.parametrize("path", EAGER, ids=EAGER_IDS)
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_grads_untouched_and_params_without_grad_skipped(cls, kw, path):
    model, loss_fn = model_and_loss()
    frozen = model[3].bias
    opt = cls(param_groups(model, 1e-2), **{**kw, "weight_decay": 0.0}, **path)
    backward(loss_fn, model)
    frozen.grad = None
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    assert frozen not in opt.state
    assert all(len(opt.state[p]) > 0 for p in model.parameters() if p is not frozen and cls is LAMB)


@pytest.mark.parametrize("path", EAGER, ids=EAGER_IDS)
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_zero_lr_leaves_weights_unchanged(cls, kw, path):
    model, loss_fn = model_and_loss()
    opt = cls(param_groups(model, 1e-2), **{**kw, "lr": 0.0}, **path)
    before = snapshot(model)
    for _ in range(3):
        backward(loss_fn, model)
        opt.step()
    assert same(before, snapshot(model))


def test_lr_dropped_to_zero_mid_run_stops_lars_but_not_the_tvlars_look_ahead():
    moved = {}
    for cls, kw in OPTIMIZERS[:2]:
        model, loss_fn = model_and_loss(torch.float64)
        opt = cls(model.parameters(), **kw)
        for _ in range(3):
            backward(loss_fn, model)
            opt.step()
        opt.param_groups[0]["lr"] = 0.0
        before = snapshot(model)
        backward(loss_fn, model)
        opt.step()
        moved[cls] = not same(before, snapshot(model))
    assert moved == {LARS: False, TVLARS: True}  # documented in TVLARS's docstring


@pytest.mark.parametrize("path", EAGER, ids=EAGER_IDS)
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_tensor_lr_matches_float_lr(cls, kw, path):
    results = []
    for lr in (kw["lr"], torch.tensor(kw["lr"])):
        model, loss_fn = model_and_loss(torch.float64)
        opt = cls(param_groups(model, 1e-2), **{**kw, "lr": lr}, **path)
        for _ in range(3):
            backward(loss_fn, model)
            opt.step()
        results.append(snapshot(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # a float32 lr tensor


@pytest.mark.parametrize("path", EAGER, ids=EAGER_IDS)
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_bfloat16_matches_float32_on_the_same_values(cls, kw, path):
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (4, 4, 3, 3)]
    values = [(torch.randn(s, generator=gen).bfloat16(), torch.randn(s, generator=gen).bfloat16()) for s in shapes]
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        params = [nn.Parameter(w.to(dtype)) for w, _ in values]
        opt = cls(params, **{**kw, "lr": 1.0}, **path, stats=True)
        for p, (_, g) in zip(params, values):
            p.grad = g.to(dtype)
        opt.step()
        results.append(([p.detach() for p in params], opt.last_stats()))
    (p32, s32), (p16, s16) = results
    for a, b in zip(p32, p16):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a, rtol=1e-2, atol=1e-2)
    # Norms of bfloat16 layers are accumulated in float32: they match the float32 run.
    torch.testing.assert_close(s16.weight_norm, s32.weight_norm, rtol=1e-6, atol=0)
    torch.testing.assert_close(s16.trust_ratio, s32.trust_ratio, rtol=1e-2, atol=0)


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_sparse_gradients_raise(cls, kw):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters(), **kw)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("cls,kw,name", [
    (LARS, dict(lr=-1.0), "lr"), (LARS, dict(momentum=1.0), "momentum"), (LARS, dict(momentum=-0.1), "momentum"),
    (LARS, dict(weight_decay=-1e-4), "weight_decay"), (LARS, dict(eps=-1.0), "eps"),
    (LARS, dict(trust_form="timm"), "trust_form"), (LARS, dict(trust_coefficient=0.0), "trust_coefficient"),
    (LARS, dict(momentum=0.0, nesterov=True), "nesterov"), (LARS, dict(fused=True), "fused"),
    (LAMB, dict(fused=True), "fused"), (TVLARS, dict(foreach=True, fused=True), "fused"),
    (LAMB, dict(lr=-1e-3), "lr"), (LAMB, dict(betas=(1.0, 0.999)), "betas"), (LAMB, dict(betas=(0.9, -0.1)), "betas"),
    (LAMB, dict(eps=-1e-6), "eps"), (LAMB, dict(weight_decay=-0.1), "weight_decay"),
    (LAMB, dict(max_weight_norm=0.0), "max_weight_norm"), (LAMB, dict(max_weight_norm=-1.0), "max_weight_norm"),
    (TVLARS, dict(lam=-1e-4), "lam"), (TVLARS, dict(variant="authors"), "variant"),
    (TVLARS, dict(delay=-1), "delay"), (TVLARS, dict(alpha=0.0), "alpha"), (TVLARS, dict(min_factor=-0.1), "min_factor"),
    (TVLARS, dict(variant="official", alpha=0.5), "alpha"),
    (TVLARS, dict(momentum=1.5), "momentum"),
    (TVLARS, dict(lr=-0.1), "lr"),
])
def test_invalid_hyper_parameters_name_the_argument(cls, kw, name):
    with pytest.raises(ValueError, match=name):
        cls([nn.Parameter(torch.ones(2))], **kw)


def test_invalid_group_values_are_rejected_too():
    with pytest.raises(ValueError, match="momentum"):
        LARS([{"params": [nn.Parameter(torch.ones(2))], "momentum": 2.0}])
    with pytest.raises(ValueError, match="lam"):
        TVLARS([{"params": [nn.Parameter(torch.ones(2))], "lam": -1.0}])


@pytest.mark.parametrize("path", EAGER, ids=EAGER_IDS)
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_zero_weight_or_grad_norm_gives_trust_one(cls, kw, path):
    zero_w = nn.Parameter(torch.zeros(3, 2))
    zero_g = nn.Parameter(torch.ones(3, 2))
    opt = cls([zero_w, zero_g], **{**kw, "weight_decay": 0.0}, **path, stats=True)
    zero_w.grad = torch.ones(3, 2)
    zero_g.grad = torch.zeros(3, 2)
    opt.step()
    stats = opt.last_stats()
    assert stats.trust_ratio.tolist() == [1.0, 1.0]
    assert torch.isfinite(zero_w).all() and torch.isfinite(zero_g).all()
    assert torch.equal(zero_g.detach(), torch.ones(3, 2))
    assert (zero_w != 0).all()


# -- non-finite gradients -----------------------------------------------------------------


@pytest.mark.parametrize("path", EAGER, ids=EAGER_IDS)
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_non_finite_grads_skip_the_whole_step(cls, kw, path):
    """A bad step changes nothing and counts; the run then continues as if it never happened."""
    runs = []
    for inject in (False, True):
        model, loss_fn = model_and_loss(torch.float64)
        opt = cls(param_groups(model, 1e-2), **kw, **path)
        for step in range(4):
            backward(loss_fn, model)
            opt.step()
            if inject and step == 1:
                state = {(p, k): v.clone() for p in model.parameters() for k, v in opt.state[p].items()}
                before = snapshot(model)
                backward(loss_fn, model)
                model[0].weight.grad[0, 0] = float("nan")
                model[3].bias.grad[1] = float("inf")
                opt.step()
                assert same(before, snapshot(model))
                after = {(p, k): v for p in model.parameters() for k, v in opt.state[p].items()}
                assert all(torch.equal(state[k], after[k]) for k in state if k[1] != "skipped_steps")
                assert all(opt.state[p]["step"].item() == 2 for p in model.parameters())
                assert opt.skipped_steps == 1
                assert all(opt.state[p]["skipped_steps"].item() == 1 for p in model.parameters())
        runs.append(snapshot(model))
    assert same(*runs)


@pytest.mark.parametrize("path", EAGER, ids=EAGER_IDS)
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_large_finite_float16_grads_are_not_skipped(cls, kw, path):
    """The finiteness check measures norms in float32: a float16 gradient whose norm exceeds
    float16's range (65504) is still finite and must be stepped on."""
    w = torch.full((100_000,), 0.5, dtype=torch.float16, requires_grad=True)
    w.grad = torch.full_like(w, 300.0)  # every element finite; ||g|| ~ 9.5e4
    opt = cls([w], **{**kw, "lr": 100.0}, **path)  # a step large enough to show in float16
    before = w.detach().clone()
    opt.step()
    assert opt.skipped_steps == 0
    assert not torch.equal(before, w.detach())
    assert torch.isfinite(w).all()


def test_grad_scaler_skips_inf_steps_and_reduces_the_scale():
    model, loss_fn = model_and_loss()
    opt = LARS(param_groups(model, 1e-2), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10)
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(loss_fn()).backward()
        scaler.step(opt)
        scaler.update()
    before, scale = snapshot(model), scaler.get_scale()
    opt.zero_grad()
    scaler.scale(loss_fn()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert same(before, snapshot(model))
    assert scaler.get_scale() == scale / 2
    assert all(s["step"].item() == 2 for s in opt.state.values())


# -- telemetry ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", EAGER, ids=EAGER_IDS)
def test_stats_equal_the_reference_norms_and_trust(path):
    model, loss_fn = model_and_loss(torch.float64)
    wd, lr, eta = 1e-2, 0.3, 2e-3
    opt = TVLARS(param_groups(model, wd), lr=lr, trust_coefficient=eta, lam=0.1, **path)
    assert opt.last_stats() is None
    backward(loss_fn, model)
    opt.step()
    assert opt.last_stats() is None  # stats off: nothing recorded
    opt.stats = True
    backward(loss_fn, model)
    weights = {p: p.detach().clone() for p in model.parameters()}
    opt.step()
    stats = opt.last_stats()
    assert isinstance(stats, LayerStats)
    assert [id(p) for p in stats.params] == [id(p) for g in opt.param_groups for p in g["params"]]
    phi = tv_factor(1, 0.1)
    decay = {p: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    adapt = {p: g["adapt"] for g in opt.param_groups for p in g["params"]}
    for i, p in enumerate(stats.params):
        w, d = weights[p], p.grad + decay[p] * weights[p]
        trust = eta * w.norm() / d.norm() if adapt[p] else 1.0
        expected = [w.norm(), d.norm(), trust, lr * phi * trust]
        got = [stats.weight_norm[i], stats.grad_norm[i], stats.trust_ratio[i], stats.step_size[i]]
        for e, g in zip(expected, got):
            assert g.item() == pytest.approx(float(e), rel=1e-12)
    for field in (stats.weight_norm, stats.grad_norm, stats.trust_ratio, stats.step_size):
        assert field.dtype == torch.float64 and field.device.type == "cpu" and field.ndim == 1


@pytest.mark.parametrize("path", DEVICE_SIDE, ids=["single", "foreach"])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_no_host_reads_in_step_and_one_transfer_in_last_stats(cls, kw, path):
    model, loss_fn = model_and_loss()
    opt = cls(param_groups(model, 1e-2), **kw, **path, stats=True)
    for _ in range(2):  # state made: the steps after the first
        backward(loss_fn, model)
        opt.step()
    backward(loss_fn, model)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read inside step()")

    with mock.patch.object(torch.Tensor, "item", forbidden), \
            mock.patch.object(torch.Tensor, "tolist", forbidden), \
            mock.patch.object(torch.Tensor, "__bool__", forbidden), \
            mock.patch.object(torch.Tensor, "__float__", forbidden), \
            mock.patch.object(torch.Tensor, "cpu", forbidden):
        opt.step()
    real_cpu = torch.Tensor.cpu
    calls = []

    def counting_cpu(self, *args, **kwargs):
        calls.append(1)
        return real_cpu(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "cpu", counting_cpu):
        stats = opt.last_stats()
    assert len(calls) == 1 and len(stats.params) == len(list(model.parameters()))


def test_stats_flag_survives_pickle_and_deepcopy():
    import copy
    import pickle

    model, _ = model_and_loss()
    opt = LARS(model.parameters(), stats=True)
    assert copy.deepcopy(opt).stats and pickle.loads(pickle.dumps(opt)).stats


# -- phi_t and TVFactorLR -----------------------------------------------------------------


def test_tv_factor_values_and_eq5_bounds():
    assert tv_factor(0, 1e-4) == 0.5
    assert tv_factor(100, 1e-2) == pytest.approx(1 / (1 + math.e))
    assert tv_factor(10, 0.1, delay=10, alpha=0.5, min_factor=0.2) == pytest.approx(1 / 1.5 + 0.2)
    assert tv_factor(10**9, 1e-2, min_factor=0.05) == 0.05
    for lam, delay, alpha, floor in [(1e-4, 0, 1.0, 0.0), (1e-2, 50, 1.0, 0.01), (1e-3, 10, 0.5, 0.1)]:
        values = [tv_factor(t, lam, delay, alpha, floor) for t in range(0, 5000, 7)]
        upper = 1 / (alpha + math.exp(-lam * delay)) + floor
        assert all(floor <= v <= upper + 1e-15 for v in values)
        assert values[0] == pytest.approx(upper)
        assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] < values[0]


def test_official_variant_factor_starts_near_0_91():
    # t counted from 1 and alpha = 0.1: the authors' phi.
    model, loss_fn = model_and_loss(torch.float64)
    opt = TVLARS(model.parameters(), lr=1.0, lam=1e-4, variant="official", stats=True)
    assert opt.param_groups[0]["alpha"] == 0.1
    backward(loss_fn, model)
    opt.step()
    stats = opt.last_stats()
    phi = 1 / (0.1 + math.exp(1e-4))
    p, w = stats.params[0], stats.weight_norm[0].item()
    d = (p.grad + 0.0).norm().item()
    assert stats.trust_ratio[0].item() == pytest.approx(1e-3 * phi * w / d, rel=1e-5)


def test_tv_factor_lr_scales_any_optimizer():
    p = nn.Parameter(torch.ones(2))
    for opt in (torch.optim.SGD([p], lr=0.5), LAMB([p], lr=0.5)):
        sched = TVFactorLR(opt, lam=0.1, delay=3, alpha=1.0, min_factor=0.01)
        seen = [opt.param_groups[0]["lr"]]
        for _ in range(10):
            p.grad = torch.ones(2)
            opt.step()
            sched.step()
            seen.append(opt.param_groups[0]["lr"])
        assert seen == pytest.approx([0.5 * tv_factor(t, 0.1, 3, 1.0, 0.01) for t in range(11)], rel=1e-12)
        state = sched.state_dict()
        again = TVFactorLR(opt, lam=0.1, delay=3, min_factor=0.01)
        again.load_state_dict(state)
        assert again.last_epoch == 10


@pytest.mark.parametrize("total_steps", [1, 150, 5850])
def test_anneal_factor_falls_from_0_99_to_0_01_over_the_run(total_steps):
    args = anneal_factor_args(total_steps)
    assert args["delay"] == total_steps / 2
    phi = [tv_factor(t, **args) for t in range(total_steps + 1)]
    assert (phi[0], phi[-1]) == (pytest.approx(0.99, rel=1e-12), pytest.approx(0.01, rel=1e-12))
    assert tv_factor(total_steps / 2, **args) == pytest.approx(0.5, rel=1e-12)
    assert all(a > b for a, b in zip(phi, phi[1:]))


def test_total_steps_derives_lam_and_delay_and_refuses_them_besides():
    p = nn.Parameter(torch.ones(2))
    opt = TVLARS([p], lr=1.0, total_steps=300)
    assert (opt.defaults["lam"], opt.defaults["delay"]) == (anneal_factor_args(300)["lam"], 150.0)
    assert (TVLARS([p]).defaults["lam"], TVLARS([p]).defaults["delay"]) == (1e-4, 0)  # the paper's
    sched = TVFactorLR(torch.optim.SGD([p], lr=0.5), total_steps=300)
    assert (sched.lam, sched.delay) == (opt.defaults["lam"], 150.0)
    for bad in (dict(lam=1e-3), dict(delay=10)):
        with pytest.raises(ValueError, match="total_steps"):
            TVLARS([p], total_steps=300, **bad)
    with pytest.raises(ValueError, match="total_steps"):
        TVLARS([p], total_steps=300, variant="official")
    with pytest.raises(ValueError, match="total_steps"):
        TVLARS([p], total_steps=0)


def test_tv_factor_lr_rejects_bad_arguments():
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError, match="lam"):
        TVFactorLR(opt, lam=-1.0)


# -- param_groups -------------------------------------------------------------------------


def test_param_groups_exclusions_are_separate_switches():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    matrices = {id(model[0].weight), id(model[2].weight)}

    def ids(group):
        return {id(p) for p in group["params"]}

    groups = param_groups(model, 0.1)
    assert [(g["weight_decay"], g["adapt"]) for g in groups] == [(0.1, True), (0.0, False)]
    assert ids(groups[0]) == matrices

    groups = param_groups(model, 0.1, exclude_from_adaptation=False, lr=0.5)
    assert [(g["weight_decay"], g["adapt"], g["lr"]) for g in groups] == [(0.1, True, 0.5), (0.0, True, 0.5)]

    groups = param_groups(model, 0.1, exclude_from_decay=False)
    assert [(g["weight_decay"], g["adapt"]) for g in groups] == [(0.1, True), (0.1, False)]

    only_bn = param_groups(model, 0.1, exclude_from_decay=lambda name, p: name.startswith("1."),
                           exclude_from_adaptation=False)
    assert ids(only_bn[1]) == {id(model[1].weight), id(model[1].bias)}

    model[0].bias.requires_grad_(False)
    assert sum(len(g["params"]) for g in param_groups(model, 0.1)) == 5


def test_param_groups_work_with_every_optimizer_and_public_exports():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    for cls in (LARS, LAMB, TVLARS):
        opt = cls(param_groups(model, 1e-3))
        assert [g["adapt"] for g in opt.param_groups] == [True, False]
    assert set(tvlars.__all__) >= {"LARS", "LAMB", "TVLARS", "tv_factor", "TVFactorLR", "param_groups", "LayerStats"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LARS(model.parameters())


# -- the host-scalar CPU path (the default on the CPU) ------------------------------------


def _counting(name, calls):
    real = getattr(torch, name)

    def wrapper(*args, **kwargs):
        calls.append(len(args[0]))  # the tensors it updates
        return real(*args, **kwargs)

    return mock.patch.object(torch, name, wrapper)


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_default_cpu_path_updates_with_torch_fused_kernels(cls, kw):
    """Every parameter through torch's kernels: LARS and TVLARS one fused SGD call per layer;
    LAMB one fused AdamW call per group (the moments; for adapted layers also the direction,
    which one add per layer then steps by)."""
    for path, used in ((dict(), 1), (dict(foreach=False), 0)):
        model, loss_fn = model_and_loss()
        opt = cls(param_groups(model, 1e-2), **kw, **path)
        backward(loss_fn, model)
        sgd, adamw = [], []
        with _counting("_fused_sgd_", sgd), _counting("_fused_adamw_", adamw):
            opt.step()
        adapted, rest = [len(g["params"]) for g in opt.param_groups]
        if cls is LAMB:
            assert (sum(adamw), len(adamw)) == (used * (adapted + rest), used * 2)
            assert sgd == []
        else:
            assert (sum(sgd), len(sgd)) == (used * (adapted + rest), used * (adapted + rest))
            assert adamw == []


def test_path_is_chosen_in_one_place_and_the_host_path_is_cpu_default_only():
    from types import SimpleNamespace

    from tvlars.optim._base import LayerwiseOptimizer

    path = LayerwiseOptimizer._path
    default = dict(foreach=None, fused=None)  # torch's keys; fused=True is refused
    cpu, meta = [torch.zeros(2)], [torch.zeros(2, device="meta")]
    cuda = [SimpleNamespace(is_cuda=True)]
    assert path(default, cpu, on_host=True) == "host"
    assert path(default, cpu, on_host=False) == "single"  # another group is on an accelerator
    assert path(default, meta, on_host=False) == "single"  # any accelerator: no host reads
    assert path(default, cuda, on_host=False) == "multi"
    assert path(dict(foreach=False, fused=None), cpu, on_host=True) == "single"
    assert path(dict(foreach=True, fused=None), cpu, on_host=True) == "multi"
    assert path(dict(foreach=None, fused=False), cpu, on_host=True) == "host"


def test_coupled_norm_falls_back_to_the_exact_norm_when_the_expansion_cancels():
    from tvlars.optim._host import _plus_decay_norm

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1000, generator=gen, dtype=torch.float64)
    wd = 1e-2
    for g in (torch.randn(1000, generator=gen, dtype=torch.float64),  # no cancellation
              -wd * w + 1e-9 * torch.randn(1000, generator=gen, dtype=torch.float64)):  # g ~ -wd*w
        exact = torch.linalg.vector_norm(g + wd * w).item()
        got = _plus_decay_norm(g, w, g.norm().item(), w.norm().item(), wd)
        assert got == pytest.approx(exact, rel=1e-12)


def _mixed_layout_model():
    """A channels_last conv (not contiguous), float64, and plain layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    model[0].weight.data = model[0].weight.data.contiguous(memory_format=torch.channels_last)
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    return model, lambda: F.cross_entropy(model(x), y)


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_default_path_handles_non_contiguous_layers_like_the_single_path(cls, kw):
    results = []
    for path in (dict(), dict(foreach=False)):
        model, loss_fn = _mixed_layout_model()
        opt = cls(param_groups(model, 1e-2), **kw, **path, stats=True)
        for _ in range(3):
            backward(loss_fn, model)
            opt.step()
        results.append((snapshot(model), opt.last_stats()))
    (a, sa), (b, sb) = results
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)
    for x, y in zip(sa[1:5], sb[1:5]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0)


def large_model_and_loss(dtype=torch.float64):
    """Layers of 76,800 and 3 x 256 elements: several chunks of the host path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 256), nn.Tanh(), nn.Linear(256, 3)).to(dtype)
    x = torch.randn(9, 300, dtype=dtype)
    y = torch.randint(0, 3, (9,))
    return model, lambda: F.cross_entropy(model(x), y)


@pytest.mark.parametrize("path", EAGER, ids=EAGER_IDS)
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_no_path_compiles_anything(cls, kw, path, monkeypatch):
    """Every path runs eagerly (fusing is torch.compile's over the user's training step), so
    a first step costs what the others cost and needs no C++ toolchain."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called inside the optimizer")

    monkeypatch.setattr(torch, "compile", refuse)
    model, loss_fn = large_model_and_loss()
    opt = cls(param_groups(model, 1e-2), **kw, **path)
    for _ in range(2):
        backward(loss_fn, model)
        opt.step()
    assert all(s["step"].item() == 2 for s in opt.state.values())


# -- telemetry rows: names and order ------------------------------------------------------

# torch.optim.Optimizer takes (name, tensor) pairs from 2.6 on; tvlars.param_groups' names work on every torch.
TORCH_TAKES_NAMES = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 6)


@pytest.mark.parametrize("path", EAGER, ids=EAGER_IDS)
def test_last_stats_names_each_row_and_prints_no_weights(path):
    """param_groups(model) and named_parameters() name the rows (torch's "param_names"); the
    rows come in group order (weights before biases), not in model.named_parameters() order;
    plain parameters leave the names None; .params prints shapes, not values."""
    model, loss_fn = model_and_loss(torch.float64)
    by_name = dict(model.named_parameters())
    inputs = [(param_groups(model, 1e-2), True), (model.parameters(), False)]
    if TORCH_TAKES_NAMES:
        inputs.append((model.named_parameters(), True))
    for params, named in inputs:
        opt = LARS(params, lr=0.1, stats=True, **path)
        backward(loss_fn, model)
        opt.step()
        stats = opt.last_stats()
        assert [id(p) for p in stats.params] == [id(p) for g in opt.param_groups for p in g["params"]]
        if named:
            assert all(by_name[name] is p for name, p in zip(stats.names, stats.params))
        else:
            assert stats.names == [None] * len(stats.params)
        assert "tensor(" not in repr(stats.params) and "(6, 5)" in repr(stats.params)
        assert "[-" not in repr(stats).split("weight_norm")[0]  # no weight values before the norms
    groups = param_groups(model, 1e-2)
    stats = LARS(groups, lr=0.1, stats=True, **path)
    backward(loss_fn, model)
    stats.step()
    names = stats.last_stats().names
    assert names == ["0.weight", "3.weight", "0.bias", "1.weight", "1.bias", "3.bias"]
    assert names != list(by_name)  # why zipping rows with model.named_parameters() mislabels them


@pytest.mark.skipif(not TORCH_TAKES_NAMES, reason="torch >= 2.6 takes named_parameters() in an optimizer")
def test_named_and_unnamed_groups_mix():
    """torch >= 2.6 refuses groups with and without names in one optimizer; tvlars names the
    unnamed ones None, so param_groups(model) plus a group of one's own still works."""
    model, loss_fn = model_and_loss(torch.float64)
    head = nn.Linear(3, 2).double()
    for build in (lambda: LARS(param_groups(model, 1e-2) + [{"params": head.parameters(), "lr": 0.2}], stats=True),
                  lambda: LARS([{"params": head.parameters(), "lr": 0.2}] + param_groups(model, 1e-2), stats=True)):
        opt = build()
        loss = loss_fn() + head(torch.ones(1, 3, dtype=torch.float64)).sum()
        for p in list(model.parameters()) + list(head.parameters()):
            p.grad = None
        loss.backward()
        opt.step()
        names = dict(zip((id(p) for p in opt.last_stats().params), opt.last_stats().names))
        assert names[id(head.weight)] is None and names[id(model[0].weight)] == "0.weight"
        opt.load_state_dict(opt.state_dict())
    opt = LARS(model.parameters())
    opt.add_param_group({"params": head.named_parameters(), "lr": 0.2})
    assert opt.param_groups[0]["param_names"] == [None, None, None, None, None, None]
    assert opt.param_groups[1]["param_names"] == ["weight", "bias"]
