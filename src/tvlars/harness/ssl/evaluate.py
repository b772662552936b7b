"""Evaluation of a self-supervised encoder, as the SSL literature reports it.

Never on training-time augmentations: features come from the encoder in eval mode, under
``no_grad``, on deterministically transformed images (for 32/64-px datasets: the image
itself, normalised; the reference's Resize(256)+CenterCrop(224) is its ImageNet analogue).

* :func:`extract_features` -- encoder features and labels for a whole data set.
* :func:`knn_accuracy` -- weighted k-nearest-neighbour top-1 (Wu et al. 2018, as in
  solo-learn / DINO): cosine similarity, weights ``exp(sim / T)``, votes summed per class.
* :func:`linear_probe` -- a linear classifier on the frozen encoder, SGD + cosine annealing
  (the paper: 100 epochs; the reference's ``evaluate.py``: batch 256, lr 0.3, momentum 0.9,
  weight decay 1e-6, head initialised N(0, 0.01), bias 0, cosine over the epochs). By default
  (``norm="bn"``) the frozen features pass a parameter-free ``BatchNorm1d(affine=False)``
  before the head, as MAE and MoCo v3 probe: the reference probes the raw features with a
  fixed learning rate, so its result depends on the features' scale, which the optimizer
  under study sets (on features of LARS pre-training, SGD at 0.3 diverges). ``norm="none"``
  is the reference's raw protocol, for comparing with the paper.
* :class:`OnlineProbe` -- a linear head trained on detached features during pre-training.

Data arguments (``data`` below) are either
  * a tuple ``(images, labels)`` of tensors: uint8 images are divided by 255 and normalised
    with ``mean``/``std`` (default 0 / 1, i.e. left in [0, 1]); float images are taken as
    model-ready (already normalised) and ``mean``/``std`` are ignored; or
  * an iterable of ``(x, y)`` batches of model-ready floats, e.g. a ``DeviceLoader`` over
    the test set with ``augment=None`` and ``shuffle=False``.

Distributed use: :func:`extract_features` gathers features across ranks (``all_gather``)
when ``torch.distributed`` is initialised with several processes -- with tensor data each
rank encodes a contiguous shard; with a loader each rank encodes what its loader yields --
so every rank gets the whole set. :func:`knn_accuracy` and :func:`linear_probe` are then
single-process computations on the whole set: run them on rank 0 (or on every rank: they
are deterministic and give the same answer). :class:`OnlineProbe` averages its gradients and
its accuracy counts over ranks by itself.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "extract_features",
    "knn_accuracy",
    "linear_probe",
    "OnlineProbe",
    "default_probe_lr",
    "epoch_evaluation",
    "PROBE_NORMS",
]

# How the linear probe sees the frozen features: "bn" standardises them (BatchNorm1d without
# affine parameters: batch statistics while training, running statistics at test time), "none"
# gives them raw to the head (the Barlow Twins reference's evaluate.py).
PROBE_NORMS = ("bn", "none")

Data = Union[tuple, Iterable]


def default_probe_lr(batch_size: int) -> float:
    """The reference's classifier lr (0.3 at batch 256), scaled linearly with the batch."""
    return 0.3 * batch_size / 256


def _dist_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _model_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _prepare(x: Tensor, device, mean, std) -> Tensor:
    """A tensor batch as model-ready float32 on ``device`` (see the module docstring)."""
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
        if mean is not None:
            m = torch.as_tensor(mean, dtype=x.dtype, device=device).view(1, -1, 1, 1)
            s = torch.as_tensor(std if std is not None else (1.0,) * len(mean), dtype=x.dtype, device=device)
            x = (x - m) / s.view(1, -1, 1, 1)
        return x
    return x.float()


def _is_tensor_pair(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)


def _tensor_batches(images: Tensor, labels: Tensor, batch_size: int, device, mean, std):
    for i in range(0, images.shape[0], batch_size):
        yield _prepare(images[i:i + batch_size], device, mean, std), labels[i:i + batch_size].to(device)


