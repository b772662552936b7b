"""tvlars sweep --launcher local|slurm (submitit), --status, and one owner per run folder.

The local launcher runs real submitit jobs on this machine: the real `tvlars train` on a
tiny digits grid, a job stopped by its time-limit signal and requeued, failures that are
not requeued. CI starts no SLURM, so here the SLURM path runs submitit's real
SlurmExecutor against stand-in ``srun``/``sbatch``/``squeue``/``sacct``/``scontrol``
scripts on PATH (they record what they are given and answer as SLURM does, with or without
accounting), down to the sbatch script submitit writes and the pickled job, which the
tests then run as SLURM would run it, signals included. tests/test_slurm_real.py runs the
same against a real scheduler where one answers.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
from test_sweep import env, starts, tvlars_sweep, write_grid  # noqa: F401 (env: a fixture)

from tvlars import runfolder
from tvlars.runfolder import RunLock, run_holder
from tvlars.study import cluster, launch, sweep
from tvlars.study.grid import load_grid
from tvlars.study.launch import RunFailed, RunJob, default_launcher, run_argv

DIGITS = {
    "command": "train",
    "base": {"dataset": "digits", "model": "mlp", "batch_size": 14, "epochs": 12, "lr": 1.0, "seed": 0,
             "device": "cpu", "layer_stats_every": 0},
}
TIMING = ("epoch_time", "images_per_sec")


@pytest.fixture(scope="module")
def digits_sweep(tmp_path_factory):
    """A two-run digits grid run to completion by submitit's local executor, through the CLI."""
    tmp = tmp_path_factory.mktemp("digits")
    path = write_grid(tmp, dict(DIGITS, grid={"optimizer": ["lars", "tvlars"]}))
    out = tmp / "sweep"
    status = tvlars_sweep([str(path), "--out", str(out), "--launcher", "local", "--workers", "2", "--threads", "1"])
    return path, out, status


def metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in runfolder.read_metrics(run_dir / "metrics.csv")]


def test_local_launcher_runs_a_digits_grid(digits_sweep, capsys):
    path, out, status = digits_sweep
    assert status == 0
    for name in ("optimizer-lars", "optimizer-tvlars"):
        assert json.loads((out / name / "summary.json").read_text())["status"] == "completed"
        assert len(metrics(out / name)) == 12
        assert "local job" in (out / name / "log.txt").read_text()
        assert run_holder(out / name) is None  # released
    records = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert {r["launcher"] for r in records.values()} == {"local"}
    jobs = {r["job_id"] for r in records.values()}
    assert all((out / "submitit" / f"{job}_0_log.err").is_file() for job in jobs)

    capsys.readouterr()
    assert tvlars_sweep([str(path), "--out", str(out), "--status"]) == 0
    text = capsys.readouterr().out
    assert "completed   optimizer-lars " in text and "sweep " in text and "2 completed" in text

    from tvlars.study import report  # the report reads the folder as it reads any sweep's

    table = report.write_report(out)
    assert "LARS" in table and "TVLARS" in table and (out / "report.csv").is_file()

    # submitted again: nothing runs twice
    submitted = sorted((out / "submitit").glob("*_submitted.pkl"))
    assert tvlars_sweep([str(path), "--out", str(out), "--launcher", "local"]) == 0
    assert "2 already finished, 0 to run" in capsys.readouterr().out
    assert sorted((out / "submitit").glob("*_submitted.pkl")) == submitted


