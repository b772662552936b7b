"""``tvlars train``: supervised large-batch training, one readable loop (top to bottom).

    tvlars train --dataset digits --optimizer tvlars --batch-size 256 --lr 1 --epochs 30
    torchrun --nproc_per_node 4 -m tvlars train --dataset cifar10 --data-dir data ...

What it does, in order:
 1. flags -> the run's configuration (tvlars.harness.config), once, at the boundary; the
    run folder is checked (tvlars.harness.run, shared with tvlars ssl, as are the data
    checks, the end of an epoch and divergence): a folder holding another run is refused
    unless --resume, which takes the saved config.yaml (a changed flag that affects
    results is an error) and the checkpoint.
 2. runtime (one process or DDP under torchrun), data (whole splits as uint8 tensors),
    model, loaders, optimizer (+ schedule stepped per optimizer step).
 3. per epoch: train over global batches of --batch-size rows, each split into this
    rank's share and then into micro-batches whose gradients are accumulated (the loss of
    every micro-batch is its SUM of losses times world / rows-in-the-global-batch, so the
    accumulated, DDP-averaged gradient is exactly the full-batch mean gradient; DDP's
    gradient all-reduce runs only on the last micro-batch); per-layer stats every K steps;
    evaluation on the WHOLE test set, sharded over ranks and summed with all_reduce;
    one metrics.csv row; an atomic checkpoint; summary.json.
 4. a non-finite loss or weight stops the run: status "diverged", exit status 1, the last
    good checkpoint is kept.

Distributed: every rank checks the run folder and, on --resume, reads the checkpoint
(multi-node runs need the folder on a shared filesystem); only rank 0 writes.

Exit status: 0 completed (or stopped by --stop-after-epochs), 1 diverged, 2 user error.
metrics.csv "epoch_time" is the training time of the epoch (evaluation excluded) and
"images_per_sec" the training images per second over it; "lr" is the learning rate of
the epoch's last optimizer step (the group lr: for TVLARS phi_t multiplies it inside the
optimizer).
"""

from __future__ import annotations

import argparse
import math
import time

from tvlars.harness import flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_train_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tvlars.harness.config import TrainConfig
    from tvlars.harness.run import open_run
    from tvlars.harness.runtime import setup_runtime

    runtime = setup_runtime(args.device)
    started = time.time()
    try:
        opened = open_run(args, runtime, TrainConfig)
        return 0 if opened is None else train(opened, runtime, started)
    finally:
        runtime.shutdown()


