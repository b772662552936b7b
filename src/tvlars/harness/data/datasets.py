"""Image classification data sets as whole-split uint8 tensors.

Every loader returns an :class:`ImageData`: the train and test splits as uint8 tensors
``[N, C, H, W]`` on the CPU, int64 labels, the number of classes and the per-channel mean
and standard deviation of the training images in [0, 1] units (what ``Normalize`` needs).
Keeping whole splits as one uint8 tensor is what lets :class:`tvlars.harness.data.loader.DeviceLoader`
move a split to the accelerator once and do everything else there.

Data sets:

``digits``
    scikit-learn's bundled 8x8 handwritten digits (1,797 images, 1 channel, 10 classes),
    scaled from 0..16 to 0..255, split 75/25 stratified with a fixed seed
    (:data:`DIGITS_SPLIT_SEED`) that does not depend on the run's seed, so every run of a
    study evaluates on the same 450 test images.
``synthetic``
    class templates plus noise, of any size; see :func:`make_synthetic`.
``cifar10``
    the ``cifar-10-batches-py`` folder as distributed (Python 2 pickles), read by a
    restricted unpickler that admits only what the batches hold, so a file that would run
    code is refused (:func:`tvlars.harness.safeload.unpickle_arrays`).
``tinyimagenet``
    the ``tiny-imagenet-200`` folder as distributed; ``val`` is the test split (the ``test``
    folder has no labels). Decoding 110,000 JPEGs takes a while, so the decoded arrays
    are cached (``allow_pickle=False``, checked against the folder); see :func:`load_tinyimagenet`.
``fashion-mnist``, ``mnist``
    the four IDX files as distributed (gzipped or not). Fashion-MNIST is the one real
    benchmark of CIFAR-10's size that a package manager installs offline (Debian's
    ``dataset-fashion-mnist``), so it is the default folder when none is given.

Anything wrong with the user's files raises :class:`tvlars.errors.UserError` with one
line naming the problem and the path.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from tvlars.errors import UserError

DATASETS = ("digits", "synthetic", "cifar10", "tinyimagenet", "fashion-mnist", "mnist")

#: Seed of the digits train/test split; fixed so the split is the same for every run.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"

TINYIMAGENET_FOLDER = "tiny-imagenet-200"
TINYIMAGENET_FETCH = "fetch http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into --data-dir"
TINYIMAGENET_SIZE = 64
# Bump when the cache file layout changes, so old caches are not read.
TINYIMAGENET_CACHE_VERSION = 1

#: The IDX data sets: where a package manager puts them, the folder names other tools use,
#: and the class names.
IDX_DATASETS = {
    "fashion-mnist": {
        "title": "Fashion-MNIST",
        "system_dir": "/usr/share/datasets/fashion-mnist",
        "install": "apt-get install dataset-fashion-mnist",
        "folders": ("fashion-mnist", "FashionMNIST/raw"),
        "classes": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                    "Bag", "Ankle boot"),
    },
    "mnist": {
        "title": "MNIST",
        "system_dir": "/usr/share/datasets/mnist",
        "install": None,
        "folders": ("mnist", "MNIST/raw"),
        "classes": tuple(str(d) for d in range(10)),
    },
}
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: The options of the synthetic data set and their defaults.
SYNTHETIC_DEFAULTS = {
    "num_train": 2048,
    "num_test": 512,
    "num_classes": 10,
    "channels": 3,
    "image_size": 32,
    "seed": 0,
}


@dataclass
class ImageData:
    """Both splits of an image classification data set.

    images: uint8 tensors ``[N, C, H, W]`` on the CPU; labels: int64 ``[N]``;
    ``mean``/``std``: per-channel tuples in [0, 1] units, computed on the training split;
    ``class_names``: one name per class where the data set has them, else empty.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = field(default=())

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        """Height of the images (all data sets here are square)."""
        return self.train_images.shape[2]


