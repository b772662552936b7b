"""``tvlars ssl``: Barlow Twins pre-training, then a linear probe on the frozen encoder.

    OMP_NUM_THREADS=1 tvlars ssl --dataset digits --model cnn --projector 512-512-512 \\
        --batch-size 128 --epochs 100 --device cpu    # ~1.5 min on a CPU core: linear probe
        # 96.9 %, kNN 92.2 % (k=200) / 97.1 % (k=20); a random-init encoder: 92.9, 82.4, 95.6 %
    torchrun --nproc_per_node 4 -m tvlars ssl --dataset cifar10 --data-dir data --epochs 1000 ...

The sibling of ``tvlars train`` (same flags, run folder, resume, failure behaviour and
torchrun support, the same end of an epoch from tvlars.harness.run; see its docstring);
what differs:

 1. model: the encoder of ``--model`` (its classification head is discarded) plus a Barlow
    Twins projector (``--projector``, Linear-BN-ReLU blocks and a final Linear), trained with
    the Barlow Twins loss (``--lambd``) on two augmented views of each image
    (``--augment-preset``: the reference's colour pipeline for 3-channel images of at least
    16 px, its grey subset for 1-channel ones, a crop/noise/erase pipeline below 16 px). The views are
    drawn for the whole global batch, so N processes see what one process sees; the loss
    normalises over the GLOBAL batch (autograd-aware all-reduce).
 2. ``--micro-batch-size`` below the per-process batch: the Barlow Twins loss does not split
    over micro-batches, so the step uses gradient caching: the embeddings of every
    micro-batch are computed without a graph (batch-norm buffers restored afterwards), the
    loss and its gradient with respect to the embeddings are computed on the whole batch,
    then each micro-batch is forwarded again and back-propagates its slice of that gradient.
    Exact for a model without batch norm; with batch norm, statistics are per micro-batch (as
    in ``tvlars train``). One extra forward pass per step.
 3. evaluation, never on training-time augmentations (encoder in eval mode, test transform =
    normalisation only): an online linear probe (``--online-probe``, trained on detached
    features of view 1 during pre-training: metrics.csv train_acc on training batches,
    online_acc on the test set, every --eval-every epochs); weighted kNN on the whole
    training and test sets (``--knn-k``, and k=20) every ``--knn-every`` epochs and after
    the last; and, after pre-training, the linear probe (``--probe-*``: SGD + cosine
    annealing on the frozen encoder, the paper's 100 epochs) on the whole test set.
 4. run folder: as ``tvlars train`` (config.yaml with ``command: ssl``); metrics.csv adds
    knn_acc, knn20_acc, online_acc, and its test_loss / test_acc stay empty except on the
    last epoch's row, whose test_acc is the linear probe's top-1 (test_loss stays empty: the
    probe reports accuracy); probe.csv holds the probe's per-epoch history; summary.json:
    final_test_acc = the linear probe's top-1 after its last epoch (the headline), linear_top5,
    probe_best_acc / probe_best_epoch (its best epoch, chosen on the test set: a diagnostic),
    knn_acc, knn20_acc, online_acc (tvlars.runfolder lists the fields).
    The last epoch's row is written after the probe; a run interrupted during the probe
    resumes with the probe only (the checkpoint of the last epoch carries that row).

Defaults: the optimizer flags keep tvlars train's (the paper's grid) except --lam, 1e-5
for Barlow Twins (Table 1). The reference (Zbontar et al.) used LARS with lr 0.2 for
weights (0.0048 for biases), weight decay 1.5e-6, batch 2048, 1000 epochs and a
4096-4096-4096 projector; the paper reports 2048-2048-4096 (the default here).
--no-drop-last is refused: the loss normalises over the batch, so every step needs a full one.

Exit status: 0 completed (or stopped by --stop-after-epochs), 1 diverged, 2 user error.
"""

from __future__ import annotations

import argparse
import math
import time

from tvlars.harness import flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_ssl_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tvlars.harness.config import SSLConfig
    from tvlars.harness.run import open_run
    from tvlars.harness.runtime import setup_runtime

    runtime = setup_runtime(args.device)
    started = time.time()
    try:
        opened = open_run(args, runtime, SSLConfig)
        return 0 if opened is None else pretrain(opened, runtime, started)
    finally:
        runtime.shutdown()


