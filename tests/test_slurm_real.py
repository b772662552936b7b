"""tvlars sweep --launcher slurm against a real SLURM scheduler.

They run where ``sinfo`` answers and are skipped elsewhere (CI starts no scheduler): on this
machine, ``sudo scripts/slurm-local.sh start`` (``--accounting`` for slurmdbd) stands up a
one-node SLURM from Debian's packages. Start it with ``REQUEUE_DELAY_S=20 MIN_JOB_AGE_S=30``
for these tests to wait less: a requeued job then waits 20 s instead of SLURM's 120 s, and
squeue forgets an ended job after 30 s instead of 300 s (the test of that case is skipped
above 120 s). Runs are tiny digits/mlp ones; the slowest test waits for one time limit
(3 minutes, the shortest accepted). Jobs run this interpreter, so the cluster's node must
be this machine (or see these paths and this venv).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweep import tvlars_sweep, write_grid

from tvlars import runfolder
from tvlars.runfolder import run_state
from tvlars.study import launch, sweep


def _scheduler_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        answer = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return answer.returncode == 0 and any(s.strip("*~#") in ("idle", "mix", "alloc") for s in answer.stdout.split())


SCHEDULER = _scheduler_answers()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(not SCHEDULER, reason="no SLURM scheduler answers here (sinfo)")]

BASE = {"dataset": "digits", "model": "mlp", "batch_size": 128, "lr": 1.0, "seed": 0, "device": "cpu",
        "layer_stats_every": 0}
TIMING = ("epoch_time", "images_per_sec")


def slurm_config(key: str) -> str:
    text = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(rf"^{key}\s*=\s*(\S+)", text, re.M)
    return match.group(1) if match else ""


ACCOUNTING = SCHEDULER and slurm_config("AccountingStorageType") != "accounting_storage/none"


@pytest.fixture(autouse=True)
def real_tvlars(monkeypatch):
    """Jobs run the real `tvlars train` (no launcher stand-in), one thread each."""
    monkeypatch.delenv(launch.LAUNCHER_ENV, raising=False)


@pytest.fixture
def jobs():
    """The SLURM jobs a test submitted (their array ids), cancelled at its end."""
    submitted: list[str] = []
    yield submitted
    if submitted:
        subprocess.run(["scancel", *submitted], capture_output=True, timeout=30)


def submit(path: Path, out: Path, capsys, jobs: list[str], *flags: str) -> str:
    capsys.readouterr()
    assert tvlars_sweep([str(path), "--out", str(out), "--launcher", "slurm", "--threads", "1", *flags]) == 0
    captured = capsys.readouterr()
    assert captured.err == "", captured.err  # nothing from sacct, submitit or SLURM
    for match in re.finditer(r"SLURM job(?: array)? (\d+)", captured.out):
        jobs.append(match.group(1))
    return captured.out


def status(path: Path, out: Path, capsys) -> tuple[dict[str, str], str]:
    capsys.readouterr()
    assert tvlars_sweep([str(path), "--out", str(out), "--status"]) == 0
    captured = capsys.readouterr()
    lines = {line.split()[1]: line for line in captured.out.splitlines()
             if line.split()[1:2] and not line.startswith("sweep ")}
    return lines, captured.err


def wait_for(what: str, condition, timeout_s: float, every_s: float = 1.0, sweep_of: tuple | None = None):
    """Poll ``condition`` until it holds; ``sweep_of`` (path, out, capsys): fail at once
    when --status says a run of that sweep failed, rather than wait on."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if sweep_of is not None:
            failed = [line for line in status(*sweep_of)[0].values() if line.startswith("failed")]
            if failed:
                pytest.fail(f"while waiting for {what}: {failed[0]}")
        time.sleep(every_s)
    pytest.fail(f"waited {timeout_s:.0f} s for {what}")


def in_queue(job: str) -> bool:
    answer = subprocess.run(["squeue", "--noheader", "--array", f"--jobs={job}", "--format=%T"],
                            capture_output=True, text=True, timeout=30)
    return any(state in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED")
               for state in answer.stdout.split())


def metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING}
            for row in runfolder.read_metrics(run_dir / runfolder.METRICS)]


