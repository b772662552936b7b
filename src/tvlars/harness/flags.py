"""The flags of ``tvlars train`` and ``tvlars ssl``: the schema of a run.

argparse is the one description of what a run can be told: ``--help`` prints it, ``--config``
files and ``tvlars sweep`` grids are checked against it, and tvlars.harness.config resolves
what it parsed into the typed configuration the rest of the harness takes. No torch here:
building a parser must stay instant for ``--help`` and for the sweep's grid checks.

``tvlars ssl`` takes every flag of ``tvlars train`` (same names, same meaning, so grids and
configs carry over) plus its own groups; where the wording or a default differs for
Barlow Twins, the shared groups take ``command`` rather than being patched afterwards.
"""

from __future__ import annotations

import argparse
import functools

from tvlars.harness.optimizers import OPTIMIZERS, taken_by
from tvlars.harness.schedules import KINDS as SCHEDULES

# The builders' own lists (tvlars.harness.data.datasets, tvlars.harness.models) import torch;
# test_cli checks these copies against them.
DATASETS = ("digits", "synthetic", "cifar10", "tinyimagenet", "fashion-mnist", "mnist")
MODELS = ("resnet18", "resnet34", "resnet50", "cnn", "cnn-pool", "mlp", "mlp-bn")
LR_SCALINGS = ("none", "linear", "sqrt")

#: The paper's decay coefficient of phi_t (Table 1): classification, and Barlow Twins.
LAM = {"train": 1e-4, "ssl": 1e-5}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_shared_arguments(parser, "train")


def add_ssl_arguments(parser: argparse.ArgumentParser) -> None:
    _add_shared_arguments(parser, "ssl")
    g = parser.add_argument_group("Barlow Twins")
    g.add_argument("--projector", default="2048-2048-4096", metavar="W1-W2-...",
                   help="projector layer widths: Linear-BN-ReLU blocks then a final Linear (default: "
                        "2048-2048-4096, the paper's; the reference code used 4096-4096-4096)")
    g.add_argument("--lambd", type=float, default=0.0051,
                   help="weight of the off-diagonal (redundancy) term of the loss (default: 0.0051)")
    g.add_argument("--augment-preset", choices=("auto", "reference", "gray", "small"), default="auto",
                   help="two-view augmentation: reference (crop, flip, colour jitter, grayscale, blur, "
                        "solarise; 3 channels), gray (crop, flip, brightness/contrast, solarise; 1 channel), "
                        "small (crop, noise, erasing; for tiny images); auto = small below 16 px, else "
                        "gray or reference by the channel count (default: auto)")
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
    e.add_argument("--probe-norm", choices=("bn", "none"), default="bn",
                   help="how the linear probe sees the frozen features: bn = standardised by a "
                        "parameter-free BatchNorm1d before the head (MAE, MoCo v3), so the result does not "
                        "depend on the features' scale; none = raw, the Barlow Twins reference's "
                        "protocol (default: bn)")
    e.add_argument("--probe-augment", action=argparse.BooleanOptionalAction, default=False,
                   help="train the linear probe on random-resized-crop + flip views, re-encoding the "
                        "training set every probe epoch (the reference's protocol); off: on features "
                        "of the un-augmented training images, computed once (default: off)")


def defaults(add_arguments) -> dict:
    """Every flag's default, as the parser built by ``add_arguments`` has it (a copy: resolving
    a run asks for them, and a sweep resolves each of its runs)."""
    return dict(_defaults(add_arguments))


@functools.cache
def _defaults(add_arguments) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return {a.dest: a.default for a in parser._actions if a.dest != argparse.SUPPRESS}


def _add_shared_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    _add_run_arguments(parser)
    _add_data_arguments(parser, command)
    _add_model_arguments(parser, command)
    _add_optimizer_arguments(parser, command)
    _add_batch_arguments(parser, command)
    _add_performance_arguments(parser)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
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
                        "holds none yet, does nothing if it already completed, and refuses (changing "
                        "nothing) a run whose checkpoint.pt or config.yaml is gone")
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


def _add_data_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits (sklearn 8x8, built in), synthetic (random images), cifar10, "
                        "tinyimagenet, fashion-mnist, mnist (IDX files) (default: digits)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="dataset folder (cifar10, tinyimagenet: default ./data; fashion-mnist, mnist: "
                        "default ./data, then /usr/share/datasets/<name> where Debian's "
                        "dataset-fashion-mnist installs it)")
    g.add_argument("--download", action="store_true", help="download the dataset into --data-dir if missing")
    # tvlars ssl keeps the flag only to say that --augment-preset is its augmentation
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help=argparse.SUPPRESS if command == "ssl" else
                   "the paper's augmentation: random crop (4-pixel padding) + horizontal flip "
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


def _add_model_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    g = parser.add_argument_group("model")
    grey = "cnn-pool" if command == "ssl" else "mlp-bn"
    g.add_argument("--model", choices=MODELS, default=None,
                   help="network (default: mlp for digits, cnn for synthetic, resnet18 for cifar10, resnet34 "
                        f"for tinyimagenet, {grey} for fashion-mnist and mnist); mlp has no batch norm, "
                        "mlp-bn the same layers with batch norm; cnn-pool is a conv net cheap enough for "
                        "Barlow Twins on 28x28 images on a CPU")
    g.add_argument("--stem", default="auto", choices=("auto", "cifar", "imagenet"),
                   help="ResNet stem: cifar (3x3 conv, no max-pool) or imagenet (7x7 conv + max-pool) "
                        "(default: auto = cifar for images up to 64 pixels)")
    g.add_argument("--init", default="kaiming_uniform", choices=("kaiming_uniform", "torchvision"),
                   help="weight initialisation: kaiming_uniform (the paper's) or torchvision's own "
                        "(default: kaiming_uniform)")


