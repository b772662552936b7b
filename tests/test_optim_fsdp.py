"""FSDP2 (``fully_shard``, DTensor parameters) on 2 CPU processes (gloo): whole-layer trust
ratios on every path, so that sharded training equals one process training the unsharded
model on the same global batch, in float64; the same skip decision on every rank; telemetry
of whole layers; torch.distributed.checkpoint save and load resume exactly (issue 8, point 3).
And the compositions large models train with, on 4 processes: HSDP, tensor parallelism, FSDP2
over tensor parallelism, each equal to one unsharded process (issue 25, point 2).

One spawned job per world size runs every case (process start-up dominates); the tests read
its results.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import run_gloo

from tvlars import LAMB, LARS, TVLARS, param_groups

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
# torch 2.4-2.7: FSDP2 fails on the CPU (2.4-2.6: CUDA streams whatever the device; 2.7: HSDP's
# post-backward asserts a CUDA event); there only plain tensor parallelism runs
FSDP2_ON_CPU = torch.__version__ >= (2, 8)
needs_fsdp2_on_cpu = pytest.mark.skipif(not FSDP2_ON_CPU, reason="FSDP2 on the CPU (gloo) needs torch >= 2.8")

WORLD = 2
STEPS = 6
SKIPPED_STEP = 3  # in the skip case, rank 1 alone puts a NaN into its shard of one gradient
OPTIMIZERS = {"lars": (LARS, dict(lr=0.1, nesterov=True)),
              "tvlars": (TVLARS, dict(lr=0.5, lam=0.1)),
              "tvlars-official": (TVLARS, dict(lr=0.1, lam=0.1, variant="official")),
              "lamb": (LAMB, dict(lr=1e-2))}
PATHS = {"default": dict(), "single": dict(foreach=False), "multi": dict(foreach=True)}
CASES = [(name, path) for name in OPTIMIZERS for path in PATHS]


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


def fully_shard(module, mesh):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.4-2.5: FSDP2 under torch.distributed._composable
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard(module, mesh=mesh)


def shard(model, world_or_mesh):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_or_mesh,)) if isinstance(world_or_mesh, int) else world_or_mesh
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
@needs_fsdp2_on_cpu
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
@needs_fsdp2_on_cpu
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
@needs_fsdp2_on_cpu
def test_distributed_checkpoint_resumes_bit_for_bit(ranks, name):
    for rank in ranks:
        assert rank[name, "dcp"]["equal"]
        assert set(rank[name, "dcp"]["steps"].values()) == {3.0}  # saved after 3 steps, by parameter name


# ---- 4 processes: HSDP, tensor parallelism, FSDP2 over tensor parallelism ----------------------
# With FSDP2 over TP the column-parallel layer's data-parallel placement is a _StridedShard
# (torch >= 2.5), which torch 2.14 does not derive from Shard: its mesh dimension must still
# enter the all-reduce of the whole-layer norms.

TP_WORLD = 4
TP_STEPS = 10
COMPOSITIONS = ["hsdp", "tp", "fsdp-over-tp"]
RUNNABLE = [c for c in COMPOSITIONS if FSDP2_ON_CPU or c == "tp"]
TP_CASES = [(name, path) for name in OPTIMIZERS for path in PATHS] + [("sgd", "torch")]
TP_PLAN = {"2": "colwise", "4": "rowwise"}  # the two middle layers


def build_tp():
    """Linear layers 2 and 4 are tensor-parallel (12 divides by 4); the last one has 3 rows,
    which FSDP2 shards unevenly on 2."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8),
                         nn.LayerNorm(8), nn.Linear(8, 3)).double()


def tp_optimizer(name, path, model):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cls, kw = OPTIMIZERS[name]
    return cls(param_groups(model, 1e-2), **kw, **PATHS[path])


def tp_batches():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
            for _ in range(TP_STEPS)]


def _tp_worker(rank, world):
    """Every (composition, optimizer, path): the final whole weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    hsdp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    tp_mesh = init_device_mesh("cpu", (world,))
    dp_tp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    def tensor_parallel(model, mesh):
        return parallelize_module(model, mesh, {layer: styles[style]() for layer, style in TP_PLAN.items()})

    def compose(composition):
        """The model, and which part of each batch this rank sees (part, parts)."""
        model = build_tp()
        if composition == "hsdp":
            return shard(model, hsdp_mesh), (rank, world)
        if composition == "tp":
            return tensor_parallel(model, tp_mesh), (0, 1)  # every rank computes on the whole batch
        model = shard(tensor_parallel(model, dp_tp_mesh["tp"]), dp_tp_mesh["dp"])
        return model, (dp_tp_mesh.get_local_rank("dp"), 2)

    out = {}
    data = tp_batches()
    for composition in RUNNABLE:
        for name, path in TP_CASES:
            model, (part, parts) = compose(composition)
            train(model, tp_optimizer(name, path, model), data, part, parts)
            out[composition, name, path] = whole(model)
    return out


@pytest.fixture(scope="module")
def tp_ranks(tmp_path_factory):
    return run_gloo(TP_WORLD, _tp_worker, tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def unsharded():
    """One process, the unsharded model, the whole batch: the final weights of every case."""
    out = {}
    for name, path in TP_CASES:
        model = build_tp()
        train(model, tp_optimizer(name, path, model), tp_batches())
        out[name, path] = [p.detach() for p in model.parameters()]
    return out


@pytest.mark.parametrize("composition", [c if c in RUNNABLE else pytest.param(c, marks=needs_fsdp2_on_cpu)
                                         for c in COMPOSITIONS])
@pytest.mark.parametrize("name,path", TP_CASES)
def test_hsdp_and_tensor_parallel_equal_one_unsharded_process(tp_ranks, unsharded, composition, name, path):
    for rank in tp_ranks:
        for got, expected in zip(rank[composition, name, path], unsharded[name, path], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
