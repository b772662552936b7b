"""The resolved configuration of a run: flags in, one frozen, typed value out.

Parsing (tvlars.harness.flags) leaves "auto" and None for what depends on other flags: the
model of a data set, the lr of an optimizer, the schedule of TVLARS. Those are settled
here, once, at the command's boundary, together with the rules of --resume, and the rest
of the harness takes the result: a frozen dataclass, so nothing downstream can change what
config.yaml records, and typed, so a reader sees what each setting is without the parser.

config.yaml holds every field of the configuration plus what the run derived from it
(:meth:`TrainConfig.record`); a resumed run takes its settings from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

from tvlars.errors import UserError
from tvlars.harness import flags

#: Flags that change how a run executes but not what it computes: free to change on --resume.
RUNTIME_FLAGS = frozenset({
    "config", "out", "resume", "device", "progress", "num_workers", "data_dir", "download",
    "data_on_device", "stop_after_epochs", "eval_batch_size", "compile", "command", "fsdp",
})

DEFAULT_LR = {"lars": 1.0, "tvlars": 1.0, "lamb": 0.01, "sgd": 0.1, "adamw": 1e-3}
DEFAULT_MODEL = {"digits": "mlp", "synthetic": "cnn", "cifar10": "resnet18", "tinyimagenet": "resnet34",
                 "fashion-mnist": "mlp-bn", "mnist": "mlp-bn"}
#: Barlow Twins learns from crops: on 28x28 grey images a pixel MLP gained nothing over its
#: untrained self (docs/study.md), a small conv net does.
DEFAULT_SSL_MODEL = {**DEFAULT_MODEL, "fashion-mnist": "cnn-pool", "mnist": "cnn-pool"}
#: The paper's delay d_e of phi_t, in epochs.
DEFAULT_DELAY_EPOCHS = 10.0
#: The paper's warm-up, in epochs (at most half the run).
DEFAULT_WARMUP_EPOCHS = 20.0
#: The schedules that decay to a floor (--min-lr, --min-lr-ratio).
DECAYS = ("warmup-cosine", "poly")


@dataclass(frozen=True)
class TrainConfig:
    """``tvlars train``: one field per flag (see --help for each), automatic values settled."""

    command: ClassVar[str] = "train"
    add_arguments: ClassVar = staticmethod(flags.add_train_arguments)
    min_epochs: ClassVar[int] = 1
    default_model: ClassVar[dict] = DEFAULT_MODEL

    # run
    config: str | None
    out: str
    resume: bool
    seed: int
    device: str
    progress: bool
    stop_after_epochs: int | None
    # data
    dataset: str
    data_dir: str | None
    download: bool
    augment: bool
    data_on_device: str
    num_workers: int
    synthetic_train: int
    synthetic_test: int
    synthetic_classes: int
    synthetic_image_size: int
    synthetic_channels: int
    # model
    model: str
    stem: str
    init: str
    # optimizer
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    trust_coefficient: float
    trust_form: str
    trust_clip: bool
    eps: float | None
    nesterov: bool
    betas: tuple[float, float]
    bias_correction: bool
    max_weight_norm: float | None
    layer_adaptation: bool
    exclude_1d_decay: bool
    exclude_1d_adapt: bool
    # TVLARS time-varying factor
    lam: float
    delay_epochs: float | None
    delay_steps: int | None
    alpha: float
    min_factor: float
    variant: str
    tv_factor: bool
    phi_anneal: bool
    # learning-rate schedule
    schedule: str
    warmup_epochs: float
    min_lr: float
    min_lr_ratio: float | None
    lr_scaling: str
    base_batch_size: int
    power: float
    # batch and epochs
    batch_size: int
    micro_batch_size: int | str  # "auto" until the run measures it
    epochs: int
    drop_last: bool
    eval_every: int
    eval_batch_size: int
    layer_stats_every: int
    # performance
    amp: str
    channels_last: bool
    compile: bool
    sync_bn: bool
    fsdp: bool

    @classmethod
    def defaults(cls) -> dict:
        return flags.defaults(cls.add_arguments)

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> argparse.Namespace:
        """The command line as given, before --resume merges the saved flags into it:
        where a command refuses or normalises a flag by what the user wrote."""
        return args

    @classmethod
    def from_flags(cls, args: argparse.Namespace, *, out: str | None = None) -> "TrainConfig":
        """The configuration of parsed flags: automatic values settled, ranges checked.
        ``out`` (else --out, else the default folder of these settings) is the run folder."""
        values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)}
        cls._resolve(values)
        values["out"] = str(out or values["out"] or cls._default_out(values))
        return cls(**values)

    @classmethod
    def given(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The settings the user chose: those that differ from their defaults (a --config file
        or a grid sets defaults too, as the user's). A resumed run's values come from its
        config.yaml, which records lam resolved: the command's default lam counts as unset."""
        defaults = cls.defaults()
        defaults_resolved = {"lam": flags.LAM[cls.command]}
        return {name: value for name, value in values.items()
                if name in defaults and not _same(value, defaults[name])
                and not (name in defaults_resolved and _same(value, defaults_resolved[name]))}

    @classmethod
    def _check_applied(cls, values: dict[str, Any], given: dict[str, Any]) -> None:
        """Every setting the user chose acts in this run, or the run is refused before anything
        is built: optimizer flags by tvlars.harness.optimizers.OPTIMIZER_INFO, schedule flags by
        the schedule they shape, phi_t's delay by the run's length."""
        from tvlars.harness.optimizers import check_optimizer_flags

        optimizer, schedule = values["optimizer"], values["schedule"]
        check_optimizer_flags(optimizer, given, tv_factor=values["tv_factor"])
        for name, schedules in (("min_lr", DECAYS), ("min_lr_ratio", DECAYS), ("power", ("poly",))):
            if name in given and schedule not in schedules:
                raise UserError(f"--{name.replace('_', '-')} shapes --schedule {' or '.join(schedules)}, not "
                                f"--schedule {schedule}; drop it")
        if "base_batch_size" in given and values["lr_scaling"] == "none":
            raise UserError("--base-batch-size acts only with --lr-scaling linear or sqrt; drop it")
        synthetic = [name for name in given if name.startswith("synthetic_")]
        if synthetic and values["dataset"] != "synthetic":
            raise UserError(f"--{synthetic[0].replace('_', '-')} shapes --dataset synthetic, not --dataset "
                            f"{values['dataset']}; drop it")
        if "stem" in given and not values["model"].startswith("resnet"):
            raise UserError(f"--stem is the ResNets' (resnet18/34/50), not --model {values['model']}'s; drop it")
        phi_acts = optimizer == "tvlars" or values["tv_factor"]
        if phi_acts and not values["phi_anneal"] and values["delay_epochs"] is not None \
                and values["delay_epochs"] >= values["epochs"]:
            raise UserError(f"--delay-epochs {values['delay_epochs']:g} is past the run's end (--epochs "
                            f"{values['epochs']}): phi_t would not pass its midpoint; use a shorter delay "
                            f"or --phi-anneal")

    def notes(self) -> list[str]:
        """What the user should know of a default that cannot act in this run (one line each)."""
        phi_acts = self.optimizer == "tvlars" or self.tv_factor
        if phi_acts and not self.phi_anneal and self.delay_epochs is None and self.delay_steps is None \
                and DEFAULT_DELAY_EPOCHS >= self.epochs:
            return [f"phi_t's delay (the paper's {DEFAULT_DELAY_EPOCHS:g} epochs, the default) is past the run's "
                    f"end ({self.epochs} epochs): phi_t stays near its start; set --delay-epochs below "
                    f"{self.epochs} or use --phi-anneal"]
        return []

    @classmethod
    def _resolve(cls, values: dict[str, Any]) -> None:
        if values["model"] is None:
            values["model"] = cls.default_model[values["dataset"]]
        if values["lr"] is None:
            values["lr"] = DEFAULT_LR[values["optimizer"]]
        if values["schedule"] is None:  # phi_t is TVLARS's schedule
            values["schedule"] = "none" if (values["optimizer"] == "tvlars" or values["tv_factor"]) else "warmup-cosine"
        cls._check_applied(values, cls.given(values))
        if values["tv_factor"] and values["schedule"] != "none":
            raise UserError("--tv-factor replaces the learning-rate schedule; use --schedule none with it")
        if values["warmup_epochs"] is None:
            values["warmup_epochs"] = (0.0 if values["schedule"] == "none"
                                       else float(min(DEFAULT_WARMUP_EPOCHS, values["epochs"] / 2)))
        elif values["schedule"] == "none" and values["warmup_epochs"] > 0:
            raise UserError("--warmup-epochs needs a schedule (warmup-cosine, poly or constant), not --schedule none")
        if values["augment"] is None:
            values["augment"] = values["dataset"] in ("cifar10", "tinyimagenet")
        if values["progress"] is None:
            values["progress"] = sys.stderr.isatty()
        _at_least(values, "epochs", cls.min_epochs)
        for name in ("batch_size", "eval_every", "eval_batch_size"):
            _at_least(values, name, 1)
        for name in ("layer_stats_every", "num_workers", "warmup_epochs", "min_lr", "weight_decay"):
            _not_negative(values, name)
        if values["warmup_epochs"] > values["epochs"]:
            raise UserError(f"--warmup-epochs {values['warmup_epochs']:g} is longer than the run "
                            f"(--epochs {values['epochs']})")
        if values["lr"] <= 0:
            raise UserError(f"--lr must be positive, got {values['lr']}")
        _at_least(values, "base_batch_size", 1)
        if values["min_lr_ratio"] is not None:
            if not 0 <= values["min_lr_ratio"] <= 1:
                raise UserError(f"--min-lr-ratio must be in [0, 1], got {values['min_lr_ratio']:g}")
            if values["min_lr"]:
                raise UserError("give --min-lr or --min-lr-ratio, not both")
        if values["max_weight_norm"] is not None and values["max_weight_norm"] <= 0:
            raise UserError(f"--max-weight-norm must be positive, got {values['max_weight_norm']:g}")
        if values["micro_batch_size"] != "auto":
            micro = values["micro_batch_size"]
            try:
                values["micro_batch_size"] = int(micro)
            except (TypeError, ValueError):
                raise UserError(f"--micro-batch-size must be a positive integer or 'auto', got '{micro}'") from None
            if values["micro_batch_size"] < 1:
                raise UserError(f"--micro-batch-size must be positive, got {values['micro_batch_size']}")
        if values["delay_epochs"] is not None and values["delay_steps"] is not None:
            raise UserError("give --delay-epochs or --delay-steps, not both")
        if values["phi_anneal"]:  # the flag table has refused it for an optimizer without phi_t
            if values["variant"] != "paper":
                raise UserError("--phi-anneal is for the paper's TVLARS, not --variant official")
            given = [flag for flag, key in (("--lam", "lam"), ("--delay-epochs", "delay_epochs"),
                                            ("--delay-steps", "delay_steps")) if values[key] is not None]
            if given:
                raise UserError(f"--phi-anneal derives lam and the delay from the run's length; drop {given[0]}")
        elif values["lam"] is None:
            values["lam"] = flags.LAM[cls.command]
        if values["stop_after_epochs"] is not None and values["stop_after_epochs"] < 1:
            raise UserError("--stop-after-epochs must be at least 1")
        values["betas"] = tuple(values["betas"])  # config.yaml gives a list

    @classmethod
    def _default_out(cls, values: dict[str, Any]) -> str:
        return (f"runs/{values['dataset']}-{values['model']}-{values['optimizer']}-b{values['batch_size']}"
                f"-lr{values['lr']:g}-s{values['seed']}")

    @property
    def peak_lr(self) -> float:
        """The lr the schedule scales from: --lr times --lr-scaling's factor at this batch size
        (the paper's Eq. 2 with linear, lr * B / base)."""
        ratio = self.batch_size / self.base_batch_size
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling]

    @property
    def final_lr(self) -> float:
        """Where cosine and poly decay end: --min-lr, or --min-lr-ratio of the peak."""
        return self.min_lr if self.min_lr_ratio is None else self.min_lr_ratio * self.peak_lr

    def delay_in_steps(self, steps_per_epoch: int) -> int:
        """The delay d of phi_t in optimizer steps: --delay-steps, else --delay-epochs (the
        paper's 10 by default, and the authors' classification script's gate)."""
        if self.delay_steps is not None:
            if self.delay_steps < 0:
                raise UserError("--delay-steps must not be negative")
            return int(self.delay_steps)
        epochs = DEFAULT_DELAY_EPOCHS if self.delay_epochs is None else float(self.delay_epochs)
        if epochs < 0:
            raise UserError("--delay-epochs must not be negative")
        return int(round(epochs * steps_per_epoch))

    def factor_args(self, steps_per_epoch: int) -> dict:
        """phi_t's lam and delay in optimizer steps: from the run's length with --phi-anneal,
        else --lam and --delay-epochs / --delay-steps."""
        if self.phi_anneal:
            from tvlars import anneal_factor_args

            derived = anneal_factor_args(self.epochs * steps_per_epoch)
            return dict(lam=derived["lam"], delay_steps=derived["delay"])
        if self.delay_steps is not None and self.delay_steps >= self.epochs * steps_per_epoch:
            raise UserError(f"--delay-steps {self.delay_steps} is past the run's end ({self.epochs} epochs of "
                            f"{steps_per_epoch} steps): phi_t would not pass its midpoint; use a shorter delay "
                            f"or --phi-anneal")
        return dict(lam=self.lam, delay_steps=self.delay_in_steps(steps_per_epoch))

    def record(self, **derived) -> dict:
        """What config.yaml holds: the command, every setting, then what the run derived
        (a derived value of a setting, such as the measured micro-batch size, replaces it)."""
        return {"command": self.command, **dataclasses.asdict(self), **derived}


