"""Flags of ``tvlars train``, their resolution, and the saved run configuration.

API (reusable by ``tvlars ssl``)::

    add_arguments(parser)                  every flag of ``tvlars train`` (groups below)
    add_run_arguments(parser)              --config --out --resume --seed --device --progress
                                           --stop-after-epochs
    add_batch_arguments(parser)            --batch-size --micro-batch-size --epochs --drop-last
                                           --eval-every --eval-batch-size --layer-stats-every
    add_performance_arguments(parser)      --amp --channels-last --compile --sync-bn
    (optimizer and schedule flags live in tvlars.harness.optimizers.add_optimizer_arguments)
    parser_defaults(add_arguments) -> dict   the defaults of a command's parser
    resolve_auto(args) -> None             fills the "auto" (None) defaults in place
    merge_resume(args, saved: dict, defaults: dict, *, free=RUNTIME_FLAGS) -> argparse.Namespace
        the rule on --resume: the saved config wins; a flag whose value differs from both
        its default and the saved value (i.e. the user changed it on the command line or in
        --config) is a UserError naming it -- except the RUNTIME_FLAGS, which only change
        how the run executes, not its results, and are taken from the command line.
    default_out(args) -> str               runs/<dataset>-<model>-<optimizer>-b<B>-lr<lr>-s<seed>

Resolution of the automatic defaults (``resolve_auto``):
    --model      digits: mlp (seconds per run), synthetic: cnn, cifar10: resnet18, tinyimagenet: resnet34
    --lr         lars/tvlars 1.0 (paper grid 1..19 at 512..16K), lamb 0.01, sgd 0.1, adamw 1e-3
    --schedule   tvlars or --tv-factor: none (phi_t replaces it); others: warmup-cosine
    --warmup-epochs  warmup-cosine/poly/constant: 20 (the paper), capped at half the run;
                     none: 0
    --augment    cifar10/tinyimagenet: on (random crop with 4-pixel padding + flip); else off
    --progress   on when stderr is a terminal (rank 0 only)
"""

from __future__ import annotations

import argparse
import sys

from tvlars.errors import UserError

# Spelled out here so that --help does not import torch; tests check them against
# tvlars.harness.data.DATASETS and tvlars.harness.models.MODELS.
DATASETS = ("digits", "synthetic", "cifar10", "tinyimagenet", "fashion-mnist", "mnist")
MODELS = ("resnet18", "resnet34", "resnet50", "cnn", "mlp", "mlp-bn")

