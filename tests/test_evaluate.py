"""kNN, linear probe, feature extraction and online probe (tvlars.harness.ssl.evaluate)."""

import copy
import math

import pytest
import torch
from torch import nn

from helpers import run_gloo
from tvlars.harness.ssl.evaluate import (
    OnlineProbe,
    default_probe_lr,
    extract_features,
    knn_accuracy,
    linear_probe,
)
from tvlars.harness.ssl.augment import OneViewAugment, probe_view


def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# --------------------------------------------------------------------------- kNN


def test_knn_hand_made_weighting_and_temperature():
    # one class-1 point exactly at the query, two class-0 points 20 degrees away
    train = torch.tensor([_unit(0), _unit(20), _unit(-20)]) * torch.tensor([[3.0], [0.5], [7.0]])  # norms irrelevant
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([_unit(0)])
    c20 = math.cos(math.radians(20))
    # k=1: nearest neighbour is class 1
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=1) == 100.0
    # k=3, T=0.1: exp(10) = 22026 < 2 exp(9.397) = 24100 -> class 0
    assert math.exp(1 / 0.1) < 2 * math.exp(c20 / 0.1)
    assert knn_accuracy(train, labels, query, torch.tensor([0]), k=3, temperature=0.1) == 100.0
    # k=3, T=0.01: exp(100) > 2 exp(93.97) -> class 1
    assert math.exp(1 / 0.01) > 2 * math.exp(c20 / 0.01)
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=0.01) == 100.0
    # k capped at the 3 training rows: same as k=3
    assert knn_accuracy(train, labels, query, torch.tensor([0]), k=200, temperature=0.1) == 100.0


def test_knn_percent_chunking_and_num_classes():
    train = torch.tensor([_unit(0), _unit(90), _unit(180)])
    labels = torch.tensor([0, 1, 2])
    test = torch.tensor([_unit(5), _unit(85), _unit(175), _unit(95)])
    test_labels = torch.tensor([0, 1, 2, 2])  # the last is wrong on purpose
    for chunk in (1, 3, 256):
        assert knn_accuracy(train, labels, test, test_labels, k=1, chunk_size=chunk) == 75.0
    assert knn_accuracy(train, labels, test, test_labels, k=1, num_classes=10) == 75.0
    with pytest.raises(ValueError):
        knn_accuracy(train, labels, test, test_labels, k=0)


# --------------------------------------------------------------------------- toy problem


