"""Every optimizer on every path against the float64 references (test_optim.Ref*), on the
parameter groups users' stacks build: timm's layer-decay and weight-decay groups on a ViT,
the Hugging Face Trainer's decay / no-decay split on a BERT, one group per identical block
with the lr decayed by depth, and group structures drawn at random by hypothesis (equal and
unequal sizes, identical shapes in several groups, empty groups, parameters without
gradients, mixed dtypes, non-finite steps, every hyper-parameter a group can hold).

Hand-picked groups missed a defect that only equal-sized groups showed (a CPU workspace
shared between groups by size): these structures are the ones that catch that class.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from test_optim import RefLAMB, RefLARS, RefTVLARS
from tvlars import LAMB, LARS, TVLARS
from tvlars.optim import _host

PATHS = {"default": dict(), "single": dict(foreach=False), "foreach": dict(foreach=True)}
REFERENCES = {LARS: RefLARS, TVLARS: RefTVLARS, LAMB: RefLAMB}
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-13), torch.float32: dict(rtol=2e-4, atol=2e-6)}


def run_both(cls, groups, kw, path, grads_per_step, chunk_bytes=None, monkeypatch=None):
    """Our optimizer (on ``groups`` as given) and the reference (on float64 copies) through the
    same gradients; returns [(ours, reference)] per parameter. ``grads_per_step[t][i]`` is
    parameter i's gradient at step t (float64, or None)."""
    params = [p for g in groups for p in g["params"]]
    copies = {p: nn.Parameter(p.detach().to(torch.float64).clone()) for p in params}
    ref_groups = [dict(g, params=[copies[p] for p in g["params"]]) for g in groups]
    if chunk_bytes is not None:
        monkeypatch.setattr(_host, "CHUNK_BYTES", chunk_bytes)
    opt = cls(groups, **kw, **PATHS[path])
    ref = REFERENCES[cls](ref_groups, **opt.defaults)  # a group's own value, else the constructor's
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(p.dtype)
            copies[p].grad = None if g is None else g.to(torch.float64)
        opt.step()
        ref.step()
    return [(p.detach(), copies[p].detach()) for p in params]


def assert_matches(pairs, what=""):
    for i, (ours, theirs) in enumerate(pairs):
        torch.testing.assert_close(ours.to(torch.float64), theirs, **TOLERANCE[ours.dtype],
                                   msg=lambda m: f"parameter {i} {tuple(ours.shape)} {ours.dtype} {what}: {m}")


def random_grads(params, steps, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [[scale * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params] for _ in range(steps)]


OPTIMIZERS = {
    "lars": (LARS, dict(lr=0.5)),
    "lars-nesterov-separate": (LARS, dict(lr=0.5, nesterov=True, trust_form="separate", eps=1e-6)),
    "tvlars": (TVLARS, dict(lr=0.5, lam=0.1)),
    "tvlars-official": (TVLARS, dict(lr=0.5, lam=0.1, variant="official")),
    "lamb": (LAMB, dict(lr=1e-2)),
}


# -- the groups users' stacks build -------------------------------------------------------


def tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, depth=3,
                             embed_dim=16, num_heads=2, num_classes=3).double()


def timm_layer_decay(model):
    from timm.optim._param_groups import param_groups_layer_decay

    return param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75,
                                    no_weight_decay_list=model.no_weight_decay())


def timm_weight_decay(model):
    from timm.optim._param_groups import param_groups_weight_decay

    return param_groups_weight_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay())


def trainer_split(model):
    """Hugging Face Trainer.create_optimizer's two groups: decay by parameter name."""
    transformers = pytest.importorskip("transformers")
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16)
    return transformers.BertModel(config).double()


def per_block_lr_decay(model=None, blocks=4, base_lr=0.5, decay=0.8):
    """One group per identical block, lr scaled by depth (BERT fine-tuning recipes)."""
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(blocks)]).double()
    return [{"params": list(block.parameters()), "lr": base_lr * decay ** (blocks - 1 - i), "weight_decay": 1e-3}
            for i, block in enumerate(stack)]


