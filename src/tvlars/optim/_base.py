"""What LARS, TVLARS and LAMB share as torch optimizers: gathering the parameters to step,
the skip rule for non-finite steps, the per-parameter counters, telemetry and path selection.
The maths is in ``_functional``.
"""

from __future__ import annotations

from itertools import chain
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _functional as F
from . import _sharding

# Per-parameter counters, as torch keeps "step": the steps taken (TVLARS's t, LAMB's bias
# correction) and the steps skipped for non-finite inputs. float32 0-d tensors on the
# parameter's device, so that a skipped step changes them without a host read.
STEP, SKIPPED = "step", "skipped_steps"
COUNTER_KEYS = (STEP, SKIPPED)
# tvlars 0.1.0 kept both counters once per optimizer, under this key of ``optimizer.state``.
LEGACY_COUNTERS = "counters"


class Parameters(list):
    """The parameters of [LayerStats][tvlars.LayerStats]' rows: the tensors themselves (so that a dict keyed
    by parameter still works), printed by shape and dtype rather than by value."""

    def __repr__(self) -> str:
        return "[" + ", ".join(f"{type(p).__name__}(shape={tuple(p.shape)}, dtype={p.dtype})" for p in self) + "]"


class LayerStats(NamedTuple):
    """Per-parameter statistics of the last ``step()``: one row per parameter that had a
    gradient, in parameter-group order (the order of ``optimizer.param_groups``, group after
    group, e.g. [tvlars.param_groups][]' weights before its biases and norm weights; inside
    a group that mixes devices or dtypes, bucket by bucket), which is not the order of
    ``model.named_parameters()``: label rows by ``names`` or ``params``, never by zipping them
    with the model's parameters.

    Attributes:
        params: the parameter tensors (printed by shape, not by value).
        weight_norm: `||w||` per row; this and the three below are 1-D float64 CPU tensors.
        grad_norm: the norm in the trust ratio's denominator: `||g + wd*w||` for the coupled
            LARS form, `||g||` for the separate form, `||u||` (the Adam direction plus decay)
            for LAMB.
        trust_ratio: the trust ratio per row (TVLARS ``variant="official"``: times phi_t).
        step_size: the scalar that multiplied the row's update direction.
        names: each parameter's name where the optimizer knows it (groups with
            ``"param_names"``: an optimizer built from ``model.named_parameters()`` or from
            [tvlars.param_groups][], as torch >= 2.6 keeps them), else None.
    """

    params: Parameters
    weight_norm: Tensor
    grad_norm: Tensor
    trust_ratio: Tensor
    step_size: Tensor
    names: list


def check(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}: {value!r}; {rule}")


def _refuse_fused(fused) -> None:
    if fused:
        raise ValueError("invalid fused: True; tvlars has no fused path (removed in 0.2.0): for fused kernels, "
                         "torch.compile the training step with foreach=True")


def _value(x):
    return x.item() if torch.is_tensor(x) else x