def test_time_limit_requeues_and_the_run_resumes_to_the_same_metrics(digits_sweep, tmp_path):
    """The local executor's time-limit signal (SIGUSR2, as SLURM sends it before the limit)
    stops the run after an epoch; the job is requeued and --resume finishes the run with
    the metrics of the uninterrupted run."""
    grid = load_grid(write_grid(tmp_path, dict(DIGITS, grid={"optimizer": ["lars"]})))
    runs = sweep.plan(grid)
    out = tmp_path / "sweep"
    executor = cluster.local_executor(out.absolute() / cluster.SUBMITIT_FOLDER, time_limit_min=2, max_requeues=1)
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        done=sweep.run_sweep(grid, runs, out, threads=1, executor=executor, log=lambda m: None)))
    worker.start()
    run_dir = out / "optimizer-lars"
    deadline = time.time() + 120
    while len(runfolder.read_metrics(run_dir / "metrics.csv")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    job_process = run_holder(run_dir)["pids"][0]  # the job's own process: where submitit handles the signal
    os.kill(job_process, signal.SIGUSR2)
    worker.join(timeout=180)
    assert result["done"].completed == ["optimizer-lars"]

    log = (run_dir / "log.txt").read_text()
    first, second = log.split("stopped by the job's time limit or a preemption")
    assert "epoch 1/12" in first and "epoch 12/12" not in first
    assert "local job" in second and "epoch 1/12" not in second and "epoch 12/12" in second  # resumed
    [job_log] = (out / "submitit").glob("*_0_log.out")  # submitit's own record of the requeue
    assert "(0 remaining timeouts)" in job_log.read_text()
    reference = digits_sweep[1] / "optimizer-lars"
    assert metrics(run_dir) == metrics(reference)
    for key in ("final_test_acc", "best_test_acc", "best_epoch"):
        assert runfolder.read_summary(run_dir)[key] == runfolder.read_summary(reference)[key]


def test_failures_are_not_requeued_and_status_says_why(env, monkeypatch, capsys):
    """A run failing for its own reasons ends its job at once; a run cut by its time limit
    more often than --max-requeues allows ends too; --status gives each one's last line."""
    monkeypatch.setenv("FAKE_FAIL", "lr-1")
    monkeypatch.setenv("FAKE_HANG", "lr-2")
    path = write_grid(env["tmp"], {"command": "train", "base": {"epochs": 2}, "grid": {"lr": [1, 2]}})
    out = env["tmp"] / "sweep"
    args = [str(path), "--out", str(out), "--launcher", "local", "--workers", "2", "--time-limit", "2",
            "--max-requeues", "0"]
    driver = threading.Thread(target=lambda: tvlars_sweep(args))
    driver.start()
    deadline = time.time() + 60
    while starts(env["marks"], "lr-2") == 0 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(run_holder(out / "lr-2")["pids"][0], signal.SIGUSR2)
    driver.join(timeout=60)
    assert starts(env["marks"], "lr-1") == 1 and starts(env["marks"], "lr-2") == 1  # neither requeued
    capsys.readouterr()
    assert tvlars_sweep([str(path), "--out", str(out), "--status"]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.split()[1:2]}
    assert lines["lr-1"].startswith("failed") and "failing on purpose" in lines["lr-1"]
    assert lines["lr-2"].startswith("failed") and "timed out 1 time; run the sweep again to continue" in lines["lr-2"]


# ------------------------------------------------------------------ one owner per run folder


def test_run_lock_one_holder_and_stale_locks(tmp_path):
    first, second = RunLock(tmp_path, "slurm job 7_1"), RunLock(tmp_path, "tvlars sweep (pid 1)")
    assert first.acquire() is None
    assert second.acquire()["owner"] == "slurm job 7_1"
    assert run_holder(tmp_path)["owner"] == "slurm job 7_1"
    second.release()  # not its lock: nothing happens
    assert run_holder(tmp_path)["owner"] == "slurm job 7_1"
    first.release()
    assert run_holder(tmp_path) is None and second.acquire() is None
    second.release()

    lock = tmp_path / runfolder.RUN_LOCK
    gone = __import__("subprocess").Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({"owner": "a dead sweep", "host": __import__("socket").gethostname(),
                                "pids": [gone.pid], "token": "t1"}))
    assert run_holder(tmp_path) is None  # its host is this one and its process is gone
    lock.write_text(json.dumps({"owner": "slurm job 8_0", "host": "node-elsewhere", "pids": [1], "token": "t2"}))
    assert run_holder(tmp_path)["owner"] == "slurm job 8_0"  # fresh: alive as far as a shared disk tells
    assert RunLock(tmp_path, "me").acquire()["owner"] == "slurm job 8_0"
    old = time.time() - runfolder.LOCK_STALE_S - 1
    os.utime(lock, (old, old))  # no heartbeat for LOCK_STALE_S: the job died
    taker = RunLock(tmp_path, "me")
    assert taker.acquire() is None and run_holder(tmp_path)["owner"] == "me"
    taker.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_every_launcher_leaves_a_held_run_alone(env, capsys):
    """A run a SLURM job holds is left to it by a local sweep and by a second job."""
    path = write_grid(env["tmp"], {"command": "train", "grid": {"lr": [1, 2]}})
    out = env["tmp"] / "sweep"
    (out / "lr-2").mkdir(parents=True)
    held = RunLock(out / "lr-2", "slurm job 4242_1")
    assert held.acquire() is None
    try:
        assert tvlars_sweep([str(path), "--out", str(out)]) == 0
        assert "left to   lr-2: slurm job 4242_1 on" in capsys.readouterr().out
        assert starts(env["marks"], "lr-1") == 1 and starts(env["marks"], "lr-2") == 0
        assert RunJob("train", out / "lr-2")().startswith("left to slurm job 4242_1")
        assert starts(env["marks"], "lr-2") == 0
        assert tvlars_sweep([str(path), "--out", str(out), "--status"]) == 0
        assert "running     lr-2  slurm job 4242_1 on" in capsys.readouterr().out
    finally:
        held.release()
    assert tvlars_sweep([str(path), "--out", str(out)]) == 0
    assert starts(env["marks"], "lr-1") == 1 and starts(env["marks"], "lr-2") == 1


