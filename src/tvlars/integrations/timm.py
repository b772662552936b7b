"""tvlars's optimizers in timm's optimizer registry: after ``import tvlars.integrations.timm``,
``timm.optim.create_optimizer_v2(model, "tvlars", ...)`` builds TVLARS, ``"tvlars-lars"``
LARS and ``"tvlars-lamb"`` LAMB (timm reads only the part of a name after its last
underscore, and keeps ``lars`` / ``lamb`` for its own), as does ``--opt`` of timm's
train.py with ``--device-modules tvlars.integrations.timm``.

Groups: timm builds them from a model and sets only ``weight_decay`` (its no-decay group:
1-D tensors, names ending in ``.bias`` and the model's ``no_weight_decay()``, e.g. ViT's
``pos_embed`` and ``cls_token``), plus ``lr_scale`` with ``layer_decay``. Adaptation
follows tvlars's rule, as [tvlars.param_groups][] decides it: in every group that does
not set ``adapt`` itself, 1-D tensors (biases, norm weights) get ``adapt=False`` (trust
ratio 1) and the others ``adapt=True``, whatever their weight decay. So a model's 1-D
tensors get neither decay nor adaptation, as with ``tvlars.param_groups``, and a tensor
that timm alone exempts from decay is still adapted. Groups from ``param_group_fn`` that
carry ``adapt`` (``tvlars.param_groups``) are used as they are.

``lr_scale`` stays in its group and tvlars never reads it: only timm's schedulers apply it
(each update sets ``lr = value * lr_scale``). TVLARS needs no schedule (phi_t is one), so
with ``layer_decay`` give it a constant timm scheduler, which applies ``lr_scale`` and
nothing else: ``StepLRScheduler(opt, decay_t=1, decay_rate=1.0)``, in train.py
``--sched step --decay-rate 1 --warmup-epochs 0`` (or ``--sched constant`` in recent timm).
"""

from __future__ import annotations

from functools import partial

import torch

try:
    from timm.optim._optim_factory import OptimInfo, default_registry
except ImportError as err:  # timm < 1.0.12 has no registry
    raise ImportError(f"tvlars.integrations.timm needs timm >= 1.0.12, whose optimizer registry it "
                      f"extends: pip install 'tvlars[timm]' ({err})") from err

from tvlars import LAMB, LARS, TVLARS


def adapt_as_tvlars(params) -> list[dict]:
    """``params`` (tensors or groups) as groups that all set ``adapt``: a group without it
    splits into its tensors of two or more dimensions (adapted) and its 1-D ones (not).

    Args:
        params (iterable of Tensor or dict): what timm's ``create_optimizer_v2`` hands an
            optimizer class: tensors, or groups (timm's, or ``param_group_fn``'s).
    """
    if isinstance(params, torch.Tensor):
        return params  # not an iterable of tensors: torch's own error says so
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    split = []
    for group in groups:
        if "adapt" in group:
            split.append(group)
            continue
        tensors = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        for adapt in (True, False):
            chosen = [p for p in tensors if (p.ndim > 1) == adapt]
            if chosen:
                split.append({**group, "params": chosen, "adapt": adapt})
    return split


def _create(optimizer_class, params, **kwargs):
    return optimizer_class(adapt_as_tvlars(params), **kwargs)


for _info in (
    OptimInfo(name="tvlars", opt_class=partial(_create, TVLARS), has_eps=False, has_momentum=True,
              description="tvlars's TVLARS: LARS scaled by the time-varying phi_t (lam, delay) instead of warm-up"),
    OptimInfo(name="tvlars-lars", opt_class=partial(_create, LARS), has_momentum=True,
              description="tvlars's LARS (trust_form coupled or separate, nesterov, trust_clip)"),
    OptimInfo(name="tvlars-lamb", opt_class=partial(_create, LAMB), has_betas=True,
              description="tvlars's LAMB (bias_correction, trust_clip, max_weight_norm)"),
):
    default_registry.register(_info)