# Flags that change how a run executes but not what it computes: free to change on --resume.
RUNTIME_FLAGS = frozenset({
    "config", "out", "resume", "device", "progress", "num_workers", "data_dir", "download",
    "data_on_device", "stop_after_epochs", "eval_batch_size", "compile", "command",
})


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--config", metavar="FILE",
                   help="YAML file of flag values (keys are flag names, e.g. batch-size: 1024); "
                        "flags given on the command line override it")
    g.add_argument("--out", metavar="DIR",
                   help="run folder (default: runs/<dataset>-<model>-<optimizer>-b<B>-lr<lr>-s<seed>); "
                        "must not hold a different run")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint.pt (the saved config.yaml wins; "
                        "changing a flag that affects results is an error); starts the run if --out "
                        "holds none yet, does nothing if it already completed")
    g.add_argument("--seed", type=int, default=0, help="random seed for init, data order and augmentation (default: 0)")
    g.add_argument("--device", default="auto",
                   help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps; under torchrun each "
                        "rank uses cuda:LOCAL_RANK (default: auto)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar with loss, accuracy and images/s on rank 0 "
                        "(default: on when stderr is a terminal)")
    g.add_argument("--stop-after-epochs", type=int, default=None, metavar="K",
                   help="stop (as if interrupted, status stays 'running') after K epochs of this "
                        "invocation; resume later with --resume. For testing resumption")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits (sklearn 8x8, built in), synthetic (random images), cifar10, "
                        "tinyimagenet, fashion-mnist, mnist (IDX files) (default: digits)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="dataset folder (cifar10, tinyimagenet: default ./data; fashion-mnist, mnist: "
                        "default ./data, then /usr/share/datasets/<name> where Debian's "
                        "dataset-fashion-mnist installs it)")
    g.add_argument("--download", action="store_true", help="download the dataset into --data-dir if missing")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="the paper's augmentation: random crop (4-pixel padding) + horizontal flip "
                        "(default: on for cifar10/tinyimagenet, off for digits/synthetic)")
    g.add_argument("--data-on-device", choices=("auto", "yes", "no"), default="auto",
                   help="keep the whole dataset on the device and augment in batches (fast path); "
                        "'no' uses a DataLoader with worker processes (default: auto = yes when it fits)")
    g.add_argument("--num-workers", type=int, default=4, metavar="N",
                   help="DataLoader worker processes when the data is not on the device (default: 4)")
    g.add_argument("--synthetic-train", type=int, default=2048, metavar="N",
                   help="synthetic dataset: number of training images (default: 2048)")
    g.add_argument("--synthetic-test", type=int, default=512, metavar="N",
                   help="synthetic dataset: number of test images (default: 512)")
    g.add_argument("--synthetic-classes", type=int, default=10, metavar="N",
                   help="synthetic dataset: number of classes (default: 10)")
    g.add_argument("--synthetic-image-size", type=int, default=32, metavar="PX",
                   help="synthetic dataset: image height and width (default: 32)")
    g.add_argument("--synthetic-channels", type=int, default=3, metavar="C",
                   help="synthetic dataset: image channels (default: 3)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", choices=MODELS, default=None,
                   help="network (default: mlp for digits, cnn for synthetic, resnet18 for cifar10, resnet34 "
                        "for tinyimagenet, mlp-bn for fashion-mnist and mnist); mlp has no batch norm, "
                        "mlp-bn the same layers with batch norm")
    g.add_argument("--stem", default="auto", choices=("auto", "cifar", "imagenet"),
                   help="ResNet stem: cifar (3x3 conv, no max-pool) or imagenet (7x7 conv + max-pool) "
                        "(default: auto = cifar for images up to 64 pixels)")
    g.add_argument("--init", default="kaiming_uniform", choices=("kaiming_uniform", "torchvision"),
                   help="weight initialisation: kaiming_uniform (the paper's) or torchvision's own "
                        "(default: kaiming_uniform)")


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("batch and epochs")
    g.add_argument("--batch-size", type=int, default=256, metavar="B",
                   help="GLOBAL batch size per optimizer step, whatever the number of processes and "
                        "accumulation steps (per process = B / world size) (default: 256)")
    g.add_argument("--micro-batch-size", default="auto", metavar="M|auto",
                   help="rows per forward/backward pass on each process; gradients of B / (world * M) "
                        "micro-batches are accumulated. auto: the largest that fits in GPU memory, on "
                        "CPU the per-process batch capped at 1024 (default: auto)")
    g.add_argument("--epochs", type=int, default=30, metavar="N", help="training epochs (default: 30)")
    g.add_argument("--drop-last", action=argparse.BooleanOptionalAction, default=True,
                   help="drop the last incomplete global batch of each epoch (default: on)")
    g.add_argument("--eval-every", type=int, default=1, metavar="K",
                   help="evaluate on the whole test set every K epochs and after the last (default: 1)")
    g.add_argument("--eval-batch-size", type=int, default=1024, metavar="N",
                   help="rows per forward pass during evaluation, per process (default: 1024)")
    g.add_argument("--layer-stats-every", type=int, default=10, metavar="K",
                   help="write per-layer weight/grad norms, trust ratio and step size to layers.csv "
                        "every K optimizer steps; 0 disables (default: 10)")


def add_performance_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("performance")
    g.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="autocast the forward pass to bfloat16 (default: none)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and inputs")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="synchronised batch norm across processes (CUDA + torchrun only, as in the "
                        "paper) (default: on)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tvlars.harness.optimizers import add_optimizer_arguments

    add_run_arguments(parser)
    add_data_arguments(parser)
    add_model_arguments(parser)
    add_optimizer_arguments(parser)
    add_batch_arguments(parser)
    add_performance_arguments(parser)