def _toy(n, seed, classes=3):
    """Images [n, 1, 4, 4] from well-separated class means: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 16, generator=torch.Generator().manual_seed(42)) * 2.0
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + 0.5 * torch.randn(n, 16, generator=g)
    return x.view(n, 1, 4, 4), y


def _encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 24))


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, before):
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # bit for bit, buffers included


def test_extract_features_modes_and_inputs():
    enc = _encoder()
    enc.train()
    enc[1].weight.requires_grad_(False)  # a mixed state, to be restored exactly
    x, y = _toy(50, 1)
    before = _snapshot(enc)
    f, lab = extract_features(enc, (x, y), "cpu", batch_size=16)
    assert f.shape == (50, 24) and f.dtype == torch.float32 and torch.equal(lab, y)
    assert not f.requires_grad
    assert enc.training and all(m.training for m in enc.modules())
    assert not enc[1].weight.requires_grad and enc[1].bias.requires_grad
    _assert_unchanged(enc, before)
    enc.eval()
    with torch.no_grad():
        assert torch.allclose(f, enc(x), atol=1e-6)  # eval-mode features
    # a loader of (x, y) batches gives the same
    f2, lab2 = extract_features(enc, [(x[:20], y[:20]), (x[20:], y[20:])], "cpu")
    assert torch.allclose(f, f2, atol=1e-6) and torch.equal(lab2, y)
    # uint8 images: / 255 then mean/std
    x8 = torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8)
    flat = nn.Flatten()
    f8, _ = extract_features(flat, (x8, torch.zeros(10, dtype=torch.long)), "cpu", mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.allclose(f8, ((x8.float() / 255 - 0.5) / 0.25).flatten(1), atol=1e-6)


def test_linear_probe_frozen_encoder_and_accuracy():
    enc = _encoder()
    enc.train()
    before = _snapshot(enc)
    flags = [p.requires_grad for p in enc.parameters()]
    train, test = _toy(600, 1), _toy(300, 2)
    out = linear_probe(enc, train, test, epochs=8, batch_size=64, weight_decay=0.0, seed=0)
    _assert_unchanged(enc, before)
    assert enc.training and [p.requires_grad for p in enc.parameters()] == flags
    assert all(p.grad is None for p in enc.parameters())
    assert out["top1"] > 90.0  # chance is 33 %
    assert out["top5"] == 100.0  # 3 classes
    assert out["precomputed"] is True and out["lr"] == pytest.approx(default_probe_lr(64))
    hist = out["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 9))
    lrs = [h["lr"] for h in hist]
    assert lrs[0] == pytest.approx(0.3 * 64 / 256)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # cosine annealing
    assert lrs[-1] == pytest.approx(lrs[0] * (1 + math.cos(math.pi * 7 / 8)) / 2)
    assert out["best_top1"] >= out["top1"] and hist[-1]["test_top1"] == out["top1"]
    # deterministic given the seed
    again = linear_probe(enc, train, test, epochs=8, batch_size=64, weight_decay=0.0, seed=0)
    assert again["top1"] == out["top1"] and again["history"][-1]["train_loss"] == hist[-1]["train_loss"]


def test_linear_probe_with_train_augmentation_reencodes():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten())
    before = _snapshot(enc)
    g = torch.Generator().manual_seed(0)
    # two classes: red-ish vs blue-ish 8x8 images (uint8, as ImageData stores them)
    y = torch.randint(0, 2, (200,), generator=g)
    base = torch.rand(200, 3, 8, 8, generator=g) * 0.3
    base[y == 0, 0] += 0.7
    base[y == 1, 2] += 0.7
    x8 = (base * 255).round().to(torch.uint8)
    mean, std = (0.5,) * 3, (0.25,) * 3
    aug = OneViewAugment(8, 3, mean, std, probe_view())
    calls = []

    def counting_aug(x, gen):
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        calls.append(x.shape[0])
        return aug(x, gen)

    out = linear_probe(enc, (x8[:150], y[:150]), (x8[150:], y[150:]), epochs=3, batch_size=50,
                       augment=counting_aug, mean=mean, std=std)
    assert out["precomputed"] is False and sum(calls) == 3 * 150
    assert out["top1"] > 80.0
    _assert_unchanged(enc, before)
    with pytest.raises(ValueError):
        linear_probe(enc, (x8, y), (x8, y), epochs=1, augment=counting_aug, precompute=True)


class _Scaled(nn.Module):
    """The encoder's features times a constant, plus one: what another optimizer's weight norms do to them."""

    def __init__(self, encoder, factor, offset=0.0):
        super().__init__()
        self.encoder, self.factor, self.offset = encoder, factor, offset

    def forward(self, x):
        return self.encoder(x) * self.factor + self.offset


def test_linear_probe_does_not_depend_on_the_feature_scale():
    enc = _encoder()
    train, test = _toy(600, 1), _toy(300, 2)
    kw = dict(epochs=6, batch_size=64, seed=0)
    plain = linear_probe(enc, train, test, **kw)
    scaled = linear_probe(_Scaled(enc, 1e3), train, test, **kw)
    assert plain["norm"] == scaled["norm"] == "bn"  # the default
    assert plain["top1"] > 90.0 and scaled["top1"] == plain["top1"]
    for a, b in zip(plain["history"], scaled["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["test_top1"] == a["test_top1"]
    # the reference's raw protocol is what moved with the scale: the same SGD step on features
    # 1000x larger overshoots (the first epoch's loss is orders of magnitude above the plain one)
    raw, raw_scaled = (linear_probe(e, train, test, norm="none", **kw) for e in (enc, _Scaled(enc, 1e3)))
    assert raw["norm"] == "none" and raw["top1"] > 90.0
    assert raw_scaled["history"][0]["train_loss"] > 100 * raw["history"][0]["train_loss"]
    with pytest.raises(ValueError, match="norm"):
        linear_probe(enc, train, test, epochs=1, norm="layer")


def test_linear_probe_uses_the_training_set_statistics_at_test_time():
    # features far from zero mean and unit variance, probed for one short epoch: an exponential
    # running average would still be near its initial 0 / 1 and shift every test feature
    large = _Scaled(_encoder(), 50.0, offset=1e3)
    train, test = _toy(601, 1), _toy(300, 2)  # at batch 100 the last batch has one row: skipped, not an error
    out = linear_probe(large, train, test, epochs=1, batch_size=100)
    train_acc, test_acc = out["history"][0]["train_acc"], out["top1"]
    assert test_acc > 90.0 and test_acc > train_acc - 5.0


# --------------------------------------------------------------------------- online probe


def test_online_probe_learns_and_never_touches_the_encoder():
    enc = _encoder()
    probe = OnlineProbe(24, 3, lr=1e-2)
    x, y = _toy(512, 3)
    for epoch in range(4):
        for i in range(0, 512, 64):
            feats = enc(x[i:i + 64])  # with grad, as during pre-training
            loss = probe.step(feats, y[i:i + 64])
            assert loss.dim() == 0 and not loss.requires_grad
        m = probe.epoch_metrics()
    assert all(p.grad is None for p in enc.parameters())
    assert m["acc"] > 90.0 and m["loss"] < 0.5
    assert math.isnan(probe.epoch_metrics()["acc"])  # counters were reset
    xt, yt = _toy(200, 4)
    with torch.no_grad():
        assert probe.accuracy(enc(xt), yt) > 90.0
    # checkpoint round trip, optimizer state included
    clone = OnlineProbe(24, 3, lr=1e-2)
    clone.load_state_dict(copy.deepcopy(probe.state_dict()))  # as if through a file
    f = enc(x[:64]).detach()
    probe.step(f, y[:64])
    clone.step(f, y[:64])
    assert torch.equal(probe.head.weight, clone.head.weight)


# --------------------------------------------------------------------------- DDP (gloo, CPU)

N_ROWS = 11  # not divisible by the world size


def _ddp_worker(rank, world):
    enc = _encoder()
    x, y = _toy(N_ROWS, 5)
    feats, labels = extract_features(enc, (x, y), "cpu", batch_size=4)  # gathers
    lo = [0, 6][rank]
    loader_feats, loader_labels = extract_features(enc, [(x[lo:lo + 6 - rank], y[lo:lo + 6 - rank])], "cpu")
    torch.manual_seed(1)
    probe = OnlineProbe(24, 3, lr=0.05)
    xs, ys = _toy(40, 6)
    half = slice(rank * 20, (rank + 1) * 20)
    with torch.no_grad():
        fs = enc(xs)
    for _ in range(3):
        probe.step(fs[half], ys[half])
    return {"feats": feats, "labels": labels, "loader_feats": loader_feats, "loader_labels": loader_labels,
            "head": probe.head.state_dict(), "metrics": probe.epoch_metrics()}


def test_distributed_feature_gather_and_online_probe(tmp_path):
    ranks = run_gloo(2, _ddp_worker, tmp_path)

    enc = _encoder()
    x, y = _toy(N_ROWS, 5)
    want, _ = extract_features(enc, (x, y), "cpu")
    torch.manual_seed(1)
    probe = OnlineProbe(24, 3, lr=0.05)
    xs, ys = _toy(40, 6)
    with torch.no_grad():
        fs = enc(xs)
    for _ in range(3):
        probe.step(fs, ys)  # one process, the global batch
    metrics = probe.epoch_metrics()
    for r in ranks:
        assert torch.allclose(r["feats"], want, atol=1e-6) and torch.equal(r["labels"], y)
        assert torch.allclose(r["loader_feats"], want, atol=1e-6) and torch.equal(r["loader_labels"], y)
        for k, v in probe.head.state_dict().items():
            assert torch.allclose(r["head"][k], v, atol=1e-6), k
        assert r["metrics"]["acc"] == pytest.approx(metrics["acc"])
        assert r["metrics"]["loss"] == pytest.approx(metrics["loss"], rel=1e-5)
