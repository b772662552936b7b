"""The flags that let a run follow either protocol: the paper's as written, or its authors'
code as it ran (docs/DIFFERENCES.md): learning-rate scaling with the batch size, the decay
floor relative to the peak, LAMB's weight-norm cap, layer adaptation off, and the linear
probe of an untrained encoder (``tvlars ssl --epochs 0``)."""

from __future__ import annotations

import argparse

import pytest
import yaml
from helpers import read_csv, run_command

from tvlars.errors import UserError
from tvlars.harness.flags import add_train_arguments
from tvlars.harness import optimizers as opt_lib
from tvlars.harness.config import TrainConfig
from tvlars.harness.models import build_model
from tvlars.harness.ssl import pretrain as ssl
from tvlars.harness.supervised import train

FAST = ["--dataset", "digits", "--model", "mlp", "--epochs", "2", "--no-progress", "--device", "cpu"]


def parse(*argv) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return TrainConfig.from_flags(parser.parse_args(list(argv)))


@pytest.mark.parametrize("scaling,expected", [("none", 19.0), ("linear", 19.0 * 64), ("sqrt", 19.0 * 8)])
def test_lr_scaling_sets_the_optimizer_peak(scaling, expected):
    args = parse("--optimizer", "lars", "--lr", "19", "--batch-size", "16384", "--lr-scaling", scaling)
    assert args.peak_lr == pytest.approx(expected)
    model = build_model("mlp", 10, 1, 8)
    optimizer = opt_lib.build_optimizer(model, **opt_lib.optimizer_kwargs(args, steps_per_epoch=10))
    assert all(g["lr"] == pytest.approx(expected) for g in optimizer.param_groups)


def test_base_batch_size_and_warm_up_reach_the_scaled_peak():
    args = parse("--optimizer", "lars", "--lr", "2", "--batch-size", "1024", "--lr-scaling", "linear",
                 "--base-batch-size", "512", "--schedule", "warmup-cosine", "--warmup-epochs", "1",
                 "--epochs", "2", "--min-lr-ratio", "0.001")
    model = build_model("mlp", 10, 1, 8)
    optimizer = opt_lib.build_optimizer(model, **opt_lib.optimizer_kwargs(args, steps_per_epoch=4))
    scheduler = opt_lib.build_scheduler(optimizer, **opt_lib.scheduler_kwargs(args, steps_per_epoch=4, total_steps=8))
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[3] == pytest.approx(4.0)            # the end of warm-up: 2 * 1024 / 512
    assert lrs[-1] == pytest.approx(4.0 * 0.001)   # the authors' floor: 0.001 of the peak


