"""Opening a file never runs code: checkpoints, CIFAR-10 batches, the Tiny ImageNet cache,
YAML and JSON. Every hostile file here is a real payload (a pickle or YAML document whose
loading creates a marker file); each test asserts that the marker was not created, that the
refusal is one line naming the file, and that honest files still load."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shlex

import numpy as np
import pytest
import torch
import yaml

from tvlars import cli
from tvlars.errors import UserError
from tvlars.harness import checkpoint as ckpt
from tvlars.harness.data import datasets as data
from tvlars.harness.supervised import train
from tvlars.harness.data.datasets import load_data
from tvlars.study import grid as grid_language
from tvlars.study import runs, sweep

from helpers import python2_pickle_dump, read_csv, run_command, tvlars_cli, weights
from test_data import write_cifar10, write_tinyimagenet

TINY = ["--dataset", "synthetic", "--synthetic-train", "256", "--synthetic-test", "64", "--synthetic-image-size", "8",
        "--synthetic-channels", "1", "--model", "mlp", "--batch-size", "64", "--epochs", "3", "--no-progress",
        "--optimizer", "tvlars", "--lam", "0.01", "--augment", "--device", "cpu"]


class Touch:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class OpenForWriting(Touch):
    """Unpickling this creates ``marker`` through the builtin open()."""

    def __reduce__(self):
        return open, (self.marker, "w")


PAYLOADS = [Touch, OpenForWriting]


def yaml_payload(marker) -> str:
    return f"lr: 0.1\nseed: !!python/object/apply:os.system [{json.dumps('touch ' + shlex.quote(str(marker)))}]\n"


def assert_one_line_naming(err, path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_the_payloads_are_live(tmp_path):
    """What the other tests refuse really runs code when loaded the usual way."""
    for i, payload in enumerate(PAYLOADS):
        marker = tmp_path / f"pickle-{i}"
        pickle.loads(pickle.dumps(payload(marker)))
        assert marker.exists()
    torch.save({"model": Touch(tmp_path / "torch")}, tmp_path / "c.pt")
    torch.load(tmp_path / "c.pt", weights_only=False)
    assert (tmp_path / "torch").exists()
    yaml.unsafe_load(yaml_payload(tmp_path / "yaml"))
    assert (tmp_path / "yaml").exists()


# --------------------------------------------------------------------------- checkpoints


def a_checkpoint_state() -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return ckpt.training_state(model, optimizer, None, epoch=1, step=1, best_test_acc=12.5, best_epoch=1)


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("layout", ["torch.save", "plain pickle", "inside a real checkpoint"])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, payload, layout):
    marker, path = tmp_path / "marker", tmp_path / "checkpoint.pt"
    if layout == "torch.save":
        torch.save({"format": ckpt.FORMAT, "model": payload(marker)}, path)
    elif layout == "plain pickle":
        path.write_bytes(pickle.dumps({"format": ckpt.FORMAT, "model": payload(marker)}))
    else:  # a real checkpoint, tampered with
        ckpt.save_checkpoint(path, a_checkpoint_state())
        state = torch.load(path, weights_only=True)
        state["best_test_acc"] = payload(marker)
        torch.save(state, path)
    with pytest.raises(UserError) as err:
        ckpt.load_checkpoint(path)
    message = assert_one_line_naming(err, path)
    assert not marker.exists()
    if layout != "plain pickle":
        assert "refused" in message and ("system" in message or "open" in message)


def test_checkpoints_hold_only_tensors_and_plain_data(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, a_checkpoint_state())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = torch.load(path, weights_only=True)  # torch's own allowlist, nothing added
    assert isinstance(state["rng"]["numpy"]["key"], torch.Tensor)
    assert isinstance(state["rng"]["python"]["state"], torch.Tensor)


def test_writing_what_cannot_be_read_back_safely_is_a_bug(tmp_path):
    with pytest.raises(TypeError, match="float64"):
        ckpt.save_checkpoint(tmp_path / "checkpoint.pt", {"best_test_acc": np.float64(1.0)})
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_rng_state_is_one_line(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = a_checkpoint_state()
    state["rng"]["numpy"]["key"] = state["rng"]["numpy"]["key"][:10]
    ckpt.save_checkpoint(path, state)
    with pytest.raises(UserError, match="RNG state") as err:
        ckpt.load_checkpoint(path)
    assert_one_line_naming(err, path)


# 0.1.0 wrote {"format": "tvlars-checkpoint-1", ...} with numpy's and Python's RNG states as
# numpy.random.get_state() and random.getstate() return them.
def rng_state_0_1_0() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": None}


def to_0_1_0(state: dict) -> dict:
    """A checkpoint of ours as tvlars 0.1.0 wrote it."""
    rng_numpy, rng_python = state["rng"]["numpy"], state["rng"]["python"]
    rng = {"torch": state["rng"]["torch"], "cuda": state["rng"]["cuda"],
           "numpy": (rng_numpy["algorithm"], rng_numpy["key"].numpy().astype(np.uint32), rng_numpy["pos"],
                     rng_numpy["has_gauss"], rng_numpy["cached_gaussian"]),
           "python": (rng_python["version"], tuple(rng_python["state"].tolist()), rng_python["gauss_next"])}
    return {**state, "format": "tvlars-checkpoint-1", "rng": rng}


def test_a_0_1_0_checkpoint_loads_through_the_safe_path(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    np.random.randn(), random.gauss(0, 1)  # cached gaussians in both states
    torch.save({"format": "tvlars-checkpoint-1", "epoch": 2, "rng": rng_state_0_1_0()}, path)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    expected = (torch.rand(3), np.random.randn(3), random.gauss(0, 1), random.random())
    state = ckpt.load_checkpoint(path)
    assert state["epoch"] == 2 and state["format"] == ckpt.FORMAT
    ckpt.set_rng_state(state["rng"])
    again = (torch.rand(3), np.random.randn(3), random.gauss(0, 1), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


@pytest.mark.parametrize("array", ["object array", "payload in an object array", "float array"])
def test_a_0_1_0_checkpoint_admits_only_a_random_state_array(tmp_path, array):
    marker, path = tmp_path / "marker", tmp_path / "checkpoint.pt"
    rng = rng_state_0_1_0()
    key = {"object array": np.array([1, 2], dtype=object), "payload in an object array":
           np.array([Touch(marker)], dtype=object), "float array": np.zeros(624)}[array]
    rng["numpy"] = ("MT19937", key, 624, 0, 0.0)
    torch.save({"format": "tvlars-checkpoint-1", "epoch": 1, "rng": rng}, path)
    with pytest.raises(UserError) as err:
        ckpt.load_checkpoint(path)
    assert_one_line_naming(err, path)
    assert not marker.exists()


def test_a_write_that_fails_halfway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {**a_checkpoint_state(), "epoch": 1})
    before = path.read_bytes()

    def disk_full(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="previous checkpoint is kept") as err:
        ckpt.save_checkpoint(path, {**a_checkpoint_state(), "epoch": 2})
    assert_one_line_naming(err, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and ckpt.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# ---- the same, end to end: `tvlars train` -------------------------------------------------
def untimed(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_sec")}
            for r in read_csv(out / "metrics.csv")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert run_command(train, out, *TINY, "--layer-stats-every", "2") == 0
    return out


def assert_same_run(a, b) -> None:
    assert untimed(a) == untimed(b)
    assert (a / "layers.csv").read_text() == (b / "layers.csv").read_text()
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_a_checkpoint_write_failed_halfway_is_exact(tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_at_the_second_epoch(obj, fh, *args, **kwargs):
        calls.append(obj["epoch"])
        if obj["epoch"] == 2:
            fh.write(b"PK\x03\x04 half a zip")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_the_second_epoch)
    with pytest.raises(UserError, match="previous checkpoint is kept") as err:
        run_command(train, out, *TINY, "--layer-stats-every", "2")
    assert_one_line_naming(err, out / "checkpoint.pt")
    monkeypatch.undo()
    assert calls == [1, 2] and ckpt.load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert run_command(train, out, *TINY, "--layer-stats-every", "2", "--resume") == 0
    assert_same_run(uninterrupted, out)


def test_resume_from_a_0_1_0_checkpoint_is_exact(tmp_path, uninterrupted):
    out = tmp_path / "run"
    assert run_command(train, out, *TINY, "--layer-stats-every", "2", "--stop-after-epochs", "1") == 0
    torch.save(to_0_1_0(torch.load(out / "checkpoint.pt", weights_only=True)), out / "checkpoint.pt")
    assert run_command(train, out, *TINY, "--layer-stats-every", "2", "--resume") == 0
    assert_same_run(uninterrupted, out)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["format"] == ckpt.FORMAT  # rewritten safe


def one_line_exit_2(res, path) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("tvlars: error:") and str(path) in lines[0], lines[0]


def test_command_line_refuses_hostile_files_with_status_2(tmp_path):
    # tvlars train --resume, the checkpoint replaced by a payload
    out, marker = tmp_path / "run", tmp_path / "marker"
    assert run_command(train, out, *TINY, "--stop-after-epochs", "1") == 0
    torch.save({"format": ckpt.FORMAT, "model": Touch(marker)}, out / "checkpoint.pt")
    one_line_exit_2(tvlars_cli("train", "--resume", "--out", str(out)), out / "checkpoint.pt")
    assert not marker.exists()
    # tvlars train --dataset cifar10, a batch replaced by a payload
    folder, _, _ = write_cifar10(tmp_path / "data", style="python2")
    with (folder / "data_batch_1").open("wb") as file:
        python2_pickle_dump({b"data": Touch(marker), b"labels": [0]}, file)
    res = tvlars_cli("train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "mlp",
                     "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "cifar-run"))
    one_line_exit_2(res, folder / "data_batch_1")
    assert not marker.exists()


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("file", ["data_batch_1", "test_batch", "batches.meta"])
@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("protocol", ["python2", 2, 5])
def test_a_cifar10_file_that_would_run_code_is_refused(tmp_path, file, payload, protocol):
    folder, _, _ = write_cifar10(tmp_path)
    marker = tmp_path / "marker"
    content = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"label_names": payload(marker)}
    with (folder / file).open("wb") as handle:
        if protocol == "python2":
            python2_pickle_dump(content, handle)
        else:
            pickle.dump(content, handle, protocol=protocol)
    with pytest.raises(UserError) as err:
        load_data("cifar10", folder)
    assert "refused" in assert_one_line_naming(err, folder / file)
    assert not marker.exists()


@pytest.mark.parametrize("content", [
    {b"data": np.array([[1, 2]], dtype=object), b"labels": [0]},   # an object array
    {b"data": np.zeros((1, 3072), np.uint8), b"labels": {0, 1}},   # a set
    np.zeros((1, 3072), np.uint8).view(np.recarray),               # an ndarray subclass
])
def test_cifar10_admits_only_what_the_format_holds(tmp_path, content):
    folder, _, _ = write_cifar10(tmp_path)
    with (folder / "test_batch").open("wb") as handle:
        pickle.dump(content, handle)
    with pytest.raises(UserError) as err:
        load_data("cifar10", folder)
    assert_one_line_naming(err, folder / "test_batch")


def test_cifar10_download_never_unpickles_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    folder, _, _ = write_cifar10(tmp_path, style="python2")
    marker = tmp_path / "marker"
    with (folder / "data_batch_2").open("wb") as handle:
        python2_pickle_dump({b"data": Touch(marker)}, handle)
    monkeypatch.setattr(tv_utils, "check_integrity", lambda *a, **k: True)  # "already downloaded"
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(UserError) as err:
        load_data("cifar10", tmp_path, download=True)
    assert_one_line_naming(err, folder / "data_batch_2")
    assert not marker.exists()

    def offline(*args, **kwargs):
        raise OSError("network unreachable\nmore detail")

    monkeypatch.setattr(tv_utils, "check_integrity", lambda *a, **k: False)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="could not download CIFAR-10") as err:
        load_data("cifar10", tmp_path / "elsewhere", download=True)
    assert_one_line_naming(err, tmp_path / "elsewhere")


# --------------------------------------------------------------------------- Tiny ImageNet cache


@pytest.mark.parametrize("damage", ["payload", "float images", "other labels", "extra array"])
def test_tinyimagenet_cache_holding_anything_else_is_rebuilt(tmp_path, monkeypatch, damage):
    folder = write_tinyimagenet(tmp_path / "data")
    honest = load_data("tinyimagenet", folder, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").iterdir()
    marker = tmp_path / "marker"
    with np.load(cache_file) as cached:
        arrays = {key: cached[key] for key in cached.files}
    if damage == "payload":
        arrays["train_y"] = np.array([Touch(marker)], dtype=object)
    elif damage == "float images":
        arrays["train_x"] = arrays["train_x"].astype(np.float32)
    elif damage == "other labels":
        arrays["test_y"] = (arrays["test_y"] + 1) % 3
    else:
        arrays["extra"] = np.zeros(3)
    with cache_file.open("wb") as handle:
        np.savez(handle, **arrays)  # object arrays are pickled inside the npz

    decoded = []
    real_decode_all = data._decode_all
    monkeypatch.setattr(data, "_decode_all", lambda paths: decoded.append(len(paths)) or real_decode_all(paths))
    again = load_data("tinyimagenet", folder, cache_dir=tmp_path / "cache")
    assert decoded == [12, 5] and not marker.exists()
    assert torch.equal(again.train_images, honest.train_images) and torch.equal(again.test_labels, honest.test_labels)


# --------------------------------------------------------------------------- YAML and JSON


def test_a_run_config_that_would_run_code_is_refused(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "marker"
    assert run_command(train, out, *TINY, "--stop-after-epochs", "1") == 0
    (out / "config.yaml").write_text(yaml_payload(marker))
    with pytest.raises(UserError) as err:
        run_command(train, out, "--resume")
    assert_one_line_naming(err, out / "config.yaml")
    assert not marker.exists()
    (out / "config.yaml").write_bytes(b"lr: \xff\xfe\n")  # not UTF-8 text
    with pytest.raises(UserError) as err:
        run_command(train, out, "--resume")
    assert_one_line_naming(err, out / "config.yaml")


@pytest.mark.parametrize("content", ["payload", b"epochs: \xff\n"])
def test_a_config_file_that_would_run_code_or_is_binary_is_one_line(tmp_path, capsys, content):
    marker, config = tmp_path / "marker", tmp_path / "flags.yaml"
    if content == "payload":
        config.write_text(yaml_payload(marker))
    else:
        config.write_bytes(content)
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0]
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_grid_file_that_would_run_code_is_refused(tmp_path):
    marker, grid = tmp_path / "marker", tmp_path / "grid.yaml"
    grid.write_text("command: train\nbase:\n  epochs: !!python/object/apply:os.system "
                    f"[{json.dumps('touch ' + shlex.quote(str(marker)))}]\ngrid:\n  lr: [0.1]\n")
    with pytest.raises(UserError) as err:
        grid_language.load_grid(grid)
    assert_one_line_naming(err, grid)
    grid.write_bytes(b"command: train\n\xff\xfe")
    with pytest.raises(UserError) as err:
        grid_language.load_grid(grid)
    assert_one_line_naming(err, grid)
    assert not marker.exists()


def test_report_inputs_are_plain_data_or_ignored(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    run.mkdir()
    (run / "config.yaml").write_text(yaml_payload(marker))
    (run / "sweep-run.yaml").write_bytes(b"\xff\xfe binary")
    (run / "summary.json").write_text("[1, 2, 3]")
    (run / "metrics.csv").write_bytes(b"epoch,test_acc\n1,50\n\xff\xfe\n")
    loaded = runs.read_run(run)
    assert loaded.config == {} and loaded.summary == {} and loaded.metrics == [] and loaded.status == "pending"
    assert not marker.exists()


def test_the_sweep_index_keeps_only_well_formed_records(tmp_path):
    index = tmp_path / "sweep.json"
    index.write_text(json.dumps({"runs": [
        {"name": "good", "status": "failed", "attempts": 2, "returncode": 1, "wall_time_s": 3.5, "error": "x"},
        {"name": "typed", "status": ["completed"], "attempts": "many", "returncode": True, "flags": [1]},
        {"name": "../outside", "status": "completed"}, {"name": 7}, {"status": "completed"}, "not a record",
    ]}))
    records = sweep.read_index(index)
    assert records == {"good": {"name": "good", "status": "failed", "attempts": 2, "returncode": 1,
                                "wall_time_s": 3.5, "error": "x"}, "typed": {"name": "typed"}}
    for text in ("[1, 2]", '{"runs": {"a": 1}}', "not json", ""):
        index.write_text(text)
        assert sweep.read_index(index) == {}