@dataclass(frozen=True)
class SSLConfig(TrainConfig):
    """``tvlars ssl``: every setting of tvlars train, plus Barlow Twins and its evaluation."""

    command: ClassVar[str] = "ssl"
    add_arguments: ClassVar = staticmethod(flags.add_ssl_arguments)
    min_epochs: ClassVar[int] = 0  # the linear probe of the untrained encoder: the baseline of every SSL result
    default_model: ClassVar[dict] = DEFAULT_SSL_MODEL

    # Barlow Twins
    projector: str
    lambd: float
    augment_preset: str
    # evaluation
    knn_k: int
    knn_temperature: float
    knn_every: int
    online_probe: bool
    probe_epochs: int
    probe_lr: float
    probe_batch_size: int
    probe_weight_decay: float
    probe_norm: str
    probe_augment: bool

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> argparse.Namespace:
        from tvlars.harness.ssl.barlow import parse_projector

        if args.augment is not None:
            raise UserError("--augment is tvlars train's crop+flip; tvlars ssl draws two views with --augment-preset")
        if args.fsdp:
            raise UserError("--fsdp is tvlars train's; tvlars ssl trains data-parallel (DDP) under torchrun")
        # one spelling of the projector, so that a --config list and the saved string compare equal on --resume
        projector = "-".join(str(width) for width in parse_projector(args.projector))
        return argparse.Namespace(**{**vars(args), "augment": False, "projector": projector})

    @classmethod
    def _resolve(cls, values: dict[str, Any]) -> None:
        from tvlars.harness.ssl.evaluate import default_probe_lr

        super()._resolve(values)
        if not values["drop_last"]:
            raise UserError("--no-drop-last: the Barlow Twins loss normalises over the batch, so tvlars ssl "
                            "drops the last partial batch")
        for name in ("knn_k", "probe_epochs", "probe_batch_size"):
            _at_least(values, name, 1)
        for name in ("knn_every", "lambd", "probe_weight_decay"):
            _not_negative(values, name)
        if values["knn_temperature"] <= 0:
            raise UserError(f"--knn-temperature must be positive, got {values['knn_temperature']}")
        if values["probe_lr"] is None:
            values["probe_lr"] = default_probe_lr(values["probe_batch_size"])
        elif values["probe_lr"] <= 0:
            raise UserError(f"--probe-lr must be positive, got {values['probe_lr']}")

    @classmethod
    def _default_out(cls, values: dict[str, Any]) -> str:
        folder = super()._default_out(values)  # apart from tvlars train's runs
        return folder.replace("runs/", "runs/ssl-", 1)


