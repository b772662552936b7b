"""Run folders written before the harness moved keep resuming and reporting.

tests/fixtures/run-folders-2026-11-30 holds config.yaml, summary.json and metrics.csv
exactly as `tvlars train` and `tvlars ssl` wrote them on 2026-11-30 (stopped with
--stop-after-epochs 1 of 2). A checkpoint of this code takes the place of theirs; the run
must take its settings from the old config.yaml, finish, and be read by the study.
"""

import argparse
import json
from pathlib import Path

import pytest
import yaml

from helpers import read_csv, run_command
from tvlars.harness.config import RUNTIME_FLAGS
from tvlars.harness.ssl import pretrain
from tvlars.harness.supervised import train
from tvlars.study import report, runs

FIXTURES = Path(__file__).parent / "fixtures" / "run-folders-2026-11-30"

# the flags the fixtures were written with
FLAGS = {
    "train": (train, ["--dataset", "digits", "--model", "mlp", "--epochs", "2", "--batch-size", "256",
                      "--no-progress", "--optimizer", "sgd", "--lr", "0.1"]),
    "ssl": (pretrain, ["--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test", "32",
                       "--synthetic-image-size", "8", "--synthetic-channels", "1", "--model", "cnn",
                       "--projector", "32-32", "--batch-size", "16", "--epochs", "2", "--probe-epochs", "2",
                       "--knn-every", "1", "--knn-k", "20", "--no-progress", "--device", "cpu"]),
}


@pytest.mark.parametrize("command", ["train", "ssl"])
def test_a_run_folder_of_2026_11_30_resumes_and_reports(tmp_path, command):
    module, flags = FLAGS[command]
    sweep = tmp_path / "sweep"
    out = sweep / "run"
    assert run_command(module, out, *flags, "--stop-after-epochs", "1") == 0
    for name in ("config.yaml", "summary.json", "metrics.csv"):
        text = (FIXTURES / command / name).read_text()
        (out / name).write_text(text.replace(f"/tmp/legacy/{command}", str(out)))
    saved = yaml.safe_load((out / "config.yaml").read_text())

    assert run_command(module, out, "--resume") == 0  # the settings come from the old config.yaml
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == 2 and summary["world_size"] == 1
    if command == "ssl":  # the probe's best epoch by its own name; no best over pre-training epochs
        assert "probe_best_acc" in summary and "best_test_acc" not in summary and "best_epoch" not in summary
    rows = read_csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0] == read_csv(FIXTURES / command / "metrics.csv")[0]  # the old row is kept as it was
    config = yaml.safe_load((out / "config.yaml").read_text())
    kept = set(saved) - RUNTIME_FLAGS - {"torch_version", "tvlars_version"}  # the others come from this invocation
    assert {k: config[k] for k in kept} == {k: saved[k] for k in kept}

    (sweep / "sweep.json").write_text("{}")
    (run,) = runs.load_runs(sweep)
    assert run.finished and runs.run_accuracy(run, "final") == pytest.approx(summary["final_test_acc"])
    assert "1 finished (0 diverged, 0 exploded)" in report.write_report(sweep)


# ---- --resume never overwrites a run's records -------------------------------------------


@pytest.mark.parametrize("command", ["train", "ssl"])
def test_resume_without_a_checkpoint_refuses_and_keeps_the_records(tmp_path, command, capsys):
    """checkpoint.pt gone after an epoch: --resume says so in one line (exit 2) and writes nothing."""
    from tvlars import cli

    module, flags = FLAGS[command]
    out = tmp_path / "run"
    assert run_command(module, out, *flags, "--stop-after-epochs", "1") == 0
    (out / "checkpoint.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert cli.main([command, "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"tvlars: error: --resume: run in {out} records 1 epoch(s) but its checkpoint.pt is gone, so there is "
        "nothing to resume from; its records were left as they are (choose another --out to start the run again)"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    (out / "config.yaml").unlink()  # records without the configuration they came from
    assert cli.main([command, *flags, "--out", str(out), "--resume"]) == 2
    assert "holds metrics.csv, summary.json but no config.yaml" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == {
        k: v for k, v in before.items() if k != "config.yaml"}


@pytest.mark.parametrize("command", ["train", "ssl"])
def test_resume_starts_a_run_that_has_nothing_to_lose(tmp_path, command):
    """--resume is how a sweep starts every run: a folder holding only the sweep's flags, or a
    run that died before its first checkpoint (no epoch recorded), starts (no folder at all:
    test_train.py::test_resume_rules)."""
    import yaml as yaml_

    from tvlars import cli

    module, flags = FLAGS[command]
    planned = tmp_path / "planned"  # as tvlars.study.launch leaves it before the first start
    planned.mkdir()
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    values = vars(parser.parse_args([*flags, "--epochs", "1"]))
    given = {k: v for k, v in values.items() if v != parser.get_default(k)}
    (planned / "sweep-run.yaml").write_text(yaml_.safe_dump({k.replace("_", "-"): list(v) if isinstance(v, tuple)
                                                              else v for k, v in given.items()}))
    assert cli.main([command, "--config", str(planned / "sweep-run.yaml"), "--out", str(planned), "--resume"]) == 0
    assert json.loads((planned / "summary.json").read_text())["status"] == "completed"

    died = tmp_path / "died"  # killed in epoch 1: config.yaml, a "running" summary, no row, no checkpoint
    assert run_command(module, died, *flags, "--stop-after-epochs", "1") == 0
    (died / "checkpoint.pt").unlink()
    summary = json.loads((died / "summary.json").read_text())
    (died / "summary.json").write_text(json.dumps({**summary, "epochs_done": 0}))
    header = (died / "metrics.csv").read_text().splitlines()[0]
    (died / "metrics.csv").write_text(header + "\n")
    assert run_command(module, died, "--resume") == 0
    assert [r["epoch"] for r in read_csv(died / "metrics.csv")] == ["1", "2"]