def load_data(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    synthetic: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ImageData:
    """Load data set ``name`` (one of :data:`DATASETS`).

    ``data_dir`` is the folder of ``cifar10`` or ``tinyimagenet`` (the data set's own folder
    or its parent; default ``./data``); ``digits`` and ``synthetic`` ignore it.
    ``download=True`` fetches CIFAR-10 through torchvision (needs the internet).
    ``synthetic`` holds the options of :func:`make_synthetic`. ``cache_dir`` overrides where
    Tiny ImageNet's decoded cache goes.
    """
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        options = dict(synthetic or {})
        unknown = sorted(set(options) - set(SYNTHETIC_DEFAULTS))
        if unknown:
            raise UserError(
                f"unknown synthetic data option(s) {', '.join(unknown)}; "
                f"choose from {', '.join(SYNTHETIC_DEFAULTS)}"
            )
        return make_synthetic(**options)
    if name in IDX_DATASETS:
        if download:
            raise UserError(f"{IDX_DATASETS[name]['title']} cannot be downloaded by tvlars; {_idx_hint(name)}")
        return load_idx_dataset(name, data_dir)
    root = Path(data_dir) if data_dir is not None else Path("data")
    if name == "cifar10":
        return load_cifar10(root, download=download)
    if name == "tinyimagenet":
        if download:
            raise UserError(f"tinyimagenet cannot be downloaded by tvlars; {TINYIMAGENET_FETCH}")
        return load_tinyimagenet(root, cache_dir=cache_dir)
    raise UserError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")


def channel_mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] units.

    Computed exactly from each channel's 256-bin histogram, which is much faster than
    float arithmetic over every pixel (0.2 s for CIFAR-10's training set).
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).to(torch.float64)
        frequency = counts / counts.sum()
        mean = (frequency * values).sum()
        means.append(mean.item())
        stds.append((frequency * (values - mean).square()).sum().sqrt().item())
    return tuple(means), tuple(stds)


def _image_data(name, train_images, train_labels, test_images, test_labels, num_classes, class_names=()):
    mean, std = channel_mean_std(train_images)
    return ImageData(
        name=name,
        train_images=train_images.contiguous(),
        train_labels=train_labels.to(torch.int64),
        test_images=test_images.contiguous(),
        test_labels=test_labels.to(torch.int64),
        num_classes=num_classes,
        mean=mean,
        std=std,
        class_names=tuple(class_names),
    )


# --------------------------------------------------------------------------- digits