# ---------------------------------------------------------------------------------------
def train(opened, runtime, started: float) -> int:
    import torch
    import torch.nn.functional as F

    from tvlars import runfolder
    from tvlars.errors import UserError
    from tvlars.harness import checkpoint as ckpt
    from tvlars.harness import optimizers
    from tvlars.harness.data import loader
    from tvlars.harness.run import (all_finite, build_classifier, data_on_device, load_run_data, micro_batch_size,
                                    micro_batches, run_record, start_session)
    from tvlars.harness.runtime import autocast, maybe_no_sync, prepare_model, say, seed_everything

    cfg, out, state = opened.config, opened.out, opened.state

    # ---- data, model, loaders, optimizer ----------------------------------------------------
    data, per_rank = load_run_data(cfg, runtime)
    n_train, n_test = len(data.train_labels), len(data.test_labels)
    seed_everything(cfg.seed)
    if cfg.fsdp and runtime.device.type == "cuda" and cfg.micro_batch_size == "auto":
        raise UserError("--fsdp needs --micro-batch-size N: the automatic probe would run the whole model on one GPU")
    wrapped, model = prepare_model(build_classifier(cfg, data), runtime, sync_bn=cfg.sync_bn,
                                   channels_last=cfg.channels_last, compile=cfg.compile, fsdp=cfg.fsdp)
    names = {id(p): n for n, p in model.named_parameters()}

    common = dict(mean=data.mean, std=data.std, device=runtime.device, rank=runtime.rank, world_size=runtime.world_size,
                  seed=cfg.seed, channels_last=cfg.channels_last)
    augment = None
    if cfg.augment:
        from tvlars.harness.data.augment import RandomCropFlip

        augment = RandomCropFlip(4)
    # every rank takes the same decision (the test set joins the training set on the device)
    on_device = data_on_device(cfg, runtime, data.train_images, data.train_labels, data.test_images,
                               data.test_labels)
    train_loader = loader.make_loader(data.train_images, data.train_labels, data_on_device=on_device,
                                      num_workers=cfg.num_workers, batch_size=cfg.batch_size, shuffle=True,
                                      drop_last=cfg.drop_last, augment=augment, **common)
    # DeviceLoader slices global batches, so the rows of each global batch are known without comms;
    # the test set then lives on the device too.
    exact_rows = isinstance(train_loader, loader.DeviceLoader)
    test_loader = loader.DeviceLoader(data.test_images, data.test_labels,
                                      batch_size=cfg.eval_batch_size * runtime.world_size, shuffle=False,
                                      drop_last=False,
                                      **{**common, "device": runtime.device if exact_rows else "cpu"})
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = optimizers.build_optimizer(model, **optimizers.optimizer_kwargs(cfg, steps_per_epoch))
    scheduler = optimizers.build_scheduler(optimizer, **optimizers.scheduler_kwargs(cfg, steps_per_epoch, total_steps))
    # probed with the data on the device and an optimizer state like training's
    micro = micro_batch_size(cfg, model, data, runtime, per_rank, make_optimizer=lambda m: optimizers.build_optimizer(
        m, **optimizers.optimizer_kwargs(cfg, steps_per_epoch)))

    start_epoch, step, best_acc, best_epoch = 0, 0, None, None
    if state is not None:
        ckpt.restore(state, out / runfolder.CHECKPOINT, model, optimizer, scheduler)
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best_acc, best_epoch = state.get("best_test_acc"), state.get("best_epoch")
        started -= float(state.get("wall_time_s", 0.0))  # wall_time_s counts every invocation

    record = run_record(cfg, runtime, micro=micro, per_rank=per_rank, steps_per_epoch=steps_per_epoch,
                        total_steps=total_steps, data=data)
    session = start_session(opened, runtime, record, started=started,
                            resume_epoch=start_epoch if state is not None else None, resume_step=step,
                            epochs_done=start_epoch, best_test_acc=best_acc, best_epoch=best_epoch)
    say(runtime, f"tvlars: training {cfg.model} on {cfg.dataset} ({n_train} images) with {cfg.optimizer}, "
                 f"batch {cfg.batch_size} = {runtime.world_size} x {math.ceil(per_rank / micro)} x {micro}, "
                 f"{steps_per_epoch} steps/epoch, run folder {out}")

    # ---- the loop ---------------------------------------------------------------------------
    dev = runtime.device
    params = list(model.parameters())
    stats_log = optimizers.LayerStatsLog(session.log, names)
    last_acc = None
    for epoch in range(start_epoch, cfg.epochs):
        wrapped.train()
        train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        correct = torch.zeros((), device=dev, dtype=torch.int64)
        rows_seen = 0
        lr_used = optimizer.param_groups[0]["lr"]
        bar = session.progress_bar(epoch, steps_per_epoch)
        t0 = time.time()
        for i, (x, y) in enumerate(train_loader):
            global_rows = (min(cfg.batch_size, n_train - i * cfg.batch_size) if exact_rows
                           else len(y) * runtime.world_size)
            stats_now = runtime.is_main and cfg.layer_stats_every > 0 and (step + 1) % cfg.layer_stats_every == 0
            optimizers.enable_stats(optimizer, stats_now)
            # as many micro-batches on every rank, sized for the rank with the most rows of a short
            # last batch, so that collectives in the forward (SyncBatchNorm, FSDP) pair up
            most_rows = math.ceil(global_rows / runtime.world_size) if exact_rows else len(y)
            chunks = micro_batches(x, y, micro, most_rows)
            for j, (xm, ym) in enumerate(chunks):
                with maybe_no_sync(wrapped, j < len(chunks) - 1), autocast(runtime, cfg.amp):
                    logits = wrapped(xm)
                loss = F.cross_entropy(logits.float(), ym, reduction="sum")
                (loss * (runtime.world_size / global_rows)).backward()
                loss_sum += loss.detach()
                correct += (logits.detach().argmax(1) == ym).sum()
            lr_used = optimizers.optimizer_step(optimizer, scheduler, stats_log, stats=stats_now, step=step + 1,
                                                epoch=epoch + 1)
            step += 1
            rows_seen += len(y)
            if not bar.disable and (i % 10 == 0 or i == steps_per_epoch - 1):  # host sync: rank 0 only
                seen = max(rows_seen, 1)
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100.0 * correct.item() / seen:.1f}",
                                img_s=f"{rows_seen * runtime.world_size / max(time.time() - t0, 1e-9):.0f}")
            bar.update(1)
        bar.close()
        stats_log.flush(wait=True)
        totals = runtime.all_reduce_sum(torch.stack([loss_sum, correct.to(torch.float64),
                                                torch.tensor(float(rows_seen), device=dev, dtype=torch.float64)]))
        train_loss, train_correct, train_rows = totals.tolist()
        epoch_time = time.time() - t0
        finite = all_finite(train_loss, params)
        row = {"epoch": epoch + 1, "step": step, "lr": float(lr_used), "train_loss": train_loss / max(train_rows, 1),
               "train_acc": 100.0 * train_correct / max(train_rows, 1), "epoch_time": round(epoch_time, 4),
               "images_per_sec": round(train_rows / max(epoch_time, 1e-9), 2)}
        if finite and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            row["test_loss"], row["test_acc"] = evaluate(wrapped, test_loader, runtime, cfg.amp, n_test)
            finite = math.isfinite(row["test_loss"])
        session.log.log_epoch(row)
        if not finite:  # ---- divergence: keep everything written so far, stop -------------------
            return session.diverged(epoch, what="training", best_test_acc=best_acc, best_epoch=best_epoch)
        if "test_acc" in row:
            last_acc = row["test_acc"]
            if best_acc is None or last_acc > best_acc:
                best_acc, best_epoch = last_acc, epoch + 1
        stop = session.end_epoch(
            epoch,
            checkpoint=dict(model=model, optimizer=optimizer, scheduler=scheduler, step=step, best_test_acc=best_acc,
                            best_epoch=best_epoch, last_test_acc=last_acc, wall_time_s=time.time() - session.started),
            summary=dict(best_test_acc=best_acc, best_epoch=best_epoch),
            message=f"epoch {epoch + 1}/{cfg.epochs} loss {row['train_loss']:.4f} acc {row['train_acc']:.2f} "
                    + (f"test_loss {row['test_loss']:.4f} test_acc {row['test_acc']:.2f} " if "test_acc" in row else "")
                    + f"({epoch_time:.1f}s, {row['images_per_sec']:.0f} img/s)")
        if stop:
            return 0
    runtime.barrier()
    if session.epochs_run == 0 and state is not None:  # the checkpoint was the last epoch's
        last_acc = state.get("last_test_acc")
    session.complete(final_test_acc=last_acc, best_test_acc=best_acc, best_epoch=best_epoch)
    say(runtime, f"tvlars: done: test accuracy {last_acc if last_acc is None else round(last_acc, 2)}% "
                 f"(best {best_acc if best_acc is None else round(best_acc, 2)}% at epoch {best_epoch}), "
                 f"run folder {out}")
    return 0


