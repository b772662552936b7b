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
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
            raise UserError(f"run in {out} diverged at epoch {summary.get('epochs_done', 0) + 1}; nothing to resume")
        if (out / runfolder.CHECKPOINT).exists():
            state = ckpt.load_checkpoint(out / runfolder.CHECKPOINT)
    return OpenedRun(kind.from_flags(args, out=str(out)), out, saved, state)


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


def micro_batch_size(cfg: TrainConfig, cost_model, data, runtime, per_rank: int) -> int:
    """Rows per forward/backward pass. ``auto`` on CUDA: the largest power-of-two fraction of
    the per-rank batch whose forward and backward through ``cost_model`` fit, halved again
    for the optimizer state; elsewhere the per-rank batch up to 1024. Every rank takes the
    smallest, so that the ranks accumulate the same number of micro-batches."""
    if cfg.micro_batch_size != "auto":
        return max(1, min(int(cfg.micro_batch_size), per_rank))
    if runtime.device.type != "cuda":
        return runtime.all_reduce_min_int(min(per_rank, 1024))
    import torch

    from tvlars.harness.runtime import autocast

    probe = copy.deepcopy(cost_model)  # batch-norm statistics of the real model stay untouched
    shape = (data.in_channels, data.image_size, data.image_size)
    micro = per_rank
    while True:
        try:
            x = torch.randn(micro, *shape, device=runtime.device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(runtime, cfg.amp):
                probe(x).float().sum().backward()
            probe.zero_grad(set_to_none=True)
            break
        except torch.cuda.OutOfMemoryError:
            probe.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if micro == 1:
                raise UserError("one image per micro-batch does not fit in GPU memory") from None
            micro = max(1, micro // 2)
    del probe
    torch.cuda.empty_cache()
    micro = micro if micro == per_rank else max(1, micro // 2)
    return runtime.all_reduce_min_int(micro)


def run_record(cfg: TrainConfig, runtime, *, micro: int, per_rank: int, steps_per_epoch: int, total_steps: int, data,
               **extra) -> dict:
    """config.yaml: the configuration, then what this run derived from it on this machine."""
    import torch

    return cfg.record(micro_batch_size=micro, accumulation_steps=math.ceil(per_rank / micro),
                      world_size=runtime.world_size, torch_version=torch.__version__, tvlars_version=package_version(),
                      steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                      delay_steps_resolved=cfg.delay_in_steps(steps_per_epoch), train_size=len(data.train_labels),
                      test_size=len(data.test_labels), **extra)


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("tvlars")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


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
        if self.runtime.is_main:
            ckpt.save_checkpoint(self.out / runfolder.CHECKPOINT, ckpt.training_state(epoch=epoch + 1, **checkpoint))
        self.log.write_summary(status=runfolder.RUNNING, epochs_done=epoch + 1, wall_time_s=self.wall_time(), **summary)
        say(self.runtime, message)
        stop_after = self.config.stop_after_epochs
        if stop_after is not None and self.epochs_run >= stop_after and epoch + 1 < self.config.epochs:
            self.log.close()
            say(self.runtime, f"tvlars: stopped after {self.epochs_run} epoch(s) as asked; "
                         f"continue with --resume --out {self.out}")
            return True
        return False

    def diverged(self, epoch: int, *, what: str, best_test_acc=None, best_epoch=None) -> int:
        """A non-finite loss or weight in ``epoch`` (0-based): summary.json "diverged", the
        last good checkpoint kept, one line on stderr; returns the exit status 1."""
        self.log.write_summary(status=runfolder.DIVERGED, epochs_done=epoch, final_test_acc=None,
                               best_test_acc=best_test_acc, best_epoch=best_epoch, wall_time_s=self.wall_time(),
                               diverged_at_epoch=epoch + 1)
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
                  epochs_done: int, best_test_acc=None, best_epoch=None,
                  metric_columns=runfolder.METRIC_COLUMNS) -> Session:
    """config.yaml written and summary.json "running", once every rank has checked the folder.
    ``resume_epoch``/``resume_step``: see RunLog (None starts the folder over)."""
    saved = opened.saved
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
    log.write_summary(status=runfolder.RUNNING, epochs_done=epochs_done, final_test_acc=None,
                      best_test_acc=best_test_acc, best_epoch=best_epoch, wall_time_s=None,
                      world_size=runtime.world_size)
    return Session(opened, runtime, log, started)
