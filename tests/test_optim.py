"""LARS, LAMB and TVLARS against plain float64 per-parameter implementations of their
equations (docs/paper.md section 1), on every execution path, plus resume/copy/pickle."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tvlars import LAMB, LARS, TVLARS, anneal_factor_args, param_groups, tv_factor

STEPS = 20
PATHS = {"default": dict(), "single": dict(foreach=False), "foreach": dict(foreach=True)}


class Net(nn.Module):
    """Conv and linear layers with biases and a norm layer: 2-D/4-D and 1-D parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.norm = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        # ReLU before the norm: a bias straight before BatchNorm has a zero gradient, pure
        # rounding noise that LAMB would normalise into O(1) steps.
        return self.fc(self.norm(F.relu(self.conv(x))).flatten(1))


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Net().to(dtype)


def make_data(steps=STEPS, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 6, 6, generator=gen).to(dtype), torch.randint(0, 4, (8,), generator=gen))
            for _ in range(steps)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def trained(cls, kw, data):
    """A fresh model and optimizer (``cls(param_groups, **kw)``) after training on ``data``."""
    model = make_model()
    opt = cls(param_groups(model, WEIGHT_DECAY), **kw)
    train(model, opt, data)
    return model, opt


# ---------------------------------------------------------------------------------------
# Reference implementations: the equations, one parameter at a time, Python floats.
# ---------------------------------------------------------------------------------------


class Ref:
    """Hyper-parameters per group: the group's own value, else the constructor's (``hp``),
    with the optimizers' names (``trust_coefficient``, ``betas``, ...). As torch.optim: a
    parameter without a gradient is not stepped, and each parameter counts its own steps
    (``st["t"]``, what TVLARS's phi_t reads); the skip rule: a step where any gradient or any
    weight of a parameter with a gradient is not finite changes nothing."""

    def __init__(self, groups, **hp):
        self.groups, self.hp, self.state = groups, hp, {}

    def zero_grad(self):
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self):
        stepped = [p for g in self.groups for p in g["params"] if p.grad is not None]
        if not all(bool(p.grad.isfinite().all() and p.isfinite().all()) for p in stepped):
            return
        for group in self.groups:
            h = {**self.hp, **{k: v for k, v in group.items() if k != "params"}}
            for p in group["params"]:
                if p.grad is not None:
                    st = self.state.setdefault(p, {"t": 0})
                    self.update(p, p.grad, h, st)
                    st["t"] += 1


def ratio(wn, un, coeff, denominator):
    return 1.0 if wn == 0 or un == 0 else coeff * wn / denominator


class RefLARS(Ref):
    def update(self, p, g, h, st):
        lr, mu, wd, eta = h["lr"], h.get("momentum", 0.9), h["weight_decay"], h.get("trust_coefficient", 1e-3)
        d = g + wd * p
        wn = p.norm().item()
        if h.get("trust_form", "coupled") == "separate":
            gn = g.norm().item()
            trust = ratio(wn, gn, eta, gn + wd * wn + h.get("eps", 0.0))
        else:
            dn = d.norm().item()
            trust = ratio(wn, dn, eta, dn + h.get("eps", 0.0))
        if not h.get("adapt", True):
            trust = 1.0
        if h.get("trust_clip"):
            trust = min(trust / lr, 1.0)
        buf = st.get("buf", torch.zeros_like(p)) * mu + trust * d
        st["buf"] = buf
        p -= lr * (trust * d + mu * buf if h.get("nesterov") else buf)


