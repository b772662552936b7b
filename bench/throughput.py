"""Training throughput: tvlars's DeviceLoader + batched crop/flip versus a plain
torchvision DataLoader pipeline (per-image RandomCrop(32, padding=4) +
RandomHorizontalFlip + ToTensor + Normalize), on synthetic CIFAR-shaped data.

Every pipeline trains the same model (each its own copy, from the same initial weights)
with the same torch SGD optimizer, in one process. Pipelines are timed in interleaved
rounds (A, B, C, then B, C, A, ...) so a change in machine load hits all of them alike;
the median round is reported with the range over rounds (on a shared machine the range
says how far to trust a difference). Each timing starts with a few untimed steps, which
also drain batches that DataLoader workers prefetched while other pipelines were timed.

Two numbers per pipeline: "data" is images delivered to the device per second with no
model (the data path alone), "train" is complete training steps (data, forward,
backward, SGD step).

    python bench/throughput.py --device cuda --model resnet18 --batch-size 512 --steps 50
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from tvlars.harness.data.augment import RandomCropFlip
from tvlars.harness.data.datasets import make_synthetic
from tvlars.harness.data.loader import DeviceLoader
from tvlars.harness.models import MODELS, build_model

UNTIMED_STEPS_PER_ROUND = 5


class PerImageDataset(Dataset):
    """The usual torchvision recipe: one PIL image at a time through the transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images = images.permute(0, 2, 3, 1).numpy()  # HWC, as PIL wants
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def endless(make_epoch: Callable[[int], Iterator]) -> Iterator:
    """Batches from epoch after epoch, so a timed window never ends early."""
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def device_pipeline(data, batch_size: int, device: torch.device) -> Iterator:
    loader = DeviceLoader(
        data.train_images, data.train_labels, batch_size=batch_size, mean=data.mean, std=data.std,
        device=device, shuffle=True, drop_last=True, augment=RandomCropFlip(4),
    )

    def epoch_batches(epoch: int):
        loader.set_epoch(epoch)
        return iter(loader)

    return endless(epoch_batches)


def torchvision_pipeline(data, batch_size: int, device: torch.device, num_workers: int) -> Iterator:
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(data.mean, data.std),
    ])
    loader = DataLoader(
        PerImageDataset(data.train_images, data.train_labels, transform),
        batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=device.type == "cuda",
    )
    non_blocking = device.type == "cuda"
    return endless(lambda epoch: (
        (x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)) for x, y in loader
    ))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(batches: Iterator, steps: int, device: torch.device, train_step=None) -> float:
    """Images per second over ``steps`` batches, after a few untimed ones."""
    for _ in range(UNTIMED_STEPS_PER_ROUND):
        x, y = next(batches)
        if train_step:
            train_step(x, y)
    synchronize(device)
    start = time.perf_counter()
    images = 0
    for _ in range(steps):
        x, y = next(batches)
        if train_step:
            train_step(x, y)
        images += len(x)
    synchronize(device)
    return images / (time.perf_counter() - start)


def make_train_step(model: nn.Module, lr: float = 0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def train_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="cnn", choices=MODELS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per pipeline per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy shared machine",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    data = make_synthetic(num_train=args.num_images, num_test=1, num_classes=10, channels=3, image_size=32)
    initial_model = build_model(args.model, 10, 3, 32).to(device)
    pipelines = {
        "DeviceLoader + batched crop/flip": lambda: device_pipeline(data, args.batch_size, device),
        "torchvision DataLoader, workers=0": lambda: torchvision_pipeline(data, args.batch_size, device, 0),
        "torchvision DataLoader, workers=2": lambda: torchvision_pipeline(data, args.batch_size, device, 2),
    }
    data_rate = {name: [] for name in pipelines}
    train_rate = {name: [] for name in pipelines}
    batch_streams = {name: make() for name, make in pipelines.items()}
    train_steps = {name: make_train_step(copy.deepcopy(initial_model).train()) for name in pipelines}
    names = list(pipelines)
    for round_index in range(args.rounds):
        # Rotate which pipeline goes first, so no pipeline always follows the same one.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            batches = batch_streams[name]
            data_rate[name].append(timed_steps(batches, args.steps, device))
            train_rate[name].append(timed_steps(batches, args.steps, device, train_steps[name]))

    baseline = statistics.median(train_rate["torchvision DataLoader, workers=0"])
    print(
        f"device={device} model={args.model} batch={args.batch_size} steps={args.steps} "
        f"rounds={args.rounds} images={args.num_images} torch threads={torch.get_num_threads()}"
    )
    print(f"| {'pipeline':<36} | data img/s (min-max)  | train img/s (min-max) | train vs workers=0 |")
    print(f"|{'-' * 38}|----------------------:|----------------------:|-------------------:|")
    for name in pipelines:
        data_text = f"{statistics.median(data_rate[name]):.0f} ({min(data_rate[name]):.0f}-{max(data_rate[name]):.0f})"
        train_median = statistics.median(train_rate[name])
        train_text = f"{train_median:.0f} ({min(train_rate[name]):.0f}-{max(train_rate[name]):.0f})"
        print(f"| {name:<36} | {data_text:>21} | {train_text:>21} | {train_median / baseline:>17.2f}x |")

if __name__ == "__main__":
    main()