def check_run(command: str, flags: dict[str, Any], where: str) -> None:
    """Resolve one run of a grid (``flags``: destination -> value, over the command's defaults)
    as ``tvlars COMMAND --config FILE`` will, so that a sweep refuses a run its command would
    refuse before any run starts; the UserError names ``where`` (the grid and the run)."""
    kind = {"train": TrainConfig, "ssl": SSLConfig}[command]
    try:
        kind.from_flags(kind.check_flags(argparse.Namespace(**{**kind.defaults(), **flags})), out="unused")
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def merge_resume(args: argparse.Namespace, saved: dict, defaults: dict, *, free=RUNTIME_FLAGS) -> argparse.Namespace:
    """The flags of a resumed run: the saved config wins. A flag the user set (it differs
    from its default) to something other than the saved value is refused, naming it: a
    resumed run that silently ran other settings would be two runs under one name. The
    ``free`` flags change how the run executes, not its results, and come from the command line."""
    merged = argparse.Namespace(**vars(args))
    for dest, value in vars(args).items():
        if dest in free or dest not in saved:
            continue
        old = saved[dest]
        changed = dest in defaults and not _same(value, defaults[dest])
        if changed and not _same(value, old):
            flag = "--" + dest.replace("_", "-")
            raise UserError(f"{flag} {_show(value)} conflicts with the run being resumed ({flag} {_show(old)} "
                            f"in config.yaml); drop the flag or choose another --out")
        setattr(merged, dest, old)
    return merged


def _same(a, b) -> bool:
    """Equal as config.yaml sees it: 1 == 1.0, a tuple == the list YAML gives back."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if numbers:
        return float(a) == float(b)
    # flags that take a number or a word (--micro-batch-size 32|auto) arrive as strings on the
    # command line and come back from config.yaml as numbers
    if isinstance(a, str) != isinstance(b, str) and not isinstance(a, bool) and not isinstance(b, bool):
        return str(a) == str(b)
    return a == b


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _at_least(values: dict, name: str, low: int) -> None:
    if values[name] < low:
        raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {values[name]}")


def _not_negative(values: dict, name: str) -> None:
    if values[name] < 0:
        raise UserError(f"--{name.replace('_', '-')} must not be negative, got {values[name]}")