def test_a_second_sweep_of_the_same_folder_is_refused(env, capsys):
    path = write_grid(env["tmp"], {"command": "train", "grid": {"lr": [1]}})
    out = env["tmp"] / "sweep"
    out.mkdir()
    with RunLock(out, "tvlars sweep (pid 99)", name=sweep.SWEEP_LOCK):
        assert tvlars_sweep([str(path), "--out", str(out), "--launcher", "local"]) == 2
    assert f"{out} is in use by tvlars sweep (pid 99) on" in capsys.readouterr().err
    assert starts(env["marks"], "lr-1") == 0


# ------------------------------------------------------------------ SLURM, as far as a machine without it goes


SBATCH = """#!/bin/sh
# stands in for sbatch: keeps the script it was given, answers as sbatch does; refuses the
# partition "nope" as sbatch refuses a partition it does not know
if grep -q -- '--partition=nope' "$1"; then
    echo "sbatch: error: invalid partition specified: nope" >&2
    echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
    exit 1
fi
n=$(cat {dir}/next_id)
echo $((n + 1)) > {dir}/next_id
cp "$1" {dir}/sbatch.$n.sh
echo "Submitted batch job $n"
"""
SQUEUE = """#!/bin/sh
# stands in for squeue: a job asking when its time limit falls (--Format=EndTime, with
# SLURM_TIME_FORMAT=%s), or the queue (--format=%i|%T)
case "$*" in *EndTime*) echo $(( $(date +%s) + $(cat {dir}/end_in_s) )); exit 0 ;; esac
if [ -f {dir}/down ]; then
    echo "slurm_load_jobs error: Unable to contact slurm controller (connect failure)" >&2
    exit 1
fi
cat {dir}/queue.txt
"""
SACCT = """#!/bin/sh
# stands in for sacct; without sacct.txt it answers as SLURM without slurmdbd does
[ -f {dir}/sacct.txt ] && exec cat {dir}/sacct.txt
echo "Slurm accounting storage is disabled" >&2
exit 1
"""
SCONTROL = """#!/bin/sh
echo "$*" >> {dir}/scontrol.log
"""


