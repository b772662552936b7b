"""tvlars.harness.models: shapes for every model, stem and image size, the two
initialisations, and the CNN learning the digits quickly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tvlars.errors import UserError
from tvlars.harness.data.datasets import load_data
from tvlars.harness.data.loader import DeviceLoader
from tvlars.harness.models import INITS, MODELS, STEMS, Classifier, build_model

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small models run faster on one thread than fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_model_names():
    assert MODELS == ("resnet18", "resnet34", "resnet50", "cnn", "cnn-pool", "mlp", "mlp-bn")


# stem="auto" is the cifar stem at these sizes (test_stems); cnn and mlp have no stem.
@pytest.mark.parametrize(
    "name, stem",
    [(name, stem) for name in MODELS[:3] for stem in ("cifar", "imagenet")] + [("cnn", "auto"), ("cnn-pool", "auto"), ("mlp", "auto")],
)
@pytest.mark.parametrize("image_size", [8, 32, 64])
def test_output_and_feature_shapes(name, stem, image_size):
    model = build_model(name, num_classes=7, in_channels=3, image_size=image_size, stem=stem).eval()
    assert isinstance(model, Classifier) and isinstance(model.head, nn.Linear)
    assert model.head.in_features == model.feature_dim and model.head.out_features == 7
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        features = model.encoder(x)
        logits = model(x)
    assert features.shape == (2, model.feature_dim)
    assert logits.shape == (2, 7)
    assert torch.allclose(logits, model.head(features))


def test_feature_dims():
    expected = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "cnn": 128, "cnn-pool": 64, "mlp": 256}
    for name, dim in expected.items():
        assert build_model(name, 10, 3, 32).feature_dim == dim


def test_cnn_pool_downsamples_before_its_wide_layers():
    # the point of cnn-pool is cost: its 32- and 64-channel convolutions see 14 and 7 pixels
    # of a 28-pixel image, so it takes several times fewer multiply-adds than cnn
    def conv_macs(name):
        encoder, total = build_model(name, 10, 1, 28).encoder, 0

        def count(module, inputs, output):
            nonlocal total
            total += output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]

        hooks = [m.register_forward_hook(count) for m in encoder.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            encoder.eval()(torch.zeros(1, 1, 28, 28))
        for h in hooks:
            h.remove()
        return total

    assert conv_macs("cnn") > 10 * conv_macs("cnn-pool")
    bn = [m for m in build_model("cnn-pool", 10, 1, 28).encoder if isinstance(m, nn.BatchNorm2d)]
    assert [m.num_features for m in bn] == [16, 32, 64]


def test_stems():
    cifar = build_model("resnet18", 10, 3, 32, stem="cifar").encoder
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    imagenet = build_model("resnet18", 10, 3, 32, stem="imagenet").encoder
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    # auto: the cifar stem up to 64 pixels, the imagenet stem above.
    assert build_model("resnet34", 200, 3, 64).encoder.conv1.kernel_size == (3, 3)
    assert build_model("resnet34", 200, 3, 65).encoder.conv1.kernel_size == (7, 7)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_one_channel_input(stem):
    model = build_model("resnet18", 10, in_channels=1, image_size=8, stem=stem).eval()
    assert model.encoder.conv1.in_channels == 1
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_kaiming_uniform_init():
    model = build_model("resnet18", 10, 3, 32, init="kaiming_uniform")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            bound = math.sqrt(6 / fan_in)
            largest = module.weight.abs().max().item()
            # uniform up to the bound (a float32 draw may round just past the float64 bound)
            assert largest <= bound * (1 + 1e-6) and largest > 0.95 * bound
            assert module.bias is None or not module.bias.any()
        elif isinstance(module, nn.BatchNorm2d):
            assert (module.weight == 1).all() and not module.bias.any()
    assert not model.head.bias.any()


def test_torchvision_init_differs():
    model = build_model("resnet18", 10, 3, 32, init="torchvision")
    conv = model.encoder.layer1[0].conv1  # Kaiming normal, fan_out: std sqrt(2 / fan_out)
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    stem_conv = model.encoder.conv1
    stem_fan_out = stem_conv.out_channels * 9
    assert stem_conv.weight.std().item() == pytest.approx(math.sqrt(2 / stem_fan_out), rel=0.1)
    assert model.head.bias.any()  # PyTorch's default Linear init has nonzero biases
    mlp = build_model("mlp", 10, 3, 8, init="torchvision")
    assert mlp.encoder[1].bias.any()


def test_mlp_has_no_normalisation_layers_and_cnn_has_batch_norm():
    mlp = build_model("mlp", 10, 3, 32)
    assert not any(isinstance(m, NORM_LAYERS) for m in mlp.modules())
    assert not any(isinstance(m, nn.Dropout) for m in mlp.modules())
    cnn = build_model("cnn", 10, 1, 8)
    assert any(isinstance(m, nn.BatchNorm2d) for m in cnn.modules())


@pytest.mark.parametrize(
    "arguments, kind",
    [
        (dict(name="vgg16"), "model"),
        (dict(name="resnet18", stem="tiny"), "stem"),
        (dict(name="cnn", init="xavier"), "initialisation"),
    ],
)
def test_unknown_choices_are_user_errors_listing_the_choices(arguments, kind):
    full = dict(num_classes=10, in_channels=3, image_size=32, **arguments)
    with pytest.raises(UserError) as caught:
        build_model(**full)
    message = str(caught.value)
    assert kind in message
    choices = {"model": MODELS, "stem": STEMS, "initialisation": INITS}[kind]
    assert all(choice in message for choice in choices)


def test_cnn_learns_digits_in_seconds():
    torch.manual_seed(0)
    digits = load_data("digits")
    model = build_model("cnn", digits.num_classes, digits.in_channels, digits.image_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train = DeviceLoader(
        digits.train_images, digits.train_labels, batch_size=64, mean=digits.mean, std=digits.std,
        device="cpu", shuffle=True, drop_last=True,
    )
    for epoch in range(3):
        train.set_epoch(epoch)
        for x, y in train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    test = DeviceLoader(
        digits.test_images, digits.test_labels, batch_size=450, mean=digits.mean, std=digits.std,
        device="cpu", shuffle=False, drop_last=False,
    )
    model.eval()
    with torch.no_grad():
        x, y = next(iter(test))
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.85
