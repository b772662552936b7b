"""One process or one rank of a torchrun job, behind one interface, so the loops have no
``if distributed`` branches: the collectives are no-ops on one process, and only rank 0
writes or speaks (:func:`say`, ``Runtime.is_main``).

Under torchrun (even with one process: a 1-GPU torchrun runs the DDP code path) or with
WORLD_SIZE > 1, the process group comes from the environment: nccl on CUDA, each rank on
cuda:LOCAL_RANK; gloo on the CPU (what the tests use).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass

from tvlars.errors import UserError


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: "object"  # torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, tensor):
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_min_int(self, value: int) -> int:
        if not self.distributed:
            return int(value)
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def broadcast_object(self, obj):
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _pick_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"device '{name}' requested but MPS is not available")
    return dev


def setup_runtime(device: str = "auto") -> Runtime:
    """``device``: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps; an unusable
    one is a UserError now rather than a CUDA error later."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun for its workers
    if world <= 1 and not under_torchrun:
        return Runtime(0, 1, 0, _pick_device(device), False)
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device)
    if dev.type == "cuda":
        if torch.cuda.device_count() > 1 or dev.index is None:
            dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"distributed training needs device cuda or cpu, not '{dev.type}'")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        try:
            dist.init_process_group(backend=backend, **kwargs)
        except TypeError:  # older torch without device_id
            dist.init_process_group(backend=backend)
    return Runtime(rank, world, local_rank, dev, True)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def prepare_model(model, runtime: Runtime, *, sync_bn: bool = False, channels_last: bool = False,
                  compile: bool = False, fsdp: bool = False):
    """(wrapped, module): device, SyncBN, channels_last, DDP or FSDP2, compile -- in that order.
    SyncBN is CUDA's; elsewhere a model with batch norm gets a note that its statistics stay
    per process (a model without says nothing: --sync-bn does not apply to it).

    Train and evaluate with the first; save, load and name parameters with the second,
    so that checkpoints and layers.csv never see a wrapper's prefixes. ``fsdp`` (distributed
    only): ``fully_shard`` every module that holds parameters, then the root, in place, so
    that ``module`` is the sharded model (its parameters DTensors)."""
    import torch

    module = model.to(runtime.device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    wrapped = module
    if runtime.distributed:
        synced = sync_bn and runtime.device.type == "cuda"
        if synced:
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
            wrapped = module
        elif sync_bn and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            say(runtime, f"tvlars: note: batch norm statistics stay per process: --sync-bn (on by default) "
                         f"needs CUDA, not {runtime.device.type}")
        if fsdp:
            wrapped = module = _fully_shard(module, runtime)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            # SyncBN keeps the buffers in step; torch >= 2.14 warns when broadcast_buffers is given at all
            wrapped = DDP(module, device_ids=ids, **({"broadcast_buffers": False} if synced else {}))
    if compile:
        wrapped = torch.compile(wrapped)
    return wrapped, module


def autocast(runtime: Runtime, amp: str):
    import torch

    if amp == "none":
        return contextlib.nullcontext()
    if amp == "bf16":
        return torch.autocast(device_type=runtime.device.type, dtype=torch.bfloat16)
    raise UserError(f"unknown --amp '{amp}' (use none or bf16)")


def _fully_shard(module, runtime: Runtime):
    """FSDP2 over all ranks: each leaf-most module holding parameters is one unit (its
    all-gather and reduce-scatter), the root holds the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    for sub in list(module.modules())[1:]:
        if any(True for _ in sub.parameters(recurse=False)):
            fully_shard(sub, mesh=mesh)
    return fully_shard(module, mesh=mesh)


def maybe_no_sync(model, skip: bool):
    """No gradient reduction for all but the last micro-batch: DDP's ``no_sync()``, or
    FSDP2's ``set_requires_gradient_sync(False)`` for the duration."""
    if skip:
        inner = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
        if hasattr(inner, "no_sync"):
            return inner.no_sync()
        if hasattr(inner, "set_requires_gradient_sync"):
            return _fsdp_no_sync(inner)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def say(runtime: Runtime, message: str) -> None:
    """A progress or status line on stderr, from rank 0 only."""
    if runtime.is_main:
        print(message, file=sys.stderr, flush=True)
