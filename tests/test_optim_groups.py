"""Parameter groups that differ in one hyper-parameter each, on every path, against the
float64 references; several optimizers alive and stepping in one process."""

import copy

import pytest
import torch

from test_optim import PATHS, WEIGHT_DECAY, RefLAMB, RefLARS, RefTVLARS, make_data, make_model, train

from tvlars import LAMB, LARS, TVLARS

# Each optimizer: constructor kwargs, and the values a second group takes instead, one at a time.
# The first group keeps the constructor's values.
GROUP_CASES = {
    "lars": (LARS, RefLARS, dict(lr=0.1, trust_coefficient=1e-3), [
        ("lr", 0.3), ("momentum", 0.5), ("weight_decay", 0.05), ("trust_coefficient", 2e-2),
        ("eps", 1e-2), ("nesterov", True), ("trust_clip", True), ("trust_form", "separate"), ("adapt", False)]),
    "tvlars": (TVLARS, RefTVLARS, dict(lr=0.1, lam=0.05), [
        ("lr", 0.3), ("momentum", 0.5), ("weight_decay", 0.05), ("trust_coefficient", 2e-2),
        ("lam", 0.3), ("delay", 4), ("alpha", 0.5), ("min_factor", 0.05), ("adapt", False),
        ("variant", dict(variant="official", alpha=0.1))]),
    "lamb": (LAMB, RefLAMB, dict(lr=1e-2), [
        ("lr", 3e-2), ("betas", (0.8, 0.99)), ("eps", 1e-3), ("weight_decay", 0.1),
        ("bias_correction", False), ("trust_clip", True), ("adapt", False), ("max_weight_norm", 0.3)]),
}


def two_groups(model, key, value):
    """Matrices with the constructor's values; vectors (biases, norm weights) with ``key``
    changed. Both decay and adapt unless the change says otherwise."""
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]
    change = value if isinstance(value, dict) else {key: value}
    return [dict(params=matrices, weight_decay=WEIGHT_DECAY), {"params": vectors, "weight_decay": WEIGHT_DECAY, **change}]


CASES = [(name, key, value, path) for name, (_, _, _, changes) in GROUP_CASES.items()
         for key, value in changes for path in PATHS]


@pytest.mark.parametrize("name,key,value,path", CASES, ids=[f"{n}-{k}-{p}" for n, k, _, p in CASES])
def test_groups_differing_in_one_hyper_parameter_match_the_reference(name, key, value, path):
    cls, ref_cls, kw, _ = GROUP_CASES[name]
    model = make_model()
    ref_model = copy.deepcopy(model)
    opt = cls(two_groups(model, key, value), **kw, **PATHS[path])
    ref = ref_cls(two_groups(ref_model, key, value), weight_decay=WEIGHT_DECAY, **kw)
    data = make_data()
    train(model, opt, data)
    train(ref_model, ref, data)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-14)


def test_several_optimizers_alive_in_one_process_step_interleaved():
    """Different settings, every path, one step each in turn: none may borrow another's
    buffers or counters."""
    settings = [(LARS, RefLARS, dict(lr=0.1, momentum=0.8, nesterov=True)),
                (LARS, RefLARS, dict(lr=0.2, momentum=0.95, trust_form="separate", eps=1e-3)),
                (TVLARS, RefTVLARS, dict(lr=0.1, lam=0.05, momentum=0.9)),
                (TVLARS, RefTVLARS, dict(lr=0.5, lam=0.2, momentum=0.5, delay=3, min_factor=0.02)),
                (TVLARS, RefTVLARS, dict(lr=0.1, lam=0.05, variant="official")),
                (LAMB, RefLAMB, dict(lr=1e-2, betas=(0.8, 0.99))),
                (LAMB, RefLAMB, dict(lr=2e-2, weight_decay=0.1, bias_correction=False))]
    runs = []
    for i, (cls, ref_cls, kw) in enumerate(settings):
        for path in PATHS.values():
            model = make_model(seed=i)
            ref_model = copy.deepcopy(model)
            opt = cls(two_groups(model, "lr", kw["lr"] * 2), **kw, **path)
            runs.append((model, opt, ref_model, ref_cls(two_groups(ref_model, "lr", kw["lr"] * 2), **kw)))
    for x, y in make_data(8):
        for model, opt, ref_model, ref in runs:
            train(model, opt, [(x, y)])
            train(ref_model, ref, [(x, y)])
    for model, _, ref_model, _ in runs:
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-14)
