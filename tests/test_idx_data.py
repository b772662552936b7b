"""Fashion-MNIST and MNIST: the four IDX files, written here in the real format (gzipped or
not), and a one-line UserError naming the file for every kind of damage."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tvlars.errors import UserError
from tvlars.harness.data import datasets as data
from tvlars.harness.data.datasets import IDX_FILES, load_data


def idx_bytes(array: np.ndarray, *, type_code: int = 0x08) -> bytes:
    """An IDX file as LeCun's format defines it: 0, 0, type, ndim, big-endian int32 dims."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, *, n_train: int = 12, n_test: int = 5, size: int = 28, gz: bool = True,
                  seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, size, size), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, size, size), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            with gzip.open(folder / f"{IDX_FILES[key]}.gz", "wb") as file:
                file.write(raw)
        else:
            (folder / IDX_FILES[key]).write_bytes(raw)
    return arrays


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_reads_the_distributed_format(tmp_path, gz, name):
    arrays = write_idx_set(tmp_path / "set", gz=gz)
    loaded = load_data(name, tmp_path / "set")
    assert loaded.name == name and loaded.num_classes == 10 and len(loaded.class_names) == 10
    assert loaded.train_images.shape == (12, 1, 28, 28) and loaded.test_images.shape == (5, 1, 28, 28)
    assert loaded.train_images.dtype == torch.uint8 and loaded.train_labels.dtype == torch.int64
    assert torch.equal(loaded.train_images[:, 0], torch.from_numpy(arrays["train_images"]))
    assert torch.equal(loaded.test_labels, torch.from_numpy(arrays["test_labels"].astype(np.int64)))
    assert loaded.mean[0] == pytest.approx(arrays["train_images"].mean() / 255, rel=1e-9)


@pytest.mark.parametrize("sub", ["fashion-mnist", "FashionMNIST/raw"])
def test_finds_the_usual_subfolders(tmp_path, sub):
    write_idx_set(tmp_path / sub)
    assert load_data("fashion-mnist", tmp_path).train_images.shape[0] == 12


def test_default_folder_is_the_system_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data here
    system = tmp_path / "usr-share" / "fashion-mnist"
    write_idx_set(system)
    monkeypatch.setitem(data.IDX_DATASETS["fashion-mnist"], "system_dir", str(system))
    assert load_data("fashion-mnist").test_images.shape[0] == 5


def test_missing_everywhere_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(data.IDX_DATASETS["fashion-mnist"], "system_dir", str(tmp_path / "nowhere"))
    message = one_line_error(load_data, "fashion-mnist")
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    message = one_line_error(load_data, "fashion-mnist", tmp_path / "absent")
    assert str(tmp_path / "absent") in message
    (tmp_path / "empty").mkdir()
    assert "IDX files not found" in one_line_error(load_data, "mnist", tmp_path / "empty")


def test_download_is_refused_with_the_hint(tmp_path):
    assert "cannot be downloaded" in one_line_error(load_data, "fashion-mnist", tmp_path, download=True)


def _damage(folder: Path, key: str, raw: bytes) -> Path:
    path = folder / f"{IDX_FILES[key]}.gz"
    with gzip.open(path, "wb") as file:
        file.write(raw)
    return path


@pytest.mark.parametrize("key,damage,words", [
    ("train_images", lambda raw: b"\x08\x03" + raw[2:], "bad magic number"),
    ("train_images", lambda raw: raw[:2] + b"\x0d" + raw[3:], "unsigned bytes"),           # float data
    ("train_labels", lambda raw: raw[:3] + b"\x02" + raw[4:], "1 dimension"),               # wrong ndim
    ("test_images", lambda raw: raw[:-7], "truncated"),
    ("test_labels", lambda raw: raw + b"\x00", "longer than its header"),
    ("train_labels", lambda raw: raw[:8] + bytes([0] * 11 + [10]), "labels must be 0..9"),  # label 10
    ("train_labels", lambda raw: raw[:3] + bytes([1]) + struct.pack(">i", 11) + raw[8:19], "12 images but 11 labels"),
    ("test_images", lambda raw: raw[:4] + struct.pack(">i", 0) + raw[8:16], "no images"),
    # a header promising 10^15 bytes is refused before anything is read into memory
    ("train_images", lambda raw: raw[:4] + struct.pack(">iii", 10**5, 10**5, 10**5) + raw[16:], "more than tvlars reads"),
])
def test_damaged_files_name_the_file(tmp_path, key, damage, words):
    folder = tmp_path / "set"
    arrays = write_idx_set(folder)
    path = _damage(folder, key, damage(idx_bytes(arrays[key])))
    message = one_line_error(load_data, "fashion-mnist", folder)
    assert words in message and folder.name in message, message
    assert path.name.removesuffix(".gz") in message or path.name in message


def test_not_gzip_and_not_readable(tmp_path):
    folder = tmp_path / "set"
    write_idx_set(folder)
    (folder / f"{IDX_FILES['train_images']}.gz").write_bytes(b"not gzip at all")
    message = one_line_error(load_data, "fashion-mnist", folder)
    assert "not readable" in message and IDX_FILES["train_images"] in message


def test_train_and_test_sizes_must_agree(tmp_path):
    folder = tmp_path / "set"
    write_idx_set(folder)
    rng = np.random.default_rng(1)
    _damage(folder, "test_images", idx_bytes(rng.integers(0, 256, size=(5, 14, 14), dtype=np.uint8)))
    assert "differ in size" in one_line_error(load_data, "fashion-mnist", folder)


def test_train_end_to_end_and_cli_errors(tmp_path):
    from helpers import read_csv, run_command, tvlars_cli

    from tvlars.harness.supervised import train

    folder = tmp_path / "set"
    write_idx_set(folder, n_train=64, n_test=16)
    out = tmp_path / "run"
    assert run_command(train, out, "--dataset", "fashion-mnist", "--data-dir", str(folder), "--epochs", "2",
                       "--batch-size", "32", "--optimizer", "lars", "--lr", "1", "--device", "cpu",
                       "--no-progress") == 0
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 2 and 0 <= float(rows[-1]["test_acc"]) <= 100
    import yaml
    assert yaml.safe_load((out / "config.yaml").read_text())["model"] == "mlp-bn"  # the default for 28x28 grey

    (folder / f"{IDX_FILES['train_labels']}.gz").unlink()
    done = tvlars_cli("train", "--dataset", "fashion-mnist", "--data-dir", str(folder), "--out", str(tmp_path / "b"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and IDX_FILES["train_labels"] in done.stderr


def test_config_lists_match_their_owners():
    from tvlars.harness import config, flags, models

    assert flags.DATASETS == data.DATASETS
    assert flags.MODELS == models.MODELS
    assert set(config.DEFAULT_MODEL) == set(data.DATASETS) == set(config.DEFAULT_SSL_MODEL)


def test_ssl_defaults_to_the_conv_net_on_grey_images():
    from tvlars.harness import config
    from tvlars.harness.flags import add_ssl_arguments, add_train_arguments

    def resolved(cls, add):
        parser = __import__("argparse").ArgumentParser()
        add(parser)
        return cls.from_flags(cls.check_flags(parser.parse_args(["--dataset", "fashion-mnist"])))

    assert resolved(config.SSLConfig, add_ssl_arguments).model == "cnn-pool"
    assert resolved(config.TrainConfig, add_train_arguments).model == "mlp-bn"