# ---------------------------------------------------------------------------------------
def pretrain(opened, runtime, started: float) -> int:
    import torch

    from tvlars import runfolder
    from tvlars.errors import UserError
    from tvlars.harness import checkpoint as ckpt
    from tvlars.harness import optimizers
    from tvlars.harness.data import loader
    from tvlars.harness.run import (all_finite, build_classifier, data_on_device, load_run_data, micro_batch_size,
                                    run_record, start_session)
    from tvlars.harness.runtime import prepare_model, say, seed_everything
    from tvlars.harness.ssl import barlow, evaluate
    from tvlars.harness.ssl.augment import OneViewAugment, TwoViewAugment, probe_view, unit_loader_stats

    cfg, out, state = opened.config, opened.out, opened.state

    # ---- data, model, loaders, optimizer ----------------------------------------------------
    data, per_rank = load_run_data(cfg, runtime)
    n_train = len(data.train_labels)
    if per_rank < 2:
        raise UserError(f"--batch-size {cfg.batch_size} leaves {per_rank} image per process; Barlow Twins "
                        "normalises over the batch and needs at least 2")
    channels, size = data.in_channels, data.image_size
    # a resumed run keeps the views it started with, even where "auto" now picks another preset
    preset = (opened.saved or {}).get("augment_preset_resolved") or cfg.augment_preset
    try:
        augment = TwoViewAugment(size, channels, data.mean, data.std, preset)
    except UserError as err:
        raise UserError(f"--augment-preset {cfg.augment_preset} on {cfg.dataset} "
                        f"({channels}x{size}x{size} images): {err}") from None

    seed_everything(cfg.seed)
    classifier = build_classifier(cfg, data)  # its encoder; the head is not used
    net = barlow.BarlowTwins(classifier.encoder, classifier.feature_dim, barlow.parse_projector(cfg.projector),
                             cfg.lambd)
    wrapped, model = prepare_model(net, runtime, sync_bn=cfg.sync_bn, channels_last=cfg.channels_last,
                                   compile=cfg.compile)
    names = {id(p): n for n, p in model.named_parameters()}

    unit_mean, unit_std = unit_loader_stats(channels)  # the loader yields [0, 1]; the views normalise
    on_device = data_on_device(cfg, runtime, data.train_images, data.train_labels)  # the same on every rank
    train_loader = loader.make_loader(data.train_images, data.train_labels, data_on_device=on_device,
                                      num_workers=cfg.num_workers, batch_size=cfg.batch_size, shuffle=True,
                                      drop_last=True, augment=None, mean=unit_mean, std=unit_std, device=runtime.device,
                                      rank=runtime.rank, world_size=runtime.world_size, seed=cfg.seed)
    offset = loader.rank_share(cfg.batch_size, runtime.rank, runtime.world_size)[0]
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = optimizers.build_optimizer(model, **optimizers.optimizer_kwargs(cfg, steps_per_epoch))
    scheduler = optimizers.build_scheduler(optimizer, **optimizers.scheduler_kwargs(cfg, steps_per_epoch, total_steps))
    probe = (evaluate.OnlineProbe(model.feature_dim, data.num_classes, device=runtime.device)
             if cfg.online_probe else None)
    # probed with the data on the device and an optimizer state like training's; a step holds
    # the loader's batch and its two views
    micro = micro_batch_size(cfg, barlow.TwoViewCost(model), data, runtime, per_rank, inputs_per_row=3,
                             make_optimizer=lambda m: optimizers.build_optimizer(
                                 m, **optimizers.optimizer_kwargs(cfg, steps_per_epoch)))

    start_epoch, step, last_eval, pending = 0, 0, {}, None
    if state is not None:
        ckpt.restore(state, out / runfolder.CHECKPOINT, model, optimizer, scheduler, online_probe=probe)
        start_epoch, step = int(state["epoch"]), int(state["step"])
        last_eval, pending = dict(state.get("last_eval") or {}), state.get("pending_row")

    record = run_record(cfg, runtime, micro=micro, per_rank=per_rank, steps_per_epoch=steps_per_epoch,
                        total_steps=total_steps, data=data, feature_dim=model.feature_dim,
                        augment_preset_resolved=augment.preset)
    # a run stopped during the probe: the last epoch's row is rewritten after the probe
    keep = None if state is None else (start_epoch - 1 if pending is not None else start_epoch)
    session = start_session(opened, runtime, record, started=started, resume_epoch=keep, resume_step=step,
                            epochs_done=start_epoch, metric_columns=runfolder.SSL_METRIC_COLUMNS)
    say(runtime, f"tvlars: Barlow Twins pre-training of {cfg.model} + projector {cfg.projector} on {cfg.dataset} "
                 f"({n_train} images) with {cfg.optimizer}, batch {cfg.batch_size} = {runtime.world_size} x "
                 f"{math.ceil(per_rank / micro)} x {micro}, {steps_per_epoch} steps/epoch, run folder {out}")

    # ---- pre-training -----------------------------------------------------------------------
    params = list(model.parameters())
    stats_log = optimizers.LayerStatsLog(session.log, names)
    for epoch in range(start_epoch, cfg.epochs):
        wrapped.train()
        train_loader.set_epoch(epoch)
        views = loader.derived_generator(cfg.seed, epoch, 2)  # the same on every rank
        loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
        lr_used = optimizer.param_groups[0]["lr"]
        bar = session.progress_bar(epoch, steps_per_epoch)
        t0 = time.time()
        for i, (x, y) in enumerate(train_loader):
            stats_now = runtime.is_main and cfg.layer_stats_every > 0 and (step + 1) % cfg.layer_stats_every == 0
            optimizers.enable_stats(optimizer, stats_now)
            v1, v2 = augment(x, views, global_batch=cfg.batch_size, offset=offset)
            if cfg.channels_last:
                v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
            loss, h1 = barlow.forward_backward(wrapped, model, v1, v2, micro, runtime, cfg.amp)
            lr_used = optimizers.optimizer_step(optimizer, scheduler, stats_log, stats=stats_now, step=step + 1,
                                                epoch=epoch + 1)
            if probe is not None:
                probe.step(h1, y)
            step += 1
            loss_sum += loss
            if not bar.disable and (i % 10 == 0 or i == steps_per_epoch - 1):  # host sync: rank 0 only
                bar.set_postfix(loss=f"{loss_sum.item() / (i + 1):.4f}")
            bar.update(1)
        bar.close()
        stats_log.flush(wait=True)
        epoch_time = time.time() - t0
        train_loss = loss_sum.item() / steps_per_epoch  # the loss is global: the same on every rank
        train_rows = steps_per_epoch * cfg.batch_size
        finite = all_finite(train_loss, params)
        row = {"epoch": epoch + 1, "step": step, "lr": float(lr_used), "train_loss": train_loss,
               "epoch_time": round(epoch_time, 4), "images_per_sec": round(train_rows / max(epoch_time, 1e-9), 2)}
        if probe is not None:
            acc = probe.epoch_metrics()["acc"]
            row["train_acc"] = acc if math.isfinite(acc) else None
        last = epoch + 1 == cfg.epochs
        if finite:
            row.update(evaluate.epoch_evaluation(
                model.encoder, data, probe, knn=last or (cfg.knn_every > 0 and (epoch + 1) % cfg.knn_every == 0),
                online=last or (epoch + 1) % cfg.eval_every == 0, knn_k=cfg.knn_k, temperature=cfg.knn_temperature,
                batch_size=cfg.eval_batch_size))
            last_eval.update({k: row[k] for k in ("knn_acc", "knn20_acc", "online_acc") if k in row})
        if not finite:  # ---- divergence: keep everything written so far, stop --------------------
            session.log.log_epoch(row)
            return session.diverged(epoch, what="pre-training")
        pending = row if last else None  # the last row waits for the probe's accuracy
        if not last:
            session.log.log_epoch(row)
        stop = session.end_epoch(
            epoch,
            checkpoint=dict(model=model, optimizer=optimizer, scheduler=scheduler, step=step, last_eval=last_eval,
                            pending_row=pending, online_probe=None if probe is None else probe.state_dict()),
            summary=last_eval,
            message=f"epoch {epoch + 1}/{cfg.epochs} loss {train_loss:.4f} "
                    + "".join(f"{k} {row[k]:.2f} " for k in ("train_acc", "online_acc", "knn_acc", "knn20_acc")
                              if row.get(k) is not None)
                    + f"({epoch_time:.1f}s, {row['images_per_sec']:.0f} img/s)")
        if stop:
            return 0

    if cfg.epochs == 0:  # the untrained baseline gets the kNN accuracies a trained run reports too
        last_eval.update(evaluate.epoch_evaluation(model.encoder, data, None, knn=True, online=False, knn_k=cfg.knn_k,
                                                   temperature=cfg.knn_temperature, batch_size=cfg.eval_batch_size))

    # ---- linear probe on the frozen encoder (every rank: deterministic; rank 0 writes) -------
    runtime.barrier()
    say(runtime, f"tvlars: linear probe, {cfg.probe_epochs} epochs on the frozen encoder")
    probe_augment = OneViewAugment(size, channels, data.mean, data.std, probe_view()) if cfg.probe_augment else None
    result = evaluate.linear_probe(model.encoder, (data.train_images, data.train_labels),
                                   (data.test_images, data.test_labels), num_classes=data.num_classes,
                                   epochs=cfg.probe_epochs, batch_size=cfg.probe_batch_size, lr=cfg.probe_lr,
                                   weight_decay=cfg.probe_weight_decay, device=runtime.device, seed=cfg.seed,
                                   augment=probe_augment, mean=data.mean, std=data.std,
                                   feature_batch_size=cfg.eval_batch_size, norm=cfg.probe_norm)
    if runtime.is_main:
        runfolder.write_csv(out / runfolder.PROBE, runfolder.PROBE_COLUMNS, result["history"])
    for history in result["history"]:
        session.log.log_scalars(step + history["epoch"], {f"probe/{k}": v for k, v in history.items()
                                                          if k != "epoch" and v is not None})
    top1 = result["top1"]
    if pending is not None:
        session.log.log_epoch({**pending, "test_acc": top1})
    session.complete(final_test_acc=top1, linear_top5=result["top5"], probe_best_acc=result["best_top1"],
                     probe_best_epoch=result["best_epoch"], probe_lr=result["lr"],
                     probe_norm=result["norm"], **last_eval)
    say(runtime, f"tvlars: done: linear probe top-1 {top1:.2f}% (top-5 {result['top5']:.2f}%), "
                 + "".join(f"{k} {last_eval[k]:.2f}% " for k in ("knn_acc", "knn20_acc", "online_acc")
                           if k in last_eval)
                 + f"run folder {out}")
    return 0