def load_digits() -> ImageData:
    """scikit-learn's 8x8 digits, split 75/25 stratified with :data:`DIGITS_SPLIT_SEED`."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    # Pixel values are 0..16; map 16 to 255 so the images look like any other uint8 image.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images,
        labels,
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    return _image_data(
        "digits",
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        num_classes=10,
        class_names=[str(d) for d in range(10)],
    )


# --------------------------------------------------------------------------- synthetic


def make_synthetic(
    num_train: int = SYNTHETIC_DEFAULTS["num_train"],
    num_test: int = SYNTHETIC_DEFAULTS["num_test"],
    num_classes: int = SYNTHETIC_DEFAULTS["num_classes"],
    channels: int = SYNTHETIC_DEFAULTS["channels"],
    image_size: int = SYNTHETIC_DEFAULTS["image_size"],
    seed: int = SYNTHETIC_DEFAULTS["seed"],
) -> ImageData:
    """Images drawn as a class template plus Gaussian pixel noise.

    Each class has a smooth random template (a 4x4 random pattern upsampled to
    ``image_size``); an image is its class's template plus independent uniform pixel noise
    with standard deviation 0.25 (in [0, 1] units), clipped to 0..255. Classes are balanced and the data
    depend only on the arguments. Linear models separate the classes well, so any model
    that learns at all gets far above chance; the point is a fast, download-free stand-in
    for real data, not a hard task. 50,000 3x32x32 images take about 2 s on 2 CPU cores.
    """
    for key, value, minimum in (
        ("num_train", num_train, 1),
        ("num_test", num_test, 1),
        ("num_classes", num_classes, 2),
        ("channels", channels, 1),
        ("image_size", image_size, 1),
        ("seed", seed, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise UserError(f"synthetic data option {key} must be an integer >= {minimum}, got {value!r}")

    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=generator)
    templates = torch.nn.functional.interpolate(
        coarse, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    # Templates span 0.15..0.85 so the noise is rarely clipped.
    templates = (0.15 + 0.7 * templates) * 255.0

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(count) % num_classes
        labels = labels[torch.randperm(count, generator=generator)]
        images = torch.empty(count, channels, image_size, image_size, dtype=torch.uint8)
        # Chunks bound the float32 working memory for large requests.
        for start in range(0, count, 8192):
            chunk_labels = labels[start : start + 8192]
            # Uniform noise is cheaper to draw than Gaussian; U(-a, a) has std a / sqrt(3).
            noise = torch.rand(len(chunk_labels), channels, image_size, image_size, generator=generator)
            pixels = noise.sub_(0.5).mul_(2 * math.sqrt(3) * 0.25 * 255.0)
            pixels += templates.index_select(0, chunk_labels)
            images[start : start + len(chunk_labels)] = pixels.round_().clamp_(0, 255).to(torch.uint8)
        return images, labels

    train_images, train_labels = draw(num_train)
    test_images, test_labels = draw(num_test)
    return _image_data(
        "synthetic", train_images, train_labels, test_images, test_labels, num_classes=num_classes
    )


# --------------------------------------------------------------------------- CIFAR-10


def _find_dataset_folder(root: Path, folder_name: str, marker: str, dataset: str, fix: str) -> Path:
    """``root`` itself if it is the data set's folder, else ``root / folder_name``; when
    neither, a UserError that ends with ``fix``, what the user can do about it."""
    if root.name == folder_name or (root / marker).exists():
        if not root.is_dir():
            raise UserError(f"{dataset} data folder not found: {root}; {fix}")
        return root
    candidate = root / folder_name
    if candidate.is_dir():
        return candidate
    if not root.exists():
        raise UserError(f"{dataset} data folder not found: {root}; {fix}")
    raise UserError(f"{dataset} data not found: {root} holds neither {marker} nor a {folder_name} folder; {fix}")


def _read_pickle(path: Path) -> dict:
    """A CIFAR-10 file's dict, read by :func:`tvlars.harness.safeload.unpickle_arrays`: only
    what the format holds (dicts, lists, strings, numbers, numpy arrays) is admitted, so a
    file that asks for anything else is refused before any of it runs."""
    from tvlars.harness.safeload import unpickle_arrays

    if not path.is_file():
        raise UserError(f"CIFAR-10 file missing: {path}")
    content = unpickle_arrays(path, what="CIFAR-10 file", encoding="bytes")
    if not isinstance(content, dict):
        raise UserError(f"CIFAR-10 file does not hold a dict: {path}")
    # The distributed files were pickled by Python 2 and load with bytes keys; files
    # written by Python 3 have str keys. Accept both.
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    content = _read_pickle(path)
    if "data" not in content or "labels" not in content:
        raise UserError(f"CIFAR-10 file lacks 'data' or 'labels': {path}")
    data, labels = content["data"], content["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise UserError(f"CIFAR-10 'data' must be uint8 [N, 3072], got {shape}: {path}")
    if data.shape[0] == 0:
        raise UserError(f"CIFAR-10 file holds no images: {path}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"CIFAR-10 'labels' are not integers: {path}") from None
    if labels.shape != (data.shape[0],):
        raise UserError(f"CIFAR-10 has {data.shape[0]} images but {labels.size} labels: {path}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"CIFAR-10 labels must be 0..9: {path}")
    return data.reshape(-1, 3, 32, 32), labels


def _download_cifar10(root: Path) -> None:
    """torchvision's verified download (md5 of the archive, then of every batch), without
    its CIFAR10 class: that would also unpickle the batches with ``pickle.load``."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    folder = root / CIFAR10.base_folder
    if all(check_integrity(str(folder / name), md5) for name, md5 in CIFAR10.train_list + CIFAR10.test_list):
        return
    try:
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as err:  # network failures come in many types
        from tvlars.harness.safeload import first_line

        raise UserError(f"could not download CIFAR-10 into {root}: {first_line(err)}") from None


