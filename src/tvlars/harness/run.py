"""What ``tvlars train`` and ``tvlars ssl`` share around their loops, in the order they use it.

Two commands, one set of rules for a run: which folder may be written, what --resume takes,
how the batch is split, what config.yaml records, and what the end of an epoch does
(checkpoint, summary.json, --stop-after-epochs) or a divergence. They live here so that the
rules cannot drift apart between the commands; what a step and an epoch compute stays in
each command's module, to be read top to bottom.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tvlars
from tvlars import runfolder
from tvlars.errors import UserError
from tvlars.harness import checkpoint as ckpt
from tvlars.harness.config import TrainConfig, merge_resume
from tvlars.harness.runlog import RunLog
from tvlars.harness.runtime import say


@dataclass(frozen=True)
class OpenedRun:
    """A run folder this invocation may write, and the run's configuration."""

    config: TrainConfig
    out: Path
    saved: dict | None  # config.yaml of the run being resumed
    state: dict | None  # its checkpoint, None when it starts from scratch


def open_run(args: argparse.Namespace, runtime, kind: type[TrainConfig]) -> OpenedRun | None:
    """The command-line boundary: parsed flags in, the run's configuration out, after the
    run-folder rules. A folder holding another run is refused unless --resume, which takes
    the saved config.yaml and checkpoint; None when that run already completed."""
    args = kind.check_flags(args)
    out = Path(kind.from_flags(args).out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run folder")
    saved = runfolder.read_config(out)
    if not args.resume and (saved is not None or runfolder.holds_run(out)):
        raise UserError(f"run folder {out} already holds a run; use --resume to continue it or choose another --out")
    state = None
    if args.resume and saved is not None:
        if saved.get("command") != kind.command:
            this = "an ssl run" if kind.command == "ssl" else f"a {kind.command} run"
            raise UserError(f"run folder {out} holds a '{saved.get('command')}' run, not {this}")
        args = merge_resume(args, saved, kind.defaults())
        summary = runfolder.read_summary(out)
        if summary.get("status") == runfolder.COMPLETED:
            say(runtime, f"tvlars: run in {out} already completed ({summary.get('epochs_done')} epochs); nothing to do")
            return None
        if summary.get("status") == runfolder.DIVERGED:
            done = summary.get("epochs_done")
            at = f" at epoch {done + 1}" if type(done) is int else ""
            raise UserError(f"run in {out} diverged{at}; nothing to resume")
        if (out / runfolder.CHECKPOINT).exists():
            state = ckpt.load_checkpoint(out / runfolder.CHECKPOINT)
        else:
            _refuse_lost_checkpoint(out, summary)
    elif args.resume and runfolder.holds_run(out):
        found = ", ".join(name for name in runfolder.RUN_FILES if (out / name).exists())
        raise UserError(f"--resume: run folder {out} holds {found} but no {runfolder.CONFIG}, so there is no run "
                        f"to resume; nothing was changed (choose another --out to start a new run)")
    return OpenedRun(kind.from_flags(args, out=str(out)), out, saved, state)


def _refuse_lost_checkpoint(out: Path, summary: dict) -> None:
    """--resume of a run whose checkpoint.pt is gone: starting over would overwrite the epochs
    its metrics.csv records, so that is refused; a run that died before its first checkpoint
    (no epoch recorded) has nothing to lose and starts over."""
    done = summary.get("epochs_done")
    rows = len(runfolder.read_metrics(out / runfolder.METRICS))
    recorded = max(done if type(done) is int else 0, rows)
    if recorded:
        raise UserError(f"--resume: run in {out} records {recorded} epoch(s) but its {runfolder.CHECKPOINT} is gone, "
                        f"so there is nothing to resume from; its records were left as they are (choose another "
                        f"--out to start the run again)")


def load_run_data(cfg: TrainConfig, runtime):
    """(ImageData, rows per process). The batch is global, so it must fit the training set
    and split evenly over the processes."""
    from tvlars.harness.data.datasets import load_data

    synthetic = dict(num_train=cfg.synthetic_train, num_test=cfg.synthetic_test, num_classes=cfg.synthetic_classes,
                     channels=cfg.synthetic_channels, image_size=cfg.synthetic_image_size)
    data = load_data(cfg.dataset, cfg.data_dir, download=cfg.download, synthetic=synthetic)
    n_train = len(data.train_labels)
    if cfg.batch_size > n_train:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {n_train} training images of {cfg.dataset}")
    if cfg.batch_size % runtime.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {runtime.world_size} processes")
    return data, cfg.batch_size // runtime.world_size


def build_classifier(cfg: TrainConfig, data):
    """--model for ``data``; an impossible combination (a ResNet stem too big for the
    images, ...) is a one-line UserError rather than a shape error deep in a forward pass."""
    from tvlars.harness.models import build_model

    try:
        return build_model(cfg.model, data.num_classes, data.in_channels, data.image_size, stem=cfg.stem,
                           init=cfg.init)
    except ValueError as err:
        raise UserError(str(err).splitlines()[0]) from None


def data_on_device(cfg: TrainConfig, runtime, *tensors) -> bool:
    """--data-on-device: yes, no, or auto = whether ``tensors`` fit comfortably in the device
    memory (tvlars.harness.data.loader.fits_on_device). Free memory differs between GPUs, so
    the ranks agree on the answer (keep on the device only if every rank can): a rank that
    disagreed would shard, normalise and count its batches differently."""
    from tvlars.harness.data.loader import fits_on_device

    if cfg.data_on_device != "auto":
        return cfg.data_on_device == "yes"
    size = sum(t.numel() * t.element_size() for t in tensors)
    return bool(runtime.all_reduce_min_int(int(fits_on_device(size, runtime.device))))


def micro_batch_size(cfg: TrainConfig, cost_model, data, runtime, per_rank: int, *, make_optimizer=None,
                     inputs_per_row: int = 1) -> int:
    """Rows per forward/backward pass: --micro-batch-size capped at the per-rank batch, or
    ``auto``: on CUDA the largest power-of-two fraction of the per-rank batch whose training
    step through ``cost_model`` fits (probe_micro_batch; call it once the data set is on the
    device), elsewhere the per-rank batch up to 1024. Every rank takes the smallest, so that
    the ranks accumulate the same number of micro-batches."""
    if cfg.micro_batch_size != "auto":
        return max(1, min(int(cfg.micro_batch_size), per_rank))
    if runtime.device.type != "cuda":
        return runtime.all_reduce_min_int(min(per_rank, 1024))
    local = probe_micro_batch(cost_model, runtime, input_shape=(data.in_channels, data.image_size, data.image_size),
                              per_rank=per_rank, amp=cfg.amp, channels_last=cfg.channels_last,
                              make_optimizer=make_optimizer, inputs_per_row=inputs_per_row)
    return runtime.all_reduce_min_int(local)


def probe_micro_batch(module, runtime, *, input_shape, per_rank: int, amp: str = "none", channels_last: bool = False,
                      make_optimizer=None, inputs_per_row: int = 1) -> int:
    """The largest of per_rank, per_rank / 2, ..., 1 rows whose forward and backward through a
    copy of ``module`` run twice without an allocation failure (is_allocation_failure), while
    what training holds at the same time is allocated too: the loader's batch
    (``inputs_per_row`` float32 tensors of per_rank rows), the gradients and, when
    ``make_optimizer(copy)`` is given, the optimizer state (one step on zero gradients).

    No collective runs in the probe, so ranks that fail at different sizes cannot hang:
    SyncBatchNorm layers are plain batch norm in the copy (plain_batch_norm). The random
    number generators (CPU and ``runtime.device``) are as they were before the probe."""
    import torch

    from tvlars.harness.runtime import autocast

    device = runtime.device
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
                    with autocast(runtime, amp):
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


def run_record(cfg: TrainConfig, runtime, *, micro: int, per_rank: int, steps_per_epoch: int, total_steps: int, data,
               **extra) -> dict:
    """config.yaml: the configuration, then what this run derived from it on this machine."""
    import torch

    phi = cfg.factor_args(steps_per_epoch)
    return cfg.record(micro_batch_size=micro, accumulation_steps=math.ceil(per_rank / micro),
                      world_size=runtime.world_size, torch_version=torch.__version__, tvlars_version=tvlars.__version__,
                      steps_per_epoch=steps_per_epoch, total_steps=total_steps, lam_resolved=phi["lam"],
                      delay_steps_resolved=phi["delay_steps"], peak_lr=cfg.peak_lr,
                      train_size=len(data.train_labels), test_size=len(data.test_labels),
                      num_classes=data.num_classes, **extra)


def all_finite(loss: float, params) -> bool:
    """A non-finite loss or weight ends the run: nothing after it can be trusted."""
    import torch

    return math.isfinite(loss) and bool(torch.stack([p.detach().isfinite().all() for p in params]).all())


class Session:
    """One invocation's hold on an open run folder, from config.yaml to the last summary.

    Made by :func:`start_session` once every rank has checked the folder. The clock counts
    from the run's first invocation (``started`` goes back by the checkpoint's wall time),
    so wall_time_s is the run's, however often it was resumed.
    """

    def __init__(self, opened: OpenedRun, runtime, log: RunLog, started: float):
        self.config, self.out, self.runtime, self.log, self.started = opened.config, opened.out, runtime, log, started
        self.epochs_run = 0  # by this invocation: --stop-after-epochs counts these

    def wall_time(self) -> float:
        return round(time.time() - self.started, 3)

    def progress_bar(self, epoch: int, steps: int):
        from tqdm import tqdm

        return tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False,
                    disable=not (self.config.progress and self.runtime.is_main), file=sys.stderr)

    def end_epoch(self, epoch: int, *, checkpoint: dict, summary: dict, message: str) -> bool:
        """After epoch ``epoch`` (0-based) went well: the checkpoint (rank 0; ``checkpoint``
        holds training_state's arguments), a "running" summary.json, the epoch's line.
        True when --stop-after-epochs says this invocation stops here."""
        self.epochs_run += 1
        state = ckpt.training_state(epoch=epoch + 1, **checkpoint)  # every rank: --fsdp gathers onto rank 0
        if self.runtime.is_main:
            ckpt.save_checkpoint(self.out / runfolder.CHECKPOINT, state)
        self.log.write_summary(status=runfolder.RUNNING, epochs_done=epoch + 1, wall_time_s=self.wall_time(), **summary)
        say(self.runtime, message)
        stop_after = self.config.stop_after_epochs
        if stop_after is not None and self.epochs_run >= stop_after and epoch + 1 < self.config.epochs:
            self.log.close()
            say(self.runtime, f"tvlars: stopped after {self.epochs_run} epoch(s) as asked; "
                         f"continue with --resume --out {self.out}")
            return True
        return False

    def diverged(self, epoch: int, *, what: str, **summary) -> int:
        """A non-finite loss or weight in ``epoch`` (0-based): summary.json "diverged" (plus
        ``summary``), the last good checkpoint kept, one line on stderr; returns the exit status 1."""
        self.log.write_summary(status=runfolder.DIVERGED, epochs_done=epoch, final_test_acc=None,
                               wall_time_s=self.wall_time(), diverged_at_epoch=epoch + 1, **summary)
        self.log.close()
        kept = f"the checkpoint of epoch {epoch} is kept" if epoch > 0 else "no checkpoint was written"
        print(f"tvlars: error: {what} diverged in epoch {epoch + 1} (non-finite loss or weights); {kept} in {self.out}",
              file=sys.stderr)
        return 1

    def complete(self, **summary) -> None:
        self.log.write_summary(status=runfolder.COMPLETED, epochs_done=self.config.epochs,
                               wall_time_s=self.wall_time(), **summary)
        self.log.close()