class RefTVLARS(Ref):
    """Algorithm 1 literally (keeps m, starts it at w_0); a group with variant="official"
    follows the authors' opt/tvlars.py as docs/paper.md lists it."""

    def update(self, p, g, h, st):
        if h.get("variant", "paper") == "official":
            return self.official(p, g, h, st)
        phi = tv_factor(st["t"], h["lam"], h.get("delay", 0), h.get("alpha", 1.0), h.get("min_factor", 0.0))
        wd, eta = h["weight_decay"], h.get("trust_coefficient", 1e-3)
        d = g + wd * p
        wn, dn = p.norm().item(), d.norm().item()
        trust = ratio(wn, dn, eta, dn) if h.get("adapt", True) else 1.0
        gamma = h["lr"] * phi * trust
        m = st.get("m", p.clone())
        m_new = p - gamma * d
        p.copy_(m_new + h.get("momentum", 0.9) * (m_new - m))
        st["m"] = m_new

    def official(self, p, g, h, st):
        # their classification script's gate: plain LARS for the first `delay` steps, then
        # phi of the global step count (not shifted by the delay)
        phi = 1.0 / (0.1 + math.exp(h["lam"] * (st["t"] + 1))) if st["t"] >= h.get("delay", 0) else 1.0
        wd, eta = h["weight_decay"], h.get("trust_coefficient", 1e-3)
        d = g + wd * p
        wn, dn = min(p.norm().item(), 10.0), min(d.norm().item(), 10.0)
        q = eta * phi * wn / dn if h.get("adapt", True) and wn > 0 and dn > 0 else 1.0
        buf = st.get("buf", torch.zeros_like(p)) * h.get("momentum", 0.9) + q * d
        st["buf"] = buf
        p -= h["lr"] * buf


class RefTVLARSOfficial(RefTVLARS):
    def update(self, p, g, h, st):
        return self.official(p, g, h, st)


class RefLAMB(Ref):
    def update(self, p, g, h, st):
        b1, b2 = h.get("betas", (0.9, 0.999))
        wd = h["weight_decay"]
        t = st["t"] + 1
        m = st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
        v = st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        bc1, bc2 = (1 - b1**t, 1 - b2**t) if h.get("bias_correction", True) else (1.0, 1.0)
        u = (m / bc1) / (v.sqrt() / math.sqrt(bc2) + h.get("eps", 1e-6)) + wd * p
        wn, un = p.norm().item(), u.norm().item()
        if h.get("max_weight_norm") is not None:  # the LAMB authors' cap on ||w||
            wn = min(wn, h["max_weight_norm"])
        trust = ratio(wn, un, 1.0, un) if h.get("adapt", True) else 1.0
        if h.get("trust_clip"):
            trust = min(trust, 1.0)
        p -= h["lr"] * trust * u


