"""Ready for accelerators without one (issue 12, optimizer side): no host read and no blocking
host-to-device copy inside step() on the paths CUDA uses, a bounded number of kernel launches
per step on the multi-tensor path, gradients read once, and per-device copies of a tensor lr.

The paths CUDA takes (the default there is the multi-tensor one; foreach=False on request)
are forced on the CPU and traced with a TorchDispatchMode, which sees every op
that reaches a kernel. A CUDA run of the same code issues the same ops.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tvlars import LAMB, LARS, TVLARS, param_groups
from tvlars.optim import _functional

aten = torch.ops.aten

OPTIMIZERS = [(LARS, dict(lr=0.1, weight_decay=1e-2, nesterov=True)),
              (LARS, dict(lr=0.1, weight_decay=1e-2, trust_form="separate", eps=1e-8)),
              (TVLARS, dict(lr=0.1, weight_decay=1e-2, lam=0.1)),
              (TVLARS, dict(lr=0.1, weight_decay=1e-2, variant="official")),
              (LAMB, dict(lr=1e-2, weight_decay=1e-2))]
IDS = ["lars", "lars-separate", "tvlars", "tvlars-official", "lamb"]
DEVICE_PATHS = {"multi (CUDA default)": dict(foreach=True), "single": dict(foreach=False)}
# Allocations, views, type queries and profiler marks launch no kernel.
NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "lift_fresh", "alias", "set_", "promote_types",
             "_record_function_enter_new", "_record_function_exit"}


def _tensor_lists(args):
    return [a for a in args if isinstance(a, (list, tuple)) and a and all(torch.is_tensor(t) for t in a)]


def _dense(t):
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _fast_route(args) -> bool:
    """Whether CUDA's multi-tensor kernel takes a foreach call whole (torch's
    ``can_use_fast_route``): one device and dtype, dense tensors, and every list pairwise of
    the same sizes and strides (a list of 0-d tensors beside full tensors is not)."""
    lists = _tensor_lists(args)
    first = lists[0]
    for lst in lists:
        for a, b in zip(first, lst):
            if (a.device, a.shape, a.stride()) != (b.device, b.shape, b.stride()) or not _dense(b):
                return False
    return len({t.dtype for t in first}) == 1 and len({t.device for t in first}) == 1


class Trace(TorchDispatchMode):
    """Counts host reads (``_local_scalar_dense``: .item(), float(t), a Scalar overload fed a
    0-d tensor), host-to-device copies, the kernels CUDA would launch, and the ops that read
    the data of any of ``watched`` (e.g. the gradients: through any view of them)."""

    def __init__(self, watched=()):
        super().__init__()
        self.host_reads = self.h2d = self.launches = 0
        self.reads = {_storage(t): 0 for t in watched}  # ops (not views) that read each watched tensor's data
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func is aten._local_scalar_dense.default:
            self.host_reads += 1
        if name in ("_to_copy", "copy_", "_foreach_copy_"):
            src = args[1] if name != "_to_copy" else args[0]
            dst_device = kwargs.get("device") if name == "_to_copy" else (args[0][0] if isinstance(args[0], list) else args[0]).device
            srcs = src if isinstance(src, (list, tuple)) else [src]
            if dst_device is not None and torch.device(dst_device).type != "cpu" and \
                    any(torch.is_tensor(s) and s.device.type == "cpu" and s.ndim > 0 for s in srcs):
                self.h2d += 1
        if not func.is_view and name not in NO_KERNEL:
            self.ops.append(name)
            if name.startswith("_foreach_"):
                self.launches += 1 if _fast_route(args) else len(_tensor_lists(args)[0])
            else:
                self.launches += 1
        if not func.is_view:
            flat = {_storage(t) for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
                    if torch.is_tensor(t)}
            for key in flat & self.reads.keys():
                self.reads[key] += 1
        return func(*args, **kwargs)


def _storage(t) -> int:
    return t.untyped_storage().data_ptr()


def stack_of_linears(layers, device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(6, 6), nn.Tanh())]).to(device, dtype)
    x = torch.randn(5, 6, device=device, dtype=dtype)
    return model, lambda: F.mse_loss(model(x), torch.zeros_like(x))


def stepped(cls, kw, path, layers=3, device="cpu"):
    """An optimizer after two steps (state made), with fresh gradients."""
    model, loss_fn = stack_of_linears(layers, device)
    opt = cls(param_groups(model, kw["weight_decay"]), **kw, **path)
    for _ in range(3):
        for p in model.parameters():
            p.grad = None
        if device == "meta":
            for p in model.parameters():
                p.grad = torch.empty_like(p)
        else:
            loss_fn().backward()
        if _ < 2:
            opt.step()
    return model, opt


@pytest.mark.parametrize("path", list(DEVICE_PATHS))
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_no_host_read_in_a_step_on_the_paths_cuda_uses(cls, kw, path):
    model, opt = stepped(cls, kw, DEVICE_PATHS[path])
    opt.stats = True  # telemetry is recorded on the device too
    with Trace() as trace:
        opt.step()
    assert trace.host_reads == 0
    assert opt.last_stats() is not None


@pytest.mark.parametrize("path", ["multi (CUDA default)", "single"])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_a_step_on_a_device_makes_no_host_copy(cls, kw, path):
    """On the meta device (no data: a host read would fail) nothing made on the host is
    copied to the device once state exists, and a step with a non-finite gradient still
    decides on the device."""
    model, opt = stepped(cls, kw, DEVICE_PATHS[path], device="meta")
    with Trace() as trace:
        opt.step()
    assert trace.host_reads == 0 and trace.h2d == 0


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_multi_tensor_step_launches_a_bounded_number_of_kernels(cls, kw):
    """The same launches for 4 and 16 layers (8 and 32 tensors): independent of the number
    of parameters, as CUDA would launch them (on the CPU, where every op loops over tensors
    anyway, per-layer scalars are applied tensor by tensor instead of expanded)."""
    counts = []
    for layers in (4, 16):  # on the meta device, which takes the accelerator form of every op
        model, opt = stepped(cls, kw, dict(foreach=True), layers=layers, device="meta")
        with Trace() as trace:
            opt.step()
        counts.append(trace.launches)
    assert counts[0] == counts[1], counts
    assert counts[0] < 150  # about 40 per bucket and group


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_multi_tensor_step_reads_each_gradient_a_fixed_number_of_times_and_norms_it_once(cls, kw):
    """The skip decision comes from the norms the update needs anyway: no pass over the
    gradients for it, one norm per layer and tensor kind. Measure keeps nothing for apply (the
    memory bound of issue 25), so apply reads a gradient again: LARS reads it into the direction
    in measure (the separate form: for its norm) and in apply; LAMB into its two moments in
    each."""
    model, opt = stepped(cls, kw, dict(foreach=True))
    grads = [p.grad for p in model.parameters()]
    with Trace(watched=grads) as trace:
        opt.step()
    assert max(trace.reads.values()) == (4 if cls is LAMB else 2), trace.ops
    assert trace.ops.count("_foreach_norm") == 2 * len(opt.param_groups)  # ||w||, ||u|| per bucket


def test_per_device_copies_of_a_tensor_value_are_made_once():
    lr = torch.tensor(0.5)
    per_device = _functional.PerDevice(lr)
    assert per_device.on(torch.device("cpu")) is lr
    meta = per_device.on(torch.device("meta"))
    assert meta.device.type == "meta" and per_device.on(torch.device("meta")) is meta
    assert _functional.PerDevice(0.5).on(torch.device("meta")) == 0.5  # numbers stay numbers


def test_scalars_of_a_group_follow_its_device_with_a_tensor_lr_elsewhere():
    """lr given as a CPU tensor, norms on another device: the trust ratio (LARC clips by lr)
    and the step size are computed there."""
    o = _functional.LARSOptions(lr=_functional.PerDevice(torch.tensor(0.5)), momentum=0.9, weight_decay=0.0,
                                trust_coefficient=1e-3, eps=0.0, trust_form="coupled", trust_clip=True,
                                adapt=True)
    norms = torch.ones(2, 3, dtype=torch.float64, device="meta")
    s = _functional.lars_scalars(norms[0], norms[1], o, torch.ones((), dtype=torch.bool, device="meta"))
    assert s.step_size.device.type == s.scale.device.type == "meta"
