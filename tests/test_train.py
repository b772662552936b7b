"""`tvlars train` end to end on digits: run folder, resume, accumulation, failures, divergence."""

import json

import pytest
import torch
import yaml

from tvlars.errors import UserError
from tvlars.harness.supervised import train
from tvlars.runfolder import LAYER_COLUMNS, METRIC_COLUMNS

from helpers import read_csv, run_command, tvlars_cli, weights

FAST = ["--dataset", "digits", "--model", "mlp", "--epochs", "2", "--batch-size", "256", "--no-progress"]


def run_train(out, *flags):
    return run_command(train, out, *flags)


# ---- the run folder ---------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["tvlars", "sgd"])
def test_run_folder_contents(tmp_path, optimizer):
    out = tmp_path / "run"
    assert run_train(out, *FAST, "--optimizer", optimizer, "--layer-stats-every", "2") == 0
    assert {"config.yaml", "metrics.csv", "layers.csv", "summary.json", "checkpoint.pt", "tb"} <= {
        p.name for p in out.iterdir()}

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["command"] == "train" and config["world_size"] == 1
    assert config["torch_version"] == torch.__version__
    assert config["optimizer"] == optimizer and config["batch_size"] == 256 and config["weight_decay"] == 5e-4
    for flag in ("lam", "delay_epochs", "trust_coefficient", "momentum", "schedule", "warmup_epochs",
                 "micro_batch_size", "amp", "seed", "drop_last"):
        assert flag in config

    with open(out / "metrics.csv") as fh:
        assert fh.readline().strip() == ",".join(METRIC_COLUMNS)
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    steps = 1347 // 256
    assert [int(r["step"]) for r in rows] == [steps, 2 * steps]
    for r in rows:
        assert 0 <= float(r["test_acc"]) <= 100 and 0 <= float(r["train_acc"]) <= 100
        assert float(r["epoch_time"]) > 0 and float(r["images_per_sec"]) > 0 and float(r["lr"]) >= 0
    assert float(rows[-1]["test_acc"]) > 50  # it learns

    with open(out / "layers.csv") as fh:
        assert fh.readline().strip() == ",".join(LAYER_COLUMNS)
    layers = read_csv(out / "layers.csv")
    names = {n for n, _ in __import__("tvlars.harness.models", fromlist=["build_model"]).build_model(
        "mlp", 10, 1, 8).named_parameters()}
    assert {r["layer"] for r in layers} == names
    assert sorted({int(r["step"]) for r in layers}) == [2, 4, 6, 8, 10]
    assert all(float(r["weight_norm"]) > 0 and float(r["grad_norm"]) >= 0 for r in layers)
    if optimizer == "tvlars":
        assert all(float(r["trust_ratio"]) > 0 and float(r["step_size"]) > 0 for r in layers)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == 2
    assert summary["final_test_acc"] == pytest.approx(float(rows[-1]["test_acc"]))
    assert summary["best_test_acc"] == pytest.approx(max(float(r["test_acc"]) for r in rows))
    assert summary["best_epoch"] in (1, 2) and summary["wall_time_s"] > 0

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "best_test_acc"):
        assert key in state
    assert state["epoch"] == 2 and state["step"] == 2 * steps
    assert {"torch", "numpy", "python", "cuda"} <= set(state["rng"])
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())


def test_evaluation_covers_the_whole_test_set(tmp_path):
    """test_acc is a multiple of 100/450: computed over all 450 digits test images."""
    out = tmp_path / "run"
    run_train(out, *FAST, "--optimizer", "sgd", "--lr", "0.1", "--eval-batch-size", "64")
    for r in read_csv(out / "metrics.csv"):
        correct = float(r["test_acc"]) * 450 / 100
        assert correct == pytest.approx(round(correct), abs=1e-6)


