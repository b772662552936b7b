"""Barlow Twins loss, projector and module (tvlars.harness.ssl.barlow)."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import run_gloo
from tvlars.errors import UserError
from tvlars.harness.ssl.barlow import (
    BarlowTwins,
    Projector,
    barlow_twins_loss,
    off_diagonal,
    parse_projector,
)


def direct_loss(z1, z2, lambd, eps=1e-5):
    """The formula written out in float64 with plain loops and a hand-made batch norm."""
    z1 = z1.double()
    z2 = z2.double()
    n, d = z1.shape

    def bn(z):
        out = torch.empty_like(z)
        for j in range(d):
            col = z[:, j]
            mean = sum(col[i] for i in range(n)) / n
            var = sum((col[i] - mean) ** 2 for i in range(n)) / n  # biased, as BN in training
            out[:, j] = (col - mean) / torch.sqrt(var + eps)
        return out

    a, b = bn(z1), bn(z2)
    loss = torch.zeros((), dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            cij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            loss = loss + ((1 - cij) ** 2 if i == j else lambd * cij ** 2)
    return loss


@pytest.mark.parametrize("lambd", [0.0051, 0.5])
def test_loss_matches_direct_formula(lambd):
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(9, 5, generator=g) * 3 + 1
    z2 = 0.5 * z1 + torch.randn(9, 5, generator=g)
    got = barlow_twins_loss(z1, z2, lambd)
    assert got.dtype == torch.float32 and got.dim() == 0
    want = direct_loss(z1, z2, lambd)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


def test_loss_matches_reference_batchnorm_form():
    # the reference: bn = nn.BatchNorm1d(D, affine=False); c = bn(z1).T @ bn(z2) / N
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(16, 7, generator=g), torch.randn(16, 7, generator=g)
    bn = nn.BatchNorm1d(7, affine=False)
    c = bn(z1).T @ bn(z2) / 16
    want = (torch.diagonal(c) - 1).pow(2).sum() + 0.0051 * off_diagonal(c).pow(2).sum()
    assert torch.allclose(barlow_twins_loss(z1, z2), want, rtol=1e-5, atol=1e-6)


def test_identical_whitened_views_give_zero_loss():
    # perfectly correlated, decorrelated dimensions -> c = I -> loss 0
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert barlow_twins_loss(z, z, eps=0.0).item() == pytest.approx(0.0, abs=1e-10)


def test_off_diagonal():
    c = torch.arange(9.0).view(3, 3)
    assert off_diagonal(c).tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]


def test_loss_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    ref = barlow_twins_loss(z1, z2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = barlow_twins_loss(z1.bfloat16(), z2.bfloat16())
    assert out.dtype == torch.float32
    # only the bf16 rounding of the inputs differs, not the arithmetic
    assert torch.allclose(out, barlow_twins_loss(z1.bfloat16().float(), z2.bfloat16().float()), rtol=1e-6)
    assert torch.allclose(out, ref, rtol=5e-2)


def test_loss_shape_errors():
    with pytest.raises(ValueError):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(RuntimeError):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 3), distributed=True)


def test_parse_projector():
    assert parse_projector("2048-2048-4096") == (2048, 2048, 4096)
    assert parse_projector("128") == (128,)
    assert parse_projector([64, 32]) == (64, 32)
    for bad in ["", "2048--4096", "2048-x", "0-10", "-5", "12.5", None, [1.5], ["8"]]:
        with pytest.raises(UserError):
            parse_projector(bad)


def test_projector_layout():
    p = Projector(10, (16, 24, 8))
    kinds = [type(m) for m in p]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [m for m in p if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 16), (16, 24), (24, 8)]
    assert all(m.bias is None for m in linears)
    assert p.out_dim == 8
    assert p(torch.randn(5, 10)).shape == (5, 8)
    single = Projector(10, "32")
    assert [type(m) for m in single] == [nn.Linear] and single(torch.randn(3, 10)).shape == (3, 32)


def test_barlow_twins_module_forward_backward():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU())
    model = BarlowTwins(encoder, 6, "16-16-32", lambd=0.01)
    assert model.encoder is encoder and isinstance(model.projector, Projector)
    v1, v2 = torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)
    loss = model(v1, v2)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss2, h1, h2 = model(v1, v2, return_features=True)
    assert h1.shape == (8, 6) and h2.shape == (8, 6)
    assert torch.allclose(loss, loss2)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # the projector's BN layers convert to SyncBatchNorm for DDP
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.projector.modules())


# --------------------------------------------------------------------------- DDP (gloo, CPU)

SIZES = (5, 7)  # unequal shards: the reduction must not assume equal rows per rank
DIM_IN, DIM_OUT = 6, 8


def _global_data():
    g = torch.Generator().manual_seed(123)
    n = sum(SIZES)
    x1 = torch.randn(n, DIM_IN, generator=g)
    x2 = x1 + 0.3 * torch.randn(n, DIM_IN, generator=g)
    return x1, x2


def _fresh_model():
    # (a bias right before the loss's batch norm gets a zero gradient: none there, a hidden one)
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(DIM_IN, 10), nn.Tanh(), nn.Linear(10, DIM_OUT, bias=False))


def _reference_style_loss(z1, z2, lambd=0.0051, eps=1e-5):
    """The reference's loss: batch statistics reduced correctly (SyncBatchNorm), but the
    cross-correlation reduced with a plain all_reduce that autograd does not see."""
    from tvlars.harness.ssl.barlow import _AllReduceSum

    all_reduce = _AllReduceSum.apply
    n = float(sum(SIZES))
    d = z1.shape[1]
    mean = all_reduce(torch.cat([z1.sum(0), z2.sum(0)])) / n
    a, b = z1 - mean[:d], z2 - mean[d:]
    var = all_reduce(torch.cat([a.pow(2).sum(0), b.pow(2).sum(0)])) / n
    a = a / torch.sqrt(var[:d] + eps)
    b = b / torch.sqrt(var[d:] + eps)
    c = a.T @ b / n
    reduced = c.detach().clone()
    dist.all_reduce(reduced)  # plain: value summed, gradient passes as identity
    c = c + (reduced - c).detach()
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * off_diagonal(c).pow(2).sum()


def _ddp_worker(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    x1, x2 = _global_data()
    lo = sum(SIZES[:rank])
    hi = lo + SIZES[rank]
    results = {}
    for name in ("fixed", "reference"):
        model = DDP(_fresh_model())
        z1, z2 = model(x1[lo:hi]), model(x2[lo:hi])
        if name == "fixed":
            loss = barlow_twins_loss(z1, z2)  # distributed=None: detects the process group
        else:
            loss = _reference_style_loss(z1, z2)
        loss.backward()  # DDP averages gradients over ranks
        results[name] = {"loss": loss.detach()}
        results[name].update({k: p.grad.clone() for k, p in model.module.named_parameters()})
    return results


def test_ddp_gradient_equals_single_process_global_batch(tmp_path):
    world = len(SIZES)
    ranks = run_gloo(world, _ddp_worker, tmp_path)

    x1, x2 = _global_data()
    model = _fresh_model()
    loss = barlow_twins_loss(model(x1), model(x2), distributed=False)
    loss.backward()
    want = {k: p.grad for k, p in model.named_parameters()}
    assert all(w.abs().max() > 1e-4 for w in want.values())

    for r in ranks:
        fixed, ref = r["fixed"], r["reference"]
        # every rank computes the global loss
        assert torch.allclose(fixed["loss"], loss.detach(), rtol=1e-5)
        assert torch.allclose(ref["loss"], loss.detach(), rtol=1e-5)
        for k in want:
            assert torch.allclose(fixed[k], want[k], rtol=1e-4, atol=1e-6), k
            # the plain all_reduce (the reference's) is exactly world_size too small
            assert not torch.allclose(ref[k], want[k], rtol=1e-2, atol=1e-6)
            assert torch.allclose(ref[k] * world, want[k], rtol=1e-4, atol=1e-6), k