@pytest.fixture
def slurm(env, monkeypatch):
    """srun, sbatch, squeue, sacct and scontrol stand-ins on PATH; returns a function setting
    what squeue and sacct answer (``accounts=None``: SLURM keeps no accounting)."""
    bin_dir = env["tmp"] / "slurm-bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("squeue", SQUEUE), ("sacct", SACCT), ("scontrol", SCONTROL),
                       ("srun", "#!/bin/sh\nexit 1\n")):
        (bin_dir / name).write_text(text.format(dir=shlex.quote(str(bin_dir))))
        (bin_dir / name).chmod(0o755)
    (bin_dir / "next_id").write_text("4242\n")
    (bin_dir / "end_in_s").write_text("3600\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def answer(queue: dict[str, str] | None = None, accounts: dict[str, str] | None = {}) -> None:
        (bin_dir / "queue.txt").write_text("".join(f"{job}|{state}\n" for job, state in (queue or {}).items()))
        (bin_dir / "sacct.txt").unlink(missing_ok=True)
        if accounts is not None:
            (bin_dir / "sacct.txt").write_text("".join(f"{job}|{state}\n" for job, state in accounts.items()))

    answer()
    answer.scripts = lambda: sorted(bin_dir.glob("sbatch.*.sh"))
    answer.down = lambda: (bin_dir / "down").write_text("")
    answer.end_in = lambda seconds: (bin_dir / "end_in_s").write_text(f"{seconds}\n")
    answer.scontrol = lambda: (bin_dir / "scontrol.log").read_text() if (bin_dir / "scontrol.log").exists() else ""
    return answer


def _pids(run_dir: Path) -> list[int]:
    return (run_holder(run_dir) or {}).get("pids", [])


def run_as_slurm_would(out: Path, job_id: str, monkeypatch, signal_after_start: str | None = None):
    """The pickled job of a SLURM job (``4242``) or array task (``4242_1``), run in the
    environment SLURM gives it, as submitit's ``_submit`` runs it: with submitit's signal
    handlers in place. ``signal_after_start``: send this process SLURM's time-limit signal
    (USR2) once the run of that name has started."""
    array, _, task = job_id.partition("_")
    folder = out.absolute() / cluster.SUBMITIT_FOLDER
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)}
    with monkeypatch.context() as m:
        for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(folder),
                           "SLURM_JOB_ID": "9" if task else array, "SLURM_ARRAY_JOB_ID": array if task else None,
                           "SLURM_ARRAY_TASK_ID": task or None}.items():
            if value is None:
                m.delenv(key, raising=False)
            else:
                m.setenv(key, value)
        environment = submitit.JobEnvironment()
        delayed = submitit.helpers.DelayedSubmission.load(environment.paths.submitted_pickle)
        if signal_after_start:
            marks, begun = Path(os.environ["FAKE_MARKS"]), starts(Path(os.environ["FAKE_MARKS"]), signal_after_start)

            def send():  # to every process of the job, as SLURM sends it: the job's and its run's
                while starts(marks, signal_after_start) == begun or len(_pids(out / signal_after_start)) < 2:
                    time.sleep(0.05)
                send.at = time.time()
                for pid in _pids(out / signal_after_start):
                    os.kill(pid, signal.SIGUSR2)

            threading.Thread(target=send, daemon=True).start()
        try:
            environment._handle_signals(environment.paths, delayed)
            return delayed.result()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            if signal_after_start:
                run_as_slurm_would.signalled_at = send.at


