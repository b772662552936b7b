"""The multi-tensor path (CUDA default, ``foreach=True``): ``torch._foreach_*`` ops on each
(device, dtype) bucket of a group, chunk by chunk, so that both the kernel launches and the
temporary memory of a step are bounded.

What stays, and why:

* A flat workspace per chunk. torch has no multi-tensor kernel that takes a list of device
  scalars (a list of 0-d tensors beside full tensors falls back to one launch per tensor),
  nor a multi-tensor select, so the per-layer scalars (trust ratio, bias corrections) are
  applied as one elementwise multiply of the chunk's direction, held flat, by the scalars
  repeated over each layer's elements (``torch.cat`` of expanded 0-d views: no element
  counts to copy to the device, nothing cached between steps: the counts cache this path
  kept gained an entry for every new set of layers with gradients), and the skip as one
  masked fill. The ops a step issues are a fixed number per bucket and per chunk (LARS about
  20 per chunk, LAMB about 45), the same for 5 or 50 layers (tests/test_optim_memory.py
  counts them with the profiler).
* Chunks of at most ``WORKSPACE_BYTES`` of workspace and at most ``BUCKET_SHARE`` of the
  bucket's own bytes (so that a small model's temporaries stay a fraction of its size too),
  never below ``MIN_WORKSPACE_BYTES`` (below that a step is bound by launches, and the bytes
  are negligible). Layers are cut at chunk boundaries and into pieces of at most a quarter
  chunk, so a layer larger than a chunk (an embedding) is no exception: the update is
  elementwise, and the norm of a cut layer is the norm of its pieces' norms. A quarter,
  because the CPU's ``_foreach_norm`` copies each float32 piece to float64 before reducing
  it. A layer whose tensors do not share one dense layout (a gradient set by hand with other
  strides) is one piece, as large as it is. 128 MiB is a choice, not yet measured on a GPU:
  at BERT-large shapes it is about 20 chunks, 0.1x of the parameters.
* measure keeps nothing for apply (LAMB hands over its chunking and bias corrections, no
  element-sized tensor): apply builds each chunk's direction again, reading the gradient a
  second time. Keeping it, as this path did before, cost 4.0x (LARS, TVLARS) and 7.0x
  (LAMB) the parameters' size in temporaries per step. Now, at BERT-large shapes (335M
  float32, bench/memory.py: the profiler's memory events, one thread), 0.10x (LARS, TVLARS)
  and 0.12x (LAMB), torch's foreach AdamW 1.00x; at a quarter of that size 0.40x / 0.47x,
  and at most about half the bucket plus a quarter chunk for a small model.

Exactness: every chunk computes, element by element, the same operations in the same order
as the flat per-bucket version did, so the update is unchanged; only a cut layer's norm is
summed in another order (float64, within 1e-16). No value is read on the host, and nothing
here stops torch.compile from capturing step() whole (no ``storage_offset()``, no ``del``
of a closure's variable): compile the training step to fuse the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ._scalars import (HEAVY_BALL, LOOK_AHEAD, LAMBOptions, LARSOptions, PerDevice, Scalar, Scalars, buckets,
                       lamb_bias_corrections, norm_dtype)

WORKSPACE_BYTES = 128 << 20  # the most workspace a bucket holds during a step
BUCKET_SHARE = 0.5  # and at most this share of the bucket's own bytes ...
MIN_WORKSPACE_BYTES = 1 << 20  # ... unless that is below this
PIECES_PER_CHUNK = 4  # a piece of a layer is at most this fraction of a chunk


def add_scalar_(tensors: list[Tensor], value: Tensor) -> None:
    """tensors += value (0-d, on their device) in one launch: the List overload; passing the
    0-d tensor itself selects the Scalar overload, which reads it on the host."""
    torch._foreach_add_(tensors, [value.to(tensors[0].dtype)] * len(tensors))


# =======================================================================================
# Chunks: a bucket's layers cut into pieces, the pieces grouped into chunks
# =======================================================================================


@dataclass
class _Piece:
    """Part of one layer: the same elements of each of its tensors (parameter, gradient,
    state), and how the workspace holds them: ``layout`` None for a 1-D run of elements in
    memory order, else (shape, order) for a layer taken whole, viewed with its own strides
    (``order``: see ``_memory_order``; None for a layer that is not dense)."""

    layer: int  # index in the bucket
    tensors: tuple
    numel: int
    layout: Optional[tuple] = None

    def view(self, workspace: Tensor, offset: int) -> Tensor:
        run = workspace[offset:offset + self.numel]
        if self.layout is None:
            return run
        shape, order = self.layout
        if order is None:
            return run.view(shape)
        return run.view([shape[d] for d in order]).permute(_inverse(order))


@dataclass
class _Chunk:
    pieces: list = field(default_factory=list)
    numel: int = 0

    def tensors(self, kind: int) -> list[Tensor]:
        """The pieces of one kind of tensor (0: parameters, 1: gradients, then the state)."""
        return [piece.tensors[kind] for piece in self.pieces]

    def views(self, workspace: Tensor) -> list[Tensor]:
        """Each piece's place in ``workspace`` (1-D, at least ``numel`` long)."""
        views, offset = [], 0
        for piece in self.pieces:
            views.append(piece.view(workspace, offset))
            offset += piece.numel
        return views

    def repeat(self, per_layer: list[Tensor], out: Tensor) -> Tensor:
        """Each piece's entry of ``per_layer`` (0-d tensors) repeated over its elements, into
        ``out``: one copy, whatever the number of pieces."""
        return torch.cat([per_layer[piece.layer].expand(piece.numel) for piece in self.pieces],
                         out=out[:self.numel])