# (ours, reference, optimizer kwargs, reference kwargs, param_groups kwargs)
CASES = {
    "lars": (LARS, RefLARS, dict(lr=0.1), dict(lr=0.1, trust_coefficient=1e-3), {}),
    "lars-separate-eps": (LARS, RefLARS, dict(lr=0.1, trust_form="separate", eps=1e-3),
                          dict(lr=0.1, trust_coefficient=1e-3, trust_form="separate", eps=1e-3), {}),
    "lars-nesterov": (LARS, RefLARS, dict(lr=0.1, nesterov=True), dict(lr=0.1, trust_coefficient=1e-3, nesterov=True), {}),
    "lars-clip": (LARS, RefLARS, dict(lr=0.1, trust_clip=True, trust_coefficient=0.05),
                  dict(lr=0.1, trust_coefficient=0.05, trust_clip=True), {}),
    "lars-no-momentum": (LARS, RefLARS, dict(lr=0.1, momentum=0.0), dict(lr=0.1, trust_coefficient=1e-3, momentum=0.0), {}),
    "lars-adapt-all": (LARS, RefLARS, dict(lr=0.5), dict(lr=0.5, trust_coefficient=1e-3),
                       dict(exclude_from_decay=False, exclude_from_adaptation=False)),
    "lars-decay-only-excluded": (LARS, RefLARS, dict(lr=0.5), dict(lr=0.5, trust_coefficient=1e-3),
                                 dict(exclude_from_adaptation=False)),
    "tvlars": (TVLARS, RefTVLARS, dict(lr=0.1, lam=0.05), dict(lr=0.1, trust_coefficient=1e-3, lam=0.05, momentum=0.9), {}),
    "tvlars-delay-alpha-floor": (
        TVLARS, RefTVLARS, dict(lr=0.1, lam=0.2, delay=5, alpha=0.5, min_factor=0.1),
        dict(lr=0.1, trust_coefficient=1e-3, lam=0.2, delay=5, alpha=0.5, min_factor=0.1, momentum=0.9), {}),
    "tvlars-adapt-all": (TVLARS, RefTVLARS, dict(lr=1.0, lam=0.05, momentum=0.5),
                         dict(lr=1.0, trust_coefficient=1e-3, lam=0.05, momentum=0.5),
                         dict(exclude_from_decay=False, exclude_from_adaptation=False)),
    # TVLARS-anneal: lam and delay from the run's length (phi_t from 0.99 to 0.01 over STEPS)
    "tvlars-anneal": (TVLARS, RefTVLARS, dict(lr=0.1, total_steps=STEPS),
                      dict(lr=0.1, trust_coefficient=1e-3, momentum=0.9, **anneal_factor_args(STEPS)), {}),
    "tvlars-official": (TVLARS, RefTVLARSOfficial, dict(lr=0.1, lam=0.05, variant="official"),
                        dict(lr=0.1, trust_coefficient=1e-3, lam=0.05, momentum=0.9), {}),
    "tvlars-official-delay": (TVLARS, RefTVLARSOfficial, dict(lr=0.1, lam=0.05, delay=7, variant="official"),
                              dict(lr=0.1, trust_coefficient=1e-3, lam=0.05, delay=7, momentum=0.9), {}),
    "lamb": (LAMB, RefLAMB, dict(lr=1e-2), dict(lr=1e-2), {}),
    # the authors' LAMB: ||w|| capped (low enough here that the cap binds), no bias
    # correction, every parameter adapted and decayed
    "lamb-authors": (LAMB, RefLAMB, dict(lr=1e-2, max_weight_norm=0.5, bias_correction=False),
                     dict(lr=1e-2, max_weight_norm=0.5, bias_correction=False),
                     dict(exclude_from_decay=False, exclude_from_adaptation=False)),
    "lamb-no-bias-correction": (LAMB, RefLAMB, dict(lr=1e-2, bias_correction=False, eps=1e-4),
                                dict(lr=1e-2, bias_correction=False, eps=1e-4), {}),
    "lamb-clip-betas": (LAMB, RefLAMB, dict(lr=1e-2, trust_clip=True, betas=(0.8, 0.99)),
                        dict(lr=1e-2, trust_clip=True, betas=(0.8, 0.99)),
                        dict(exclude_from_adaptation=False)),
    "lamb-adapt-all": (LAMB, RefLAMB, dict(lr=1e-2), dict(lr=1e-2),
                       dict(exclude_from_decay=False, exclude_from_adaptation=False)),
    # the cap (0.5) binds on the conv and fc weights (norms about 1 and 2) and not on the rest
    "lamb-max-weight-norm": (LAMB, RefLAMB, dict(lr=1e-2, max_weight_norm=0.5), dict(lr=1e-2, max_weight_norm=0.5),
                             dict(exclude_from_adaptation=False)),
}
WEIGHT_DECAY = 5e-3


@pytest.mark.parametrize("case,path", [(c, p) for c in CASES for p in PATHS])
def test_matches_reference(case, path):
    cls, ref_cls, kw, ref_kw, group_kw = CASES[case]
    model = make_model()
    ref_model = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    opt = cls(param_groups(model, WEIGHT_DECAY, **group_kw), **kw, **PATHS[path])
    ref = ref_cls(param_groups(ref_model, WEIGHT_DECAY, **group_kw), **ref_kw)
    data = make_data()
    train(model, opt, data)
    train(ref_model, ref, data)
    moved = 0.0
    for p, q, p0 in zip(model.parameters(), ref_model.parameters(), start):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-14)
        moved = max(moved, ((p - p0).norm() / p0.norm().clamp(min=1e-3)).item())
    assert moved > 1e-4  # the run is not trivially static


@pytest.mark.parametrize("case", ["lars-nesterov", "tvlars", "tvlars-official", "lamb", "lamb-max-weight-norm"])
def test_default_path_on_large_layers_matches_reference(case):
    """Layers of 65,536 elements or more, on the default path (torch's fused kernels on the CPU)."""
    cls, ref_cls, kw, ref_kw, group_kw = CASES[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 256), nn.Tanh(), nn.Linear(256, 4)).double()
    assert model[0].weight.numel() >= 1 << 16
    ref_model = copy.deepcopy(model)
    opt = cls(param_groups(model, WEIGHT_DECAY, **group_kw), **kw)
    ref = ref_cls(param_groups(ref_model, WEIGHT_DECAY, **group_kw), **ref_kw)
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 300, generator=gen, dtype=torch.float64), torch.randint(0, 4, (16,), generator=gen))
            for _ in range(8)]
    for m, o in ((model, opt), (ref_model, ref)):
        for x, y in data:
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-14)