def test_slurm_job_array_submission_status_and_resubmission(env, slurm, monkeypatch, capsys):
    path = write_grid(env["tmp"], {
        "command": "train", "base": {"epochs": 2}, "grid": {"lr": [1, 2, 3]},
        "slurm": {"partition": "gpu", "gpus_per_node": 4, "cpus_per_task": 32, "time": "1-00:00:00",
                  "additional_parameters": {"account": "lab"}},
    })
    out = env["tmp"] / "sweep"
    argv = [str(path), "--out", str(out), "--launcher", "slurm", "--slurm-partition", "big",
            "--array-parallelism", "2", "--slurm-setup", "source ~/venv/bin/activate",
            "--slurm-option", "mail-type=END"]
    assert tvlars_sweep(argv) == 0
    text = capsys.readouterr().out
    assert "3 submitted" in text and "SLURM job array 4242: 4242_0 .. 4242_2" in text, text
    [script] = slurm.scripts()
    sbatch = script.read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=big", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --time=1440", "#SBATCH --requeue",
                 "#SBATCH --account=lab", "#SBATCH --mail-type=END", "#SBATCH --signal=USR2@90",
                 "#SBATCH --job-name=tvlars-g", "source ~/venv/bin/activate"):
        assert line in sbatch.splitlines(), line
    assert "srun --unbuffered" in sbatch and "-m submitit.core._submit" in sbatch
    assert str(out.absolute() / "submitit") in sbatch

    job = submitit.SlurmJob(out.absolute() / "submitit", "4242_1").submission().function
    assert isinstance(job, RunJob) and job.nproc == 4 and job.env == {"OMP_NUM_THREADS": "8"}
    assert Path(job.run_dir) == (out / "lr-2").absolute()
    monkeypatch.delenv(launch.LAUNCHER_ENV)
    torchrun = run_argv(default_launcher(job.nproc), job.command, Path(job.run_dir))
    assert torchrun[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]
    assert torchrun[6:8] == ["tvlars", "train"] and torchrun[-1] == "--resume"
    monkeypatch.setenv(launch.LAUNCHER_ENV, f"{sys.executable} {env['script']}")
    records = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert {n: (r["status"], r["launcher"], r["job_id"]) for n, r in records.items()} == {
        "lr-1": ("submitted", "slurm", "4242_0"), "lr-2": ("submitted", "slurm", "4242_1"),
        "lr-3": ("submitted", "slurm", "4242_2")}

    # submitted again while SLURM still holds the jobs: nothing is submitted twice
    slurm(queue={"4242_0": "PENDING", "4242_1": "PENDING", "4242_2": "PENDING"})
    assert tvlars_sweep(argv) == 0
    assert "3 already queued or running, 0 submitted" in capsys.readouterr().out
    assert len(slurm.scripts()) == 1

    # the jobs run as SLURM runs them: one completes, one fails, one is still running
    assert run_as_slurm_would(out, "4242_0", monkeypatch) == "completed"
    assert "slurm job 4242_0 on" in (out / "lr-1" / "log.txt").read_text()
    monkeypatch.setenv("FAKE_FAIL", "lr-2")
    with pytest.raises(RunFailed, match="exit status 3: failing on purpose"):
        run_as_slurm_would(out, "4242_1", monkeypatch)
    (out / "submitit" / "4242_1_0_log.err").write_text(  # as submitit and srun leave it
        "submitit ERROR (2026-12-07 13:05:51,019) - Submitted job triggered an exception\n"
        "Traceback (most recent call last):\n  File \"launch.py\", line 215, in __call__\n"
        f"tvlars.study.launch.RunFailed: exit status 3: failing on purpose (see {out / 'lr-2' / 'log.txt'})\n"
        "srun: error: vm: task 0: Exited with exit code 1\n")
    slurm(queue={"4242_2": "RUNNING"}, accounts={"4242_0": "COMPLETED", "4242_1": "FAILED"})
    assert tvlars_sweep([str(path), "--out", str(out), "--status"]) == 0
    captured = capsys.readouterr()
    lines = {line.split()[1]: line for line in captured.out.splitlines() if line.split()[1:2]}
    assert lines["lr-1"].startswith("completed")
    assert lines["lr-2"].startswith("failed") and lines["lr-2"].endswith(
        f"slurm job 4242_1 FAILED: exit status 3: failing on purpose (see {out / 'lr-2' / 'log.txt'})")
    assert lines["lr-3"].startswith("running") and "slurm job 4242_2" in lines["lr-3"]
    assert captured.err == ""  # SLURM keeps accounting: nothing to say about it
    records = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert {n: r["status"] for n, r in records.items()} == {"lr-1": "completed", "lr-2": "failed", "lr-3": "running"}

    # submitted again: only the failed run goes back to SLURM (a job of its own)
    monkeypatch.delenv("FAKE_FAIL")
    assert tvlars_sweep(argv) == 0
    assert "1 already queued or running, 1 submitted" in capsys.readouterr().out
    assert len(slurm.scripts()) == 2 and "--array" not in slurm.scripts()[1].read_text()
    assert json.loads((out / "sweep.json").read_text())["runs"][1]["job_id"] == "4243"