class _frozen:
    """Context: module in eval mode with requires_grad False; both restored on exit."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.flags = [(p, p.requires_grad) for p in self.module.parameters()]
        self.module.eval()
        for p, _ in self.flags:
            p.requires_grad_(False)
        return self.module

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode
        for p, flag in self.flags:
            p.requires_grad_(flag)
        return False


def _gather_rows(t: Tensor) -> Tensor:
    """Concatenate each rank's rows (sizes may differ) in rank order."""
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    most = max(sizes)
    pad = torch.zeros((most - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded = torch.cat([t, pad]).contiguous()
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    data: Data,
    device=None,
    *,
    batch_size: int = 512,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    distributed: Optional[bool] = None,
) -> tuple[Tensor, Tensor]:
    """``(features float32 [N, D], labels int64 [N])`` on ``device`` for a whole data set.

    The encoder runs in eval mode under ``no_grad`` (its mode and ``requires_grad`` flags
    are restored afterwards; its weights and buffers are untouched). ``device`` defaults to
    the encoder's. ``distributed``: ``None`` gathers over ranks when torch.distributed is
    initialised with several processes (see the module docstring), ``False`` never does.
    """
    device = torch.device(device) if device is not None else _model_device(encoder)
    use_dist = (_dist_world() > 1) if distributed is None else bool(distributed)
    feats, labs = [], []
    with _frozen(encoder):
        if _is_tensor_pair(data):
            images, labels = data
            if images.shape[0] != labels.shape[0]:
                raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
            if use_dist:
                world, rank = dist.get_world_size(), dist.get_rank()
                per = math.ceil(images.shape[0] / world)
                images = images[rank * per:(rank + 1) * per]
                labels = labels[rank * per:(rank + 1) * per]
            batches = _tensor_batches(images, labels, batch_size, device, mean, std)
        else:
            batches = ((x.to(device).float(), y.to(device)) for x, y in data)
        for x, y in batches:
            f = encoder(x)
            feats.append(f.float().reshape(f.shape[0], -1))
            labs.append(y.long())
    if feats:
        features, labels = torch.cat(feats), torch.cat(labs)
    else:
        dim = 0
        features = torch.zeros(0, dim, device=device)
        labels = torch.zeros(0, dtype=torch.long, device=device)
    if use_dist:
        features = _gather_rows(features)
        labels = _gather_rows(labels)
    return features, labels


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: Optional[int] = None,
    chunk_size: int = 256,
) -> float:
    """Weighted kNN top-1 accuracy in percent (0-100).

    Features are L2-normalised; for each test row the ``k`` most cosine-similar training
    rows vote for their class with weight ``exp(sim / temperature)``; the class with the
    largest summed weight is predicted (ties: the lowest class index). ``k`` is capped at
    the number of training rows. Test rows are processed ``chunk_size`` at a time, so
    memory is ``chunk_size x N_train``. Computed in float32 on the features' device; the
    weights are scaled by each row's largest (``exp((sim - max) / T)``, the same vote), so a
    small temperature cannot overflow.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    if n_train == 0 or n_test == 0:
        raise ValueError("knn_accuracy needs at least one training and one test row")
    device = train_features.device
    train_labels = train_labels.to(device).long()
    test_labels = test_labels.to(device).long()
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    k = min(int(k), n_train)
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.to(device).float(), dim=1)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, n_test, chunk_size):
        sim = test[i:i + chunk_size] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=device)
        # exp((sim - max) / T): the same vote ratios per row, without float32 overflow at small T
        weights = torch.exp((top_sim - top_sim[:, :1]) / temperature)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        correct += (votes.argmax(dim=1) == test_labels[i:i + chunk_size]).sum()
    return 100.0 * correct.item() / n_test


def epoch_evaluation(encoder: nn.Module, data, probe: Optional["OnlineProbe"], *, knn: bool, online: bool,
                     knn_k: int, temperature: float, batch_size: int) -> dict:
    """What tvlars ssl records after an epoch: kNN accuracy at ``knn_k`` and at 20
    (knn_acc, knn20_acc) and the online probe's test accuracy (online_acc), on features of
    the un-augmented images; ``data`` is the run's ImageData. Every rank gets the same numbers."""
    if not (knn or online):
        return {}
    kw = dict(batch_size=batch_size, mean=data.mean, std=data.std)
    test_features, test_labels = extract_features(encoder, (data.test_images, data.test_labels), **kw)
    row = {}
    if online and probe is not None:
        row["online_acc"] = probe.accuracy(test_features, test_labels)
    if knn:
        train_features, train_labels = extract_features(encoder, (data.train_images, data.train_labels), **kw)
        for key, k in (("knn_acc", knn_k), ("knn20_acc", 20)):
            row[key] = knn_accuracy(train_features, train_labels, test_features, test_labels, k=k,
                                    temperature=temperature, num_classes=data.num_classes)
    return row