STRUCTURES = {
    "timm-layer-decay-vit": lambda: timm_layer_decay(tiny_vit()),
    "timm-weight-decay-vit": lambda: timm_weight_decay(tiny_vit()),
    "trainer-split-bert": lambda: trainer_split(tiny_bert()),
    "block-lr-decay": per_block_lr_decay,
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_users_group_structures_match_the_reference(structure, opt_name, path):
    cls, kw = OPTIMIZERS[opt_name]
    groups = STRUCTURES[structure]()
    params = [p for g in groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    pairs = run_both(cls, groups, kw, path, random_grads(params, 4, seed=1))
    assert_matches(pairs, f"{structure} {opt_name} {path}")
    moved = max(((p - p0).norm() / p0.norm().clamp(min=1e-3)).item() for (p, _), p0 in zip(pairs, start))
    assert moved > 1e-3  # the run is not trivially static


# The shapes of the defect's report: equal sizes in two groups, identical settings.
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("shapes", [[[(9, 4), (3, 3, 2, 2)], [(9, 4), (3, 3, 2, 2)]], [[(9, 4)], [(9, 4)]],
                                    [[(9, 4)], [(4, 10)]]], ids=["same-sizes", "same-shape", "other-sizes"])
def test_groups_of_equal_sizes_are_independent(shapes, opt_name, path):
    cls, kw = OPTIMIZERS[opt_name]
    gen = torch.Generator().manual_seed(0)
    groups = [{"params": [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in g],
               "weight_decay": 1e-3} for g in shapes]
    params = [p for g in groups for p in g["params"]]
    assert_matches(run_both(cls, groups, kw, path, random_grads(params, 5, seed=2)))


# -- random structures ---------------------------------------------------------------------

SHAPES = [(3,), (5,), (4, 3), (3, 4), (2, 3, 2, 2), (6, 5), (40, 30)]  # (40, 30): 9.6 KB in float64


@st.composite
def structures(draw, cls):
    """(groups, constructor kwargs, gradients per step, chunk bytes) for ``cls``."""
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    n_groups = draw(st.integers(1, 4))
    groups, grad_plan = [], []
    for _ in range(n_groups):
        n = draw(st.integers(0, 4))  # empty groups too
        shapes = [draw(st.sampled_from(SHAPES)) for _ in range(n)]
        params = []
        for s in shapes:
            dtype = draw(st.sampled_from([torch.float64, torch.float64, torch.float32]))
            zero = draw(st.booleans()) and len(s) == 1  # zero-initialised biases: trust 1
            w = torch.zeros(s, dtype=dtype) if zero else torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)
            params.append(nn.Parameter(w))
            grad_plan.append(draw(st.sampled_from(["always", "always", "always", "never", "sometimes"])))
        group = {"params": params, **draw(group_options(cls))}
        groups.append(group)
    if not any(g["params"] for g in groups):
        groups[0]["params"].append(nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64)))
        grad_plan.append("always")
    params = [p for g in groups for p in g["params"]]
    steps = draw(st.integers(1, 4))
    nonfinite_step = draw(st.one_of(st.none(), st.integers(0, steps - 1)))
    grads = []
    for t in range(steps):
        row = []
        for p, plan in zip(params, grad_plan):
            has = plan == "always" or (plan == "sometimes" and (t + seed) % 2 == 0)
            row.append(torch.randn(p.shape, generator=gen, dtype=torch.float64) if has else None)
        if t == nonfinite_step:
            present = [i for i, g in enumerate(row) if g is not None]
            if present:
                row[present[seed % len(present)]].view(-1)[0] = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
        grads.append(row)
    chunk = draw(st.sampled_from([None, 1, 200, 2000]))  # the host path's chunk boundaries
    return groups, draw(constructor_options(cls)), grads, chunk


def group_options(cls):
    """A group's own values for the hyper-parameters a group can hold (drawn or absent)."""
    common = dict(lr=st.sampled_from([0.05, 0.3, 1.0]), weight_decay=st.sampled_from([0.0, 1e-3, 0.05]),
                  adapt=st.booleans())
    if cls is LAMB:
        extra = dict(betas=st.sampled_from([(0.9, 0.999), (0.8, 0.99), (0.0, 0.5)]), eps=st.sampled_from([1e-6, 1e-3]),
                     bias_correction=st.booleans(), trust_clip=st.booleans(),
                     max_weight_norm=st.sampled_from([None, 0.5, 10.0]))
    else:
        extra = dict(momentum=st.sampled_from([0.0, 0.5, 0.9]), trust_coefficient=st.sampled_from([1e-3, 0.02]))
        if cls is LARS:
            extra.update(trust_form=st.sampled_from(["coupled", "separate"]), eps=st.sampled_from([0.0, 1e-6]),
                         trust_clip=st.booleans())
        else:
            extra.update(lam=st.sampled_from([0.0, 1e-2, 0.5]), delay=st.sampled_from([0, 2]),
                         min_factor=st.sampled_from([0.0, 0.1]))
    keys = {**common, **extra}
    return st.fixed_dictionaries({}, optional=keys)


def constructor_options(cls):
    if cls is TVLARS:
        return st.sampled_from([dict(lam=0.1), dict(lam=0.1, variant="official"), dict(lam=0.3, alpha=0.5),
                                dict(total_steps=4)])
    if cls is LARS:
        return st.sampled_from([dict(), dict(nesterov=True)])
    return st.just(dict())


def _consistent(cls, groups, kw):
    """Drop draws torch.optim semantics refuse (nesterov without momentum; a group's own
    alpha/min_factor beside the authors' variant)."""
    for g in groups:
        if kw.get("nesterov") and g.get("momentum", 0.9) == 0:
            g["momentum"] = 0.5
        if kw.get("variant") == "official":
            g.pop("min_factor", None)
    return groups


def check_random_structure(cls, path, drawn, monkeypatch):
    groups, kw, grads, chunk = drawn
    groups = _consistent(cls, groups, kw)
    pairs = run_both(cls, groups, kw, path, grads, chunk_bytes=chunk, monkeypatch=monkeypatch)
    assert_matches(pairs, f"{cls.__name__} {path} {kw} chunk={chunk}")


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("cls", [LARS, TVLARS, LAMB], ids=["lars", "tvlars", "lamb"])
def test_random_structures_match_the_reference(cls, path, monkeypatch):
    @settings(max_examples=40, **SETTINGS)
    @given(drawn=structures(cls))
    def check(drawn):
        with monkeypatch.context() as m:
            check_random_structure(cls, path, copy.deepcopy(drawn), m)

    check()
