"""Barlow Twins (Zbontar et al. 2021): loss, projector and the pre-training module.

Layout and defaults follow the reference code (facebookresearch/barlowtwins, ``main.py``):
a projector of Linear-BN-ReLU blocks and a final bias-free Linear (``2048-2048-4096`` in
the paper), affine-free batch normalisation of each embedding over the *global* batch,
the cross-correlation divided by the global batch size, and
``loss = sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2`` with ``lambd = 0.0051``.

Distributed training
--------------------
The reference all-reduces the cross-correlation with a plain ``torch.distributed.all_reduce``,
which autograd does not see: each rank back-propagates only its own contribution, DDP then
averages over ranks, and the gradient comes out ``1 / world_size`` too small.
:func:`barlow_twins_loss` instead uses an autograd-aware all-reduce (the semantics of
``torch.distributed.nn.functional.all_reduce``, deprecated in torch 2.14, written out here as
a small ``autograd.Function``) for every cross-rank quantity (the batch
mean, the batch variance and the cross-correlation). Its backward all-reduces the
incoming gradient, which multiplies each rank's gradient by ``world_size``; DDP's average
then gives exactly the gradient of one process holding the global batch, and every rank
computes the same loss value. Ranks may hold different numbers of rows.

Under DDP, convert the projector's batch-norm layers (and the encoder's) to
``torch.nn.SyncBatchNorm`` with ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` before
wrapping the model in DDP, as the reference does, so the projector's hidden BN layers also
normalise over the global batch (SyncBatchNorm needs a CUDA device). The loss's own
normalisation never needs conversion: it is computed here over the global batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tvlars.errors import UserError

__all__ = [
    "barlow_twins_loss",
    "off_diagonal",
    "Projector",
    "parse_projector",
    "BarlowTwins",
    "TwoViewCost",
    "forward_backward",
    "DEFAULT_LAMBD",
    "DEFAULT_PROJECTOR",
]

DEFAULT_LAMBD = 0.0051
DEFAULT_PROJECTOR = "2048-2048-4096"
_BN_EPS = 1e-5  # nn.BatchNorm1d's default, as the reference's affine-free BN


def off_diagonal(c: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix, as a flat view-free tensor."""
    n, m = c.shape
    if n != m:
        raise ValueError(f"off_diagonal needs a square matrix, got {tuple(c.shape)}")
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _use_distributed(distributed: Optional[bool]) -> bool:
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return initialised and dist.get_world_size() > 1
    if distributed and not initialised:
        raise RuntimeError("barlow_twins_loss(distributed=True) needs torch.distributed initialised")
    return bool(distributed)


