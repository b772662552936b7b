"""Run folders written before the harness moved keep resuming and reporting.

tests/fixtures/run-folders-2026-11-30 holds config.yaml, summary.json and metrics.csv
exactly as `tvlars train` and `tvlars ssl` wrote them on 2026-11-30 (stopped with
--stop-after-epochs 1 of 2). A checkpoint of this code takes the place of theirs; the run
must take its settings from the old config.yaml, finish, and be read by the study.
"""

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