def load_cifar10(root: Path, *, download: bool = False) -> ImageData:
    """The ``cifar-10-batches-py`` folder at ``root`` or inside it.

    With ``download=True`` torchvision fetches and verifies the archive into ``root``
    first (skipped when it is already there).
    """
    if download:
        _download_cifar10(Path(root))
    folder = _find_dataset_folder(root, CIFAR10_FOLDER, CIFAR10_TEST_FILE, "CIFAR-10",
                                  f"give --data-dir the folder holding {CIFAR10_FOLDER}, or add --download to fetch it")
    train = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    test_images, test_labels = _read_cifar_batch(folder / CIFAR10_TEST_FILE)
    meta = _read_pickle(folder / CIFAR10_META_FILE)
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise UserError(f"CIFAR-10 meta file lacks 10 'label_names': {folder / CIFAR10_META_FILE}")
    class_names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    return _image_data(
        "cifar10",
        torch.from_numpy(np.concatenate([images for images, _ in train])),
        torch.from_numpy(np.concatenate([labels for _, labels in train])),
        torch.from_numpy(test_images),
        torch.from_numpy(test_labels),
        num_classes=10,
        class_names=class_names,
    )


# --------------------------------------------------------------------------- Fashion-MNIST, MNIST

_IDX_UBYTE = 0x08
_IDX_MAX_BYTES = 1 << 32  # 4 GiB: far above any IDX data set


def _idx_hint(name: str) -> str:
    spec = IDX_DATASETS[name]
    where = f"put the four IDX files ({', '.join(IDX_FILES.values())}, .gz or not) in --data-dir"
    return f"{spec['install']}, or {where}" if spec["install"] else where


def _idx_folder(name: str, data_dir: str | os.PathLike | None) -> Path:
    """The folder holding the IDX files: ``data_dir`` itself or one of the usual subfolders;
    without ``data_dir``, ``./data/<name>`` and then where the system package puts it."""
    spec = IDX_DATASETS[name]
    marker = IDX_FILES["test_labels"]

    def holds(folder: Path) -> bool:
        return (folder / marker).is_file() or (folder / f"{marker}.gz").is_file()

    roots = [Path(data_dir)] if data_dir is not None else [Path("data"), Path(spec["system_dir"])]
    for root in roots:
        for folder in (root, *(root / sub for sub in spec["folders"])):
            if holds(folder):
                return folder
    if data_dir is not None:
        if not Path(data_dir).exists():
            raise UserError(f"{spec['title']} data folder not found: {data_dir}")
        raise UserError(f"{spec['title']} IDX files not found in {data_dir}; {_idx_hint(name)}")
    raise UserError(f"{spec['title']} not found in ./data or {spec['system_dir']}; {_idx_hint(name)}")


def _read_idx(folder: Path, stem: str, ndim: int) -> np.ndarray:
    """One IDX file of unsigned bytes with ``ndim`` dimensions (3 for images, 1 for labels)."""
    path = folder / stem
    if not path.is_file():
        path = folder / f"{stem}.gz"
    if not path.is_file():
        raise UserError(f"IDX file missing: {folder / stem} (or .gz)")
    header = 4 + 4 * ndim
    try:
        # Read only what the header promises (plus one byte to detect a longer file), so a
        # gzip bomb or a wrong header cannot fill the memory.
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as file:
            head = file.read(header)
            if len(head) < header or head[0] != 0 or head[1] != 0:
                raise UserError(f"not an IDX file (bad magic number): {path}")
            if head[2] != _IDX_UBYTE or head[3] != ndim:
                raise UserError(f"IDX file must hold unsigned bytes in {ndim} dimension(s), "
                                f"got type 0x{head[2]:02x} in {head[3]}: {path}")
            dims = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
            count = math.prod(dims)
            if count > _IDX_MAX_BYTES:
                raise UserError(f"IDX header claims {count} bytes of data, more than tvlars reads: {path}")
            body = file.read(count + 1)
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise UserError(f"IDX file is not readable: {path} ({type(err).__name__})") from None
    if len(body) != count:
        state = "truncated" if len(body) < count else "longer than its header says"
        shown = f"{len(body)} bytes of data" if len(body) < count else "more data"
        raise UserError(f"IDX file is {state} ({shown}, header says {count}): {path}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _read_idx_split(folder: Path, images_stem: str, labels_stem: str, num_classes: int):
    images = _read_idx(folder, images_stem, 3)
    labels = _read_idx(folder, labels_stem, 1)
    if images.shape[0] == 0:
        raise UserError(f"IDX file holds no images: {folder / images_stem}")
    if labels.shape[0] != images.shape[0]:
        raise UserError(f"{images.shape[0]} images but {labels.shape[0]} labels: {folder / labels_stem}")
    if labels.max() >= num_classes:
        raise UserError(f"labels must be 0..{num_classes - 1}, found {labels.max()}: {folder / labels_stem}")
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))


