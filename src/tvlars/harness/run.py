"""The run-level steps ``tvlars train`` and ``tvlars ssl`` share, in the order the loops call them.

    open_run(args, rt, *, command, parser_defaults, default_out)
        -> (args, out, saved, state) | None
        the run-folder rules: a folder holding another run is refused unless --resume,
        which takes the saved config.yaml (a changed flag that affects results is an
        error) and the checkpoint; None when the run already completed (nothing to do)
    load_run_data(args, rt) -> (data, per_rank)        --dataset + the global-batch checks
    build_classifier(args, data) -> Classifier         --model, one-line UserError
    data_on_device(args, rt, *tensors) -> bool         --data-on-device, the same on every rank
    micro_batch_size(args, module, data, rt, per_rank, *, make_optimizer=None, inputs_per_row=1)
        -> int                                          --micro-batch-size, the same on every rank
    micro_batches(x, y, micro, most_rows) -> list      a step's micro-batches, as many on every rank
    run_config(args, rt, *, command, micro, per_rank, steps_per_epoch, total_steps, data, **extra)
        -> dict                                         what config.yaml records
    open_log(out, rt, config, saved, *, resume_epoch, resume_step, epochs_done, best_test_acc=None,
             best_epoch=None, metric_columns=METRIC_COLUMNS) -> RunLog
        the notes, the barrier, config.yaml and a "running" summary.json
    diverged(log, out, *, epoch, t_start, what="training", best_test_acc=None, best_epoch=None) -> int
        summary.json "diverged", the one-line error; the exit status 1
    package_version() -> str

The loops themselves (the per-step and per-epoch code) stay in train.py and ssl_loop.py.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sys
import time
from pathlib import Path

from tvlars.errors import UserError
from tvlars.harness import config as cfg
from tvlars.harness.runlog import METRIC_COLUMNS
from tvlars.harness.runtime import say


def open_run(args: argparse.Namespace, rt, *, command: str, parser_defaults, default_out, min_epochs: int = 1):
    """(args resolved, out, saved config or None, checkpoint state or None), or None when
    the run in --out already completed. ``parser_defaults()`` gives the command's flag
    defaults (read only on --resume); ``default_out(args)`` the folder when --out is unset."""
    from tvlars.harness import checkpoint as ckpt
    from tvlars.harness.runlog import RUN_FILES, read_config, read_summary

    probe = copy.copy(args)
    cfg.resolve_auto(probe, min_epochs=min_epochs)
    out = Path(args.out or default_out(probe))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run folder")
    saved = read_config(out)
    if not args.resume and (saved is not None or any((out / f).exists() for f in RUN_FILES)):
        raise UserError(f"run folder {out} already holds a run; use --resume to continue it or choose another --out")
    state = None
    if args.resume and saved is not None:
        if saved.get("command") != command:
            this = "an ssl run" if command == "ssl" else f"a {command} run"
            raise UserError(f"run folder {out} holds a '{saved.get('command')}' run, not {this}")
        args = cfg.merge_resume(args, saved, parser_defaults())
        summary = read_summary(out)
        if summary.get("status") == "completed":
            say(rt, f"tvlars: run in {out} already completed ({summary.get('epochs_done')} epochs); nothing to do")
            return None
        if summary.get("status") == "diverged":
            done = summary.get("epochs_done")
            at = f" at epoch {done + 1}" if type(done) is int else ""
            raise UserError(f"run in {out} diverged{at}; nothing to resume")
        if (out / "checkpoint.pt").exists():
            state = ckpt.load_checkpoint(out / "checkpoint.pt")
    cfg.resolve_auto(args, min_epochs=min_epochs)
    args.out = str(out)
    return args, out, saved, state


def load_run_data(args: argparse.Namespace, rt):
    """(ImageData, rows per process): --dataset loaded whole; --batch-size must fit the
    training set and divide over the processes."""
    from tvlars.harness.data import load_data

    synthetic = dict(num_train=args.synthetic_train, num_test=args.synthetic_test, num_classes=args.synthetic_classes,
                     channels=args.synthetic_channels, image_size=args.synthetic_image_size)
    data = load_data(args.dataset, args.data_dir, download=args.download, synthetic=synthetic)
    n_train = len(data.train_labels)
    if args.batch_size > n_train:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {n_train} training images of {args.dataset}")
    if args.batch_size % rt.world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {rt.world_size} processes")
    return data, args.batch_size // rt.world_size


def build_classifier(args: argparse.Namespace, data):
    """--model for ``data`` (seed first); an impossible combination is a one-line UserError."""
    from tvlars.harness.models import build_model

    try:
        return build_model(args.model, data.num_classes, data.in_channels, data.image_size, stem=args.stem,
                           init=args.init)
    except ValueError as err:
        raise UserError(str(err).splitlines()[0]) from None


def data_on_device(args: argparse.Namespace, rt, *tensors) -> bool:
    """--data-on-device: yes, no, or auto = whether ``tensors`` fit comfortably in the device
    memory (tvlars.harness.loader.fits_on_device). Free memory differs between GPUs, so the
    ranks agree on the answer (keep on the device only if every rank can): a rank that
    disagreed would shard, normalise and count its batches differently."""
    from tvlars.harness.loader import fits_on_device

    if args.data_on_device != "auto":
        return args.data_on_device == "yes"
    size = sum(t.numel() * t.element_size() for t in tensors)
    return bool(rt.all_reduce_min_int(int(fits_on_device(size, rt.device))))


def micro_batch_size(args: argparse.Namespace, module, data, rt, per_rank: int, *, make_optimizer=None,
                     inputs_per_row: int = 1) -> int:
    """--micro-batch-size: an integer (capped at the per-rank batch), or auto: on CUDA the
    largest power-of-two fraction of the per-rank batch whose training step of ``module``
    fits (see probe_micro_batch; call it once the data set is on the device), else the
    per-rank batch capped at 1024. The smallest choice over ranks wins."""
    if args.micro_batch_size != "auto":
        return max(1, min(int(args.micro_batch_size), per_rank))
    if rt.device.type != "cuda":
        return rt.all_reduce_min_int(min(per_rank, 1024))
    local = probe_micro_batch(module, rt, input_shape=(data.in_channels, data.image_size, data.image_size),
                              per_rank=per_rank, amp=args.amp, channels_last=args.channels_last,
                              make_optimizer=make_optimizer, inputs_per_row=inputs_per_row)
    return rt.all_reduce_min_int(local)


def probe_micro_batch(module, rt, *, input_shape, per_rank: int, amp: str = "none", channels_last: bool = False,
                      make_optimizer=None, inputs_per_row: int = 1) -> int:
    """The largest of per_rank, per_rank / 2, ..., 1 rows whose forward and backward through a
    copy of ``module`` run twice without an allocation failure (is_allocation_failure), while
    what training holds at the same time is allocated too: the loader's batch
    (``inputs_per_row`` float32 tensors of per_rank rows), the gradients and, when
    ``make_optimizer(copy)`` is given, the optimizer state (one step on zero gradients).

    No collective runs in the probe, so ranks that fail at different sizes cannot hang:
    SyncBatchNorm layers are plain batch norm in the copy (plain_batch_norm). The random
    number generators (CPU and ``rt.device``) are as they were before the probe."""
    import torch

    from tvlars.harness.runtime import autocast

    device = rt.device
    fork = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork, device_type=device.type if fork else "cuda"):
        probe = plain_batch_norm(copy.deepcopy(module)).train()
        optimizer = None
        if make_optimizer is not None:
            optimizer = make_optimizer(probe)
            for p in probe.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            optimizer.step()  # the state exists from the first step on
        held = torch.empty((per_rank * inputs_per_row, *input_shape), device=device)

        def fits(rows: int) -> bool:
            try:
                for _ in range(2):  # the second pass meets the first one's leftovers, as training does
                    x = torch.randn((rows, *input_shape), device=device)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast(rt, amp):
                        out = probe(x)
                    out.float().sum().backward()
                    del x, out
                return True
            except Exception as err:  # noqa: BLE001 -- anything but an allocation failure is re-raised
                if not is_allocation_failure(err):
                    raise
                return False
            finally:
                probe.zero_grad(set_to_none=optimizer is None)

        micro = per_rank
        while not fits(micro):
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if micro == 1:
                raise UserError("one image per micro-batch does not fit in GPU memory")
            micro = max(1, micro // 2)
        del probe, optimizer, held
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return micro


#: Messages of allocation failures that reach Python as a plain RuntimeError (cuBLAS,
#: cuDNN and CUDA runtime errors) rather than torch.OutOfMemoryError.
ALLOCATION_FAILURES = ("out of memory", "ALLOC_FAILED")


def is_allocation_failure(err: BaseException) -> bool:
    """Whether ``err`` says the device ran out of memory: torch's OutOfMemoryError, or a
    RuntimeError such as "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED" or
    "CUDNN_STATUS_ALLOC_FAILED"."""
    import torch

    if isinstance(err, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


def plain_batch_norm(module):
    """``module`` with every SyncBatchNorm replaced by a plain batch norm holding the same
    parameters and statistics (in place; returns the module). SyncBatchNorm runs a
    collective in every training forward."""
    from torch import nn

    if isinstance(module, nn.SyncBatchNorm):
        plain = _any_rank_batch_norm()(module.num_features, module.eps, module.momentum, module.affine,
                                       module.track_running_stats)
        state = module.state_dict()
        if state:
            plain = plain.to(next(iter(state.values())).device)
            plain.load_state_dict(state)
        for name, p in module.named_parameters(recurse=False):
            getattr(plain, name).requires_grad_(p.requires_grad)
        return plain.train(module.training)
    for name, child in module.named_children():
        replaced = plain_batch_norm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


@functools.cache
def _any_rank_batch_norm():
    from torch.nn.modules.batchnorm import _BatchNorm

    class AnyRankBatchNorm(_BatchNorm):
        """Batch norm over dimension 1 of an input of any rank, as SyncBatchNorm accepts."""

        def _check_input_dim(self, input):
            if input.dim() < 2:
                raise ValueError(f"expected at least 2-D input (got {input.dim()}-D input)")

    return AnyRankBatchNorm


def micro_batches(x, y, micro: int, most_rows: int) -> list:
    """The micro-batches of one step: rows [j * micro, (j + 1) * micro) of ``x`` and ``y`` for
    j < ceil(most_rows / micro), at least one. ``most_rows`` is the largest share of the
    global batch on any rank, so every rank gets the same number of micro-batches (the last
    ones of a rank with fewer rows may be short or empty): SyncBatchNorm and FSDP run
    collectives in each forward, which must pair up across ranks."""
    count = max(1, math.ceil(most_rows / micro))
    return [(x[j * micro:(j + 1) * micro], y[j * micro:(j + 1) * micro]) for j in range(count)]


def run_config(args: argparse.Namespace, rt, *, command: str, micro: int, per_rank: int, steps_per_epoch: int,
               total_steps: int, data, **extra) -> dict:
    """The resolved configuration config.yaml records: every flag, then what was derived."""
    import torch

    from tvlars.harness.optimizers import delay_in_steps, peak_lr

    return dict(vars(args), command=command, out=args.out, micro_batch_size=micro,
                accumulation_steps=math.ceil(per_rank / micro), world_size=rt.world_size,
                torch_version=torch.__version__, tvlars_version=package_version(), steps_per_epoch=steps_per_epoch,
                total_steps=total_steps, delay_steps_resolved=delay_in_steps(args, steps_per_epoch),
                peak_lr=peak_lr(args),
                train_size=len(data.train_labels), test_size=len(data.test_labels), **extra)


def open_log(out: Path, rt, config: dict, saved: dict | None, *, resume_epoch, resume_step: int, epochs_done: int,
             best_test_acc=None, best_epoch=None, metric_columns=METRIC_COLUMNS):
    """The RunLog of this invocation (see RunLog for resume_epoch / resume_step), once every
    rank has checked the folder: config.yaml written, summary.json "running"."""
    from tvlars.harness.runlog import RunLog

    if saved is not None and saved.get("world_size") not in (None, rt.world_size):
        say(rt, f"tvlars: note: resuming a run started with {saved['world_size']} process(es) on {rt.world_size}")
    rt.barrier()  # every rank has checked the folder before rank 0 writes to it
    try:
        log = RunLog(out, enabled=rt.is_main, metric_columns=metric_columns, resume_epoch=resume_epoch,
                     resume_step=resume_step)
        log.write_config(config)
    except OSError as err:
        raise UserError(f"cannot write the run folder {out}: {err.strerror or err}") from None
    log.write_summary(status="running", epochs_done=epochs_done, final_test_acc=None, best_test_acc=best_test_acc,
                      best_epoch=best_epoch, wall_time_s=None, world_size=rt.world_size)
    return log


def diverged(log, out: Path, *, epoch: int, t_start: float, what: str = "training", best_test_acc=None,
             best_epoch=None) -> int:
    """A non-finite loss or weight in ``epoch`` (0-based): summary.json "diverged", the last
    good checkpoint kept, a one-line error; returns the exit status 1."""
    log.write_summary(status="diverged", epochs_done=epoch, final_test_acc=None, best_test_acc=best_test_acc,
                      best_epoch=best_epoch, wall_time_s=round(time.time() - t_start, 3),
                      diverged_at_epoch=epoch + 1)
    log.close()
    kept = f"the checkpoint of epoch {epoch} is kept" if epoch > 0 else "no checkpoint was written"
    print(f"tvlars: error: {what} diverged in epoch {epoch + 1} (non-finite loss or weights); {kept} in {out}",
          file=sys.stderr)
    return 1


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("tvlars")
    except Exception:  # not installed (running from a source tree)
        return "unknown"