@pytest.mark.parametrize("argv,words", [
    (["--base-batch-size", "0"], "--base-batch-size"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio"),
    (["--optimizer", "lars", "--min-lr-ratio", "0.1", "--min-lr", "0.01"], "not both"),
    (["--optimizer", "lamb", "--max-weight-norm", "0"], "--max-weight-norm"),
])
def test_bad_values_are_user_errors(argv, words):
    with pytest.raises(UserError, match=words):
        parse(*argv)


def test_no_layer_adaptation_and_the_authors_lamb():
    args = parse("--optimizer", "lamb", "--max-weight-norm", "10", "--no-bias-correction",
                 "--no-exclude-1d-decay", "--no-exclude-1d-adapt")
    model = build_model("mlp", 10, 1, 8)
    optimizer = opt_lib.build_optimizer(model, **opt_lib.optimizer_kwargs(args, steps_per_epoch=1))
    assert all(g["adapt"] and g["weight_decay"] == 5e-4 for g in optimizer.param_groups)
    assert {g["max_weight_norm"] for g in optimizer.param_groups} == {10.0}
    assert not any(g["bias_correction"] for g in optimizer.param_groups)
    args = parse("--optimizer", "lamb", "--no-layer-adaptation")
    optimizer = opt_lib.build_optimizer(model, **opt_lib.optimizer_kwargs(args, steps_per_epoch=1))
    assert not any(g["adapt"] for g in optimizer.param_groups)


def test_official_tvlars_delay_defaults_to_ten_epochs():
    args = parse("--optimizer", "tvlars", "--variant", "official")
    assert args.delay_in_steps(steps_per_epoch=7) == 70


def test_config_records_the_peak_and_report_shows_it(tmp_path):
    from tvlars.study.report import build_table, render_csv, render_markdown
    from tvlars.study.runs import load_runs

    for lr in ("1", "2"):
        out = tmp_path / "sweep" / f"lr{lr}"
        assert run_command(train, out, *FAST, "--optimizer", "lars", "--lr", lr, "--batch-size", "512",
                           "--lr-scaling", "linear", "--schedule", "warmup-cosine", "--warmup-epochs", "1") == 0
        config = yaml.safe_load((out / "config.yaml").read_text())
        assert config["peak_lr"] == pytest.approx(float(lr) * 2) and config["lr_scaling"] == "linear"
        assert float(read_csv(out / "metrics.csv")[0]["lr"]) == pytest.approx(float(lr) * 2)
    (tmp_path / "sweep" / "sweep.json").write_text("{}")
    table = build_table(load_runs(tmp_path / "sweep"))
    assert "512 (1/2), peak ×2" in render_markdown(table)
    rows = list(__import__("csv").DictReader(render_csv(table).splitlines()))
    assert [row["peak_lr"] for row in rows] == ["2", "4"]


def test_ssl_zero_epochs_probes_the_untrained_encoder(tmp_path):
    out = tmp_path / "probe0"
    assert run_command(ssl, out, "--dataset", "digits", "--model", "mlp", "--projector", "64-64",
                       "--batch-size", "128", "--epochs", "0", "--probe-epochs", "2", "--no-progress",
                       "--device", "cpu") == 0
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == 0
    assert 10 < summary["final_test_acc"] <= 100
    assert 10 < summary["knn_acc"] <= 100 and 10 < summary["knn20_acc"] <= 100 and "online_acc" not in summary
    assert not (out / "metrics.csv").exists() or len(read_csv(out / "metrics.csv")) == 0
    with pytest.raises(UserError, match="--epochs must be at least 1"):  # tvlars train still needs one
        parse("--epochs", "0")


# --------------------------------------------------------------------------- the grids

def _expand(name):
    from tvlars.study import grid, sweep

    return sweep.plan(grid.load_grid(name))  # a shipped grid, checked against the real flags


@pytest.mark.parametrize("name", ["official-cifar10", "official-tinyimagenet", "official-barlowtwins-cifar10",
                                  "fashion-mnist-official"])
def test_official_grids_follow_the_authors_code(name):
    from tvlars.study.paper import LEARNING_RATES

    runs = _expand(name)
    assert len(runs) == 90 and len({r.name for r in runs}) == 90
    for r in runs:
        flags = r.flags
        assert flags["lr"] in LEARNING_RATES[flags["batch_size"]]
        warm = flags.get("warmup_epochs", 0) > 0
        assert flags.get("lr_scaling", "none") == ("linear" if warm else "none")
        assert (flags.get("min_lr_ratio") == 0.001) == warm
        if flags["optimizer"] in ("lars", "lamb") and not warm:
            assert flags["schedule"] == "constant"
        if flags["optimizer"] == "tvlars":
            assert flags["variant"] == "official" and flags["schedule"] == "none"
        if flags["optimizer"] == "lamb":
            assert flags["bias_correction"] is False and flags["exclude_1d_decay"] is False
            if name.startswith("official-barlowtwins"):
                assert flags["layer_adaptation"] is False        # their adam=True
            else:
                assert flags["max_weight_norm"] == 10.0 and flags["exclude_1d_adapt"] is False


def test_fashion_mnist_paper_grid_runs_seed_0_first():
    runs = _expand("fashion-mnist-paper")
    assert len(runs) == 180
    seeds = [r.flags["seed"] for r in runs]
    assert seeds == sorted(seeds)
    assert all(r.flags.get("lr_scaling", "none") == "none" for r in runs)
    lam = _expand("fashion-mnist-lam")
    assert sorted({r.flags["lam"] for r in lam}) == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
    assert {r.flags["batch_size"] for r in lam} == {16384}


def test_fashion_mnist_barlowtwins_grid_starts_with_the_untrained_baseline():
    runs = _expand("fashion-mnist-barlowtwins")
    assert len(runs) == 7 and runs[0].flags["epochs"] == 0
    assert all(r.flags["epochs"] == 20 for r in runs[1:])
    assert {(r.flags["optimizer"], r.flags.get("warmup_epochs"), r.flags["batch_size"], r.flags["lr"])
            for r in runs[1:]} == {(o, w, b, lr) for o, w in (("lars", 2), ("lars", 0), ("tvlars", None))
                                   for b, lr in ((512, 1), (4096, 8))}
    assert all(r.flags["model"] == "cnn-pool" and r.flags["augment_preset"] == "gray" for r in runs)
    assert {r.flags["lam"] for r in runs if r.flags["optimizer"] == "tvlars"} == {1e-5}


def test_fashion_mnist_100_grid_is_the_paper_length():
    runs = _expand("fashion-mnist-100")
    assert len(runs) == 6 and all(r.flags["epochs"] == 100 for r in runs)
    assert {r.flags.get("warmup_epochs") for r in runs if r.flags["optimizer"] == "lars"} == {20, 0}
    assert {r.flags["delay_epochs"] for r in runs if r.flags["optimizer"] == "tvlars"} == {10}


def test_report_rows_sort_flag_values_by_number():
    from tvlars.study.runs import label_order

    labels = ["TVLARS [lam=0.0001]", "TVLARS [lam=0.01]", "TVLARS [lam=1e-05]", "LARS (no warm-up)",
              "TVLARS [lam=1e-06]", "LARS (warm-up)", "TVLARS [lam=0.001]"]
    assert sorted(labels, key=label_order) == [
        "LARS (warm-up)", "LARS (no warm-up)", "TVLARS [lam=1e-06]", "TVLARS [lam=1e-05]",
        "TVLARS [lam=0.0001]", "TVLARS [lam=0.001]", "TVLARS [lam=0.01]"]


def test_resume_accepts_the_same_micro_batch_size_given_again(tmp_path):
    out = tmp_path / "run"
    flags = [*FAST, "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "256", "--micro-batch-size", "64"]
    assert run_command(train, out, *flags, "--stop-after-epochs", "1") == 0
    # "64" on the command line, 64 in config.yaml: the same setting, not a conflict
    assert run_command(train, out, *flags, "--resume") == 0
    assert len(read_csv(out / "metrics.csv")) == 2
    with pytest.raises(UserError, match="--micro-batch-size"):
        run_command(train, tmp_path / "run", *FAST, "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "256",
                    "--micro-batch-size", "32", "--resume", "--epochs", "3")


def test_phi_anneal_takes_lam_and_delay_from_the_run_length(tmp_path):
    """--phi-anneal: TVLARS-anneal (or --tv-factor) with phi_t from 0.99 to 0.01 over the run,
    recorded in config.yaml, and the report's own row."""
    from tvlars import anneal_factor_args
    from tvlars.study.runs import load_runs, row_labels

    out = tmp_path / "sweep" / "anneal"
    assert run_command(train, out, *FAST, "--optimizer", "tvlars", "--phi-anneal") == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    expected = anneal_factor_args(config["total_steps"])
    assert (config["lam_resolved"], config["delay_steps_resolved"]) == (expected["lam"], expected["delay"])
    model = build_model("mlp", 10, 1, 8)
    args = parse("--optimizer", "tvlars", "--phi-anneal", "--epochs", "50")
    optimizer = opt_lib.build_optimizer(model, **opt_lib.optimizer_kwargs(args, steps_per_epoch=3))
    assert {(g["lam"], g["delay"]) for g in optimizer.param_groups} == {tuple(anneal_factor_args(150).values())}
    lars = parse("--optimizer", "lars", "--tv-factor", "--phi-anneal", "--epochs", "50")
    scheduler = opt_lib.build_scheduler(optimizer, **opt_lib.scheduler_kwargs(lars, 3, 150))
    assert (scheduler.lam, scheduler.delay) == tuple(anneal_factor_args(150).values())
    (tmp_path / "sweep" / "sweep.json").write_text("{}")
    assert list(row_labels(load_runs(tmp_path / "sweep")).values()) == ["TVLARS-anneal"]


@pytest.mark.parametrize("flags,message", [
    (["--optimizer", "lars"], "^--phi-anneal applies to tvlars, or any optimizer with --tv-factor, not to"),
    (["--optimizer", "tvlars", "--variant", "official"], "paper"),
    (["--optimizer", "tvlars", "--lam", "1e-3"], "drop --lam"),
    (["--optimizer", "tvlars", "--delay-epochs", "5"], "drop --delay-epochs"),
])
def test_phi_anneal_refuses_what_it_replaces(flags, message):
    with pytest.raises(UserError, match=message):
        parse(*flags, "--phi-anneal")