def reference(run_dir: Path, out: Path) -> subprocess.Popen:
    """The same run, uninterrupted, outside SLURM."""
    return subprocess.Popen([sys.executable, "-m", "tvlars", "train", "--config", str(run_dir / runfolder.SWEEP_FLAGS),
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def log_text(run_dir: Path) -> str:
    path = run_dir / runfolder.SWEEP_LOG
    return path.read_text() if path.exists() else ""


def starts(run_dir: Path) -> list[str]:
    """The sections of the run's log.txt: one per start of its process, and its notes."""
    return log_text(run_dir).split("=== tvlars sweep ")[1:]


def test_a_grid_is_submitted_finishes_is_reported_and_is_not_submitted_again(tmp_path, capsys, jobs):
    path = write_grid(tmp_path, {"command": "train", "base": dict(BASE, epochs=2),
                                 "grid": {"optimizer": ["lars", "tvlars"]}})
    out = tmp_path / "sweep"
    text = submit(path, out, capsys, jobs, "--time-limit", "5")
    assert "2 runs, 0 finished, 0 already queued or running, 2 submitted" in text
    assert {r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]} == {"submitted"}
    runs = [out / "optimizer-lars", out / "optimizer-tvlars"]
    wait_for("both runs to complete", lambda: all(run_state(r) == "completed" for r in runs), 600,
             sweep_of=(path, out, capsys))
    wait_for("the jobs to leave the queue", lambda: not in_queue(jobs[0]), 120)

    lines, err = status(path, out, capsys)
    assert lines["optimizer-lars"].startswith("completed   optimizer-lars ") and err == ""
    assert {r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]} == {"completed"}
    from tvlars.study import report

    table = report.write_report(out)
    assert "LARS" in table and "TVLARS" in table

    scripts = sorted((out / "submitit").glob("*_submission.sh"))
    assert "2 finished, 0 already queued or running, 0 submitted" in submit(path, out, capsys, jobs, "--time-limit", "5")
    assert sorted((out / "submitit").glob("*_submission.sh")) == scripts