def _add_optimizer_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="tvlars",
                   help="lars, lamb, tvlars (the paper's), or torch's sgd / adamw (default: tvlars)")
    g.add_argument("--lr", type=float, default=None,
                   help="base (target) learning rate; the paper's grid is 1..19 for batch 512..16K "
                        "(default: 1.0 for lars/tvlars, 0.01 lamb, 0.1 sgd, 0.001 adamw)")
    g.add_argument("--momentum", type=float, default=0.9, help=f"momentum mu: {taken_by('momentum')} (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: 5e-4, the paper's)")
    g.add_argument("--trust-coefficient", type=float, default=1e-3,
                   help=f"LARS coefficient eta: {taken_by('trust_coefficient')} (default: 1e-3)")
    g.add_argument("--trust-form", default="coupled", choices=("coupled", "separate"),
                   help=f"{taken_by('trust_form')}: the trust ratio: coupled = eta*||w||/||g + wd*w|| (official "
                        "code, Barlow Twins); separate = eta*||w||/(||g|| + wd*||w|| + eps) (You et al., timm) "
                        "(default: coupled)")
    g.add_argument("--trust-clip", action="store_true",
                   help="clip the trust ratio (LARC for lars: min(trust/lr, 1); <= 1 for lamb)")
    g.add_argument("--eps", type=float, default=None,
                   help="epsilon: lars denominator (default 0), lamb (default 1e-6), adamw (default 1e-8)")
    g.add_argument("--nesterov", action="store_true", help=f"Nesterov momentum: {taken_by('nesterov')}")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"),
                   help="lamb / adamw moment coefficients (default: 0.9 0.999)")
    g.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="lamb: bias-correct the moments (default: on)")
    g.add_argument("--max-weight-norm", type=float, default=None, metavar="C",
                   help="lamb: cap ||w|| at C in the trust ratio min(||w||, C) / ||u|| (the TVLARS "
                        "authors' LAMB, cybertronai/pytorch-lamb: 10) (default: no cap)")
    g.add_argument("--layer-adaptation", action=argparse.BooleanOptionalAction, default=True,
                   help=f"{taken_by('layer_adaptation')}: the layer-wise trust ratio; --no-layer-adaptation sets it "
                        "to 1 for every parameter (the authors' Barlow Twins 'LAMB' ran that way, as Adam "
                        "without bias correction) (default: on)")
    g.add_argument("--exclude-1d-decay", action=argparse.BooleanOptionalAction, default=True,
                   help="no weight decay on 1-D parameters (biases, norm weights) (default: on)")
    g.add_argument("--exclude-1d-adapt", action=argparse.BooleanOptionalAction, default=True,
                   help=f"{taken_by('exclude_1d_adapt')}: trust ratio 1 (no layer-wise adaptation) for 1-D parameters "
                        "(default: on)")
    t = parser.add_argument_group("TVLARS time-varying factor phi_t = 1/(alpha + exp(lam*(t - d))) + min-factor",
                                  f"{taken_by('lam')}")
    t.add_argument("--lam", type=float, default=None,
                   help="decay coefficient lambda of phi_t (default: 1e-5, the paper's for Barlow Twins)"
                   if command == "ssl" else
                   "decay coefficient lambda of phi_t (default: 1e-4, the paper's for classification)")
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
    t.add_argument("--phi-anneal", action="store_true",
                   help="tvlars (paper variant) or --tv-factor: lam and delay from the run's length T "
                        "instead of --lam and --delay-*: phi_t falls from 0.99 to 0.01, centred on the "
                        "middle of the run (delay T/2, lam 2 ln(99)/T), an anneal without warm-up")
    s = parser.add_argument_group("learning-rate schedule (stepped every optimizer step)")
    s.add_argument("--schedule", choices=SCHEDULES, default=None,
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


def _add_batch_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    ssl = command == "ssl"
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
                   help="drop the last incomplete global batch (always on for Barlow Twins) (default: on)" if ssl
                   else "drop the last incomplete global batch of each epoch (default: on)")
    g.add_argument("--eval-every", type=int, default=1, metavar="K",
                   help="evaluate the online probe on the whole test set every K epochs and after the last "
                        "(default: 1)" if ssl else
                   "evaluate on the whole test set every K epochs and after the last (default: 1)")
    g.add_argument("--eval-batch-size", type=int, default=1024, metavar="N",
                   help="rows per forward pass when extracting features, per process (default: 1024)" if ssl
                   else "rows per forward pass during evaluation, per process (default: 1024)")
    g.add_argument("--layer-stats-every", type=int, default=10, metavar="K",
                   help="write per-layer weight/grad norms, trust ratio and step size to layers.csv "
                        "every K optimizer steps; 0 disables (default: 10)")


def _add_performance_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("performance")
    g.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="autocast the forward pass to bfloat16 (default: none)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and inputs")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="synchronised batch norm across processes (CUDA + torchrun only, as in the "
                        "paper) (default: on)")
    g.add_argument("--fsdp", action="store_true",
                   help="tvlars train under torchrun: shard parameters, gradients and optimizer state over "
                        "the processes (FSDP2 fully_shard) instead of replicating them (DDP); the same "
                        "results (tvlars's trust ratios see whole layers); checkpoints stay whole")