def parser_defaults(adder=add_arguments) -> dict:
    p = argparse.ArgumentParser(add_help=False)
    adder(p)
    return {a.dest: a.default for a in p._actions if a.dest != argparse.SUPPRESS}


DEFAULT_LR = {"lars": 1.0, "tvlars": 1.0, "lamb": 0.01, "sgd": 0.1, "adamw": 1e-3}
DEFAULT_MODEL = {"digits": "mlp", "synthetic": "cnn", "cifar10": "resnet18", "tinyimagenet": "resnet34",
                 "fashion-mnist": "mlp-bn", "mnist": "mlp-bn"}


def resolve_auto(args: argparse.Namespace, *, min_epochs: int = 1) -> None:
    """Fill the automatic (None) defaults in place; validate simple ranges. ``tvlars ssl``
    allows ``--epochs 0``: the linear probe of the untrained encoder, the baseline every
    self-supervised result is measured against."""
    if args.model is None:
        args.model = DEFAULT_MODEL[args.dataset]
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.schedule is None:
        args.schedule = "none" if (args.optimizer == "tvlars" or args.tv_factor) else "warmup-cosine"
    if args.tv_factor and args.schedule != "none":
        raise UserError("--tv-factor replaces the learning-rate schedule; use --schedule none with it")
    if args.warmup_epochs is None:
        args.warmup_epochs = 0.0 if args.schedule == "none" else float(min(20.0, args.epochs / 2))
    elif args.schedule == "none" and args.warmup_epochs > 0:
        raise UserError("--warmup-epochs needs a schedule (warmup-cosine, poly or constant), not --schedule none")
    if args.augment is None:
        args.augment = args.dataset in ("cifar10", "tinyimagenet")
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    if args.epochs < min_epochs:
        raise UserError(f"--epochs must be at least {min_epochs}, got {args.epochs}")
    for name in ("batch_size", "eval_every", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("layer_stats_every", "num_workers", "warmup_epochs", "min_lr", "weight_decay"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.warmup_epochs > args.epochs:
        raise UserError(f"--warmup-epochs {args.warmup_epochs:g} is longer than the run (--epochs {args.epochs})")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.base_batch_size < 1:
        raise UserError(f"--base-batch-size must be at least 1, got {args.base_batch_size}")
    if args.min_lr_ratio is not None:
        if not 0 <= args.min_lr_ratio <= 1:
            raise UserError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio:g}")
        if args.min_lr:
            raise UserError("give --min-lr or --min-lr-ratio, not both")
    if args.max_weight_norm is not None and args.max_weight_norm <= 0:
        raise UserError(f"--max-weight-norm must be positive, got {args.max_weight_norm:g}")
    if args.micro_batch_size != "auto":
        try:
            args.micro_batch_size = int(args.micro_batch_size)
        except (TypeError, ValueError):
            raise UserError(f"--micro-batch-size must be a positive integer or 'auto', got '{args.micro_batch_size}'") from None
        if args.micro_batch_size < 1:
            raise UserError(f"--micro-batch-size must be positive, got {args.micro_batch_size}")
    if args.delay_epochs is not None and args.delay_steps is not None:
        raise UserError("give --delay-epochs or --delay-steps, not both")
    if args.stop_after_epochs is not None and args.stop_after_epochs < 1:
        raise UserError("--stop-after-epochs must be at least 1")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def merge_resume(args: argparse.Namespace, saved: dict, defaults: dict, *, free=RUNTIME_FLAGS) -> argparse.Namespace:
    """The saved config wins; a flag the user changed to a different value is an error."""
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


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def default_out(args: argparse.Namespace) -> str:
    return f"runs/{args.dataset}-{args.model}-{args.optimizer}-b{args.batch_size}-lr{args.lr:g}-s{args.seed}"