def test_a_partition_slurm_does_not_know_is_one_line_and_leaves_nothing(tmp_path, capsys):
    path = write_grid(tmp_path, {"command": "train", "base": dict(BASE, epochs=2), "grid": {"optimizer": ["lars"]}})
    out = tmp_path / "sweep"
    assert tvlars_sweep([str(path), "--out", str(out), "--launcher", "slurm", "--time-limit", "5",
                         "--slurm-partition", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SLURM refused the job array, nothing was submitted: sbatch: error:" in err[0], err
    assert "partition" in err[0].lower() and not out.exists()


def test_a_time_limit_requeues_the_run_which_resumes_exactly(tmp_path, capsys, jobs):
    """A run longer than its 3-minute limit: it runs until 30 s before the limit (not only
    to SLURM's signal, 2 minutes earlier), is requeued, shows as queued (not failed) while
    it waits, is not submitted again meanwhile, and resumes with the metrics of an
    uninterrupted run."""
    path = write_grid(tmp_path, {"command": "train", "base": dict(BASE, epochs=5000), "grid": {"optimizer": ["lars"]}})
    out = tmp_path / "sweep"
    submit(path, out, capsys, jobs, "--time-limit", "3")
    run_dir = out / "optimizer-lars"
    uninterrupted = reference(run_dir, tmp_path / "reference")
    try:
        wait_for("the time limit", lambda: "stopped by the job's time limit" in log_text(run_dir),
                 400, every_s=5, sweep_of=(path, out, capsys))
        first = starts(run_dir)
        began = time.mktime(time.strptime(first[0][:20], "%Y-%m-%dT%H:%M:%SZ"))
        stopped = time.mktime(time.strptime(first[1][:20], "%Y-%m-%dT%H:%M:%SZ"))
        assert stopped - began >= 110, first[1][:80]  # the signal comes 2-2.5 minutes before the 3-minute limit

        def waiting():
            lines, err = status(path, out, capsys)
            assert not lines["optimizer-lars"].startswith("failed"), lines
            return "queued" in lines["optimizer-lars"] or len(starts(run_dir)) > 2

        wait_for("the requeued job to show as queued or start again", waiting, 120, every_s=2)
        if len(starts(run_dir)) == 2:  # still waiting for its requeue: not submitted again
            assert "1 already queued or running, 0 submitted" in submit(path, out, capsys, jobs, "--time-limit", "3")
        stopped_at = len(metrics(run_dir))
        wait_for("the run to resume and go 3 epochs on", lambda: len(metrics(run_dir)) >= stopped_at + 3, 300,
                 sweep_of=(path, out, capsys))
        resumed = starts(run_dir)[-1]
        assert "slurm job" in resumed and f"epoch {stopped_at + 1}/5000" in resumed
        assert "epoch 1/5000" not in resumed
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)
        done = len(metrics(run_dir))
        wait_for("the uninterrupted run", lambda: len(metrics(tmp_path / "reference")) >= done, 600, every_s=2)
    finally:
        uninterrupted.kill()
        uninterrupted.wait()
    assert metrics(run_dir)[:done] == metrics(tmp_path / "reference")[:done]


def test_a_cancelled_run_is_failed_and_the_same_sweep_resumes_it(tmp_path, capsys, jobs):
    path = write_grid(tmp_path, {"command": "train", "base": dict(BASE, epochs=150), "grid": {"optimizer": ["lars"]}})
    out = tmp_path / "sweep"
    submit(path, out, capsys, jobs, "--time-limit", "10")
    run_dir = out / "optimizer-lars"
    uninterrupted = reference(run_dir, tmp_path / "reference")
    try:
        wait_for("10 epochs", lambda: len(metrics(run_dir)) >= 10, 300, sweep_of=(path, out, capsys))
        subprocess.run(["scancel", jobs[0]], check=True, timeout=30)
        wait_for("the run to show as failed", lambda: status(path, out, capsys)[0]["optimizer-lars"].startswith("failed"),
                 120, every_s=2)
        lines, _ = status(path, out, capsys)
        assert f"slurm job {jobs[0]}" in lines["optimizer-lars"] and str(run_dir / "log.txt") in lines["optimizer-lars"]
        cancelled_at = len(metrics(run_dir))

        assert "0 already queued or running, 1 submitted" in submit(path, out, capsys, jobs, "--time-limit", "10")
        wait_for("the resumed run to complete", lambda: run_state(run_dir) == "completed", 600, every_s=2,
                 sweep_of=(path, out, capsys))
        assert uninterrupted.wait(timeout=600) == 0
    finally:
        uninterrupted.kill()
        uninterrupted.wait()
    resumed = starts(run_dir)[-1]
    assert f"slurm job {jobs[1]}" in resumed and "epoch 1/150" not in resumed
    assert f"epoch {cancelled_at + 1}/150" in resumed or f"epoch {cancelled_at}/150" in resumed
    assert metrics(run_dir) == metrics(tmp_path / "reference")


def test_status_while_jobs_wait_and_run(tmp_path, capsys, jobs):
    """With or without accounting: a pending task is queued, not failed, and the sweep
    submitted again submits nothing."""
    path = write_grid(tmp_path, {"command": "train", "base": dict(BASE, epochs=400),
                                 "grid": {"optimizer": ["lars", "tvlars"]}})
    out = tmp_path / "sweep"
    submit(path, out, capsys, jobs, "--time-limit", "10", "--array-parallelism", "1")

    def one_running():
        lines, err = status(path, out, capsys)
        return (lines, err) if any(line.startswith("running") for line in lines.values()) else None

    lines, err = wait_for("one run to start", one_running, 120)
    assert sorted(line.split()[0] for line in lines.values()) == ["queued", "running"], lines
    queued = next(line for line in lines.values() if line.startswith("queued"))
    assert "(pending)" in queued and err == ""
    assert "0 finished, 2 already queued or running, 0 submitted" in submit(path, out, capsys, jobs, "--time-limit", "10")


@pytest.mark.skipif(SCHEDULER and int(slurm_config("MinJobAge") or 300) > 120,
                    reason="squeue keeps ended jobs over 2 minutes here (MinJobAge): start SLURM with MIN_JOB_AGE_S=30")
def test_status_of_a_job_gone_from_the_queue(tmp_path, capsys, jobs):
    """Once squeue has forgotten a cancelled job: with accounting, sacct says CANCELLED;
    without, the run shows as ended with its job log's last line, and one line says what
    cannot be known."""
    path = write_grid(tmp_path, {"command": "train", "base": dict(BASE, epochs=400), "grid": {"optimizer": ["lars"]}})
    out = tmp_path / "sweep"
    submit(path, out, capsys, jobs, "--time-limit", "10")
    run_dir = out / "optimizer-lars"
    wait_for("an epoch", lambda: len(metrics(run_dir)) >= 1, 300, sweep_of=(path, out, capsys))
    subprocess.run(["scancel", jobs[0]], check=True, timeout=30)
    age = int(slurm_config("MinJobAge") or 300)
    wait_for("squeue to forget the job", lambda: subprocess.run(
        ["squeue", "--noheader", f"--jobs={jobs[0]}"], capture_output=True, text=True).stdout.strip() == "",
        age + 90, every_s=5)
    lines, err = status(path, out, capsys)
    line = lines["optimizer-lars"]
    if ACCOUNTING:
        assert line.startswith(f"failed      optimizer-lars  slurm job {jobs[0]} CANCELLED: ") and err == "", (line, err)
    else:
        assert line.startswith(f"failed      optimizer-lars  slurm job {jobs[0]} ended: "), line
        assert err == f"tvlars sweep: {sweep.NO_ACCOUNTING}\n"
    assert str(run_dir / "log.txt") in line
