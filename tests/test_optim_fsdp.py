"""FSDP2 (``fully_shard``, DTensor parameters) on 2 CPU processes (gloo): whole-layer trust
ratios on every path, so that sharded training equals one process training the unsharded
model on the same global batch, in float64; the same skip decision on every rank; telemetry
of whole layers; torch.distributed.checkpoint save and load resume exactly (issue 8, point 3).

One spawned job runs every case (process start-up dominates); the tests read its results.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import run_gloo

from tvlars import LAMB, LARS, TVLARS, param_groups

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

WORLD = 2
STEPS = 6
SKIPPED_STEP = 3  # in the skip case, rank 1 alone puts a NaN into its shard of one gradient
OPTIMIZERS = {"lars": (LARS, dict(lr=0.1, nesterov=True)),
              "tvlars": (TVLARS, dict(lr=0.5, lam=0.1)),
              "tvlars-official": (TVLARS, dict(lr=0.1, lam=0.1, variant="official")),
              "lamb": (LAMB, dict(lr=1e-2))}
PATHS = {"default": dict(), "single": dict(foreach=False), "multi": dict(foreach=True)}
CASES = [(name, path) for name in OPTIMIZERS for path in PATHS] + [("tvlars", "fused")]
PATHS["fused"] = dict(fused=True)


def build():
    """7 and 3 rows: a first dimension that does not divide by 2, biases, a norm layer."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()


def batches(steps=STEPS):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(steps)]


def train(model, opt, data, rank=0, world=1, skip_at=None):
    for i, (x, y) in enumerate(data):
        rows = len(x) // world
        x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if i == skip_at:
            grad = model[2].weight.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            if rank == world - 1:
                local[0, 0] = float("nan")
        opt.step()


def shard(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def whole(model):
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def local(model):
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in model.parameters()]


def _worker(rank, world):
    """Every case on sharded models: final whole weights, whole-layer stats, skipped steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    out = {}
    data = batches()
    for name, path in CASES:
        cls, kw = OPTIMIZERS[name]
        model = shard(build(), world)
        opt = cls(param_groups(model, 1e-2), **kw, **PATHS[path], stats=True)
        train(model, opt, data, rank, world)
        stats = opt.last_stats()
        out[name, path] = dict(weights=whole(model), stats=(stats.weight_norm, stats.grad_norm, stats.trust_ratio))
    for name in OPTIMIZERS:  # the skip, decided alike although one rank saw no NaN
        cls, kw = OPTIMIZERS[name]
        model = shard(build(), world)
        opt = cls(param_groups(model, 1e-2), **kw)
        train(model, opt, data, rank, world, skip_at=SKIPPED_STEP)
        out[name, "skip"] = dict(weights=whole(model), skipped=opt.skipped_steps)
    for name in OPTIMIZERS:  # DCP: save after 3 steps, load into a fresh model, finish; vs straight
        cls, kw = OPTIMIZERS[name]
        model = shard(build(), world)
        opt = cls(param_groups(model, 1e-2), **kw)
        train(model, opt, data, rank, world)
        straight = local(model)
        model = shard(build(), world)
        opt = cls(param_groups(model, 1e-2), **kw)
        train(model, opt, data[:3], rank, world)
        folder = os.path.join(os.environ["TVLARS_TEST_DCP"], name)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=folder)
        torch.manual_seed(5)
        model = shard(nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.LayerNorm(5),
                                    nn.Linear(5, 3)).double(), world)
        opt = cls(param_groups(model, 1e-2), **kw)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=folder)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        steps = {k: v["step"].item() for k, v in get_optimizer_state_dict(model, opt)["state"].items()}
        train(model, opt, data[3:], rank, world)
        out[name, "dcp"] = dict(equal=all(torch.equal(a, b) for a, b in zip(local(model), straight)), steps=steps)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    os.environ["TVLARS_TEST_DCP"] = str(folder / "dcp")
    try:
        return run_gloo(WORLD, _worker, folder)
    finally:
        del os.environ["TVLARS_TEST_DCP"]


def one_process(name, path, **train_kw):
    cls, kw = OPTIMIZERS[name]
    model = build()
    opt = cls(param_groups(model, 1e-2), **kw, **PATHS[path], stats=True)
    train(model, opt, batches(), **train_kw)
    return model, opt


@pytest.mark.parametrize("name,path", CASES)
def test_two_sharded_processes_equal_one_unsharded(ranks, name, path):
    model, opt = one_process(name, path)
    stats = opt.last_stats()
    for rank in ranks:
        got = rank[name, path]
        for a, b in zip(got["weights"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)
        # telemetry of whole layers, the same on every rank
        for a, b in zip(got["stats"], (stats.weight_norm, stats.grad_norm, stats.trust_ratio)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(ranks, name):
    cls, kw = OPTIMIZERS[name]
    model = build()
    opt = cls(param_groups(model, 1e-2), **kw)
    data = batches()
    train(model, opt, data[:SKIPPED_STEP])
    train(model, opt, data[SKIPPED_STEP + 1:])
    for rank in ranks:
        assert rank[name, "skip"]["skipped"] == 1
        for a, b in zip(rank[name, "skip"]["weights"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_distributed_checkpoint_resumes_bit_for_bit(ranks, name):
    for rank in ranks:
        assert rank[name, "dcp"]["equal"]
        assert set(rank[name, "dcp"]["steps"].values()) == {3.0}  # saved after 3 steps, by parameter name