class _Plan:
    """One (device, dtype) bucket's layers in chunks of at most ``chunk_numel`` elements.
    ``layers[i]``: layer i's tensors (parameter, gradient, state...), all of its shape."""

    def __init__(self, layers: list[tuple], workspace_bytes_per_element: int):
        first = layers[0][0]
        bucket_bytes = sum(tensors[0].numel() for tensors in layers) * first.element_size()
        budget = min(WORKSPACE_BYTES, max(MIN_WORKSPACE_BYTES, int(BUCKET_SHARE * bucket_bytes)))
        self.chunk_numel = max(1, budget // workspace_bytes_per_element)
        piece_numel = max(1, self.chunk_numel // PIECES_PER_CHUNK)
        self.chunks = [_Chunk()]
        self.layer_pieces = []  # layer i's pieces: [first, end) in bucket order
        count = 0
        for i, tensors in enumerate(layers):
            first_piece = count
            for piece in self._pieces(i, tensors, piece_numel):
                chunk = self.chunks[-1]
                if chunk.pieces and chunk.numel + piece.numel > self.chunk_numel:
                    chunk = _Chunk()
                    self.chunks.append(chunk)
                chunk.pieces.append(piece)
                chunk.numel += piece.numel
                count += 1
            self.layer_pieces.append((first_piece, count))
        self.numel = max(chunk.numel for chunk in self.chunks)  # the workspace each buffer needs
        self.pieces = [piece for chunk in self.chunks for piece in chunk.pieces]

    def _pieces(self, layer: int, tensors: tuple, piece_numel: int):
        """Pieces of at most ``piece_numel``, cut where the chunk being filled ends."""
        p = tensors[0]
        n = p.numel()
        order = _memory_order(p)
        if n == 0 or order is None or any(t.shape != p.shape or t.stride() != p.stride() for t in tensors):
            yield _Piece(layer, tensors, n, (p.shape, order))
            return
        if order == sorted(order):  # contiguous (the common case; a permuted view costs 20x more)
            flat = [t.view(-1) for t in tensors]
        else:  # each in memory order, one dense run
            flat = [t.permute(order).view(-1) for t in tensors]
        start = 0
        while start < n:
            room = self.chunk_numel - self.chunks[-1].numel
            take = min(n - start, piece_numel, room if room > 0 else self.chunk_numel)
            yield _Piece(layer, tuple(flat) if take == n else tuple(t[start:start + take] for t in flat), take)
            start += take

    def tensors(self, kind: int) -> list[Tensor]:
        return [piece.tensors[kind] for piece in self.pieces]

    def layer_norms(self, piece_norms: Tensor) -> Tensor:
        """Each layer's norm from its pieces' norms: a cut layer's is the norm of its pieces'
        (one ``_foreach_norm`` for all cut layers), a whole layer's is its piece's as it is."""
        cut = [(first, end) for first, end in self.layer_pieces if end - first > 1]
        if not cut:
            return piece_norms
        cut_norms = iter(torch._foreach_norm([piece_norms[first:end] for first, end in cut]))
        parts, run = [], None  # run: consecutive whole layers, taken as one slice
        for first, end in self.layer_pieces:
            if end - first == 1:
                run = (run[0] if run else first, end)
                continue
            if run:
                parts.append(piece_norms[run[0]:run[1]])
                run = None
            parts.append(next(cut_norms).reshape(1))
        if run:
            parts.append(piece_norms[run[0]:run[1]])
        return torch.cat(parts)


def _memory_order(t: Tensor) -> Optional[list[int]]:
    """The order of ``t``'s dimensions from the largest stride to the smallest, in which a
    dense tensor (contiguous, channels_last, any permutation) is contiguous; None if ``t`` is
    not dense (it overlaps itself or has gaps)."""
    order = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    expected = 1
    for d in reversed(order):
        if t.shape[d] == 1:
            continue
        if t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return order


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, d in enumerate(order):
        inverse[d] = position
    return inverse


def _norms(tensors: list[Tensor], device: torch.device) -> Tensor:
    return torch.stack(torch._foreach_norm(tensors, dtype=norm_dtype(device)))


def _scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-layer scalars multiply in: at least float32 (a bfloat16 bias correction
    or trust ratio would be off by up to 0.4%)."""
    return torch.promote_types(dtype, torch.float32)


class _Decision:
    """The step's decision on one device, in the forms a bucket of ``dtype`` uses."""

    def __init__(self, ok: Tensor, dtype: torch.dtype):
        self.ok = ok
        self.skipped = ~ok
        self.unchanged = self.skipped.to(dtype)  # state: old * (1 - ok) + new * ok, exact for ok in {0, 1}
        self.dtype = dtype
        self._taken = None

    def zero_unless_taken_(self, x: Tensor) -> Tensor:
        """``x``, or 0 on a skipped step (``x`` may then hold inf or NaN), in place. Eager CPU
        code runs a broadcast masked_fill_ unvectorised (about 4x a multiply), so there it
        multiplies by the decision and clears what 0 * inf left."""
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            if self._taken is None:
                self._taken = self.ok.to(self.dtype)
            return torch.nan_to_num_(x.mul_(self._taken), nan=0.0, posinf=0.0, neginf=0.0)
        return x.masked_fill_(self.skipped, 0.0)


def _on(value, device: torch.device) -> Scalar:
    return (value if isinstance(value, PerDevice) else PerDevice(value)).on(device)


def _add_(params: list[Tensor], flat: Tensor, views: list[Tensor], alpha: Scalar) -> None:
    """params += alpha * flat, ``views`` being the flat's pieces (a tensor alpha first scales
    the flat)."""
    if torch.is_tensor(alpha):
        flat.mul_(alpha)
        alpha = 1.0
    torch._foreach_add_(params, views, alpha=alpha)


# =======================================================================================
# LARS and TVLARS
# =======================================================================================
#
# Per chunk, d = g + wd*w in the parameters' dtype; apply multiplies it by the per-layer
# scale (zero on a skipped step) and writes buf = mu*buf + d (kept where the step is taken)
# in the buffer that held the repeated scale: two chunk-sized buffers.


def _lars_plan(layers: list[tuple], dtype: torch.dtype) -> _Plan:
    """Chunks sized for apply's two buffers (measure, which needs one, uses the same)."""
    return _Plan(layers, dtype.itemsize + _scalar_dtype(dtype).itemsize)


def _lars_direction(chunk: _Chunk, workspace: Tensor, options: LARSOptions) -> tuple[Tensor, list[Tensor]]:
    """d = g + wd*w of the chunk's pieces in ``workspace``: (the flat, its pieces)."""
    flat, views = workspace[:chunk.numel], chunk.views(workspace)
    torch._foreach_copy_(views, chunk.tensors(1))
    if options.decay:
        torch._foreach_add_(views, chunk.tensors(0), alpha=options.weight_decay)
    return flat, views


def _multi_tensor_lars_measure(params, grads, options: LARSOptions):
    norms = []
    for start, end in buckets(params):
        params_here, grads_here = params[start:end], grads[start:end]
        device, dtype = params_here[0].device, params_here[0].dtype
        plan = _lars_plan(list(zip(params_here, grads_here)), dtype)
        w_norms = plan.layer_norms(_norms(plan.tensors(0), device))
        if options.coupled and options.decay:  # ||g + wd*w||, chunk by chunk
            workspace, u_norms = torch.empty(plan.numel, dtype=dtype, device=device), []
            for chunk in plan.chunks:
                u_norms.append(_norms(_lars_direction(chunk, workspace, options)[1], device))
            del workspace
            u_norms = torch.cat(u_norms)
        else:
            u_norms = _norms(plan.tensors(1), device)
        norms.append(torch.stack([w_norms, plan.layer_norms(u_norms)]))
    return torch.cat([n.to(norms[0].device) for n in norms], dim=1), None


def _multi_tensor_lars_apply(params, grads, bufs, steps, options: LARSOptions, scalars: Scalars, work=None) -> None:
    scales, oks = PerDevice(scalars.scale), PerDevice(scalars.ok)
    for start, end in buckets(params):
        params_here = params[start:end]
        device, dtype = params_here[0].device, params_here[0].dtype
        layers = list(zip(params_here, grads[start:end], bufs[start:end])) if options.buffered \
            else list(zip(params_here, grads[start:end]))
        scale_dtype = _scalar_dtype(dtype)
        plan = _lars_plan(layers, dtype)
        decision = _Decision(oks.on(device), dtype)
        scale_per_layer = scales.on(device)[start:end].to(scale_dtype).unbind()
        outer = -1.0 if options.momentum_form == LOOK_AHEAD else -_on(options.lr, device)
        direction_space = torch.empty(plan.numel, dtype=dtype, device=device)
        second_space = torch.empty(plan.numel, dtype=scale_dtype, device=device)  # the scale, then the new buffer
        buffer_space = second_space.view(dtype)
        for chunk in plan.chunks:
            direction, direction_views = _lars_direction(chunk, direction_space, options)
            decision.zero_unless_taken_(direction)
            direction.mul_(chunk.repeat(scale_per_layer, second_space))  # scale * d, 0 when skipped
            if not options.buffered:
                _add_(chunk.tensors(0), direction, direction_views, outer)
                continue
            new_buffer, new_buffer_views = buffer_space[:chunk.numel], chunk.views(buffer_space)
            torch._foreach_copy_(new_buffer_views, chunk.tensors(2))
            decision.zero_unless_taken_(new_buffer.mul_(options.momentum).add_(direction))
            torch._foreach_mul_(chunk.tensors(2), decision.unchanged)
            torch._foreach_add_(chunk.tensors(2), new_buffer_views)
            if options.momentum_form == HEAVY_BALL:
                _add_(chunk.tensors(0), new_buffer, new_buffer_views, outer)
            else:  # nesterov, look-ahead: w -= outer * (scale*d + mu*buf)
                direction.add_(new_buffer, alpha=options.momentum)
                _add_(chunk.tensors(0), direction, direction_views, outer)
        add_scalar_(steps[start:end], decision.ok.to(torch.float32))


# =======================================================================================
# LAMB
# =======================================================================================
#
# Per chunk, this step's moments m', v' (two chunk-sized buffers), then u in m's buffer:
# (m' / (1 - b1^t)) / (sqrt(v') / sqrt(1 - b2^t) + eps) + wd*w, each bias correction repeated
# over its layers' elements in a third buffer. apply writes the moments (kept where the step
# is taken) before it turns m' into u.


def _lamb_moments(chunk: _Chunk, moments_space: tuple[Tensor, Tensor], options: LAMBOptions):
    """m' = b1*m + (1-b1)*g and v' = b2*v + (1-b2)*g^2 in the workspaces: [(flat, pieces)] * 2."""
    grads = chunk.tensors(1)
    m_new, v_new = ((space[:chunk.numel], chunk.views(space)) for space in moments_space)
    torch._foreach_copy_(m_new[1], chunk.tensors(2))
    m_new[0].mul_(options.beta1)
    torch._foreach_add_(m_new[1], grads, alpha=1.0 - options.beta1)
    torch._foreach_copy_(v_new[1], chunk.tensors(3))
    v_new[0].mul_(options.beta2)
    torch._foreach_addcmul_(v_new[1], grads, grads, value=1.0 - options.beta2)
    return m_new, v_new


def _lamb_direction_(chunk: _Chunk, m_new, v_new, corrections, scalar_space: Tensor, options: LAMBOptions):
    """u, written over m' (``v_new`` becomes the denominator); ``corrections``: each layer's
    (1 - b1^t, sqrt(1 - b2^t)) as 0-d tensors, or None without bias correction."""
    denominator = v_new[0].sqrt_()
    if corrections is not None:
        m_new[0].div_(chunk.repeat(corrections[0], scalar_space))
        denominator.div_(chunk.repeat(corrections[1], scalar_space))
    m_new[0].div_(denominator.add_(options.eps))
    if options.decay:
        torch._foreach_add_(m_new[1], chunk.tensors(0), alpha=options.weight_decay)
    return m_new


@dataclass
class _LAMBBucket:
    """What measure hands to apply for one bucket: its chunks and each layer's bias
    corrections (1 - b1^t, sqrt(1 - b2^t)) as 0-d tensors (None without bias correction);
    no element-sized tensor."""

    start: int
    end: int
    plan: _Plan
    corrections: Optional[tuple]


def _lamb_buckets(params, grads, ms, vs, steps, options: LAMBOptions) -> list[_LAMBBucket]:
    found = []
    for start, end in buckets(params):
        dtype = params[start].dtype
        scalar_dtype = _scalar_dtype(dtype)
        plan = _Plan(list(zip(params[start:end], grads[start:end], ms[start:end], vs[start:end])),
                     2 * dtype.itemsize + scalar_dtype.itemsize)
        corrections = None
        if options.bias_correction:
            bc1, bc2_sqrt = lamb_bias_corrections(torch.stack(steps[start:end]), options)
            corrections = (bc1.to(scalar_dtype).unbind(), bc2_sqrt.to(scalar_dtype).unbind())
        found.append(_LAMBBucket(start, end, plan, corrections))
    return found


def _lamb_workspaces(plan: _Plan) -> tuple[Tensor, Tensor, Tensor]:
    """m', v' (the parameters' dtype) and the repeated scalars (at least float32)."""
    first = plan.pieces[0].tensors[0]
    size, dtype, device = plan.numel, first.dtype, first.device
    return (torch.empty(size, dtype=dtype, device=device), torch.empty(size, dtype=dtype, device=device),
            torch.empty(size, dtype=_scalar_dtype(dtype), device=device))


def _multi_tensor_lamb_measure(params, grads, ms, vs, steps, options: LAMBOptions):
    lamb_buckets = _lamb_buckets(params, grads, ms, vs, steps, options)
    norms = []
    for bucket in lamb_buckets:
        plan = bucket.plan
        device = params[bucket.start].device
        m_space, v_space, scalar_space = _lamb_workspaces(plan)
        u_norms = []
        for chunk in plan.chunks:
            m_new, v_new = _lamb_moments(chunk, (m_space, v_space), options)
            u_views = _lamb_direction_(chunk, m_new, v_new, bucket.corrections, scalar_space, options)[1]
            u_norms.append(_norms(u_views, device))
        del m_space, v_space, scalar_space
        w_norms = _norms(plan.tensors(0), device)
        norms.append(torch.stack([plan.layer_norms(w_norms), plan.layer_norms(torch.cat(u_norms))]))
    return torch.cat([n.to(norms[0].device) for n in norms], dim=1), lamb_buckets


def _multi_tensor_lamb_apply(params, grads, ms, vs, steps, options: LAMBOptions, scalars: Scalars, work=None) -> None:
    """``work``: measure's buckets (made again if None)."""
    scales, oks = PerDevice(scalars.scale), PerDevice(scalars.ok)
    for bucket in work if work is not None else _lamb_buckets(params, grads, ms, vs, steps, options):
        device, dtype = params[bucket.start].device, params[bucket.start].dtype
        m_space, v_space, scalar_space = _lamb_workspaces(bucket.plan)
        decision = _Decision(oks.on(device), dtype)
        scale_per_layer = scales.on(device)[bucket.start:bucket.end].to(scalar_space.dtype).unbind()
        for chunk in bucket.plan.chunks:
            m_new, v_new = _lamb_moments(chunk, (m_space, v_space), options)
            for kind, (new, new_views) in ((2, m_new), (3, v_new)):
                decision.zero_unless_taken_(new)
                torch._foreach_mul_(chunk.tensors(kind), decision.unchanged)
                torch._foreach_add_(chunk.tensors(kind), new_views)
            u, u_views = _lamb_direction_(chunk, m_new, v_new, bucket.corrections, scalar_space, options)
            decision.zero_unless_taken_(u)
            u.mul_(chunk.repeat(scale_per_layer, scalar_space))
            torch._foreach_sub_(chunk.tensors(0), u_views)
        add_scalar_(steps[bucket.start:bucket.end], decision.ok.to(torch.float32))