def start_session(opened: OpenedRun, runtime, record: dict, *, started: float, resume_epoch, resume_step: int,
                  epochs_done: int, metric_columns=runfolder.METRIC_COLUMNS, **summary) -> Session:
    """config.yaml written and summary.json "running" (plus the command's own ``summary``
    fields), once every rank has checked the folder. ``resume_epoch``/``resume_step``: see
    RunLog (None starts the folder over)."""
    saved = opened.saved
    for note in opened.config.notes():  # once the run is sure to start
        say(runtime, f"tvlars: note: {note}")
    if saved is not None and saved.get("world_size") not in (None, runtime.world_size):
        say(runtime, f"tvlars: note: resuming a run started with {saved['world_size']} process(es) "
                     f"on {runtime.world_size}")
    runtime.barrier()  # every rank has checked the folder before rank 0 writes to it
    try:
        log = RunLog(opened.out, enabled=runtime.is_main, metric_columns=metric_columns, resume_epoch=resume_epoch,
                     resume_step=resume_step)
        log.write_config(record)
    except OSError as err:
        raise UserError(f"cannot write the run folder {opened.out}: {err.strerror or err}") from None
    log.write_summary(status=runfolder.RUNNING, epochs_done=epochs_done, final_test_acc=None, wall_time_s=None,
                      world_size=runtime.world_size, **summary)
    return Session(opened, runtime, log, started)