def _topk_correct(logits: Tensor, y: Tensor, ks=(1, 5)) -> list[Tensor]:
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices
    hit = pred == y.view(-1, 1)
    return [hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks]


def linear_probe(
    encoder: nn.Module,
    train_data: Data,
    test_data: Data,
    *,
    num_classes: Optional[int] = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: Optional[float] = None,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
    device=None,
    seed: int = 0,
    augment: Optional[Callable] = None,
    precompute: Optional[bool] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    eval_every: int = 1,
    feature_batch_size: int = 1024,
    norm: str = "bn",
) -> dict:
    """Train a linear classifier on the frozen encoder; report test top-1/top-5 in percent.

    The encoder is put in eval mode with ``requires_grad`` False for the duration (batch-norm
    statistics are not updated; weights and buffers stay bit-for-bit unchanged) and both are
    restored afterwards. The head is ``nn.Linear(D, num_classes)`` initialised N(0, 0.01),
    bias 0, from ``seed``; SGD(lr, momentum, weight_decay) with ``CosineAnnealingLR`` over
    ``epochs`` stepped once per epoch, cross-entropy loss, as the reference's evaluate.py.
    ``lr=None`` uses :func:`default_probe_lr` (0.3 * batch_size / 256).

    ``norm="bn"`` (default) puts ``BatchNorm1d(D, affine=False, eps=1e-6, momentum=None)`` between the
    features and the head (MAE's and MoCo v3's linear probe): it has no parameters to
    learn, so the probe stays linear, and it makes the result independent of the features'
    scale (and of a per-feature scale and offset): features multiplied by 1e3 probe to the
    same accuracy. ``norm="none"`` trains the head on the raw features (the reference).

    Test features are computed once (the test transform is deterministic). Training:
    with ``precompute`` (default: True when ``augment`` is None and ``train_data`` is a
    tensor tuple) the training features are also computed once and the head is trained on
    shuffled mini-batches of them -- exact for a deterministic train transform, and what
    makes 100 epochs affordable on a CPU. Otherwise every epoch re-encodes the training
    data: a tuple is shuffled and batched here and each batch (uint8 -> [0, 1] float; float
    as given) goes through ``augment(x, generator)``, which must return model-ready images
    (e.g. ``OneViewAugment(..., probe_view())``: the reference's random resized crop +
    flip); an iterable is iterated as is (its own shuffling / augmentation), with
    ``augment`` applied to each batch when given.

    Returns ``{"top1", "top5", "best_top1", "best_epoch", "history": [per-epoch dicts with
    epoch, lr, train_loss, train_acc, test_top1, test_top5 (None when not evaluated)],
    "epochs", "batch_size", "lr", "weight_decay", "momentum", "precomputed", "norm"}``.
    ``top1`` is the final epoch's accuracy on the whole test set.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be positive")
    if norm not in PROBE_NORMS:
        raise ValueError(f"norm must be one of {', '.join(PROBE_NORMS)}, got {norm!r}")
    device = torch.device(device) if device is not None else _model_device(encoder)
    lr = default_probe_lr(batch_size) if lr is None else float(lr)
    train_is_tensors = _is_tensor_pair(train_data)
    if precompute is None:
        precompute = augment is None and train_is_tensors
    if precompute and augment is not None:
        raise ValueError("precompute=True would skip the train augmentation; pass augment=None")
    gen = torch.Generator().manual_seed(int(seed))

    with _frozen(encoder):
        test_x, test_y = extract_features(encoder, test_data, device, batch_size=feature_batch_size,
                                          mean=mean, std=std, distributed=False)
        if precompute:
            train_x, train_y = extract_features(encoder, train_data, device, batch_size=feature_batch_size,
                                                mean=mean, std=std, distributed=False)
        if num_classes is None:
            ys = [test_y] + ([train_y] if precompute else ([train_data[1]] if train_is_tensors else []))
            num_classes = int(max(int(t.max().item()) for t in ys)) + 1
        dim = test_x.shape[1]
        linear = nn.Linear(dim, num_classes)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.01)
            linear.bias.zero_()
        # eps 1e-6 (MAE's): a feature with tiny variance is still standardised, not flattened.
        # momentum None: the test-time statistics are the average over every training batch
        # seen (the training set's), not an exponential average that a short probe leaves
        # close to its initial 0 / 1 (3 probe epochs on digits: test 75.6% at train 94%)
        head = (nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None), linear) if norm == "bn"
                else linear).to(device)
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

        def train_batches():
            if precompute:
                perm = torch.randperm(train_x.shape[0], generator=gen).to(device)
                for i in range(0, perm.numel(), batch_size):
                    idx = perm[i:i + batch_size]
                    yield train_x[idx], train_y[idx]
                return
            if train_is_tensors:
                images, labels = train_data
                perm = torch.randperm(images.shape[0], generator=gen)
                for i in range(0, perm.numel(), batch_size):
                    idx = perm[i:i + batch_size]
                    x = images[idx].to(device)
                    if augment is not None:
                        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
                        x = augment(x, gen)
                    else:
                        x = _prepare(x, device, mean, std)
                    # (no yield inside no_grad: the mode would leak into the consumer)
                    with torch.no_grad():
                        feats = encoder(x).float().flatten(1)
                    yield feats, labels[idx].to(device)
                return
            for x, y in train_data:
                x = x.to(device).float()
                if augment is not None:
                    x = augment(x, gen)
                with torch.no_grad():
                    feats = encoder(x).float().flatten(1)
                yield feats, y.to(device)

        @torch.no_grad()
        def test_metrics():
            head.eval()
            c1 = torch.zeros((), dtype=torch.long, device=device)
            c5 = torch.zeros((), dtype=torch.long, device=device)
            for i in range(0, test_x.shape[0], 4096):
                a, b = _topk_correct(head(test_x[i:i + 4096]), test_y[i:i + 4096])
                c1 += a
                c5 += b
            n = max(1, test_x.shape[0])
            return 100.0 * c1.item() / n, 100.0 * c5.item() / n

        history = []
        best_top1, best_epoch = -1.0, 0
        top1 = top5 = None
        for epoch in range(1, epochs + 1):
            head.train()
            cur_lr = opt.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            for feats, y in train_batches():
                if norm == "bn" and y.shape[0] < 2:
                    continue  # batch statistics need two rows: a last batch of one is skipped
                logits = head(feats)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * y.shape[0]
                correct += (logits.detach().argmax(1) == y).sum()
                seen += y.shape[0]
            sched.step()
            row = {
                "epoch": epoch,
                "lr": cur_lr,
                "train_loss": loss_sum.item() / max(1, seen),
                "train_acc": 100.0 * correct.item() / max(1, seen),
                "test_top1": None,
                "test_top5": None,
            }
            if epoch % max(1, eval_every) == 0 or epoch == epochs:
                top1, top5 = test_metrics()
                row["test_top1"], row["test_top5"] = top1, top5
                if top1 > best_top1:
                    best_top1, best_epoch = top1, epoch
            history.append(row)

    return {
        "top1": top1,
        "top5": top5,
        "best_top1": best_top1,
        "best_epoch": best_epoch,
        "history": history,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "momentum": momentum,
        "precomputed": bool(precompute),
        "norm": norm,
    }


class OnlineProbe:
    """A linear head trained on detached encoder features during pre-training.

    It has its own optimizer (AdamW, ``lr`` 1e-2, no weight decay by default: Adam is
    insensitive to the scale of the drifting features, and 1e-2 tracks them within an epoch
    even on the ~10-step epochs of the CPU ``digits`` runs) and never sends gradient into the encoder.
    Under torch.distributed with several processes, gradients are averaged over ranks
    (plain all_reduce: the head is not wrapped in DDP) and accuracy counts are summed, so
    all ranks keep identical heads and report the global accuracy. Keep it outside the
    DDP-wrapped model.

    Per training step: ``probe.step(features, labels)``; per epoch:
    ``probe.epoch_metrics() -> {"acc": percent, "loss": mean}`` (one host sync, resets the
    counters); test accuracy on given features: ``probe.accuracy(features, labels)``.
    ``state_dict()`` / ``load_state_dict()`` cover the head and its optimizer (checkpoints).
    """

    def __init__(self, feature_dim: int, num_classes: int, *, lr: float = 1e-2,
                 weight_decay: float = 0.0, device=None, distributed: Optional[bool] = None):
        self.head = nn.Linear(int(feature_dim), int(num_classes))
        if device is not None:
            self.head.to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=weight_decay)
        self.distributed = distributed
        self._reset()

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _use_dist(self) -> bool:
        return (_dist_world() > 1) if self.distributed is None else bool(self.distributed)

    def _reset(self):
        dev = self.head.weight.device
        self._loss = torch.zeros((), device=dev)
        self._correct = torch.zeros((), dtype=torch.long, device=dev)
        self._seen = torch.zeros((), dtype=torch.long, device=dev)

    def step(self, features: Tensor, labels: Tensor) -> Tensor:
        """One optimizer step of the head on ``features.detach()``; returns the loss (detached)."""
        self.head.train()
        with torch.autocast(device_type=self.device.type, enabled=False):
            x = features.detach().float().flatten(1)
            y = labels.to(x.device).long()
            logits = self.head(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self._use_dist():
            grads = [p.grad for p in self.head.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)  # one collective for weight and bias
            flat.div_(dist.get_world_size())
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        self.optimizer.step()
        loss = loss.detach()
        self._loss += loss * y.shape[0]
        self._correct += (logits.detach().argmax(1) == y).sum()
        self._seen += y.shape[0]
        return loss

    def epoch_metrics(self, reset: bool = True) -> dict:
        """Training accuracy (percent) and mean loss since the last reset, over all ranks."""
        stats = torch.stack([self._loss.double(), self._correct.double(), self._seen.double()])
        if self._use_dist():
            dist.all_reduce(stats)
        loss, correct, seen = stats.tolist()
        if reset:
            self._reset()
        if seen == 0:
            return {"acc": float("nan"), "loss": float("nan")}
        return {"acc": 100.0 * correct / seen, "loss": loss / seen}

    @torch.no_grad()
    def accuracy(self, features: Tensor, labels: Tensor, chunk_size: int = 4096) -> float:
        """Top-1 accuracy (percent) of the head on the given features (no training)."""
        self.head.eval()
        correct = 0
        for i in range(0, features.shape[0], chunk_size):
            x = features[i:i + chunk_size].to(self.device).float().flatten(1)
            y = labels[i:i + chunk_size].to(self.device).long()
            correct += int((self.head(x).argmax(1) == y).sum().item())
        return 100.0 * correct / max(1, features.shape[0])

    def to(self, device) -> "OnlineProbe":
        self.head.to(device)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, Tensor):
                    state[k] = v.to(device)
        self._reset()
        return self

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
