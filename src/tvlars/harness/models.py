"""Classifiers: an encoder to a feature vector and a linear head.

``build_model(name, ...)`` returns a :class:`Classifier` whose ``encoder`` maps images to
``[N, feature_dim]`` features (what self-supervised learning and the linear probe use)
and whose ``head`` is a single ``nn.Linear``.

Models (:data:`MODELS`):

``resnet18``, ``resnet34``, ``resnet50``
    torchvision's ResNets with the classifier removed. The stem (:data:`STEMS`) is
    ``"cifar"`` (3x3 stride-1 convolution, no max-pool: the usual choice for 32x32
    images), ``"imagenet"`` (torchvision's 7x7 stride-2 convolution and 3x3 stride-2
    max-pool, which the authors' published code used), or ``"auto"``: the cifar stem for
    images of at most 64 pixels (CIFAR-10, Tiny ImageNet, digits), the imagenet stem for
    larger ones. The imagenet stem shrinks a 32x32 image to 8x8 before the first block,
    which costs several points of accuracy on CIFAR-10.
``cnn``
    three 3x3 convolutions with batch norm and a global average pool (128 features);
    trains on 8x8 digits in seconds.
``cnn-pool``
    three 3x3 convolutions of 16, 32 and 64 channels with batch norm, the first two
    followed by a 2x2 max-pool, then a global average pool (64 features). Pooling early
    makes it about 15 times cheaper than ``cnn`` on 28x28 images (a Barlow Twins epoch of
    Fashion-MNIST's two views takes tens of seconds on one CPU thread rather than
    minutes), while keeping what a pixel MLP lacks for self-supervised learning: local
    filters and translation equivariance, so a cropped view and the whole image share
    features.
``mlp``
    two hidden layers of 256 units with ReLU and no normalisation layer at all, so a
    batch's gradient is the mean of per-example gradients (used to check that
    distributed training matches single-process training exactly).
``mlp-bn``
    the same two hidden layers, each linear map (without bias) followed by batch norm.
    Like the paper's ResNets, every hidden weight matrix is then scale-invariant (the
    loss does not change when it is multiplied by a constant), which is what shapes how
    LARS's ``||w||/||g||`` evolves; at about 0.5 s per Fashion-MNIST epoch on two CPU cores
    it lets a CPU run the paper's grids on real data.

Initialisation (:data:`INITS`):

``"kaiming_uniform"``
    the paper's: every convolution and linear weight ~ U(-b, b) with
    b = sqrt(6 / fan_in) (Kaiming uniform for ReLU), biases 0, batch-norm weight 1 and
    bias 0.
``"torchvision"``
    what the modules get by default: for the ResNets torchvision's own initialisation
    (Kaiming normal, fan_out, for convolutions; batch norm 1 and 0; PyTorch's default for
    the linear head), for ``cnn`` and ``mlp`` PyTorch's default layer initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from tvlars.errors import UserError

MODELS = ("resnet18", "resnet34", "resnet50", "cnn", "cnn-pool", "mlp", "mlp-bn")
STEMS = ("auto", "cifar", "imagenet")
INITS = ("kaiming_uniform", "torchvision")

#: ``stem="auto"`` uses the cifar stem for images up to this many pixels across.
CIFAR_STEM_MAX_SIZE = 64


class Classifier(nn.Module):
    """``forward(x) = head(encoder(x))`` with ``encoder(x)`` of shape [N, feature_dim]."""

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _resnet_encoder(name: str, in_channels: int, stem: str) -> tuple[nn.Module, int]:
    from torchvision import models as tv_models

    resnet = getattr(tv_models, name)(weights=None)
    feature_dim = resnet.fc.in_features
    resnet.fc = nn.Identity()  # the encoder ends at the pooled, flattened features
    if stem == "cifar":
        resnet.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    elif in_channels != 3:
        resnet.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # A replaced first convolution gets torchvision's rule, as if the ResNet had built it.
    nn.init.kaiming_normal_(resnet.conv1.weight, mode="fan_out", nonlinearity="relu")
    return resnet, feature_dim


def _conv_block(inputs: int, outputs: int, *, pool: bool = False) -> list[nn.Module]:
    layers = [
        nn.Conv2d(inputs, outputs, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))  # ceil_mode keeps 1-pixel inputs valid
    return layers


def _cnn_encoder(in_channels: int, widths: tuple[int, int, int], pools: tuple[bool, bool]) -> tuple[nn.Module, int]:
    encoder = nn.Sequential(
        *_conv_block(in_channels, widths[0], pool=pools[0]),
        *_conv_block(widths[0], widths[1], pool=pools[1]),
        *_conv_block(widths[1], widths[2]),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return encoder, widths[2]


def _mlp_encoder(in_channels: int, image_size: int, *, batch_norm: bool = False) -> tuple[nn.Module, int]:
    hidden = 256
    layers: list[nn.Module] = [nn.Flatten()]
    inputs = in_channels * image_size * image_size
    for _ in range(2):
        # A bias before batch norm is cancelled by its mean subtraction: leave it out.
        layers.append(nn.Linear(inputs, hidden, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU(inplace=True))
        inputs = hidden
    return nn.Sequential(*layers), hidden


def kaiming_uniform_init(model: nn.Module) -> None:
    """The paper's initialisation (see the module docstring), in place."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _choose(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {kind} {value!r}; choose from {', '.join(choices)}")


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    stem: str = "auto",
    init: str = "kaiming_uniform",
) -> Classifier:
    """Model ``name`` (one of :data:`MODELS`) for ``in_channels`` x ``image_size`` x
    ``image_size`` images and ``num_classes`` classes. ``stem`` applies to the ResNets
    only (the others accept and ignore it); see the module docstring."""
    _choose("model", name, MODELS)
    _choose("stem", stem, STEMS)
    _choose("initialisation", init, INITS)
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if value < 1:
            raise UserError(f"{label} must be positive, got {value}")

    if name.startswith("resnet"):
        if stem == "auto":
            stem = "cifar" if image_size <= CIFAR_STEM_MAX_SIZE else "imagenet"
        encoder, feature_dim = _resnet_encoder(name, in_channels, stem)
    elif name == "cnn":
        encoder, feature_dim = _cnn_encoder(in_channels, (32, 64, 128), pools=(False, True))
    elif name == "cnn-pool":
        encoder, feature_dim = _cnn_encoder(in_channels, (16, 32, 64), pools=(True, True))
    else:
        encoder, feature_dim = _mlp_encoder(in_channels, image_size, batch_norm=name == "mlp-bn")

    model = Classifier(encoder, feature_dim, num_classes)
    if init == "kaiming_uniform":
        kaiming_uniform_init(model)
    return model