def test_a_slurm_job_uses_its_time_then_requeues_and_ends_after_max_requeues(env, slurm, monkeypatch, capsys):
    """At SLURM's time-limit signal the run goes on until STOP_MARGIN_S before the limit
    (squeue's EndTime), then the job requeues itself through submitit; after
    --max-requeues time limits it ends, its run unfinished, and says so (log.txt, --status)."""
    monkeypatch.setattr(launch, "STOP_MARGIN_S", 1)
    monkeypatch.setattr(launch, "SIGNAL_WAIT_S", 0.1)  # a run killed by the signal would end the job at once
    slurm.end_in(3)  # the limit falls 3 s after the job asks: 2 s more for the run
    monkeypatch.setenv("FAKE_HANG", "lr-1")
    path = write_grid(env["tmp"], {"command": "train", "grid": {"lr": [1]}})
    out = env["tmp"] / "sweep"
    assert tvlars_sweep([str(path), "--out", str(out), "--launcher", "slurm", "--time-limit", "10",
                         "--max-requeues", "1"]) == 0
    log = out / "lr-1" / "log.txt"

    with pytest.raises(SystemExit):  # submitit's handler: requeued, the job exits
        run_as_slurm_would(out, "4242", monkeypatch, signal_after_start="lr-1")
    assert time.time() - run_as_slurm_would.signalled_at >= 1.5  # it used its time, not stopped at the signal
    assert slurm.scontrol() == "requeue 4242\n"
    assert log.read_text().count("stopped by the job's time limit or a preemption") == 1
    assert run_holder(out / "lr-1") is None and starts(env["marks"], "lr-1") == 1

    with pytest.raises(RunFailed, match="^timed out 2 times; run the sweep again to continue$"):
        run_as_slurm_would(out, "4242", monkeypatch, signal_after_start="lr-1")  # the requeued job, signalled again
    assert time.time() - run_as_slurm_would.signalled_at >= 1.5
    assert slurm.scontrol() == "requeue 4242\n" and starts(env["marks"], "lr-1") == 2
    assert log.read_text().splitlines()[-1].endswith(": timed out 2 times; run the sweep again to continue")

    (out / "submitit" / "4242_0_log.err").write_text(
        "tvlars.study.launch.RunFailed: timed out 2 times; run the sweep again to continue\n"
        "srun: error: vm: task 0: Exited with exit code 1\n")
    slurm(accounts={"4242": "FAILED"})
    capsys.readouterr()
    assert tvlars_sweep([str(path), "--out", str(out), "--status"]) == 0
    assert "failed      lr-1  slurm job 4242 FAILED: timed out 2 times; run the sweep again to continue (the run's " \
        "output: " in capsys.readouterr().out


def test_status_and_resubmission_without_accounting(env, slurm, capsys):
    """Without slurmdbd, squeue says which jobs wait or run: a pending run is queued, not
    failed, and is not submitted again; what cannot be known is said once, in one line,
    and SLURM's own complaints stay off the terminal."""
    path = write_grid(env["tmp"], {"command": "train", "grid": {"lr": [1, 2, 3]}})
    out = env["tmp"] / "sweep"
    argv = [str(path), "--out", str(out), "--launcher", "slurm", "--time-limit", "10"]
    assert tvlars_sweep(argv) == 0
    slurm(queue={"4242_0": "PENDING", "4242_1": "RUNNING"}, accounts=None)  # 4242_2 has left the queue
    capsys.readouterr()
    assert tvlars_sweep([str(path), "--out", str(out), "--status"]) == 0
    captured = capsys.readouterr()
    lines = {line.split()[1]: line for line in captured.out.splitlines() if line.split()[1:2]}
    assert lines["lr-1"].startswith("queued") and "slurm job 4242_0 (pending)" in lines["lr-1"]
    assert lines["lr-2"].startswith("running") and "slurm job 4242_1" in lines["lr-2"]
    assert lines["lr-3"].startswith("failed") and "slurm job 4242_2 ended: no output" in lines["lr-3"]
    assert captured.err == f"tvlars sweep: {sweep.NO_ACCOUNTING}\n"

    assert tvlars_sweep(argv) == 0
    captured = capsys.readouterr()
    assert "2 already queued or running, 1 submitted" in captured.out and captured.err == ""
    assert "--array" not in slurm.scripts()[1].read_text()  # lr-3 alone

    slurm.down()  # SLURM does not answer: nothing is called failed, nothing is submitted again
    assert tvlars_sweep([str(path), "--out", str(out), "--status"]) == 0
    assert "queued      lr-1  slurm job 4242_0 (not known: slurm_load_jobs error: Unable to contact slurm " \
        "controller (connect failure))" in capsys.readouterr().out
    assert tvlars_sweep(argv) == 0
    assert "3 already queued or running, 0 submitted" in capsys.readouterr().out and len(slurm.scripts()) == 2