class LayerwiseOptimizer(Optimizer):
    """Base of the layer-wise optimizers (not public).

    The skip rule, the same on every path: the step is decided from every gradient and every
    weight it reads, on every layer, adapted or not. If any of them holds inf or NaN, the
    whole step is skipped: weights, state and the ``step`` counters stay as they were, and
    ``skipped_steps`` counts it; so a step never writes from a non-finite input. On an
    accelerator the decision is taken on the device, so ``step()`` never waits for it;
    nothing is printed (that would need a host read). Under ``torch.amp.GradScaler`` the
    scaler skips steps with non-finite gradients before they reach the optimizer.

    Paths (per group; all compute the same update, see ``_functional``; chosen in ``_path``):

    * ``foreach=True``: multi-tensor ``torch._foreach_*`` kernels, a bounded number of
      launches per step (to fuse them, ``torch.compile`` the training step);
    * ``foreach=False``: one parameter at a time, all scalars kept on the device;
    * default (``foreach=None, fused=None``): when every parameter of the step is an
      ordinary CPU tensor, the host path: the skip decision and the per-layer scalars are
      read as Python numbers (free on the CPU) and torch's fused SGD / AdamW kernels update
      the layers, eagerly (nothing is compiled), the fastest exact path on the CPU
      (BENCHMARKS.md). Otherwise the multi-tensor path when every parameter is on CUDA,
      else ``foreach=False``. No accelerator path reads the host.

    ``fused=True`` is refused: tvlars has no fused kernel of its own (its former compiled
    per-layer path measured slower than the default on the CPU). A state_dict or pickle saved
    with ``fused=True`` loads, onto the default path.

    Sharded parameters (DTensors, e.g. FSDP2's ``fully_shard``) take any path but the host
    path: each rank measures its shards and one all-reduce per step makes every norm a
    whole layer's.
    """

    # Group keys that a state_dict or pickle from tvlars 0.1.0 lacks.
    _keys_since_0_1_0: tuple = ()

    def __init__(self, params, defaults: dict, foreach: Optional[bool], fused: Optional[bool], stats: bool):
        _refuse_fused(fused)
        # "fused" stays a group key, as in torch's optimizers (None or False).
        defaults = dict(defaults, adapt=True, foreach=foreach, fused=fused)
        super().__init__(params, defaults)
        self.stats = bool(stats)
        self._records: list = []

    # -- hyper-parameters ---------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """torch's, except that groups with parameter names (``"param_names"``, as
        [tvlars.param_groups][] and ``named_parameters()`` give them) and groups without
        mix, which torch >= 2.6 refuses: the unnamed parameters are named None, so that
        ``param_groups(model) + [a group of one's own]`` works as it did before names."""
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):
            param_group["params"] = params = list(params)
            named = "param_names" in param_group or any(isinstance(p, tuple) for p in params)
            if not named and any("param_names" in group for group in self.param_groups):
                param_group["param_names"] = [None] * len(params)
            elif named:
                for group in self.param_groups:
                    group.setdefault("param_names", [None] * len(group["params"]))
        super().add_param_group(param_group)
        self._validate(self.param_groups[-1])

    def _validate(self, group: dict) -> None:
        lr = _value(group["lr"])
        check("lr", lr, lr >= 0.0, "must be >= 0")
        check("weight_decay", group["weight_decay"], group["weight_decay"] >= 0.0, "must be >= 0")
        check("eps", group["eps"], group["eps"] >= 0.0, "must be >= 0")
        _refuse_fused(group["fused"])
        for p in group["params"]:
            check("params", p.dtype, p.is_floating_point(), "parameters must be floating point")

    @staticmethod
    def _path(group: dict, params: list, on_host: bool) -> str:
        """The one place a path is chosen. ``on_host``: every parameter of the step is an
        ordinary CPU tensor, where reading the skip decision costs nothing."""
        if group["foreach"] is None:
            if on_host:
                return F.HOST
            return F.MULTI if all(p.is_cuda for p in params) else F.SINGLE
        return F.MULTI if group["foreach"] else F.SINGLE

    # -- pickling keeps the telemetry switch ---------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()  # torch's: defaults, state and param_groups only
        state["stats"] = self.stats
        return state

    def __setstate__(self, state):
        # Also called by torch's load_state_dict with only "state" and "param_groups".
        stats = state.pop("stats", None)
        super().__setstate__(state)
        if stats is not None or not hasattr(self, "stats"):
            self.stats = bool(stats)
        self._records = []
        for group in self.param_groups:  # a key added since the state was saved: the constructor's value
            for key in self._keys_since_0_1_0:
                group.setdefault(key, self.defaults[key])
            if group.get("fused"):  # saved before fused=True was removed: the default path
                group["fused"] = None
        legacy = self.state.pop(LEGACY_COUNTERS, None)  # an optimizer pickled by tvlars 0.1.0
        if legacy is not None:
            self._spread_legacy_counters(legacy)

    # -- counters ------------------------------------------------------------------------
    def _counters(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """``p``'s (step, skipped_steps), created at 0 on its first step."""
        state = self.state[p]
        if STEP not in state:
            state[STEP] = torch.zeros((), dtype=torch.float32, device=p.device)
        if SKIPPED not in state:
            state[SKIPPED] = torch.zeros((), dtype=torch.float32, device=p.device)
        return state[STEP], state[SKIPPED]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite inputs (one host read; the [skip rule][skip-rule]). A parameter counts the
        steps it took part in; this is the most any parameter counted."""
        counts = [s[SKIPPED] for s in self.state.values() if SKIPPED in s]
        if not counts:
            return 0
        return int(torch.stack([c.to(counts[0].device) for c in counts]).max().item())

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, plus: the counters keep float32 and move to their parameter's device
        (torch casts every other tensor to the parameter's dtype, and leaves "step" where it
        was saved), and a state_dict saved by tvlars 0.1.0 (counters under
        ``state["counters"]``) loads with its counters given to every parameter."""
        counters = {k: {c: v[c] for c in COUNTER_KEYS if c in v}
                    for k, v in state_dict["state"].items() if k != LEGACY_COUNTERS}
        # torch keeps the unknown LEGACY_COUNTERS entry as it is; __setstate__, which its
        # loader calls, spreads it over the parameters
        super().load_state_dict(state_dict)
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            for key, value in counters.get(pid, {}).items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    def _spread_legacy_counters(self, legacy: dict) -> None:
        """0.1.0 counted steps once per optimizer; every parameter took every step then, so
        each parameter gets that count (LAMB's parameters kept their own "step" already)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                for key in COUNTER_KEYS:
                    if key not in state:
                        state[key] = legacy[key].to(device=p.device, dtype=torch.float32).clone()

    # -- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = []  # (group, its parameters with a gradient)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if params:
                # Layers in (device, dtype) buckets, the order every path and telemetry use.
                order = {}
                params = sorted(params, key=lambda p: order.setdefault((p.device, p.dtype), len(order)))
                stepped.append((group, params))
        if not stepped:
            return loss
        on_host = all(p.device.type == "cpu" and not _sharding.is_distributed(p)
                      for _, params in stepped for p in params)
        # 1. measure every layer (reads only); sharded layers become whole
        paths = [self._path(group, params, on_host) for group, params in stepped]
        plans = [self._plan(group, params, path) for (group, params), path in zip(stepped, paths)]
        measured = [measure() for measure, _ in plans]
        norms = _sharding.combine([group_norms for group_norms, _ in measured],
                                  [[_sharding.shard_key(p) for p in params] for _, params in stepped])
        # 2. decide: any non-finite norm, of any weight or gradient, skips the whole step (on the
        #    device, never read)
        finite = [group_norms.isfinite().all() for group_norms in norms]
        ok = finite[0] if len(finite) == 1 else torch.stack([f.to(finite[0].device) for f in finite]).all()
        decision = F.PerDevice(ok)
        # 3. scalars and update, group by group
        records = []
        for (_, apply), (_, workspace), group_norms, (group, params) in zip(plans, measured, norms, stepped):
            scalars = apply(decision.on(group_norms.device), group_norms, workspace)
            if self.stats:
                table = torch.stack([scalars.w_norm, scalars.u_norm, scalars.trust, scalars.step_size])
                records.append((group, params, table))
        self._records = records
        if all(path == F.HOST for path in paths) and bool(ok):
            return loss  # the host path has read the decision already: nothing to count
        skipped = {}
        for _, params in stepped:
            for p in params:
                count = self._counters(p)[1]
                skipped.setdefault(count.device, []).append(count)
        for device, counts in skipped.items():
            F.add_scalar_(counts, (~decision.on(device)).to(torch.float32))
        return loss

    def _plan(self, group: dict, params: list, path: str) -> tuple:
        """(measure, apply) for one group's layers on ``path``: ``measure()`` reads only and
        returns (what decides the step: local norms, a workspace); ``apply(ok, measured,
        workspace)`` updates with the whole-layer values and returns the ``F.Scalars`` it used."""
        raise NotImplementedError

    # -- telemetry -----------------------------------------------------------------------
    def last_stats(self) -> Optional[LayerStats]:
        """Statistics of the last step() taken with ``stats`` on (rows and their order:
        [LayerStats][tvlars.LayerStats]); one device-to-host copy."""
        got = self.last_stats_table()
        if got is None:
            return None
        names = []
        for group, params, _ in self._records:
            known = dict(zip(group["params"], group["param_names"])) if "param_names" in group else {}
            names.extend(known.get(p) for p in params)
        return LayerStats(Parameters(got[0]), *got[1].cpu().unbind(0), names)

    def last_stats_table(self) -> Optional[tuple[list[Tensor], Tensor]]:
        """``last_stats()`` left on the device, for a caller that copies it without waiting:
        (parameters, [4, n] float64 rows weight_norm, grad_norm, trust_ratio, step_size)."""
        if not self._records:
            return None
        params = [p for _, group_params, _ in self._records for p in group_params]
        device = self._records[0][2].device
        return params, torch.cat([t.to(device=device, dtype=torch.float64) for _, _, t in self._records], dim=1)
