"""Building the optimizer and its learning-rate schedule from flags; per-layer statistics.

API (reusable by ``tvlars ssl``)::

    OPTIMIZERS = ("lars", "lamb", "tvlars", "sgd", "adamw")
    add_optimizer_arguments(parser)      --optimizer --lr and every hyper-parameter, plus the
                                         schedule flags (--schedule --warmup-epochs --min-lr
                                         --power --tv-factor)
    delay_in_steps(args, steps_per_epoch) -> int     --delay-steps, or --delay-epochs (default
                                         10, the paper's d_e and the authors' classification
                                         script's gate) times steps per epoch
    build_optimizer(model, args, steps_per_epoch) -> torch.optim.Optimizer
        parameter groups from tvlars.param_groups (1-D parameters excluded from weight decay
        and from adaptation unless --no-exclude-1d-decay / --no-exclude-1d-adapt); sgd and
        adamw are torch's (SGD with --momentum/--nesterov, AdamW with --betas/--eps).
    build_scheduler(optimizer, args, steps_per_epoch, total_steps) -> LRScheduler | None
        --tv-factor: TVFactorLR (phi_t as the schedule, any optimizer); else
        schedules.build_schedule(--schedule, warm-up --warmup-epochs * steps_per_epoch steps,
        --min-lr, --power). Step it once per optimizer step.
    enable_stats(optimizer, on: bool) -> None     turn per-step statistics on/off (cheap no-op
                                         for torch optimizers)
    LayerStatsLog(log, names)            layers.csv rows without making the host wait:
        .capture(optimizer, step=, epoch=)   after optimizer.step() (before zero_grad): the
            per-parameter "weight_norm", "grad_norm", "trust_ratio", "step_size" as one
            table on the device, copied to pinned host memory without blocking
        .flush(wait=False)               write the captured steps whose copy has arrived
            (all of them, waiting, with wait=True: at the end of an epoch)
        ``names`` maps id(parameter) -> name (from the raw model's named_parameters()).
        tvlars optimizers: their recorded statistics (what optimizer.last_stats() returns).
        torch optimizers: norms computed here, trust_ratio empty (None), step_size = the
        group's lr for sgd, None for adamw.
    optimizer_step(optimizer, scheduler, stats_log, *, stats, step, epoch) -> float | Tensor
        the end of a training step: optimizer.step(), stats_log.capture() when ``stats``
        (rows labelled ``step``, ``epoch``), zero_grad, scheduler.step(); returns the lr it
        stepped with (a copy, still on the device, when the group's lr is a tensor: read it
        with float() at the end of the epoch)
"""

from __future__ import annotations

import argparse
import math

from tvlars.errors import UserError

