"""tvlars.harness.data: the four data sets, read from folders written here in the real
on-disk formats, and the one-line UserError for every kind of bad input."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tvlars.errors import UserError
from tvlars.harness.data import datasets as data
from tvlars.harness.data.datasets import ImageData, channel_mean_std, load_data

from helpers import python2_pickle_dump


def expect_user_error(match_path, call, *args, **kwargs) -> str:
    """Run ``call``; it must raise a one-line UserError naming ``match_path``."""
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    if match_path is not None:
        assert str(match_path) in message, message
    return message


# --------------------------------------------------------------------------- helpers


def _check_image_data(loaded: ImageData, channels: int, size: int) -> None:
    for images, labels in ((loaded.train_images, loaded.train_labels), (loaded.test_images, loaded.test_labels)):
        assert images.dtype == torch.uint8 and images.device.type == "cpu"
        assert images.shape[1:] == (channels, size, size)
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        assert 0 <= labels.min() and labels.max() < loaded.num_classes
    assert len(loaded.mean) == len(loaded.std) == channels
    assert all(0 <= m <= 1 for m in loaded.mean) and all(0 < s <= 1 for s in loaded.std)
    assert loaded.in_channels == channels and loaded.image_size == size


def write_cifar10(parent: Path, per_batch: int = 6, seed: int = 0, style: str = "python3"
                  ) -> tuple[Path, np.ndarray, np.ndarray]:
    """A ``cifar-10-batches-py`` folder as distributed: pickled dicts with bytes keys.

    ``style``: "python2" writes what the distributed files hold (Python 2, protocol 2,
    8-bit strings); "protocol2" is Python 3 at protocol 2 (bytes via ``_codecs.encode``);
    "python3" the default protocol (arrays via numpy's ``_frombuffer``).
    """
    def dump(obj, file):
        if style == "python2":
            python2_pickle_dump(obj, file)
        else:
            pickle.dump(obj, file, protocol=2 if style == "protocol2" else pickle.DEFAULT_PROTOCOL)

    rng = np.random.default_rng(seed)
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_data, all_labels = [], []
    for name in [*data.CIFAR10_TRAIN_FILES, data.CIFAR10_TEST_FILE]:
        pixels = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with (folder / name).open("wb") as file:
            dump({b"batch_label": name.encode(), b"data": pixels, b"labels": labels,
                  b"filenames": [f"image_{i}.png".encode() for i in range(per_batch)]}, file)
        all_data.append(pixels)
        all_labels.append(labels)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    with (folder / data.CIFAR10_META_FILE).open("wb") as file:
        dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, file)
    return folder, np.concatenate(all_data), np.concatenate(all_labels)


WNIDS = ("n01443537", "n01629819", "n01641577")


def write_tinyimagenet(parent: Path, per_class: int = 4, val_count: int = 5) -> Path:
    """A ``tiny-imagenet-200`` folder as distributed (3 classes, one grayscale image)."""
    rng = np.random.default_rng(1)
    folder = parent / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "test" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in WNIDS))
    (folder / "words.txt").write_text("".join(f"{w}\tsome thing\n" for w in WNIDS))
    for wnid in WNIDS:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        boxes = []
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{wnid}_{i}.JPEG")
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    # Some real Tiny ImageNet images are grayscale.
    gray = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(folder / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_0.JPEG")
    lines = []
    for i in range(val_count):
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{WNIDS[i % 3]}\t1\t2\t40\t50\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    Image.fromarray(gray, mode="L").save(folder / "test" / "images" / "test_0.JPEG")
    return folder


def _tree_state(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_pixel_scale():
    digits = load_data("digits")
    _check_image_data(digits, channels=1, size=8)
    assert digits.num_classes == 10
    assert len(digits.train_labels) == 1347 and len(digits.test_labels) == 450
    assert digits.train_images.max() == 255  # 16 maps to 255


def test_digits_split_is_fixed_and_stratified():
    torch.manual_seed(123)
    np.random.seed(123)
    first = load_data("digits")
    torch.manual_seed(7)
    np.random.seed(7)
    second = load_data("digits")
    assert torch.equal(first.test_images, second.test_images)
    assert torch.equal(first.train_labels, second.train_labels)
    test_counts = torch.bincount(first.test_labels, minlength=10)
    class_counts = test_counts + torch.bincount(first.train_labels, minlength=10)
    assert ((test_counts - 0.25 * class_counts).abs() <= 1).all()  # 25% of each class


# --------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_determinism_and_options():
    options = {"num_train": 60, "num_test": 20, "num_classes": 4, "channels": 2, "image_size": 12, "seed": 3}
    first = load_data("synthetic", synthetic=options)
    _check_image_data(first, channels=2, size=12)
    assert len(first.train_labels) == 60 and len(first.test_labels) == 20 and first.num_classes == 4
    assert torch.bincount(first.train_labels).tolist() == [15] * 4  # balanced
    again = load_data("synthetic", synthetic=options)
    assert torch.equal(first.train_images, again.train_images)
    other = load_data("synthetic", synthetic={**options, "seed": 4})
    assert not torch.equal(first.train_images, other.train_images)


def test_synthetic_is_learnable():
    synthetic = data.make_synthetic(num_train=500, num_test=200, num_classes=10, image_size=16)
    train_x = synthetic.train_images.flatten(1).float()
    class_means = torch.stack([train_x[synthetic.train_labels == c].mean(0) for c in range(10)])
    distances = torch.cdist(synthetic.test_images.flatten(1).float(), class_means)
    accuracy = (distances.argmin(1) == synthetic.test_labels).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


@pytest.mark.parametrize("options", [{"colour": 3}, {"num_train": 0}, {"image_size": 2.5}])
def test_synthetic_bad_options(options):
    message = expect_user_error(None, load_data, "synthetic", synthetic=options)
    assert "synthetic" in message


# --------------------------------------------------------------------------- mean / std


def test_channel_mean_std_matches_float_computation():
    images = torch.randint(0, 256, (30, 3, 5, 5), dtype=torch.uint8)
    mean, std = channel_mean_std(images)
    scaled = images.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), scaled.mean((0, 2, 3)))
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), scaled.std((0, 2, 3), unbiased=False))


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("point_at", ["folder", "parent", "parent-as-str"])
def test_cifar10_reads_the_distributed_format(tmp_path, point_at):
    folder, pixels, labels = write_cifar10(tmp_path)
    data_dir = {"folder": folder, "parent": tmp_path, "parent-as-str": str(tmp_path)}[point_at]
    cifar = load_data("cifar10", data_dir)
    _check_image_data(cifar, channels=3, size=32)
    assert cifar.num_classes == 10 and cifar.class_names[0] == "airplane"
    train_count = 5 * 6
    assert torch.equal(cifar.train_images, torch.from_numpy(pixels[:train_count].reshape(-1, 3, 32, 32)))
    assert cifar.train_labels.tolist() == labels[:train_count].tolist()
    assert torch.equal(cifar.test_images, torch.from_numpy(pixels[train_count:].reshape(-1, 3, 32, 32)))
    # Channel planes are R, G, B of 1024 row-major pixels each.
    assert cifar.train_images[0, 1, 0, 1].item() == pixels[0, 1024 + 1]


@pytest.mark.parametrize("style", ["python2", "protocol2", "python3"])
def test_cifar10_reads_every_pickle_style(tmp_path, style):
    """The distributed files are Python 2 pickles; re-pickled copies from Python 3 load too."""
    folder, pixels, labels = write_cifar10(tmp_path, style=style)
    if style == "python2":
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in (folder / "data_batch_1").read_bytes()
    cifar = load_data("cifar10", folder)
    assert cifar.class_names[9] == "truck"
    assert torch.equal(cifar.train_images, torch.from_numpy(pixels[:30].reshape(-1, 3, 32, 32)))
    assert cifar.train_labels.tolist() == labels[:30].tolist()
    assert cifar.test_labels.tolist() == labels[30:].tolist()


def test_cifar10_missing_folder(tmp_path):
    expect_user_error(tmp_path / "nowhere", load_data, "cifar10", tmp_path / "nowhere")
    expect_user_error(tmp_path, load_data, "cifar10", tmp_path)  # exists but holds no CIFAR-10


@pytest.mark.parametrize("dataset, fix", [("cifar10", "--download"), ("tinyimagenet", "tiny-imagenet-200.zip")])
def test_a_missing_data_folder_says_how_to_get_one(tmp_path, monkeypatch, capsys, dataset, fix):
    from tvlars import cli

    monkeypatch.chdir(tmp_path)  # a fresh clone: no ./data
    (tmp_path / "empty").mkdir()
    for where in ([], ["--data-dir", "nowhere"], ["--data-dir", "empty"]):
        assert cli.main(["train", "--dataset", dataset, "--out", "run", *where]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--data-dir" in err[0] and fix in err[0], err


def test_cifar10_missing_file(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    expect_user_error(folder / "data_batch_3", load_data, "cifar10", tmp_path)


def test_cifar10_malformed_pickle(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(b"this is not a pickle")
    expect_user_error(folder / "data_batch_2", load_data, "cifar10", folder)


@pytest.mark.parametrize(
    "content",
    [
        {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4},  # wrong shape
        {b"data": np.zeros((0, 3072), np.uint8), b"labels": []},  # no images
        {b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4},  # wrong dtype
        {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3},  # label count
        {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]},  # label range
        {b"images": np.zeros((4, 3072), np.uint8)},  # missing keys
        [1, 2, 3],  # not a dict
    ],
)
def test_cifar10_malformed_batches(tmp_path, content):
    folder, _, _ = write_cifar10(tmp_path)
    with (folder / "test_batch").open("wb") as file:
        pickle.dump(content, file)
    expect_user_error(folder / "test_batch", load_data, "cifar10", tmp_path)


def test_cifar10_malformed_meta(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    with (folder / "batches.meta").open("wb") as file:
        pickle.dump({b"label_names": [b"cat"]}, file)
    expect_user_error(folder / "batches.meta", load_data, "cifar10", tmp_path)


# --------------------------------------------------------------------------- Tiny ImageNet


def test_tinyimagenet_reads_the_distributed_format(tmp_path):
    folder = write_tinyimagenet(tmp_path / "data")
    before = _tree_state(folder)
    tiny = load_data("tinyimagenet", tmp_path / "data")
    _check_image_data(tiny, channels=3, size=64)
    assert tiny.num_classes == 3 and tiny.class_names == WNIDS
    assert len(tiny.train_labels) == 12 and len(tiny.test_labels) == 5
    # Train images in wnids.txt order, then file name order; labels are wnids.txt positions.
    assert tiny.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert tiny.test_labels.tolist() == [0, 1, 2, 0, 1]
    expected = np.array(Image.open(folder / "val" / "images" / "val_3.JPEG").convert("RGB"))
    assert torch.equal(tiny.test_images[3], torch.from_numpy(expected).permute(2, 0, 1))
    gray = tiny.train_images[4]  # the grayscale image, expanded to three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert _tree_state(folder) == before  # the data set's folder is only read
    assert len(list((tmp_path / "data" / ".tvlars-cache").glob("tinyimagenet-*.npz"))) == 1


def test_tinyimagenet_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    folder = write_tinyimagenet(tmp_path)
    first = load_data("tinyimagenet", folder, cache_dir=tmp_path / "cache")

    decoded = []
    real_decode_all = data._decode_all
    monkeypatch.setattr(data, "_decode_all", lambda paths: decoded.append(len(paths)) or real_decode_all(paths))
    cached = load_data("tinyimagenet", folder, cache_dir=tmp_path / "cache")
    assert decoded == []  # served from the cache
    assert torch.equal(cached.train_images, first.train_images)
    assert torch.equal(cached.test_labels, first.test_labels)

    new_image = folder / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_9.JPEG"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(new_image)
    changed = load_data("tinyimagenet", folder, cache_dir=tmp_path / "cache")
    assert decoded == [13, 5]  # decoded afresh
    assert len(changed.train_labels) == 13
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the stale cache was replaced

    os.utime(new_image, ns=(1, 1))  # a touched file invalidates too
    load_data("tinyimagenet", folder, cache_dir=tmp_path / "cache")
    assert decoded == [13, 5, 13, 5]


def test_tinyimagenet_damaged_cache_is_rebuilt(tmp_path):
    folder = write_tinyimagenet(tmp_path)
    load_data("tinyimagenet", folder, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").iterdir()
    cache_file.write_bytes(b"garbage")
    tiny = load_data("tinyimagenet", folder, cache_dir=tmp_path / "cache")
    assert len(tiny.train_labels) == 12


def test_default_cache_dir_falls_back_when_unwritable(tmp_path, monkeypatch):
    folder = write_tinyimagenet(tmp_path)
    assert data.default_cache_dir(folder) == tmp_path.resolve() / ".tvlars-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert data.default_cache_dir(folder) == tmp_path / "home-cache" / "tvlars"


def _break_missing_wnids(folder):
    (folder / "wnids.txt").unlink()
    return folder / "wnids.txt"


def _break_binary_wnids(folder):
    (folder / "wnids.txt").write_bytes(b"\xff\xfe\x00binary")
    return folder / "wnids.txt"


def _break_missing_class_folder(folder):
    target = folder / "train" / WNIDS[1] / "images"
    for path in target.iterdir():
        path.unlink()
    target.rmdir()
    return target


def _break_empty_class_folder(folder):
    target = folder / "train" / WNIDS[0] / "images"
    for path in target.iterdir():
        path.unlink()
    return target


def _break_missing_annotations(folder):
    (folder / "val" / "val_annotations.txt").unlink()
    return folder / "val" / "val_annotations.txt"


def _break_malformed_annotation(folder):
    target = folder / "val" / "val_annotations.txt"
    target.write_text(target.read_text() + "val_9.JPEG n01443537 0 0 1 1\n")  # spaces, not tabs
    return target


def _break_unknown_annotation_class(folder):
    target = folder / "val" / "val_annotations.txt"
    target.write_text(target.read_text() + "val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    return target


def _break_missing_val_image(folder):
    (folder / "val" / "images" / "val_2.JPEG").unlink()
    return folder / "val" / "images" / "val_2.JPEG"


def _break_corrupt_image(folder):
    target = folder / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_1.JPEG"
    target.write_bytes(b"\xff\xd8 not really a jpeg")
    return target


def _break_wrong_image_size(folder):
    target = folder / "val" / "images" / "val_1.JPEG"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target, format="JPEG")
    return target


@pytest.mark.parametrize(
    "breakage",
    [
        _break_missing_wnids,
        _break_binary_wnids,
        _break_missing_class_folder,
        _break_empty_class_folder,
        _break_missing_annotations,
        _break_malformed_annotation,
        _break_unknown_annotation_class,
        _break_missing_val_image,
        _break_corrupt_image,
        _break_wrong_image_size,
    ],
)
def test_tinyimagenet_failures_name_the_path(tmp_path, breakage):
    folder = write_tinyimagenet(tmp_path)
    broken_path = breakage(folder)
    expect_user_error(broken_path, load_data, "tinyimagenet", folder, cache_dir=tmp_path / "cache")


def test_tinyimagenet_missing_folder(tmp_path):
    expect_user_error(tmp_path / "tiny-imagenet-200", load_data, "tinyimagenet", tmp_path / "tiny-imagenet-200")


# --------------------------------------------------------------------------- dispatch


def test_unknown_dataset_lists_the_choices():
    message = expect_user_error(None, load_data, "imagenet")
    assert "imagenet" in message and all(name in message for name in data.DATASETS)
