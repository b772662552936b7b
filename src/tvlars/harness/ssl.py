"""``tvlars ssl``: Barlow Twins pre-training, then a linear probe on the frozen encoder.

    OMP_NUM_THREADS=1 tvlars ssl --dataset digits --model cnn --projector 512-512-512 \\
        --batch-size 128 --epochs 100 --device cpu    # ~1.5 min on a CPU core: linear probe
        # 96.9 %, kNN 92.2 % (k=200) / 97.1 % (k=20); a random-init encoder: 92.9, 82.4, 95.6 %
    torchrun --nproc_per_node 4 -m tvlars ssl --dataset cifar10 --data-dir data --epochs 1000 ...

The sibling of ``tvlars train`` (same flags, run folder, resume, failure behaviour and
torchrun support; see its docstring); what differs:

 1. model: the encoder of ``--model`` (its classification head is discarded) plus a Barlow
    Twins projector (``--projector``, Linear-BN-ReLU blocks and a final Linear), trained with
    the Barlow Twins loss (``--lambd``) on two augmented views of each image
    (``--augment-preset``: the reference's colour pipeline for 3-channel images of at least
    16 px, a reduced crop/noise/erase pipeline for small or 1-channel images). The views are
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
    final_test_acc = linear probe top-1, best_test_acc = its best over the probe epochs,
    best_epoch = the pre-training epochs, linear_top5, knn_acc, knn20_acc, online_acc.
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
from pathlib import Path

from tvlars.errors import UserError
from tvlars.harness import config as cfg
from tvlars.harness.runlog import METRIC_COLUMNS

SSL_COLUMNS = METRIC_COLUMNS + ("knn_acc", "knn20_acc", "online_acc")
PROBE_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_top1", "test_top5")
SSL_LAM = 1e-5  # the paper's lam for Barlow Twins (Table 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cfg.add_arguments(parser)
    for action in parser._actions:  # the train flags whose meaning or default differs here
        if action.dest == "lam":
            action.default = SSL_LAM
            action.help = "decay coefficient lambda of phi_t (default: 1e-5, the paper's for Barlow Twins)"
        elif action.dest == "augment":
            action.help = argparse.SUPPRESS  # tvlars train's crop+flip; see --augment-preset
        elif action.dest == "eval_every":
            action.help = ("evaluate the online probe on the whole test set every K epochs and after "
                           "the last (default: 1)")
        elif action.dest == "eval_batch_size":
            action.help = "rows per forward pass when extracting features, per process (default: 1024)"
        elif action.dest == "drop_last":
            action.help = "drop the last incomplete global batch (always on for Barlow Twins) (default: on)"
    g = parser.add_argument_group("Barlow Twins")
    g.add_argument("--projector", default="2048-2048-4096", metavar="W1-W2-...",
                   help="projector layer widths: Linear-BN-ReLU blocks then a final Linear (default: "
                        "2048-2048-4096, the paper's; the reference code used 4096-4096-4096)")
    g.add_argument("--lambd", type=float, default=0.0051,
                   help="weight of the off-diagonal (redundancy) term of the loss (default: 0.0051)")
    g.add_argument("--augment-preset", choices=("auto", "reference", "small"), default="auto",
                   help="two-view augmentation: reference (crop, flip, colour jitter, grayscale, blur, "
                        "solarise; 3 channels), small (crop, noise, erasing; for tiny or 1-channel "
                        "images); auto = reference for 3-channel images of 16 px or more (default: auto)")
    e = parser.add_argument_group("evaluation (never on training-time augmentations)")
    e.add_argument("--knn-k", type=int, default=200, metavar="K",
                   help="neighbours of the weighted kNN classifier, metrics.csv knn_acc; knn20_acc "
                        "is always k=20 (default: 200)")
    e.add_argument("--knn-temperature", type=float, default=0.1, metavar="T",
                   help="temperature of the kNN vote weights exp(sim / T) (default: 0.1)")
    e.add_argument("--knn-every", type=int, default=1, metavar="K",
                   help="kNN accuracy on the whole test set every K epochs and after the last (one "
                        "forward pass over both splits); 0 = after the last only (default: 1)")
    e.add_argument("--online-probe", action=argparse.BooleanOptionalAction, default=True,
                   help="train a linear head on detached features during pre-training "
                        "(train_acc and online_acc in metrics.csv) (default: on)")
    e.add_argument("--probe-epochs", type=int, default=100, metavar="N",
                   help="epochs of the final linear probe on the frozen encoder (default: 100, the paper's)")
    e.add_argument("--probe-lr", type=float, default=None,
                   help="linear probe learning rate, SGD with cosine annealing (default: 0.3 x "
                        "probe-batch-size / 256, the reference's)")
    e.add_argument("--probe-batch-size", type=int, default=256, metavar="B",
                   help="linear probe batch size (default: 256)")
    e.add_argument("--probe-weight-decay", type=float, default=1e-6,
                   help="linear probe weight decay (default: 1e-6)")
    e.add_argument("--probe-augment", action=argparse.BooleanOptionalAction, default=False,
                   help="train the linear probe on random-resized-crop + flip views, re-encoding the "
                        "training set every probe epoch (the reference's protocol); off: on features "
                        "of the un-augmented training images, computed once (default: off)")


def run(args: argparse.Namespace) -> int:
    from tvlars.harness.runtime import setup_runtime

    rt = setup_runtime(args.device)
    try:
        from tvlars.harness.ssl_loop import pretrain

        return pretrain(args, rt)
    finally:
        rt.shutdown()


def resolve_ssl(args: argparse.Namespace) -> None:
    """Validate and normalise the Barlow Twins and evaluation flags in place (after resolve_auto)."""
    from tvlars.harness.evaluate import default_probe_lr

    if not args.drop_last:
        raise UserError("--no-drop-last: the Barlow Twins loss normalises over the batch, so tvlars ssl "
                        "drops the last partial batch")
    for name in ("knn_k", "probe_epochs", "probe_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("knn_every", "lambd", "probe_weight_decay"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.knn_temperature <= 0:
        raise UserError(f"--knn-temperature must be positive, got {args.knn_temperature}")
    if args.probe_lr is None:
        args.probe_lr = default_probe_lr(args.probe_batch_size)
    elif args.probe_lr <= 0:
        raise UserError(f"--probe-lr must be positive, got {args.probe_lr}")


def default_out(args: argparse.Namespace) -> str:
    """runs/ssl-<dataset>-<model>-<optimizer>-b<B>-lr<lr>-s<seed> (apart from tvlars train's runs)."""
    path = Path(cfg.default_out(args))
    return str(path.with_name("ssl-" + path.name))


def open_run(args: argparse.Namespace, rt):
    """The run-folder rules of tvlars train (tvlars.harness.run.open_run) for an ssl run:
    (args resolved, out, saved config, checkpoint state or None), or None when the run
    already completed."""
    from tvlars.harness.barlow import parse_projector
    from tvlars.harness.run import open_run as open_any_run

    if args.augment is not None:
        raise UserError("--augment is tvlars train's crop+flip; tvlars ssl draws two views with --augment-preset")
    args.augment = False
    args.projector = "-".join(str(w) for w in parse_projector(args.projector))  # a --config list too
    opened = open_any_run(args, rt, command="ssl", parser_defaults=lambda: cfg.parser_defaults(add_arguments),
                          default_out=default_out, min_epochs=0)
    if opened is not None:
        resolve_ssl(opened[0])
    return opened


def write_probe_csv(out: Path, history: list[dict]) -> None:
    """probe.csv: the linear probe's per-epoch history (written whole, atomically)."""
    import csv
    import io

    from tvlars.harness.runlog import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(PROBE_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(Path(out) / "probe.csv", buf.getvalue())