def load_idx_dataset(name: str, data_dir: str | os.PathLike | None = None) -> ImageData:
    """Fashion-MNIST or MNIST from its four IDX files; see :func:`_idx_folder` for where."""
    spec = IDX_DATASETS[name]
    folder = _idx_folder(name, data_dir)
    classes = len(spec["classes"])
    train_images, train_labels = _read_idx_split(folder, IDX_FILES["train_images"], IDX_FILES["train_labels"], classes)
    test_images, test_labels = _read_idx_split(folder, IDX_FILES["test_images"], IDX_FILES["test_labels"], classes)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise UserError(f"{spec['title']} train and test images differ in size "
                        f"({tuple(train_images.shape[2:])} vs {tuple(test_images.shape[2:])}): {folder}")
    return _image_data(name, train_images, train_labels, test_images, test_labels,
                       num_classes=classes, class_names=spec["classes"])


# --------------------------------------------------------------------------- Tiny ImageNet


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise UserError(f"Tiny ImageNet {what} missing: {path}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read Tiny ImageNet {what} {path}: {type(err).__name__}") from None


def _tinyimagenet_listing(folder: Path) -> tuple[list[str], list[Path], list[int], list[Path], list[int]]:
    """Class ids, then train and val image paths with their labels, validated."""
    wnids_file = folder / "wnids.txt"
    wnids = [line.strip() for line in _read_lines(wnids_file, "class list") if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise UserError(f"Tiny ImageNet class list is empty or has duplicates: {wnids_file}")
    label_of = {wnid: index for index, wnid in enumerate(wnids)}

    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid, label in label_of.items():
        images_dir = folder / "train" / wnid / "images"
        if not images_dir.is_dir():
            raise UserError(f"Tiny ImageNet training folder missing: {images_dir}")
        paths = sorted(images_dir.glob("*.JPEG"))
        if not paths:
            raise UserError(f"Tiny ImageNet training folder has no .JPEG images: {images_dir}")
        train_paths += paths
        train_labels += [label] * len(paths)

    annotations = folder / "val" / "val_annotations.txt"
    val_paths: list[Path] = []
    val_labels: list[int] = []
    for line_number, line in enumerate(_read_lines(annotations, "validation annotations"), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise UserError(
                f"Tiny ImageNet annotation line {line_number} is not 'filename<TAB>wnid...' "
                f"with a wnid from wnids.txt: {annotations}"
            )
        path = folder / "val" / "images" / fields[0]
        if not path.is_file():
            raise UserError(f"Tiny ImageNet validation image missing: {path}")
        val_paths.append(path)
        val_labels.append(label_of[fields[1]])
    if not val_paths:
        raise UserError(f"Tiny ImageNet validation annotations are empty: {annotations}")
    return wnids, train_paths, train_labels, val_paths, val_labels


def _decode_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            # Some Tiny ImageNet images are grayscale; every image becomes 3 channels.
            pixels = np.asarray(image.convert("RGB"))
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... on bad files
        raise UserError(f"cannot decode image {path}: {type(err).__name__}") from None
    if pixels.shape != (TINYIMAGENET_SIZE, TINYIMAGENET_SIZE, 3):
        raise UserError(
            f"Tiny ImageNet image is {pixels.shape[1]}x{pixels.shape[0]}, "
            f"expected {TINYIMAGENET_SIZE}x{TINYIMAGENET_SIZE}: {path}"
        )
    return pixels


def _decode_all(paths: list[Path]) -> np.ndarray:
    """Decode JPEGs on a thread pool (PIL releases the GIL while decoding) into [N, 3, H, W]."""
    images = np.empty((len(paths), TINYIMAGENET_SIZE, TINYIMAGENET_SIZE, 3), dtype=np.uint8)

    def decode_into(index: int) -> None:
        images[index] = _decode_rgb(paths[index])

    pool = ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1))
    try:
        # list() re-raises the first worker's UserError here.
        list(pool.map(decode_into, range(len(paths))))
    finally:
        # On an error, do not decode the rest of 100k images first.
        pool.shutdown(cancel_futures=True)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def _fingerprint(folder: Path, files: list[Path]) -> str:
    """Changes when any listed file is added, removed, resized or touched."""
    digest = hashlib.sha256(f"v{TINYIMAGENET_CACHE_VERSION}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def default_cache_dir(dataset_folder: Path) -> Path:
    """``.tvlars-cache`` beside the data set's folder if writable, else ~/.cache/tvlars.

    The cache goes beside, not inside, the data set's folder so the folder itself is
    never modified (which would also change its fingerprint).
    """
    beside = dataset_folder.resolve().parent / ".tvlars-cache"
    try:
        beside.mkdir(exist_ok=True)
    except OSError:
        pass
    if beside.is_dir() and os.access(beside, os.W_OK):
        return beside
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "tvlars"


def _write_cache_atomically(path: Path, **arrays: np.ndarray) -> None:
    from tvlars.runfolder import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: np.savez(file, **arrays))


