"""The optimizer and learning-rate schedule of a run, and the per-layer statistics of its steps.

The builders take plain keyword arguments, not the run's configuration: the configuration
is turned into them once, at the call site, by optimizer_kwargs / scheduler_kwargs (timm's
optimizer_kwargs(cfg=args) pattern), so that the builders can be called from a notebook or
a test with only what they use. Unknown or invalid settings surface as one-line UserErrors.
"""

from __future__ import annotations

from tvlars.errors import UserError

OPTIMIZERS = ("lars", "lamb", "tvlars", "sgd", "adamw")


def optimizer_kwargs(cfg, steps_per_epoch: int) -> dict:
    """build_optimizer's keyword arguments from a run's configuration."""
    return dict(name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                trust_coefficient=cfg.trust_coefficient, trust_form=cfg.trust_form, trust_clip=cfg.trust_clip,
                eps=cfg.eps, nesterov=cfg.nesterov, betas=tuple(cfg.betas), bias_correction=cfg.bias_correction,
                exclude_1d_decay=cfg.exclude_1d_decay, exclude_1d_adapt=cfg.exclude_1d_adapt, lam=cfg.lam,
                delay_steps=cfg.delay_in_steps(steps_per_epoch), alpha=cfg.alpha, min_factor=cfg.min_factor,
                variant=cfg.variant)


def scheduler_kwargs(cfg, steps_per_epoch: int, total_steps: int) -> dict:
    """build_scheduler's keyword arguments: the schedule counts optimizer steps, the flags epochs."""
    if cfg.tv_factor:
        return dict(tv_factor=True, lam=cfg.lam, delay_steps=cfg.delay_in_steps(steps_per_epoch), alpha=cfg.alpha,
                    min_factor=cfg.min_factor)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return dict(schedule=cfg.schedule, total_steps=total_steps, warmup_steps=min(warmup, total_steps),
                min_lr=cfg.min_lr, power=cfg.power)


def _call(factory, name: str, *a, **kw):
    """Call an optimizer/scheduler constructor; its ValueError (bad option) becomes a UserError."""
    try:
        return factory(*a, **kw)
    except (ValueError, TypeError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{name}: {msg}") from None


def build_optimizer(model, name: str, *, lr: float, weight_decay: float = 0.0, exclude_1d_decay: bool = True,
                    exclude_1d_adapt: bool = True, momentum: float = 0.9, trust_coefficient: float = 1e-3,
                    trust_form: str = "coupled", trust_clip: bool = False, eps: float | None = None,
                    nesterov: bool = False, betas=(0.9, 0.999), bias_correction: bool = True, lam: float = 1e-4,
                    delay_steps: int = 0, alpha: float = 1.0, min_factor: float = 0.0, variant: str = "paper"):
    """``name`` over tvlars.param_groups(model): 1-D parameters (biases, norm weights) get no
    weight decay and no layer-wise adaptation unless told otherwise, as in the paper. Each
    optimizer gets only the settings it has; eps=None keeps each one's own default."""
    import torch

    import tvlars

    groups = tvlars.param_groups(model, weight_decay, exclude_from_decay=exclude_1d_decay,
                                 exclude_from_adaptation=exclude_1d_adapt)
    own_eps = {} if eps is None else {"eps": eps}
    if name == "lars":
        return _call(tvlars.LARS, "lars", groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     trust_coefficient=trust_coefficient, nesterov=nesterov, trust_clip=trust_clip,
                     trust_form=trust_form, **own_eps)
    if name == "lamb":
        return _call(tvlars.LAMB, "lamb", groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                     bias_correction=bias_correction, trust_clip=trust_clip, **own_eps)
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
                    delay_steps: int = 0, alpha: float = 1.0, min_factor: float = 0.0):
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
    """Statistics cost a host transfer, so the tvlars optimizers record them only on the
    steps that write layers.csv; torch's optimizers have no switch (their norms are
    computed afterwards, by layer_stats)."""
    if hasattr(optimizer, "last_stats"):
        optimizer.stats = bool(on)


def layer_stats(optimizer, names: dict) -> dict | None:
    """layers.csv's columns for the step just taken, a list per column in parameter order.

    The tvlars optimizers report what they used (LayerStats); for torch's the norms are
    taken here, the trust ratio is empty (they have none) and SGD's step size is its lr.
    """
    import torch

    if hasattr(optimizer, "last_stats"):
        stats = optimizer.last_stats()
        if stats is None:
            return None
        return {"layer": [names.get(id(p), "?") for p in stats.params],
                "weight_norm": stats.weight_norm.tolist(), "grad_norm": stats.grad_norm.tolist(),
                "trust_ratio": stats.trust_ratio.tolist(), "step_size": stats.step_size.tolist()}
    params, lrs = [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                lrs.append(float(group["lr"]))
    if not params:
        return None
    with torch.no_grad():
        weight_norms = torch.stack([p.detach().float().norm() for p in params])
        grad_norms = torch.stack([p.grad.detach().float().norm() for p in params])
        both = torch.stack([weight_norms, grad_norms]).to("cpu", torch.float64)  # one transfer
    sgd = isinstance(optimizer, torch.optim.SGD)
    return {"layer": [names.get(id(p), "?") for p in params], "weight_norm": both[0].tolist(),
            "grad_norm": both[1].tolist(), "trust_ratio": [None] * len(params),
            "step_size": lrs if sgd else [None] * len(params)}


def optimizer_step(optimizer, scheduler, log, names: dict, *, stats: bool, step: int, epoch: int) -> float:
    """The end of a training step, the same in both loops: step, layers.csv rows for step
    ``step`` of epoch ``epoch`` (1-based) when ``stats``, clear the gradients, move the
    schedule. Returns the lr the step used (the schedule has moved it since)."""
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    if stats:
        columns = layer_stats(optimizer, names)
        if columns is not None:
            log.log_layers([{"step": step, "epoch": epoch, **{k: v[n] for k, v in columns.items()}}
                            for n in range(len(columns["layer"]))])
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return lr