def test_eval_every_leaves_other_epochs_empty(tmp_path):
    out = tmp_path / "run"
    run_train(out, *FAST, "--epochs", "3", "--eval-every", "2", "--optimizer", "sgd", "--lr", "0.1")
    rows = read_csv(out / "metrics.csv")
    assert [r["test_acc"] != "" for r in rows] == [False, True, True]  # the last epoch always


# ---- resume -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("optimizer, model", [("tvlars", "mlp"), ("lamb", "cnn")])
def test_resume_is_exact(tmp_path, optimizer, model):
    """Stopped after 2 of 3 epochs and resumed == uninterrupted: rows, layer stats, weights (cnn: BN buffers)."""
    flags = ["--dataset", "digits", "--model", model, "--epochs", "3", "--batch-size", "256", "--no-progress",
             "--optimizer", optimizer, "--augment", "--layer-stats-every", "3"]
    if optimizer == "tvlars":  # phi_t moves within the run
        flags += ["--lam", "0.01", "--delay-epochs", "1"]
    if optimizer == "lamb":  # a small synthetic set keeps the cnn cheap
        flags += ["--warmup-epochs", "1", "--schedule", "warmup-cosine", "--dataset", "synthetic",
                  "--synthetic-train", "320", "--synthetic-test", "100", "--synthetic-image-size", "12",
                  "--batch-size", "64", "--lr", "0.02"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_train(whole, *flags) == 0
    assert run_train(parts, *flags, "--stop-after-epochs", "2") == 0
    assert json.loads((parts / "summary.json").read_text())["status"] == "running"
    assert len(read_csv(parts / "metrics.csv")) == 2
    assert run_train(parts, *flags, "--resume") == 0

    def untimed(out):
        return [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_sec")}
                for r in read_csv(out / "metrics.csv")]

    assert untimed(whole) == untimed(parts)
    assert (whole / "layers.csv").read_text() == (parts / "layers.csv").read_text()
    a, b = weights(whole), weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical, BN buffers too
    assert json.loads((parts / "summary.json").read_text())["status"] == "completed"


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    flags = [*FAST, "--epochs", "3", "--optimizer", "sgd", "--lr", "0.1"]
    run_train(out, *flags, "--stop-after-epochs", "1")
    with open(out / "metrics.csv", "a") as fh:  # a crash between the metrics row and the checkpoint
        fh.write("2,10,0.1,1.0,50.0,1.0,50.0,0.1,100.0\n")
    run_train(out, *flags, "--resume")
    assert [int(r["epoch"]) for r in read_csv(out / "metrics.csv")] == [1, 2, 3]


def test_resume_rules(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*FAST, "--optimizer", "sgd", "--lr", "0.1"]
    run_train(out, *flags, "--stop-after-epochs", "1")
    with pytest.raises(UserError, match="--lr 0.2 conflicts"):
        run_train(out, *FAST, "--optimizer", "sgd", "--lr", "0.2", "--resume")
    with pytest.raises(UserError, match="already holds a run"):
        run_train(out, *flags)
    # unchanged flags may be omitted: the saved config wins
    assert run_train(out, "--resume", "--no-progress") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.1
    assert run_train(out, "--resume") == 0  # already completed: nothing to do
    assert "already completed" in capsys.readouterr().err
    # --resume on an empty folder starts the run (same command after a pre-emption)
    assert run_train(tmp_path / "new", *flags, "--resume") == 0


# ---- large batches ----------------------------------------------------------------------
def test_gradient_accumulation_equals_full_batch(tmp_path):
    base = [*FAST, "--optimizer", "lars", "--lr", "1", "--no-drop-last", "--layer-stats-every", "0"]
    run_train(tmp_path / "full", *base)
    run_train(tmp_path / "accum", *base, "--micro-batch-size", "40")  # 256 = 6 x 40 + 16, uneven on purpose
    cfg = yaml.safe_load((tmp_path / "accum" / "config.yaml").read_text())
    assert cfg["accumulation_steps"] == 7 and cfg["micro_batch_size"] == 40
    a, b = weights(tmp_path / "full"), weights(tmp_path / "accum")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_batch_larger_than_the_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="larger than the 1347 training images"):
        run_train(tmp_path / "run", *FAST, "--batch-size", "4096", "--no-drop-last")