OPTIMIZERS = ("lars", "lamb", "tvlars", "sgd", "adamw")
LR_SCALINGS = ("none", "linear", "sqrt")


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="tvlars",
                   help="lars, lamb, tvlars (the paper's), or torch's sgd / adamw (default: tvlars)")
    g.add_argument("--lr", type=float, default=None,
                   help="base (target) learning rate; the paper's grid is 1..19 for batch 512..16K "
                        "(default: 1.0 for lars/tvlars, 0.01 lamb, 0.1 sgd, 0.001 adamw)")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum mu: lars, tvlars, sgd (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: 5e-4, the paper's)")
    g.add_argument("--trust-coefficient", type=float, default=1e-3,
                   help="LARS coefficient eta: lars, tvlars (default: 1e-3)")
    g.add_argument("--trust-form", default="coupled", choices=("coupled", "separate"),
                   help="LARS trust ratio: coupled = eta*||w||/||g + wd*w|| (official code, Barlow Twins); "
                        "separate = eta*||w||/(||g|| + wd*||w|| + eps) (You et al., timm) (default: coupled)")
    g.add_argument("--trust-clip", action="store_true",
                   help="clip the trust ratio (LARC for lars: min(trust/lr, 1); <= 1 for lamb)")
    g.add_argument("--eps", type=float, default=None,
                   help="epsilon: lars denominator (default 0), lamb (default 1e-6), adamw (default 1e-8)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum: lars, sgd")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"),
                   help="lamb / adamw moment coefficients (default: 0.9 0.999)")
    g.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="lamb: bias-correct the moments (default: on)")
    g.add_argument("--max-weight-norm", type=float, default=None, metavar="C",
                   help="lamb: cap ||w|| at C in the trust ratio min(||w||, C) / ||u|| (the TVLARS "
                        "authors' LAMB, cybertronai/pytorch-lamb: 10) (default: no cap)")
    g.add_argument("--layer-adaptation", action=argparse.BooleanOptionalAction, default=True,
                   help="lars, lamb, tvlars: the layer-wise trust ratio; --no-layer-adaptation sets it to 1 "
                        "for every parameter (the authors' Barlow Twins 'LAMB' ran that way, as Adam "
                        "without bias correction) (default: on)")
    g.add_argument("--exclude-1d-decay", action=argparse.BooleanOptionalAction, default=True,
                   help="no weight decay on 1-D parameters (biases, norm weights) (default: on)")
    g.add_argument("--exclude-1d-adapt", action=argparse.BooleanOptionalAction, default=True,
                   help="trust ratio 1 (no layer-wise adaptation) for 1-D parameters (default: on)")
    t = parser.add_argument_group("TVLARS time-varying factor phi_t = 1/(alpha + exp(lam*(t - d))) + min-factor")
    t.add_argument("--lam", type=float, default=1e-4,
                   help="decay coefficient lambda of phi_t (default: 1e-4, the paper's for classification)")
    t.add_argument("--delay-epochs", type=float, default=None, metavar="E",
                   help="delay d of phi_t in epochs, converted with steps per epoch (default: 10, the paper's)")
    t.add_argument("--delay-steps", type=int, default=None, metavar="T",
                   help="delay d of phi_t in optimizer steps (instead of --delay-epochs)")
    t.add_argument("--alpha", type=float, default=1.0, help="alpha of phi_t (default: 1.0)")
    t.add_argument("--min-factor", type=float, default=0.0, help="floor gamma_min of phi_t (default: 0)")
    t.add_argument("--variant", default="paper", choices=("paper", "official"),
                   help="tvlars: paper = Algorithm 1 and Eq. 4; official = the authors' published code "
                        "(alpha 0.1, heavy-ball momentum, plain LARS during the delay and then phi of the "
                        "unshifted step count; --alpha and --min-factor must stay at their defaults) "
                        "(default: paper)")
    t.add_argument("--tv-factor", action="store_true",
                   help="run any optimizer (lars, lamb, sgd, adamw) under phi_t as its learning-rate "
                        "schedule (TVFactorLR); implies --schedule none")
    s = parser.add_argument_group("learning-rate schedule (stepped every optimizer step)")
    s.add_argument("--schedule", choices=("warmup-cosine", "poly", "constant", "none"), default=None,
                   help="linear warm-up then cosine decay to --min-lr / polynomial decay / constant; "
                        "none = no scheduler (default: none for tvlars and --tv-factor, else warmup-cosine)")
    s.add_argument("--warmup-epochs", type=float, default=None, metavar="E",
                   help="linear warm-up length in epochs (0 = 'without warm-up') (default: 20 as in "
                        "the paper, at most half the run; 0 with --schedule none)")
    s.add_argument("--min-lr", type=float, default=0.0,
                   help="final learning rate of cosine/poly decay, absolute (default: 0)")
    s.add_argument("--min-lr-ratio", type=float, default=None, metavar="R",
                   help="final learning rate of cosine/poly decay as a fraction of the peak, instead of "
                        "--min-lr (the authors' warm-up: 0.001)")
    s.add_argument("--lr-scaling", choices=LR_SCALINGS, default="none",
                   help="peak learning rate from --lr and the batch size B: none = lr, linear = lr * B / "
                        "base (the paper's Eq. 2 and the authors' warm-up), sqrt = lr * sqrt(B / base); "
                        "the resolved peak is recorded as peak_lr in config.yaml (default: none)")
    s.add_argument("--base-batch-size", type=int, default=256, metavar="B0",
                   help="the batch size at which --lr-scaling leaves --lr unchanged (default: 256)")
    s.add_argument("--power", type=float, default=2.0, help="power of the polynomial decay (default: 2)")