def test_lamb_first_step_moves_adapted_layers_by_lr_times_weight_norm():
    for bias_correction in (True, False):
        model = make_model()
        start = {p: p.detach().clone() for p in model.parameters()}
        opt = LAMB(param_groups(model, 0.1), lr=0.03, bias_correction=bias_correction)
        train(model, opt, make_data(1))
        for group in opt.param_groups:
            for p in group["params"]:
                if group["adapt"]:
                    assert (p - start[p]).norm().item() == pytest.approx(0.03 * start[p].norm().item(), rel=1e-12)


@pytest.mark.parametrize("path", list(PATHS))
def test_lamb_max_weight_norm_caps_the_first_step_at_lr_times_the_cap(path):
    model = make_model()
    start = {p: p.detach().clone() for p in model.parameters()}
    cap = 0.5
    opt = LAMB(param_groups(model, 0.1, exclude_from_adaptation=False), lr=0.03, max_weight_norm=cap, **PATHS[path])
    train(model, opt, make_data(1))
    capped = 0
    for p, w in start.items():
        expected = 0.03 * min(w.norm().item(), cap) if w.norm() > 0 else None
        if expected is not None:
            assert (p - w).norm().item() == pytest.approx(expected, rel=1e-12)
            capped += w.norm().item() > cap
    assert capped >= 2  # the cap binds (conv and fc weights), so the test can fail


def test_tvlars_first_step_is_one_plus_mu_times_gamma_grad():
    model = make_model()
    start = {p: p.detach().clone() for p in model.parameters()}
    opt = TVLARS(param_groups(model, 0.0, exclude_from_adaptation=False), lr=2.0, lam=1e-2, momentum=0.9)
    train(model, opt, make_data(1))
    for p in model.parameters():
        g = p.grad
        trust = 1e-3 * start[p].norm() / g.norm() if start[p].norm() > 0 else 1.0  # BN bias starts at 0
        expected = start[p] - 1.9 * 2.0 * 0.5 * trust * g  # phi_0 = 1 / (1 + e^0) = 0.5
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cls,kw", [(LARS, dict(lr=0.1, trust_form="separate", nesterov=True)),
                                    (TVLARS, dict(lr=0.1, lam=0.1)), (LAMB, dict(lr=1e-2))])
def test_paths_agree_float32(cls, kw):
    results = []
    for path in PATHS.values():
        model = make_model(torch.float32)
        train(model, cls(param_groups(model, WEIGHT_DECAY), **kw, **path), make_data(5, torch.float32))
        results.append([p.detach() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


RESUME = [(LARS, dict(lr=0.1, nesterov=True)), (TVLARS, dict(lr=0.1, lam=0.2, delay=3, min_factor=0.01)),
          (TVLARS, dict(lr=0.1, lam=0.2, variant="official")), (LAMB, dict(lr=1e-2))]


@pytest.mark.parametrize("cls,kw", RESUME)
@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle"])
def test_resume_is_bit_for_bit(cls, kw, how):
    data = make_data()
    straight = [p.detach().clone() for p in trained(cls, kw, data)[0].parameters()]
    model, opt = trained(cls, kw, data[:10])
    if how == "state_dict":
        saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        model = make_model(seed=5)
        opt = cls(param_groups(model, WEIGHT_DECAY), **kw)
        model.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
    elif how == "deepcopy":
        model, opt = copy.deepcopy((model, opt))
    else:
        model, opt = pickle.loads(pickle.dumps((model, opt)))
    train(model, opt, data[10:])
    for a, b in zip(model.parameters(), straight):
        assert torch.equal(a, b)
    state = opt.state_dict()["state"]
    assert len(state) == len(list(model.parameters()))  # only parameters: no optimizer-level entry
    assert all(s["step"].item() == STEPS and s["skipped_steps"].item() == 0 for s in state.values())