class _AllReduceSum(torch.autograd.Function):
    """Autograd-aware sum over ranks: the forward all-reduces the value, the backward
    all-reduces the incoming gradient (the semantics of
    ``torch.distributed.nn.functional.all_reduce``, which torch 2.14 deprecates; written out
    here so it neither warns nor depends on a private replacement)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _sum_all(t: Tensor, distributed: bool) -> Tensor:
    """Sum over ranks, differentiably (the backward all-reduces the gradient)."""
    if not distributed:
        return t
    return _AllReduceSum.apply(t.contiguous())


def barlow_twins_loss(
    z1: Tensor,
    z2: Tensor,
    lambd: float = DEFAULT_LAMBD,
    *,
    distributed: Optional[bool] = None,
    eps: float = _BN_EPS,
) -> Tensor:
    """Barlow Twins loss of two embeddings ``[n_local, D]`` of the two views.

    Each embedding is normalised per dimension over the global batch (mean and biased
    variance, ``eps`` inside the square root: ``nn.BatchNorm1d(affine=False)`` in training
    mode), ``c = z1n.T @ z2n / N`` with ``N`` the global batch size, and the loss is
    ``sum((1 - diag(c))^2) + lambd * sum(offdiag(c)^2)``.

    ``distributed``: ``None`` (default) reduces over ranks when ``torch.distributed`` is
    initialised with more than one process, ``True`` requires it, ``False`` never reduces.
    When reducing, each rank passes its own rows; the result (value and, after DDP's
    gradient averaging, the gradient) equals one process holding the global batch.

    Computed in float32 whatever the input dtype, with autocast disabled. Returns a scalar
    float32 tensor (identical on every rank).
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must be [N, D] of the same shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    use_dist = _use_distributed(distributed)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1 = z1.float()
        z2 = z2.float()
        # the row count, filled on the device: torch.tensor(..., device=) would be a blocking
        # host-to-device copy in every step
        n = z1.new_full((1,), float(z1.shape[0]))
        if use_dist:
            dist.all_reduce(n)  # no gradient needed for the row count
        d = z1.shape[1]
        # batch means (both views in one reduction)
        mean = _sum_all(torch.cat([z1.sum(0), z2.sum(0)]), use_dist) / n
        c1 = z1 - mean[:d]
        c2 = z2 - mean[d:]
        # biased variance, two-pass for accuracy
        var = _sum_all(torch.cat([c1.pow(2).sum(0), c2.pow(2).sum(0)]), use_dist) / n
        inv = torch.rsqrt(var + eps)
        z1n = c1 * inv[:d]
        z2n = c2 * inv[d:]
        c = _sum_all(z1n.T @ z2n, use_dist) / n
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = off_diagonal(c).pow(2).sum()
        return on_diag + lambd * off_diag


def parse_projector(spec) -> tuple[int, ...]:
    """``"2048-2048-4096"`` (or a sequence of ints) -> ``(2048, 2048, 4096)``.

    Raises :class:`UserError` for anything that is not one or more positive integers
    separated by ``-``.
    """
    if isinstance(spec, str):
        parts = spec.strip().split("-")
        try:
            sizes = tuple(int(p) for p in parts)
        except ValueError:
            raise UserError(
                f"projector {spec!r}: expected layer widths separated by '-', e.g. 2048-2048-4096"
            ) from None
    elif isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        try:
            sizes = tuple(int(p) for p in spec)
        except (TypeError, ValueError):
            raise UserError(f"projector {spec!r}: expected a list of integers") from None
        if any(isinstance(p, bool) or int(p) != p for p in spec):
            raise UserError(f"projector {spec!r}: expected a list of integers")
    else:
        raise UserError(f"projector {spec!r}: expected a string like 2048-2048-4096")
    if not sizes or any(s <= 0 for s in sizes):
        raise UserError(f"projector {spec!r}: every layer width must be a positive integer")
    return sizes


class Projector(nn.Sequential):
    """The Barlow Twins projector: ``[Linear(no bias) - BatchNorm1d - ReLU] * (len(sizes)-1)``
    then a final ``Linear`` without bias, ``in_dim -> sizes[0] -> ... -> sizes[-1]``.

    As in the reference, the hidden Linear layers have no bias either (the BN that follows
    would cancel it). ``out_dim`` is ``sizes[-1]``.
    """

    def __init__(self, in_dim: int, sizes: Sequence[int] = (2048, 2048, 4096)):
        sizes = parse_projector(sizes)
        if in_dim <= 0:
            raise ValueError(f"in_dim must be positive, got {in_dim}")
        dims = (int(in_dim),) + tuple(sizes)
        layers: list[nn.Module] = []
        for i in range(len(dims) - 2):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
            layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
        super().__init__(*layers)
        self.in_dim = int(in_dim)
        self.sizes = tuple(sizes)
        self.out_dim = int(sizes[-1])


