"""The ``tvlars ssl`` loop (flags and run-folder rules: :mod:`tvlars.harness.ssl`).

Read top to bottom, as ``tvlars.harness.train``: configuration and run folder; data,
model, loaders, optimizer; per epoch: Barlow Twins steps on two views of each global
batch (online probe on detached view-1 features), per-layer stats every K steps, kNN /
online-probe evaluation, one metrics.csv row, an atomic checkpoint, summary.json; then
the linear probe on the frozen encoder. A non-finite loss or weight stops the run:
status "diverged", exit 1, the last good checkpoint kept.
"""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn

from tvlars.errors import UserError
from tvlars.harness.barlow import BarlowTwins


class SSLModel(BarlowTwins):
    """BarlowTwins with one more forward mode for gradient caching: ``embeddings=True``
    returns ``(z1, z2, h1)`` (projector outputs of both views, encoder features of view 1)
    without computing the loss. Same parameters and state_dict keys as BarlowTwins."""

    def forward(self, v1, v2, *, return_features: bool = False, embeddings: bool = False):
        if not embeddings:
            return super().forward(v1, v2, return_features=return_features)
        h1 = self.encoder(v1)
        return self.projector(h1), self.projector(self.encoder(v2)), h1


class _TwoViewCost(nn.Module):
    """One input, the activation memory of a Barlow Twins step (two passes): for
    tvlars.harness.run.micro_batch_size's automatic search."""

    def __init__(self, model: SSLModel):
        super().__init__()
        self.model = model

    def forward(self, x):
        z1, z2, _ = self.model(x, x, embeddings=True)
        return z1 + z2


def forward_backward(model, raw: SSLModel, v1, v2, micro: int, rt, amp: str):
    """Loss (detached) and view-1 encoder features (detached) of one step; gradients are
    left in the parameters, averaged over ranks by DDP. Gradient caching when the rank's
    rows exceed ``micro`` (see tvlars.harness.ssl)."""
    from tvlars.harness.barlow import barlow_twins_loss
    from tvlars.harness.runtime import autocast, maybe_no_sync

    if micro >= v1.shape[0]:
        with autocast(rt, amp):
            loss, h1, _ = model(v1, v2, return_features=True)
        loss.backward()
        return loss.detach(), h1.detach()
    pairs = list(zip(v1.split(micro), v2.split(micro)))
    buffers = [b.detach().clone() for b in raw.buffers()]
    with torch.no_grad(), autocast(rt, amp):
        zs = [raw(a, b, embeddings=True)[:2] for a, b in pairs]
    with torch.no_grad():  # the second pass updates the batch-norm running statistics once
        for b, saved in zip(raw.buffers(), buffers):
            b.copy_(saved)
    z1 = torch.cat([z[0] for z in zs]).float().requires_grad_()
    z2 = torch.cat([z[1] for z in zs]).float().requires_grad_()
    del zs
    loss = barlow_twins_loss(z1, z2, raw.lambd, distributed=raw.distributed)
    loss.backward()
    feats = []
    grads = list(zip(z1.grad.split(micro), z2.grad.split(micro)))
    for j, ((a, b), (g1, g2)) in enumerate(zip(pairs, grads)):
        with maybe_no_sync(model, j < len(pairs) - 1), autocast(rt, amp):
            c1, c2, h = model(a, b, embeddings=True)
        torch.autograd.backward([c1.float(), c2.float()], [g1, g2])
        feats.append(h.detach())
    return loss.detach(), torch.cat(feats)


def evaluate(raw: SSLModel, data, args, probe, *, knn: bool, online: bool) -> dict:
    """kNN (k = --knn-k and 20) and online-probe test accuracy, on features of the
    un-augmented images (encoder in eval mode); every rank gets the same numbers."""
    from tvlars.harness.evaluate import extract_features, knn_accuracy

    if not (knn or online):
        return {}
    kw = dict(batch_size=args.eval_batch_size, mean=data.mean, std=data.std)
    test_f, test_y = extract_features(raw.encoder, (data.test_images, data.test_labels), **kw)
    row = {}
    if online and probe is not None:
        row["online_acc"] = probe.accuracy(test_f, test_y)
    if knn:
        train_f, train_y = extract_features(raw.encoder, (data.train_images, data.train_labels), **kw)
        for key, k in (("knn_acc", args.knn_k), ("knn20_acc", 20)):
            row[key] = knn_accuracy(train_f, train_y, test_f, test_y, k=k, temperature=args.knn_temperature,
                                    num_classes=data.num_classes)
    return row