def delay_in_steps(args, steps_per_epoch: int) -> int:
    if getattr(args, "delay_steps", None) is not None:
        if args.delay_steps < 0:
            raise UserError("--delay-steps must not be negative")
        return int(args.delay_steps)
    epochs = 10.0 if getattr(args, "delay_epochs", None) is None else float(args.delay_epochs)
    if epochs < 0:
        raise UserError("--delay-epochs must not be negative")
    return int(round(epochs * steps_per_epoch))


def lr_scale(args) -> float:
    """How much --lr-scaling multiplies --lr at this run's global batch size."""
    ratio = args.batch_size / args.base_batch_size
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[args.lr_scaling]


def peak_lr(args) -> float:
    return args.lr * lr_scale(args)


def min_lr(args) -> float:
    return args.min_lr if args.min_lr_ratio is None else args.min_lr_ratio * peak_lr(args)


def _call(factory, name: str, *a, **kw):
    """Call an optimizer/scheduler constructor; its ValueError (bad option) becomes a UserError."""
    try:
        return factory(*a, **kw)
    except (ValueError, TypeError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{name}: {msg}") from None


def _groups(model, args) -> list[dict]:
    import tvlars

    groups = tvlars.param_groups(model, args.weight_decay, exclude_from_decay=args.exclude_1d_decay,
                                 exclude_from_adaptation=args.exclude_1d_adapt)
    if not args.layer_adaptation:
        for group in groups:
            group["adapt"] = False
    return groups


def build_optimizer(model, args, steps_per_epoch: int):
    import torch
    import tvlars

    groups = _groups(model, args)
    name = args.optimizer
    lr = peak_lr(args)  # schedules scale from the optimizer's lr, so the peak goes in here
    kw = {}
    if name == "lars":
        if args.eps is not None:
            kw["eps"] = args.eps
        return _call(tvlars.LARS, "lars", groups, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                     trust_coefficient=args.trust_coefficient, nesterov=args.nesterov, trust_clip=args.trust_clip,
                     trust_form=args.trust_form, **kw)
    if name == "lamb":
        if args.eps is not None:
            kw["eps"] = args.eps
        return _call(tvlars.LAMB, "lamb", groups, lr=lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
                     bias_correction=args.bias_correction, trust_clip=args.trust_clip,
                     max_weight_norm=args.max_weight_norm, **kw)
    if name == "tvlars":
        return _call(tvlars.TVLARS, "tvlars", groups, lr=lr, momentum=args.momentum,
                     weight_decay=args.weight_decay, trust_coefficient=args.trust_coefficient, lam=args.lam,
                     delay=delay_in_steps(args, steps_per_epoch), alpha=args.alpha, min_factor=args.min_factor,
                     variant=args.variant)
    if name == "sgd":
        return _call(torch.optim.SGD, "sgd", groups, lr=lr, momentum=args.momentum,
                     weight_decay=args.weight_decay, nesterov=args.nesterov)
    if name == "adamw":
        return _call(torch.optim.AdamW, "adamw", groups, lr=lr, betas=tuple(args.betas),
                     eps=1e-8 if args.eps is None else args.eps, weight_decay=args.weight_decay)
    raise UserError(f"unknown optimizer '{name}'; choose from {', '.join(OPTIMIZERS)}")


def build_scheduler(optimizer, args, steps_per_epoch: int, total_steps: int):
    from tvlars.harness.schedules import build_schedule

    if args.tv_factor:
        import tvlars

        return _call(tvlars.TVFactorLR, "tv-factor", optimizer, lam=args.lam,
                     delay=delay_in_steps(args, steps_per_epoch), alpha=args.alpha, min_factor=args.min_factor)
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    return build_schedule(optimizer, args.schedule, total_steps=total_steps, warmup_steps=min(warmup, total_steps),
                          min_lr=min_lr(args), power=args.power)


def enable_stats(optimizer, on: bool) -> None:
    if hasattr(optimizer, "last_stats"):
        optimizer.stats = bool(on)


def _stats_table(optimizer):
    """(parameters, [k, n] float64 table on the device, host columns) of the last step, with
    no host read: tvlars optimizers' recorded statistics; for torch optimizers the weight and
    gradient norms computed here (and each group's lr as step_size for sgd)."""
    import torch

    if hasattr(optimizer, "last_stats"):
        # the records optimizer.last_stats() would gather and copy to the host with a wait;
        # same gathering here (same float64 values), the copy is LayerStatsLog's
        records = getattr(optimizer, "_records", None)
        if records is None:  # an optimizer without the records: its own (blocking) copy
            st = optimizer.last_stats()
            if st is None:
                return None
            return st.params, torch.stack([st.weight_norm, st.grad_norm, st.trust_ratio, st.step_size]), {}
        if not records:
            return None
        params = [p for ps, _ in records for p in ps]
        device = records[0][1].device
        table = torch.cat([t.to(device=device, dtype=torch.float64) for _, t in records], dim=1)
        return params, table, {}
    params, lrs = [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                lrs.append(group["lr"])
    if not params:
        return None
    with torch.no_grad():
        w = torch.stack([p.detach().float().norm() for p in params])
        g = torch.stack([p.grad.detach().float().norm() for p in params])
        table = torch.stack([w, g]).to(torch.float64)
    sgd = isinstance(optimizer, torch.optim.SGD)
    host = {"trust_ratio": [None] * len(params),
            "step_size": [float(lr) for lr in lrs] if sgd else [None] * len(params)}
    return params, table, host


_TABLE_COLUMNS = ("weight_norm", "grad_norm", "trust_ratio", "step_size")


class LayerStatsLog:
    """layers.csv rows of the steps that record statistics, written without a host wait.

    ``capture`` starts a non-blocking copy of the step's statistics into pinned host memory
    and marks it with a CUDA event; ``flush`` writes, in step order, the steps whose copy
    has arrived (``event.query()``, which never waits) and, with ``wait=True``, all the
    rest. A synchronous read here would stall rank 0 and, through the next collective,
    every other rank. On the CPU the rows are ready at once. The rows are those a direct
    read would give, value for value.
    """

    def __init__(self, log, names: dict):
        self.log = log
        self.names = names
        self._pending = []  # (step, epoch, layer names, host table, event or None, host columns)

    def capture(self, optimizer, *, step: int, epoch: int) -> None:
        import torch

        got = _stats_table(optimizer)
        if got is None:
            return
        params, table, host = got
        event = None
        if table.device.type == "cuda":
            copy = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
            copy.copy_(table, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            table = copy
        elif table.device.type != "cpu":
            table = table.cpu()
        self._pending.append((step, epoch, [self.names.get(id(p), "?") for p in params], table, event, host))

    def flush(self, wait: bool = False) -> None:
        while self._pending:
            step, epoch, layers, table, event, host = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._pending.pop(0)
            columns = dict(zip(_TABLE_COLUMNS, table.tolist()))
            columns.update(host)
            self.log.log_layers([{"step": step, "epoch": epoch, "layer": layer,
                                  **{k: columns[k][n] for k in _TABLE_COLUMNS}}
                                 for n, layer in enumerate(layers)])


def optimizer_step(optimizer, scheduler, stats_log: LayerStatsLog, *, stats: bool, step: int, epoch: int):
    """Step with the accumulated gradients; when ``stats`` (see enable_stats) capture the
    per-layer statistics for ``stats_log`` as rows of optimizer step ``step`` in epoch
    ``epoch`` (both 1-based); clear the gradients; step the schedule. Returns the learning
    rate of the step (the first group's, before the schedule moved it): a float, or a
    device copy of a tensor lr, so that no step reads the device."""
    import torch

    lr = optimizer.param_groups[0]["lr"]
    lr = lr.detach().clone() if torch.is_tensor(lr) else float(lr)
    optimizer.step()
    if stats:
        stats_log.capture(optimizer, step=step, epoch=epoch)
    stats_log.flush()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return lr