def evaluate(model, loader, runtime, amp: str, n_test: int) -> tuple[float, float]:
    """Mean loss and top-1 accuracy (percent) over the WHOLE test set: every rank evaluates
    its share of each batch, and the sums of loss and correct predictions are all-reduced."""
    import torch
    import torch.nn.functional as F

    from tvlars.harness.runtime import autocast

    model.eval()
    dev = runtime.device
    sums = torch.zeros(3, device=dev, dtype=torch.float64)
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if len(y) == 0 and not hasattr(model, "reshard"):  # an FSDP2 model: every rank's forward all-gathers
                continue
            with autocast(runtime, amp):
                logits = _unwrapped(model)(x)
            sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
    loss, correct, rows = runtime.all_reduce_sum(sums).tolist()
    if int(rows) != n_test:  # the sharding must cover the test set exactly once
        raise RuntimeError(f"evaluated {int(rows)} test images, expected {n_test}")
    model.train()
    return loss / rows, 100.0 * correct / rows


# ---- helpers ---------------------------------------------------------------------------
def _unwrapped(model):
    """The module to call for evaluation: DDP's inner module (no gradient sync hooks needed)."""
    inner = getattr(model, "_orig_mod", None)
    if inner is not None and hasattr(inner, "module"):
        return model  # compiled DDP: call the compiled one
    return getattr(model, "module", model)
