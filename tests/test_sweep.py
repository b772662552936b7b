"""tvlars sweep: grid expansion, validation, resume, failures, workers, devices.

The runs are launched through ``TVLARS_SWEEP_LAUNCHER`` / the ``launcher`` argument with
a fake, fast ``tvlars`` (a script written by the tests), so these tests do not depend on
the trainer; ``test_end_to_end_real_train`` (slow) runs the real ``tvlars train``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tvlars.errors import UserError
from tvlars.study import grid as grid_language
from tvlars.study import launch, sweep

FAKE = textwrap.dedent(
    r"""
    import argparse, json, os, signal, sys, time
    from pathlib import Path
    import yaml

    p = argparse.ArgumentParser()
    p.add_argument("command")
    p.add_argument("--config")
    p.add_argument("--out")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    out = Path(a.out)
    flags = yaml.safe_load(open(a.config))
    print("fake", a.command, out.name, "resume" if (out / "checkpoint.pt").exists() else "fresh", flush=True)
    print("device", os.environ.get("CUDA_VISIBLE_DEVICES", "-"), flush=True)
    print("threads", os.environ.get("OMP_NUM_THREADS", "-"), flush=True)
    marks = Path(os.environ["FAKE_MARKS"])
    (marks / f"{out.name}.{os.getpid()}.start").write_text(str(time.time()))
    (out / "config.yaml").write_text(yaml.safe_dump(dict(flags, command=a.command)))
    (out / "checkpoint.pt").write_text("epoch 1")
    (out / "summary.json").write_text(json.dumps({"status": "running", "epochs_done": 1}))
    for word in os.environ.get("FAKE_FAIL", "").split(","):
        if word and word in out.name:
            print("failing on purpose", flush=True)
            sys.exit(3)
    for word in os.environ.get("FAKE_KILL", "").split(","):
        if word and word in out.name:
            os.kill(os.getpid(), signal.SIGKILL)
    for word in os.environ.get("FAKE_HANG", "").split(","):
        if word and word in out.name:
            time.sleep(60)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    epochs = int(flags.get("epochs", 3))
    lr = float(flags.get("lr", 1))
    rows = ["epoch,step,lr,train_loss,train_acc,test_loss,test_acc,epoch_time,images_per_sec"]
    accs = [min(99.0, 10 * lr + 5 * e) for e in range(1, epochs + 1)]
    for e, acc in enumerate(accs, 1):
        rows.append(f"{e},{10 * e},{lr},1.0,{acc},{1.0 / e},{acc},0.1,100")
    (out / "metrics.csv").write_text("\n".join(rows) + "\n")
    status = "diverged" if lr >= 50 else "completed"
    (out / "summary.json").write_text(json.dumps({
        "status": status, "epochs_done": epochs, "final_test_acc": accs[-1],
        "best_test_acc": max(accs), "best_epoch": accs.index(max(accs)) + 1, "wall_time_s": 0.1}))
    (marks / f"{out.name}.{os.getpid()}.end").write_text(str(time.time()))
    sys.exit(1 if status == "diverged" else 0)  # as `tvlars train` does
    """
)


def fake_parser(command: str = "train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"tvlars {command}")
    p.add_argument("--config")
    p.add_argument("--out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--dataset", choices=["digits", "synthetic", "cifar10"], default="digits")
    p.add_argument("--optimizer", choices=["lars", "lamb", "tvlars", "sgd"], default="lars")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--schedule", default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true")
    return p


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fake tvlars: its script, a marks folder, the launcher prefix and a fake parser."""
    script = tmp_path / "fake_tvlars.py"
    script.write_text(FAKE)
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("FAKE_MARKS", str(marks))
    for var in ("FAKE_FAIL", "FAKE_KILL", "FAKE_HANG", "FAKE_SLEEP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(launch.LAUNCHER_ENV, f"{sys.executable} {script}")
    monkeypatch.setattr(sweep, "command_parser", lambda command: fake_parser(command))
    return {"script": script, "marks": marks, "tmp": tmp_path}


def tvlars_sweep(argv):
    """``tvlars sweep ARGV`` as tvlars.cli.main runs it, without importing the other commands."""
    from tvlars import cli

    parser = cli._Parser(prog="tvlars sweep")
    sweep.add_arguments(parser)
    return cli.exit_status(lambda: sweep.run(parser.parse_args(argv)))


def write_grid(tmp: Path, data: dict, name: str = "g.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def starts(marks: Path, name: str) -> int:
    return len(list(marks.glob(f"{name}.*.start")))


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


SMALL = {
    "command": "train",
    "base": {"dataset": "digits", "epochs": 3},
    "grid": {"optimizer": ["lars", "lamb"], "lr": [1, 2]},
}


# ------------------------------------------------------------------ expansion and names


def test_product_union_and_linked_axes(tmp_path):
    grid = grid_language.load_grid(write_grid(tmp_path, {
        "command": "train",
        "base": {"dataset": "digits", "epochs": 5, "lr": 0.5},
        "grid": [
            {"optimizer": ["lars", "lamb"],
             "warmup": [{"warmup_epochs": 2, "schedule": "warmup-cosine"}, {"warmup_epochs": 0, "schedule": "poly"}],
             "size": [{"batch_size": 16, "lr": [1, 2]}, {"batch_size": 32, "lr": [3]}],
             "seed": [0, 1]},
            {"optimizer": "tvlars", "lam": "1e-4", "size": [{"batch_size": 16, "lr": [1, 2]}], "seed": [0, 1]},
        ],
    }))
    runs = grid_language.expand_grid(grid, parser=fake_parser())
    assert len(runs) == 2 * 2 * 3 * 2 + 2 * 2
    first = runs[0]
    assert first.name == "optimizer-lars_warmup_epochs-2_schedule-warmup-cosine_batch_size-16_lr-1_seed-0"
    assert first.flags == {"dataset": "digits", "epochs": 5, "lr": 1.0, "optimizer": "lars",
                           "warmup_epochs": 2, "schedule": "warmup-cosine", "batch_size": 16, "seed": 0}
    tv = [r for r in runs if r.flags["optimizer"] == "tvlars"]
    assert tv[0].name == "optimizer-tvlars_batch_size-16_lr-1_seed-0_lam-0.0001"
    assert tv[0].flags["lam"] == pytest.approx(1e-4) and isinstance(tv[0].flags["lam"], float)
    assert "warmup_epochs" not in tv[0].flags
    assert len({r.name for r in runs}) == len(runs)
    # grid values override base; ints from YAML floats; names are stable across calls
    assert [r.name for r in grid_language.expand_grid(grid, parser=fake_parser())] == [r.name for r in runs]


def test_duplicates_run_once_and_names_are_safe(tmp_path):
    grid = grid_language.load_grid(write_grid(tmp_path, {
        "command": "train",
        "grid": [{"optimizer": ["lars"], "schedule": ["a/b c"]}, {"optimizer": ["lars"], "schedule": ["a/b c"]}],
    }))
    runs = grid_language.expand_grid(grid, parser=fake_parser())
    assert [r.name for r in runs] == ["optimizer-lars_schedule-a-b-c"]
    assert grid_language.format_value(1.0) == "1" and grid_language.format_value(1e-5) == "1e-05"
    assert grid_language.format_value(True) == "true" and grid_language.format_value([1, 2]) == "1+2"
    long = grid_language.run_name({"schedule": "x" * 400}, ["schedule"])
    assert len(long) <= grid_language.MAX_NAME


@pytest.mark.parametrize("data, message", [
    ({"command": "fit", "grid": {"lr": [1]}}, "command must be one of"),
    ({"command": "train"}, "grid: is missing"),
    ({"command": "train", "grid": [1, 2]}, "must be a mapping"),
    ({"command": "train", "grid": "lr"}, "grid must be a mapping"),
    ({"command": "train", "grid": []}, "grid must be a mapping"),
    ({"command": "train", "grid": {"lr": []}}, "empty list"),
    ({"command": "train", "grid": {"lr": {"a": 1}}}, "not a mapping"),
    ({"command": "train", "grid": {"learning_rate": [1]}}, "unknown flag 'learning_rate'"),
    ({"command": "train", "base": {"colour": 1}, "grid": {"lr": [1]}}, "unknown flag 'colour'"),
    ({"command": "train", "grid": {"out": ["x"]}}, "set by the sweep"),
    ({"command": "train", "grid": {"optimizer": ["adam"]}}, "must be one of"),
    ({"command": "train", "grid": {"batch_size": ["big"]}}, "takes an integer"),
    ({"command": "train", "grid": {"batch_size": [1.5]}}, "takes an integer"),
    ({"command": "train", "grid": {"channels_last": ["yes"]}}, "true or false"),
    ({"command": "train", "grid": {"lr": [1]}, "colour": 1}, "unknown key 'colour'"),
    ({"command": "train", "base": [1], "grid": {"lr": [1]}}, "base must map"),
    ({"command": "train", "workers": 0, "grid": {"lr": [1]}}, "workers must be a positive integer"),
])
def test_grid_validation_errors(tmp_path, data, message):
    path = write_grid(tmp_path, data)
    with pytest.raises(UserError, match=message) as err:
        grid_language.expand_grid(grid_language.load_grid(path), parser=fake_parser())
    assert "\n" not in str(err.value)


def test_cli_errors_are_one_line(env, capsys):
    path = write_grid(env["tmp"], {"command": "train", "grid": {"lr": [], "seed": [0]}})
    assert tvlars_sweep([str(path), "--out", str(env["tmp"] / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty list" in err[0]
    assert tvlars_sweep([str(env["tmp"] / "nope.yaml")]) == 2
    assert "grid file not found" in capsys.readouterr().err
    path = write_grid(env["tmp"], SMALL, "ok.yaml")
    assert tvlars_sweep([str(path), "--devices", "gpu0"]) == 2
    assert tvlars_sweep([str(path), "--workers", "0"]) == 2


def test_real_parser_validation_when_trainer_exists(tmp_path):
    pytest.importorskip("tvlars.harness.supervised.train")
    grid = grid_language.load_grid(write_grid(tmp_path, {"command": "train", "grid": {"no_such_flag": [1]}}))
    with pytest.raises(UserError, match="unknown flag 'no_such_flag'"):
        sweep.plan(grid)


def test_a_run_its_command_would_refuse_is_refused_before_any_starts(tmp_path, capsys):
    """A flag the run's optimizer does not take fails the whole sweep up front, in one line
    naming the grid and the run, not when that run's turn comes."""
    pytest.importorskip("tvlars.harness.supervised.train")
    path = write_grid(tmp_path, {"command": "train", "base": {"dataset": "digits", "epochs": 1},
                                 "grid": [{"optimizer": "lars", "lr": 1},
                                          {"optimizer": "tvlars", "trust_form": "separate"}]})
    out = tmp_path / "out"
    assert tvlars_sweep([str(path), "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optimizer-tvlars" in err[0] and "--trust-form applies to lars" in err[0]
    assert tvlars_sweep([str(path), "--out", str(out)]) == 2
    assert not out.exists()


def test_shipped_grid_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(grid_language.find_grid("quickstart")).resolve() == (GRIDS / "quickstart.yaml").resolve()
    assert grid_language.load_grid("digits.yaml").name == "digits"
    with pytest.raises(UserError, match="grid file not found: nothing"):
        grid_language.find_grid("nothing")


def test_parse_devices():
    assert sweep.parse_devices("cuda:0, cuda:1,2") == ["0", "1", "2"]
    assert sweep.parse_devices(None) == []
    with pytest.raises(UserError):
        sweep.parse_devices("cpu")


# ------------------------------------------------------------------ running


def do_sweep(env, data, out, **kw):
    grid = grid_language.load_grid(write_grid(env["tmp"], data))
    runs = sweep.plan(grid)
    return sweep.run_sweep(grid, runs, out, log=lambda m: None, **kw), runs


def test_sweep_runs_everything_and_writes_index(env):
    out = env["tmp"] / "sweep"
    result, runs = do_sweep(env, SMALL, out)
    assert sorted(result.completed) == sorted(r.name for r in runs) and not result.failed
    for r in runs:
        d = out / r.name
        assert yaml.safe_load((d / "sweep-run.yaml").read_text()) == r.flags
        assert json.loads((d / "summary.json").read_text())["status"] == "completed"
        log = (d / "log.txt").read_text()
        assert "fake train" in log and "--resume" in log and "fresh" in log
    index = json.loads((out / "sweep.json").read_text())
    assert {r["name"]: r["status"] for r in index["runs"]} == {r.name: "completed" for r in runs}
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("name,status,returncode,attempts,wall_time_s,device,optimizer,lr")
    assert len(rows) == 1 + len(runs)
    assert (out / "grid.yaml").is_file() and not (out / ".sweep.lock").exists()
    # nothing left: a second sweep starts nothing
    result, _ = do_sweep(env, SMALL, out)
    assert len(result.skipped) == len(runs) and not result.completed
    assert all(starts(env["marks"], r.name) == 1 for r in runs)


def test_failed_and_killed_runs_then_restart_runs_only_those(env, monkeypatch, capsys):
    out = env["tmp"] / "sweep"
    monkeypatch.setenv("FAKE_FAIL", "lamb_lr-1")
    monkeypatch.setenv("FAKE_KILL", "lamb_lr-2")
    result, runs = do_sweep(env, SMALL, out)
    failed = sorted(result.failed)
    assert failed == ["optimizer-lamb_lr-1", "optimizer-lamb_lr-2"]
    assert sorted(result.completed) == ["optimizer-lars_lr-1", "optimizer-lars_lr-2"]
    err = capsys.readouterr().err
    assert "2 run(s) failed" in err and "exit status 3" in err and "exit status -9" in err
    index = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert index["optimizer-lamb_lr-1"]["status"] == "failed" and index["optimizer-lamb_lr-1"]["returncode"] == 3
    assert "optimizer-lamb_lr-1,failed,3,1" in (out / "sweep.csv").read_text()
    kept = {name: snapshot(out / name) for name in result.completed}

    monkeypatch.delenv("FAKE_FAIL")
    monkeypatch.delenv("FAKE_KILL")
    result, _ = do_sweep(env, SMALL, out)
    assert sorted(result.completed) == failed and sorted(result.skipped) == sorted(kept)
    for name, files in kept.items():
        assert snapshot(out / name) == files  # untouched, byte for byte and mtime
        assert starts(env["marks"], name) == 1
    for name in failed:
        assert starts(env["marks"], name) == 2
        log = (out / name / "log.txt").read_text()
        assert "attempt 1" in log and "attempt 2" in log  # the failed attempt's log is kept
        assert "resume" in log.split("attempt 2")[1]      # partial run resumed
    index = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert all(index[n]["status"] == "completed" for n in index)
    assert index["optimizer-lamb_lr-1"]["attempts"] == 2


def test_exit_zero_without_summary_is_a_failure(env, monkeypatch, tmp_path):
    script = tmp_path / "quiet.py"
    script.write_text("import sys\n")
    out = tmp_path / "s"
    grid = grid_language.load_grid(write_grid(tmp_path, {"command": "train", "grid": {"lr": [1]}}))
    result = sweep.run_sweep(grid, sweep.plan(grid), out, launcher=[sys.executable, str(script)],
                             log=lambda m: None)
    assert result.failed == ["lr-1"]
    assert "without a finished summary.json" in json.loads((out / "sweep.json").read_text())["runs"][0]["error"]


def test_diverged_counts_as_finished(env):
    out = env["tmp"] / "sweep"
    data = {"command": "train", "grid": {"lr": [1, 60]}}
    result, _ = do_sweep(env, data, out)
    assert result.diverged == ["lr-60"] and result.completed == ["lr-1"]
    result, _ = do_sweep(env, data, out)
    assert sorted(result.skipped) == ["lr-1", "lr-60"]


def test_workers_run_in_parallel_and_devices_round_robin(env, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "1.0")
    out = env["tmp"] / "sweep"
    result, runs = do_sweep(env, SMALL, out, workers=2, devices=["0", "1"], threads=1)
    assert len(result.completed) == 4
    assert all("threads 1" in (out / r.name / "log.txt").read_text() for r in runs)
    spans = []
    for start in env["marks"].glob("*.start"):
        end = start.with_suffix(".end")
        spans.append((float(start.read_text()), float(end.read_text())))
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert most == 2  # two at a time, never more
    devices = {r.name: (out / r.name / "log.txt").read_text().split("device ")[1].split()[0] for r in runs}
    assert sorted(devices.values()) == ["0", "0", "1", "1"]
    index = {r["name"]: r["device"] for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert index == devices


def test_changed_flags_for_an_existing_folder_are_refused(env):
    out = env["tmp"] / "sweep"
    do_sweep(env, SMALL, out)
    changed = dict(SMALL, base={"dataset": "digits", "epochs": 4})
    with pytest.raises(UserError, match="different flags \\(epochs\\)"):
        do_sweep(env, changed, out)


def test_dry_run_writes_nothing(env, capsys):
    path = write_grid(env["tmp"], SMALL)
    out = env["tmp"] / "dry"
    assert tvlars_sweep([str(path), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "4 runs of tvlars train: 0 finished, 4 to run" in text and "optimizer-lamb_lr-2" in text
    assert not out.exists()


def test_grid_workers_and_threads_are_defaults(env, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "0.5")
    path = write_grid(env["tmp"], dict(SMALL, workers=2, threads=3))
    out = env["tmp"] / "wt"
    assert tvlars_sweep([str(path), "--out", str(out)]) == 0
    logs = [p.read_text() for p in out.glob("*/log.txt")]
    assert len(logs) == 4 and all("threads 3" in text for text in logs)
    assert tvlars_sweep([str(path), "--out", str(env["tmp"] / "wt2"), "--threads", "1"]) == 0
    assert all("threads 1" in p.read_text() for p in (env["tmp"] / "wt2").glob("*/log.txt"))


def test_cli_exit_status_and_report_flag(env, monkeypatch, capsys):
    path = write_grid(env["tmp"], SMALL)
    out = env["tmp"] / "cli"
    monkeypatch.setenv("FAKE_FAIL", "lars_lr-2")
    assert tvlars_sweep([str(path), "--out", str(out)]) == 1
    assert "optimizer-lars_lr-2" in capsys.readouterr().err
    monkeypatch.delenv("FAKE_FAIL")
    assert tvlars_sweep([str(path), "--out", str(out), "--report"]) == 0
    assert (out / "report.md").is_file() and (out / "report.csv").is_file()


INTERRUPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import test_sweep
    from tvlars.study import sweep
    sweep.command_parser = test_sweep.fake_parser
    sys.exit(test_sweep.tvlars_sweep(sys.argv[2:]))
    """
)


def test_interrupted_sweep_restarts_where_it_stopped(env, tmp_path):
    """SIGTERM to the sweep stops its running run; starting again finishes the rest only."""
    driver = tmp_path / "driver.py"
    driver.write_text(INTERRUPT.format(tests=str(Path(__file__).parent)))
    path = write_grid(tmp_path, SMALL)
    out = tmp_path / "int"
    envs = dict(os.environ, FAKE_HANG="lamb_lr-1")
    proc = subprocess.Popen([sys.executable, str(driver), "sweep", str(path), "--out", str(out)], env=envs,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while starts(env["marks"], "optimizer-lamb_lr-1") == 0 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    index = {r["name"]: r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert index["optimizer-lars_lr-1"] == "completed" and index["optimizer-lars_lr-2"] == "completed"
    assert index["optimizer-lamb_lr-1"] == "interrupted" and index["optimizer-lamb_lr-2"] == "pending"
    kept = {n: snapshot(out / n) for n in ("optimizer-lars_lr-1", "optimizer-lars_lr-2")}
    done = subprocess.run([sys.executable, str(driver), "sweep", str(path), "--out", str(out)],
                          env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "2 already finished, 2 to run" in done.stdout
    for name, files in kept.items():
        assert snapshot(out / name) == files
    assert starts(env["marks"], "optimizer-lamb_lr-1") == 2 and starts(env["marks"], "optimizer-lamb_lr-2") == 1


# ------------------------------------------------------------------ shipped grids


GRIDS = Path(grid_language.__file__).resolve().parents[1] / "grids"  # package data: in the wheel too


@pytest.mark.parametrize("name", ["paper-cifar10", "paper-tinyimagenet", "paper-barlowtwins-cifar10",
                                  "digits", "quickstart"])
def test_shipped_grids_expand(name):
    grid = grid_language.load_grid(GRIDS / f"{name}.yaml")
    module = {"train": "tvlars.harness.supervised.train", "ssl": "tvlars.harness.ssl.pretrain"}[grid.command]
    try:
        __import__(module)
        runs = sweep.plan(grid)  # checked against the real command's flags
    except ImportError:  # the command is not written yet: check the structure only
        runs = grid_language.expand_grid(grid, parser=_permissive_parser(grid))
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    if name.startswith("paper-"):
        from tvlars.study.paper import LEARNING_RATES

        for r in runs:
            assert r.flags["lr"] in LEARNING_RATES[r.flags["batch_size"]]
        per_opt = {}
        for r in runs:
            per_opt.setdefault((r.flags["optimizer"], r.flags.get("warmup_epochs", 0)), []).append(r)
        if grid.command == "train":
            assert sorted(per_opt) == [("lamb", 0), ("lamb", 20), ("lars", 0), ("lars", 20), ("tvlars", 0)]
            assert all(len(v) == 18 for v in per_opt.values())


def _permissive_parser(grid):
    p = argparse.ArgumentParser()
    for flag in ("config", "out"):
        p.add_argument(f"--{flag}")
    p.add_argument("--resume", action="store_true")
    keys = set(grid.base)
    stack = list(grid.entries)
    while stack:
        entry = stack.pop()
        for k, v in entry.items():
            if grid_language.is_linked(v):
                stack.extend(v)
            else:
                keys.add(k)
    for k in sorted(keys):
        p.add_argument("--" + str(k).replace("_", "-"), dest=str(k).replace("-", "_"))
    return p


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_end_to_end_real_train(tmp_path):
    """The real `tvlars train` on tiny synthetic data, through the CLI, twice."""
    from tvlars.cli import build_parser

    try:
        build_parser()
    except ImportError as err:  # `python -m tvlars` needs every command module
        pytest.skip(f"the tvlars command line is not complete yet: {err}")
    path = write_grid(tmp_path, {
        "command": "train",
        "base": {"dataset": "synthetic", "model": "mlp", "epochs": 2, "batch_size": 32, "device": "cpu",
                 "synthetic_train": 256, "synthetic_test": 128, "synthetic_image_size": 8},
        # LARS at lr 100 blows up without a non-finite value: training loss ~100 at chance (10 classes)
        "grid": [{"optimizer": ["lars", "tvlars"], "lr": [1.0]}, {"optimizer": ["lars"], "lr": [100.0]}],
    })
    out = tmp_path / "e2e"
    env = {k: v for k, v in os.environ.items() if k != launch.LAUNCHER_ENV}
    cmd = [sys.executable, "-m", "tvlars", "sweep", str(path), "--out", str(out), "--workers", "2", "--report"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("optimizer-lars_lr-1", "optimizer-tvlars_lr-1", "optimizer-lars_lr-100"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["status"] == "completed"  # the run's own word stays
        assert (out / name / "metrics.csv").is_file()
    assert "3 completed (1 with an exploded loss)" in done.stdout
    report = (out / "report.md").read_text()
    assert "3 finished (0 diverged, 1 exploded)" in report and " ‡ |" in report
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "3 already finished, 0 to run" in again.stdout


def test_help_names_every_shipped_grid():
    import argparse

    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for grid in GRIDS.glob("*.yaml"):
        assert grid.stem in text.replace("- ", "-")