def test_a_refused_submission_is_one_line_and_leaves_nothing_behind(env, slurm, capsys):
    path = write_grid(env["tmp"], {"command": "train", "grid": {"lr": [1]}})
    out = env["tmp"] / "sweep"
    refused = [str(path), "--out", str(out), "--launcher", "slurm", "--time-limit", "10", "--slurm-partition", "nope"]
    assert tvlars_sweep(refused) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tvlars: error: SLURM refused the job array, nothing was submitted: "
                   "sbatch: error: Batch job submission failed: Invalid partition name specified"], err
    assert not out.exists() and not slurm.scripts()

    # a sweep folder in use: a refused submission of a run more leaves it as it was
    assert tvlars_sweep(refused[:-2]) == 0
    slurm(queue={"4242": "RUNNING"})
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    path = write_grid(env["tmp"], {"command": "train", "grid": {"lr": [1, 2]}})
    assert tvlars_sweep(refused) == 2
    assert "Invalid partition name specified" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_slurm_settings_errors_are_one_line(env, slurm, monkeypatch, capsys):
    path = write_grid(env["tmp"], {"command": "train", "grid": {"lr": [1]}})
    out = str(env["tmp"] / "sweep")
    cases = [
        ([], "needs a time limit"),
        (["--time-limit", "90", "--slurm-option", "nonsense"], "--slurm-option takes KEY=VALUE"),
        (["--time-limit", "2"], "a SLURM time limit must be at least 3 minutes, not 2: SLURM signals a job up to "
                                "2.5 minutes before its limit"),
        (["--time-limit", "90", "--workers", "2"], "--workers is for --launcher subprocess or local"),
        (["--launcher", "local", "--gpus-per-run", "2"], "--gpus-per-run is for --launcher slurm"),
    ]
    for flags, message in cases:
        launcher = [] if "--launcher" in flags else ["--launcher", "slurm"]
        assert tvlars_sweep([str(path), "--out", out, *launcher, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    bad = write_grid(env["tmp"], {"command": "train", "grid": {"lr": [1]}, "slurm": {"time": 5, "colour": "red"}},
                     "bad.yaml")
    assert tvlars_sweep([str(bad), "--out", out, "--launcher", "slurm"]) == 2
    assert "SLURM settings: Unavailable parameter(s): ['colour']" in capsys.readouterr().err
    assert not slurm.scripts() and not (env["tmp"] / "sweep").exists()

    monkeypatch.setitem(sys.modules, "submitit", None)  # as without the extra installed
    assert tvlars_sweep([str(path), "--out", out, "--launcher", "slurm", "--time-limit", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'tvlars[slurm]'" in err


def test_time_limits():
    assert cluster.parse_minutes("90") == 90 and cluster.parse_minutes("1-00:00:00") == 1440
    assert cluster.parse_minutes("02:30:01") == 151 and cluster.parse_minutes(45) == 45
    for bad in ("0", "1h", "-5", "1:2"):
        with pytest.raises(Exception, match="time limit"):
            cluster.parse_minutes(bad)