# ---- divergence -------------------------------------------------------------------------
def test_divergence_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """NaN inputs from epoch 3 on: status diverged, exit 1, epoch-2 checkpoint and rows kept."""
    from tvlars.harness.data import loader as loader_mod

    real = loader_mod.make_loader

    class Poisoned:
        def __init__(self, inner):
            self.inner = inner

        def set_epoch(self, epoch):
            self.epoch = epoch
            self.inner.set_epoch(epoch)

        def __len__(self):
            return len(self.inner)

        def __iter__(self):
            for x, y in self.inner:
                yield (x * float("nan") if self.epoch >= 2 else x), y

    monkeypatch.setattr(loader_mod, "make_loader", lambda *a, **k: Poisoned(real(*a, **k)))
    out = tmp_path / "run"
    assert run_train(out, *FAST, "--epochs", "4", "--optimizer", "sgd", "--lr", "0.1") == 1
    assert "diverged in epoch 3" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["epochs_done"] == 2
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    rows = read_csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[2]["train_loss"] == "nan"


@pytest.mark.slow
def test_divergence_through_the_command_line(tmp_path):
    out = tmp_path / "run"
    res = tvlars_cli("train", *FAST, "--optimizer", "sgd", "--lr", "1e5", "--warmup-epochs", "0", "--out", str(out))
    assert res.returncode == 1
    errors = [l for l in res.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and "diverged" in errors[0] and "Traceback" not in res.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


# ---- failures: one line, non-zero exit, no traceback ------------------------------------
def _one_line_error(res, *words):
    assert res.returncode != 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("tvlars") and "Traceback" not in res.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.slow
def test_failures_are_one_line(tmp_path):
    # missing data folder
    _one_line_error(tvlars_cli("train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"),
                               "--out", str(tmp_path / "a")), "CIFAR-10")
    # malformed data folder
    bad = tmp_path / "data" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    (bad / "data_batch_1").write_bytes(b"garbage")
    _one_line_error(tvlars_cli("train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                               "--out", str(tmp_path / "b")))
    # unknown choice
    _one_line_error(tvlars_cli("train", "--optimizer", "adam"), "--optimizer")
    # batch larger than the data
    _one_line_error(tvlars_cli("train", *FAST, "--batch-size", "5000", "--out", str(tmp_path / "c")), "5000")


@pytest.mark.slow
def test_folder_and_checkpoint_failures_are_one_line(tmp_path):
    out = tmp_path / "run"
    flags = [*FAST, "--optimizer", "sgd", "--lr", "0.1", "--epochs", "2"]
    assert run_train(out, *flags, "--stop-after-epochs", "1") == 0
    # a run folder holding a different run
    _one_line_error(tvlars_cli("train", *flags, "--lr", "0.3", "--out", str(out)), "already holds a run")
    # a conflicting flag on resume
    _one_line_error(tvlars_cli("train", *flags, "--lr", "0.3", "--out", str(out), "--resume"), "--lr")
    # a corrupt checkpoint
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    _one_line_error(tvlars_cli("train", "--out", str(out), "--resume"), "checkpoint")


def test_tv_factor_runs_any_optimizer_under_phi(tmp_path):
    """--tv-factor: the lr column follows lr * phi_t, t counting optimizer steps from 0."""
    from tvlars import tv_factor

    out = tmp_path / "run"
    assert run_train(out, *FAST, "--optimizer", "sgd", "--lr", "0.1", "--tv-factor", "--lam", "0.1",
                     "--delay-steps", "3", "--layer-stats-every", "0") == 0
    for r in read_csv(out / "metrics.csv"):
        last = int(r["step"]) - 1  # the epoch's last optimizer step
        assert float(r["lr"]) == pytest.approx(0.1 * tv_factor(last, 0.1, 3))