class BarlowTwins(nn.Module):
    """Encoder + projector trained with :func:`barlow_twins_loss`.

    ``encoder``: maps images to ``[N, feature_dim]`` (e.g. ``build_model(...).encoder``).
    ``forward(v1, v2)`` returns the scalar loss; ``forward(v1, v2, return_features=True)``
    returns ``(loss, h1, h2)`` with the encoder features of each view (for an online probe,
    which must detach them); ``forward(v1, v2, embeddings=True)`` returns ``(z1, z2, h1)``
    without the loss. The views go through the network in two separate passes, so
    batch-norm statistics are per view, as in the reference.

    Under DDP: ``model = nn.SyncBatchNorm.convert_sync_batchnorm(model)`` then
    ``DDP(model)``; the loss reduces over ranks by itself (``distributed=None``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        projector_sizes=(2048, 2048, 4096),
        lambd: float = DEFAULT_LAMBD,
        *,
        distributed: Optional[bool] = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.feature_dim = int(feature_dim)
        self.projector = Projector(self.feature_dim, projector_sizes)
        self.lambd = float(lambd)
        self.distributed = distributed

    def forward(self, v1: Tensor, v2: Tensor, *, return_features: bool = False, embeddings: bool = False):
        if embeddings:  # for gradient caching (forward_backward): the loss is taken outside
            h1 = self.encoder(v1)
            return self.projector(h1), self.projector(self.encoder(v2)), h1
        h1 = self.encoder(v1)
        h2 = self.encoder(v2)
        z1 = self.projector(h1)
        z2 = self.projector(h2)
        loss = barlow_twins_loss(z1, z2, self.lambd, distributed=self.distributed)
        if return_features:
            return loss, h1, h2
        return loss

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, lambd={self.lambd}"


class TwoViewCost(nn.Module):
    """One input, the activation memory of a Barlow Twins step (two passes): the model the
    automatic --micro-batch-size search (tvlars.harness.run.micro_batch_size) measures."""

    def __init__(self, model: BarlowTwins):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        z1, z2, _ = self.model(x, x, embeddings=True)
        return z1 + z2


def forward_backward(wrapped, model: BarlowTwins, v1: Tensor, v2: Tensor, micro: int, runtime, amp: str):
    """One step's loss and view-1 encoder features (both detached); the gradients are left
    in the parameters, averaged over ranks by DDP. ``wrapped`` is what prepare_model made of
    ``model`` (DDP, compiled): the passes that back-propagate go through it.

    The loss normalises over the whole batch, so it does not split into micro-batches. When
    the rank's rows exceed ``micro``, gradient caching: the embeddings of every micro-batch
    without a graph (batch-norm buffers restored afterwards, so that they move once per
    step), the loss and its gradient with respect to the embeddings on the whole batch, then
    each micro-batch forward again, back-propagating its slice of that gradient. Exact for a
    model without batch norm; one extra forward pass per step.
    """
    from tvlars.harness.runtime import autocast, maybe_no_sync

    if micro >= v1.shape[0]:
        with autocast(runtime, amp):
            loss, h1, _ = wrapped(v1, v2, return_features=True)
        loss.backward()
        return loss.detach(), h1.detach()
    pairs = list(zip(v1.split(micro), v2.split(micro)))
    buffers = [b.detach().clone() for b in model.buffers()]
    with torch.no_grad(), autocast(runtime, amp):
        embedded = [model(a, b, embeddings=True)[:2] for a, b in pairs]
    with torch.no_grad():  # the second pass updates the batch-norm running statistics once
        for buffer, before in zip(model.buffers(), buffers):
            buffer.copy_(before)
    z1 = torch.cat([z[0] for z in embedded]).float().requires_grad_()
    z2 = torch.cat([z[1] for z in embedded]).float().requires_grad_()
    del embedded
    loss = barlow_twins_loss(z1, z2, model.lambd, distributed=model.distributed)
    loss.backward()
    features = []
    grads = list(zip(z1.grad.split(micro), z2.grad.split(micro)))
    for j, ((a, b), (g1, g2)) in enumerate(zip(pairs, grads)):
        with maybe_no_sync(wrapped, j < len(pairs) - 1), autocast(runtime, amp):
            c1, c2, h = wrapped(a, b, embeddings=True)
        torch.autograd.backward([c1.float(), c2.float()], [g1, g2])
        features.append(h.detach())
    return loss.detach(), torch.cat(features)
