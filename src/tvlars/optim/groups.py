"""Parameter groups that keep 1-D tensors (biases, norm-layer weights) out of weight decay
and out of layer-wise adaptation, the convention of every LARS/LAMB recipe.

The two exclusions are separate switches: some recipes decay biases but do not adapt them,
others the reverse.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn

Predicate = Callable[[str, torch.Tensor], bool]


def _is_1d(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1


def _as_predicate(rule: Union[bool, Predicate]) -> Predicate:
    if callable(rule):
        return rule
    return _is_1d if rule else (lambda name, p: False)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    exclude_from_decay: Union[bool, Predicate] = True,
    exclude_from_adaptation: Union[bool, Predicate] = True,
    **group_options,
) -> list[dict]:
    """Split ``model``'s trainable parameters into at most four groups.

    Excluded parameters get ``weight_decay=0.0`` / ``adapt=False`` (trust ratio 1). Empty
    groups are dropped; parameter order inside a group follows ``model.named_parameters()``.
    Each group carries its parameters' names under ``"param_names"``, the key torch's
    optimizers (>= 2.6) keep for named parameters, so that
    [last_stats][tvlars.LARS.last_stats] names its rows.

    Args:
        model (torch.nn.Module): the model whose trainable parameters are grouped.
        weight_decay (float): >= 0, for the parameters not excluded from decay.
        exclude_from_decay (bool or callable): ``True`` excludes 1-D parameters (biases, norm
            weights), ``False`` excludes none, or a predicate ``(name, param) -> bool`` selects
            the excluded ones.
        exclude_from_adaptation (bool or callable): the same, for the trust ratio.
        **group_options (Any): copied into every group (e.g. ``lr=...``).

    Returns:
        The groups, each with ``params``, ``param_names``, ``weight_decay`` and ``adapt``.
    """
    if weight_decay < 0:
        raise ValueError(f"invalid weight_decay: {weight_decay}; must be >= 0")
    no_decay, no_adapt = _as_predicate(exclude_from_decay), _as_predicate(exclude_from_adaptation)
    named: dict[tuple[bool, bool], list[tuple[str, torch.Tensor]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (not no_decay(name, p), not no_adapt(name, p))
        named.setdefault(key, []).append((name, p))
    groups = []
    for (decay, adapt) in [(True, True), (False, True), (True, False), (False, False)]:
        if (decay, adapt) in named:
            members = named[(decay, adapt)]
            groups.append(dict(group_options, params=[p for _, p in members], param_names=[n for n, _ in members],
                               weight_decay=weight_decay if decay else 0.0, adapt=adapt))
    return groups