def _read_cache(path: Path, train_labels: list[int], test_labels: list[int]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None (the cache is then rebuilt, not reported) unless the file
    holds exactly what :func:`load_tinyimagenet` writes for this folder: no pickles
    (``allow_pickle=False``), uint8 images [N, 3, 64, 64], the listing's int64 labels."""
    size = TINYIMAGENET_SIZE
    labels = {"train_y": np.asarray(train_labels, dtype=np.int64), "test_y": np.asarray(test_labels, dtype=np.int64)}
    images = {"train_x": (len(train_labels), 3, size, size), "test_x": (len(test_labels), 3, size, size)}
    try:
        with np.load(path, allow_pickle=False) as cached:
            if not isinstance(cached, np.lib.npyio.NpzFile) or set(cached.files) != {*labels, *images}:
                return None
            arrays = {key: cached[key] for key in (*images, *labels)}
    except Exception:  # truncated zip, a pickle refused by allow_pickle=False, a bad header ...
        return None
    if any(arrays[key].dtype != np.uint8 or arrays[key].shape != shape for key, shape in images.items()):
        return None
    if any(arrays[key].dtype != np.int64 or not np.array_equal(arrays[key], value) for key, value in labels.items()):
        return None
    return arrays


def load_tinyimagenet(root: Path, *, cache_dir: str | os.PathLike | None = None) -> ImageData:
    """The ``tiny-imagenet-200`` folder at ``root`` or inside it; ``val`` is the test split.

    Labels are positions in ``wnids.txt``. The folder is only read. Decoded arrays are
    cached in ``cache_dir`` (default :func:`default_cache_dir`) as
    ``tinyimagenet-<folder hash>-<content hash>.npz``, written atomically; the content hash
    covers every file's path, size and mtime, so any change to the folder decodes afresh
    (and replaces the stale cache of that folder).
    """
    folder = _find_dataset_folder(root, TINYIMAGENET_FOLDER, "wnids.txt", "Tiny ImageNet", TINYIMAGENET_FETCH)
    wnids, train_paths, train_labels, val_paths, val_labels = _tinyimagenet_listing(folder)
    listed = [folder / "wnids.txt", folder / "val" / "val_annotations.txt", *train_paths, *val_paths]
    folder_key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir(folder)
    cache_file = cache_root / f"tinyimagenet-{folder_key}-{_fingerprint(folder, listed)}.npz"

    arrays = _read_cache(cache_file, train_labels, val_labels) if cache_file.is_file() else None
    if arrays is None:
        arrays = {
            "train_x": _decode_all(train_paths),
            "train_y": np.asarray(train_labels, dtype=np.int64),
            "test_x": _decode_all(val_paths),
            "test_y": np.asarray(val_labels, dtype=np.int64),
        }
        try:
            _write_cache_atomically(cache_file, **arrays)
            for stale in cache_root.glob(f"tinyimagenet-{folder_key}-*.npz"):
                if stale != cache_file:
                    stale.unlink(missing_ok=True)
        except OSError:
            pass  # an unwritable cache only costs the next run the decoding time
    return _image_data(
        "tinyimagenet",
        torch.from_numpy(arrays["train_x"]),
        torch.from_numpy(arrays["train_y"]),
        torch.from_numpy(arrays["test_x"]),
        torch.from_numpy(arrays["test_y"]),
        num_classes=len(wnids),
        class_names=wnids,
    )