def pretrain(args, rt) -> int:
    from tqdm import tqdm

    from tvlars.harness import checkpoint as ckpt
    from tvlars.harness import optimizers as opt_lib
    from tvlars.harness import run as run_lib
    from tvlars.harness.barlow import parse_projector
    from tvlars.harness.evaluate import OnlineProbe, linear_probe
    from tvlars.harness.loader import derived_generator, make_loader, rank_share
    from tvlars.harness.runtime import prepare_model, say, seed_everything
    from tvlars.harness.ssl import SSL_COLUMNS, open_run, write_probe_csv
    from tvlars.harness.ssl_augment import OneViewAugment, TwoViewAugment, probe_view, unit_loader_stats

    t_start = time.time()
    # ---- 1. configuration and run folder ------------------------------------------------
    opened = open_run(args, rt)
    if opened is None:
        return 0
    args, out, saved, state = opened

    # ---- 2. data, model, loaders, optimizer ---------------------------------------------
    data, per_rank = run_lib.load_run_data(args, rt)
    n_train = len(data.train_labels)
    if per_rank < 2:
        raise UserError(f"--batch-size {args.batch_size} leaves {per_rank} image per process; Barlow Twins "
                        "normalises over the batch and needs at least 2")
    channels, size = data.in_channels, data.image_size
    try:
        augment = TwoViewAugment(size, channels, data.mean, data.std, args.augment_preset)
    except UserError as err:
        raise UserError(f"--augment-preset {args.augment_preset} on {args.dataset} "
                        f"({channels}x{size}x{size} images): {err}") from None

    seed_everything(args.seed)
    clf = run_lib.build_classifier(args, data)
    net = SSLModel(clf.encoder, clf.feature_dim, parse_projector(args.projector), args.lambd)
    model, raw = prepare_model(net, rt, sync_bn=args.sync_bn, channels_last=args.channels_last,
                               compile=args.compile)
    names = {id(p): n for n, p in raw.named_parameters()}

    unit_mean, unit_std = unit_loader_stats(channels)  # the loader yields [0, 1]; the views normalise
    on_device = run_lib.data_on_device(args, rt, data.train_images, data.train_labels)  # the same on every rank
    train_loader = make_loader(data.train_images, data.train_labels, data_on_device=on_device,
                               num_workers=args.num_workers, batch_size=args.batch_size, shuffle=True, drop_last=True,
                               augment=None, mean=unit_mean, std=unit_std, device=rt.device, rank=rt.rank,
                               world_size=rt.world_size, seed=args.seed)
    offset = rank_share(args.batch_size, rt.rank, rt.world_size)[0]
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * args.epochs
    optimizer = opt_lib.build_optimizer(raw, args, steps_per_epoch)
    scheduler = opt_lib.build_scheduler(optimizer, args, steps_per_epoch, total_steps)
    probe = OnlineProbe(raw.feature_dim, data.num_classes, device=rt.device) if args.online_probe else None
    # probed with the data on the device and an optimizer state like training's; a step holds
    # the loader's batch and its two views
    micro = run_lib.micro_batch_size(args, _TwoViewCost(raw), data, rt, per_rank, inputs_per_row=3,
                                     make_optimizer=lambda m: opt_lib.build_optimizer(m, args, steps_per_epoch))

    start_epoch, step, last_eval, pending = 0, 0, {}, None
    if state is not None:
        ckpt.restore(state, out / "checkpoint.pt", raw, optimizer, scheduler, online_probe=probe)
        start_epoch, step = int(state["epoch"]), int(state["step"])
        last_eval, pending = dict(state.get("last_eval") or {}), state.get("pending_row")

    resolved = run_lib.run_config(args, rt, command="ssl", micro=micro, per_rank=per_rank,
                                  steps_per_epoch=steps_per_epoch, total_steps=total_steps, data=data,
                                  feature_dim=raw.feature_dim, augment_preset_resolved=augment.preset)
    # a run stopped during the probe: the last epoch's row is rewritten after the probe
    keep = None if state is None else (start_epoch - 1 if pending is not None else start_epoch)
    log = run_lib.open_log(out, rt, resolved, saved, resume_epoch=keep, resume_step=step, epochs_done=start_epoch,
                           metric_columns=SSL_COLUMNS)
    say(rt, f"tvlars: Barlow Twins pre-training of {args.model} + projector {args.projector} on {args.dataset} "
            f"({n_train} images) with {args.optimizer}, batch {args.batch_size} = {rt.world_size} x "
            f"{math.ceil(per_rank / micro)} x {micro}, {steps_per_epoch} steps/epoch, run folder {out}")

    # ---- 3. pre-training ----------------------------------------------------------------
    params = list(raw.parameters())
    stats_log = opt_lib.LayerStatsLog(log, names)
    epochs_run = 0
    for epoch in range(start_epoch, args.epochs):
        model.train()
        train_loader.set_epoch(epoch)
        views = derived_generator(args.seed, epoch, 2)  # the same on every rank
        loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
        lr_used = optimizer.param_groups[0]["lr"]
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=not (args.progress and rt.is_main), file=sys.stderr)
        t0 = time.time()
        for i, (x, y) in enumerate(train_loader):
            stats_now = rt.is_main and args.layer_stats_every > 0 and (step + 1) % args.layer_stats_every == 0
            opt_lib.enable_stats(optimizer, stats_now)
            v1, v2 = augment(x, views, global_batch=args.batch_size, offset=offset)
            if args.channels_last:
                v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
            loss, h1 = forward_backward(model, raw, v1, v2, micro, rt, args.amp)
            lr_used = opt_lib.optimizer_step(optimizer, scheduler, stats_log, stats=stats_now, step=step + 1,
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
        train_rows = steps_per_epoch * args.batch_size
        finite = math.isfinite(train_loss) and bool(torch.stack([p.detach().isfinite().all() for p in params]).all())
        row = {"epoch": epoch + 1, "step": step, "lr": float(lr_used), "train_loss": train_loss,
               "epoch_time": round(epoch_time, 4), "images_per_sec": round(train_rows / max(epoch_time, 1e-9), 2)}
        if probe is not None:
            acc = probe.epoch_metrics()["acc"]
            row["train_acc"] = acc if math.isfinite(acc) else None
        last = epoch + 1 == args.epochs
        if finite:
            row.update(evaluate(raw, data, args, probe,
                                knn=last or (args.knn_every > 0 and (epoch + 1) % args.knn_every == 0),
                                online=last or (epoch + 1) % args.eval_every == 0))
            last_eval.update({k: row[k] for k in ("knn_acc", "knn20_acc", "online_acc") if k in row})
        epochs_run += 1
        if not finite:  # ---- divergence: keep everything written so far, stop ------------------
            log.log_epoch(row)
            return run_lib.diverged(log, out, epoch=epoch, t_start=t_start, what="pre-training")
        pending = row if last else None
        if not last:
            log.log_epoch(row)
        if rt.is_main:
            ckpt.save_checkpoint(out / "checkpoint.pt", ckpt.training_state(
                raw, optimizer, scheduler, epoch=epoch + 1, step=step, last_eval=last_eval, pending_row=pending,
                online_probe=None if probe is None else probe.state_dict()))
        log.write_summary(status="running", epochs_done=epoch + 1, wall_time_s=round(time.time() - t_start, 3),
                          **last_eval)
        say(rt, f"epoch {epoch + 1}/{args.epochs} loss {train_loss:.4f} "
                 + "".join(f"{k} {row[k]:.2f} " for k in ("train_acc", "online_acc", "knn_acc", "knn20_acc")
                           if row.get(k) is not None)
                 + f"({epoch_time:.1f}s, {row['images_per_sec']:.0f} img/s)")
        if args.stop_after_epochs is not None and epochs_run >= args.stop_after_epochs and not last:
            log.close()
            say(rt, f"tvlars: stopped after {epochs_run} epoch(s) as asked; continue with --resume --out {out}")
            return 0

    # ---- 4. linear probe on the frozen encoder (every rank: deterministic; rank 0 writes) ----
    rt.barrier()
    say(rt, f"tvlars: linear probe, {args.probe_epochs} epochs on the frozen encoder")
    probe_aug = OneViewAugment(size, channels, data.mean, data.std, probe_view()) if args.probe_augment else None
    result = linear_probe(raw.encoder, (data.train_images, data.train_labels),
                          (data.test_images, data.test_labels), num_classes=data.num_classes,
                          epochs=args.probe_epochs, batch_size=args.probe_batch_size, lr=args.probe_lr,
                          weight_decay=args.probe_weight_decay, device=rt.device, seed=args.seed,
                          augment=probe_aug, mean=data.mean, std=data.std, feature_batch_size=args.eval_batch_size)
    if rt.is_main:
        write_probe_csv(out, result["history"])
    for h in result["history"]:
        log.log_scalars(step + h["epoch"], {f"probe/{k}": v for k, v in h.items()
                                            if k != "epoch" and v is not None})
    top1 = result["top1"]
    if pending is not None:
        log.log_epoch({**pending, "test_acc": top1})
    log.write_summary(status="completed", epochs_done=args.epochs, final_test_acc=top1,
                      best_test_acc=result["best_top1"], best_epoch=args.epochs, linear_top5=result["top5"],
                      probe_best_epoch=result["best_epoch"], probe_lr=result["lr"],
                      wall_time_s=round(time.time() - t_start, 3), **last_eval)
    log.close()
    say(rt, f"tvlars: done: linear probe top-1 {top1:.2f}% (top-5 {result['top5']:.2f}%), "
             + "".join(f"{k} {last_eval[k]:.2f}% " for k in ("knn_acc", "knn20_acc", "online_acc") if k in last_eval)
             + f"run folder {out}")
    return 0
