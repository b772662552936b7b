"""The optimizer and learning-rate schedule of a run, and the per-layer statistics of its steps.

The builders take plain keyword arguments, not the run's configuration: the configuration
is turned into them once, at the call site, by optimizer_kwargs / scheduler_kwargs (timm's
optimizer_kwargs(cfg=args) pattern), so that the builders can be called from a notebook or
a test with only what they use. Unknown or invalid settings surface as one-line UserErrors.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvlars.errors import UserError

#: phi_t's settings (Eq. 4): TVLARS's own, and any optimizer's under --tv-factor (TVFactorLR).
PHI_FLAGS = ("lam", "delay_epochs", "delay_steps", "alpha", "min_factor", "phi_anneal")


@dataclass(frozen=True)
class OptimInfo:
    """One optimizer of ``tvlars train --optimizer`` and the optimizer flags it takes (timm's
    OptimInfo, as data). --lr, --weight-decay and --exclude-1d-decay reach every optimizer and
    are not listed; a listed flag reaches only the optimizers that list it, and a user who sets
    it for another one is refused (check_optimizer_flags): config.yaml never records a setting
    that did not run."""

    name: str
    flags: tuple[str, ...]


#: The one table of which optimizer flag reaches which optimizer. TVLARS fixes the trust
#: ratio's form (coupled, no eps, no clipping) and its momentum (Algorithm 1's look-ahead), so
#: --trust-form, --trust-clip, --eps and --nesterov are LARS's; --tv-factor puts phi_t on top
#: of the others, TVLARS has it built in.
OPTIMIZER_INFO = {info.name: info for info in (
    OptimInfo("lars", ("momentum", "trust_coefficient", "trust_form", "trust_clip", "eps", "nesterov",
                       "layer_adaptation", "exclude_1d_adapt", "tv_factor")),
    OptimInfo("lamb", ("betas", "eps", "bias_correction", "trust_clip", "max_weight_norm", "layer_adaptation",
                       "exclude_1d_adapt", "tv_factor")),
    OptimInfo("tvlars", ("momentum", "trust_coefficient", "layer_adaptation", "exclude_1d_adapt", *PHI_FLAGS,
                         "variant")),
    OptimInfo("sgd", ("momentum", "nesterov", "tv_factor")),
    OptimInfo("adamw", ("betas", "eps", "tv_factor")),
)}
OPTIMIZERS = tuple(OPTIMIZER_INFO)
#: Every flag the table governs.
TABLE_FLAGS = tuple(dict.fromkeys(flag for info in OPTIMIZER_INFO.values() for flag in info.flags))


def takes(optimizer: str, flag: str, *, tv_factor: bool = False) -> bool:
    """Whether ``flag`` (a configuration field) reaches ``optimizer`` (under --tv-factor or not)."""
    if flag not in TABLE_FLAGS:
        return True
    return flag in OPTIMIZER_INFO[optimizer].flags or (tv_factor and flag in PHI_FLAGS)


def taken_by(flag: str) -> str:
    """Who takes ``flag``, for --help and errors: "lars, tvlars, sgd" (phi_t's: "tvlars, or
    any optimizer with --tv-factor")."""
    names = ", ".join(name for name, info in OPTIMIZER_INFO.items() if flag in info.flags)
    return f"{names}, or any optimizer with --tv-factor" if flag in PHI_FLAGS else names


def check_optimizer_flags(optimizer: str, given: dict, *, tv_factor: bool) -> None:
    """Refuse the first flag in ``given`` (field -> value, the flags the user set) that
    ``optimizer`` does not take, naming it and the optimizers it applies to."""
    for flag, value in given.items():
        if not takes(optimizer, flag, tv_factor=tv_factor):
            written = f"--{'no-' if value is False else ''}{flag.replace('_', '-')}"  # as the user wrote it
            raise UserError(f"{written} applies to {taken_by(flag)}, not to --optimizer "
                            f"{optimizer}{' with --tv-factor' if tv_factor else ''}; drop it")


def optimizer_kwargs(cfg, steps_per_epoch: int) -> dict:
    """build_optimizer's keyword arguments from a run's configuration. The lr is the peak:
    schedules scale from the optimizer's lr."""
    return dict(name=cfg.optimizer, lr=cfg.peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                trust_coefficient=cfg.trust_coefficient, trust_form=cfg.trust_form, trust_clip=cfg.trust_clip,
                eps=cfg.eps, nesterov=cfg.nesterov, betas=tuple(cfg.betas), bias_correction=cfg.bias_correction,
                max_weight_norm=cfg.max_weight_norm, layer_adaptation=cfg.layer_adaptation,
                exclude_1d_decay=cfg.exclude_1d_decay, exclude_1d_adapt=cfg.exclude_1d_adapt,
                **cfg.factor_args(steps_per_epoch), alpha=cfg.alpha, min_factor=cfg.min_factor, variant=cfg.variant)


def scheduler_kwargs(cfg, steps_per_epoch: int, total_steps: int) -> dict:
    """build_scheduler's keyword arguments: the schedule counts optimizer steps, the flags epochs."""
    if cfg.tv_factor:
        return dict(tv_factor=True, **cfg.factor_args(steps_per_epoch), alpha=cfg.alpha, min_factor=cfg.min_factor)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return dict(schedule=cfg.schedule, total_steps=total_steps, warmup_steps=min(warmup, total_steps),
                min_lr=cfg.final_lr, power=cfg.power)


def _call(factory, name: str, *a, **kw):
    """Call an optimizer/scheduler constructor; its ValueError (bad option) becomes a UserError."""
    try:
        return factory(*a, **kw)
    except (ValueError, TypeError) as err:
        from tvlars.harness.safeload import first_line

        raise UserError(f"{name}: {first_line(err)}") from None


def build_optimizer(model, name: str, *, lr: float, weight_decay: float = 0.0, exclude_1d_decay: bool = True,
                    exclude_1d_adapt: bool = True, momentum: float = 0.9, trust_coefficient: float = 1e-3,
                    trust_form: str = "coupled", trust_clip: bool = False, eps: float | None = None,
                    nesterov: bool = False, betas=(0.9, 0.999), bias_correction: bool = True,
                    max_weight_norm: float | None = None, layer_adaptation: bool = True, lam: float = 1e-4,
                    delay_steps: float = 0, alpha: float = 1.0, min_factor: float = 0.0, variant: str = "paper"):
    """``name`` over tvlars.param_groups(model): 1-D parameters (biases, norm weights) get no
    weight decay and no layer-wise adaptation unless told otherwise, as in the paper;
    ``layer_adaptation=False`` turns the trust ratio off everywhere (the authors' Barlow
    Twins "LAMB"). Each optimizer gets only the settings it has; eps=None keeps each one's
    own default."""
    import torch

    import tvlars

    groups = tvlars.param_groups(model, weight_decay, exclude_from_decay=exclude_1d_decay,
                                 exclude_from_adaptation=exclude_1d_adapt)
    if not layer_adaptation:
        for group in groups:
            group["adapt"] = False
    own_eps = {} if eps is None else {"eps": eps}
    if name == "lars":
        return _call(tvlars.LARS, "lars", groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     trust_coefficient=trust_coefficient, nesterov=nesterov, trust_clip=trust_clip,
                     trust_form=trust_form, **own_eps)
    if name == "lamb":
        return _call(tvlars.LAMB, "lamb", groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                     bias_correction=bias_correction, trust_clip=trust_clip, max_weight_norm=max_weight_norm,
                     **own_eps)
    if name == "tvlars":
        return _call(tvlars.TVLARS, "tvlars", groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     trust_coefficient=trust_coefficient, lam=lam, delay=delay_steps, alpha=alpha,
                     min_factor=min_factor, variant=variant)
    if name == "sgd":
        return _call(torch.optim.SGD, "sgd", groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     nesterov=nesterov)
    if name == "adamw":
        return _call(torch.optim.AdamW, "adamw", groups, lr=lr, betas=tuple(betas),
                     eps=1e-8 if eps is None else eps, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer '{name}'; choose from {', '.join(OPTIMIZERS)}")


def build_scheduler(optimizer, *, schedule: str = "none", total_steps: int = 0, warmup_steps: int = 0,
                    min_lr: float = 0.0, power: float = 2.0, tv_factor: bool = False, lam: float = 1e-4,
                    delay_steps: float = 0, alpha: float = 1.0, min_factor: float = 0.0):
    """The schedule to step once per optimizer step (None for none). ``tv_factor``: phi_t
    itself is the schedule (TVFactorLR), for any optimizer; else tvlars.harness.schedules."""
    from tvlars.harness.schedules import build_schedule

    if tv_factor:
        import tvlars

        return _call(tvlars.TVFactorLR, "tv-factor", optimizer, lam=lam, delay=delay_steps, alpha=alpha,
                     min_factor=min_factor)
    return build_schedule(optimizer, schedule, total_steps=total_steps, warmup_steps=warmup_steps, min_lr=min_lr,
                          power=power)


def enable_stats(optimizer, on: bool) -> None:
    """Statistics cost device work and a copy, so the tvlars optimizers record them only on
    the steps that write layers.csv; torch's optimizers have no switch (their norms are
    computed afterwards, by LayerStatsLog)."""
    if hasattr(optimizer, "last_stats"):
        optimizer.stats = bool(on)


def _stats_table(optimizer):
    """(parameters, [k, n] float64 table on the device, host columns) of the last step, with
    no host read: tvlars optimizers' recorded statistics; for torch optimizers the weight and
    gradient norms computed here (and each group's lr as step_size for sgd)."""
    import torch

    if hasattr(optimizer, "last_stats_table"):  # the copy to the host is LayerStatsLog's
        got = optimizer.last_stats_table()
        return None if got is None else (*got, {})
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
