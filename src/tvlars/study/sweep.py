"""``tvlars sweep GRID.yaml``: every run a grid names, each in its own process, resumably.

What a grid file says and how its runs are named: tvlars.study.grid. How one run is
launched (its command, log and outcome, also as a submitit job): tvlars.study.launch.

Each run is its own ``tvlars`` process::

    python -m tvlars COMMAND --config <run>/sweep-run.yaml --out <run> --resume

with stdout and stderr appended to ``<run>/log.txt``. A separate process, not a function
call, so that one run's crash, memory or CUDA state cannot take the others down, and
``--resume`` makes the launch the same whether the run is new or half done.

Launchers
---------
``--launcher subprocess`` (the default) runs the runs from this process, ``--workers`` at
a time, and waits. ``--launcher local`` does the same through submitit's local executor
(with its time limit and requeue). ``--launcher slurm`` submits the unfinished runs as one
SLURM job array and returns (tvlars.study.cluster). ``--status`` says what each run is
doing, from the run folders, their locks and the launchers' records.

Resuming, failures, owners
--------------------------
A run whose ``summary.json`` says ``completed`` or ``diverged`` is finished and never run
again. Starting an interrupted sweep again runs only the unfinished runs (partial ones
resume from their checkpoints) and never deletes or rewrites a run folder's results. A run
that exits non-zero (or exits 0 without a finished ``summary.json``) is recorded as failed
and the sweep goes on; at the end the sweep lists the failures and exits 1. The sweep's
index ``<out>/sweep.json`` (full state, with each run's job id) and ``<out>/sweep.csv``
(one row per run) are rewritten atomically after every change; ``<out>/grid.yaml`` is a
copy of the grid file. If an existing run folder holds different flags than the grid now
gives it, the sweep refuses to start (rather than mixing two settings under one name).
Whoever runs a run holds its folder's lock (tvlars.runfolder.RunLock): a run held by
another launcher (a SLURM job, a second sweep) is left to it, so a sweep submitted twice,
or run locally and on a cluster at once, runs nothing twice. One sweep command at a time
writes a sweep folder's index (``<out>/.sweep.lock``).

``--workers N`` runs N subprocesses at a time; ``--devices cuda:0,cuda:1`` hands runs to
the devices round-robin through ``CUDA_VISIBLE_DEVICES``; ``--threads`` sets each run's
``OMP_NUM_THREADS`` (default: CPU count // workers, so parallel CPU runs do not
oversubscribe the cores). ``--dry-run`` validates the grid and lists the runs with their
state, writing nothing. ``--report`` runs ``tvlars report`` on the sweep at the end.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from tvlars import runfolder
from tvlars.cli import command_parser
from tvlars.errors import UserError
from tvlars.harness.config import check_run
from tvlars.runfolder import FINISHED, RunLock, atomic_write, describe_holder, read_summary, run_holder, run_state
from tvlars.study import cluster
from tvlars.study.grid import Grid, Run, canonical, expand_grid, format_value, load_grid, shipped_grids
from tvlars.study.launch import (STOP_GRACE_S, RunJob, default_launcher, last_line, now, outcome, run_argv,
                                 signal_group, start_run)
from tvlars.study.runs import exploded, read_run

LAUNCHERS = ("subprocess", "local", "slurm")
SWEEP_LOCK = ".sweep.lock"  # held by the one sweep command that writes the folder's index
#: Flags of one launcher only: given to another, they are an error, not ignored.
_LAUNCHER_FLAGS = {
    "slurm": ("slurm_partition", "slurm_account", "slurm_qos", "slurm_constraint", "gpus_per_run", "cpus_per_run",
              "array_parallelism", "slurm_setup", "slurm_option"),
    "local|slurm": ("time_limit", "max_requeues"),
    "subprocess|local": ("workers", "devices"),
}


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shipped = sorted(shipped_grids())
    parser.add_argument("grid", metavar="GRID.yaml",
                        help="grid file (format: `pydoc tvlars.study.grid`), or the name of a shipped grid: "
                             + ", ".join(shipped))
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="sweep folder (default: the grid's out:, else runs/<grid name>)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="runs at a time, each its own subprocess (default: the grid's workers:, else 1)")
    parser.add_argument("--devices", default=None, metavar="LIST",
                        help="comma-separated devices, e.g. cuda:0,cuda:1 (or 0,1): runs are assigned "
                             "round-robin through CUDA_VISIBLE_DEVICES")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads per run (OMP_NUM_THREADS); default: the grid's threads:, else the "
                             "CPU count divided by --workers, unless OMP_NUM_THREADS is already set")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the grid and list the runs and their state; run and write nothing")
    parser.add_argument("--report", action="store_true", help="at the end, write and print `tvlars report` for the sweep")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="subprocess",
                        help="subprocess: run the runs from here, --workers at a time, and wait (default); "
                             "local: the same as submitit jobs (time limit, requeue); slurm: submit the "
                             "unfinished runs as one SLURM job array and return")
    parser.add_argument("--status", action="store_true",
                        help="say which runs are finished, running, queued or failed (with the failure's "
                             "last line), from the run folders and the launchers' records; run nothing")
    cluster.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    out = Path(args.out or grid.out or Path("runs") / grid.name)
    runs = plan(grid)
    if args.status:
        print_status(out, runs, grid, args.grid)
        return 0
    _check_launcher_flags(args)
    if args.launcher == "slurm":
        if args.report:
            raise UserError(f"--launcher slurm returns once the runs are queued: run tvlars report {out} later")
        parameters = cluster.slurm_parameters(grid.slurm, args, job_name=f"tvlars-{grid.name}")
        nproc = cluster.processes_per_run(parameters)
        threads = args.threads if args.threads is not None else grid.threads
        if threads is None and parameters.get("cpus_per_task"):
            threads = max(1, parameters["cpus_per_task"] // nproc)
        if args.dry_run:
            print_plan(runs, out, grid.command, nproc)
            print("slurm: " + ", ".join(f"{k}={v}" for k, v in parameters.items()))
            return 0
        submit_to_slurm(grid, runs, out, parameters, max_requeues=_max_requeues(args), threads=threads,
                        grid_path=args.grid)
        return 0
    workers = args.workers if args.workers is not None else (grid.workers or 1)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")
    devices = parse_devices(args.devices)
    threads = args.threads if args.threads is not None else grid.threads
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, not {threads}")
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, (os.cpu_count() or 1) // workers)
    if args.dry_run:
        print_plan(runs, out, grid.command)
        return 0
    executor = None
    if args.launcher == "local":
        executor = cluster.local_executor(out.absolute() / cluster.SUBMITIT_FOLDER, args.time_limit,
                                          _max_requeues(args))
    with _sigterm_as_interrupt():
        result = run_sweep(grid, runs, out, workers=workers, devices=devices, grid_path=args.grid,
                           threads=threads, executor=executor)
    if args.report:
        from tvlars.study import report

        print(report.write_report(out), end="")
    return 0 if not result.failed else 1


def _check_launcher_flags(args: argparse.Namespace) -> None:
    for launchers, flags in _LAUNCHER_FLAGS.items():
        for flag in flags:
            if getattr(args, flag, None) is not None and args.launcher not in launchers.split("|"):
                raise UserError(f"--{flag.replace('_', '-')} is for --launcher {launchers.replace('|', ' or ')}")
    if args.max_requeues is not None and args.max_requeues < 0:
        raise UserError(f"--max-requeues must be 0 or more, not {args.max_requeues}")


def _max_requeues(args: argparse.Namespace) -> int:
    return cluster.DEFAULT_MAX_REQUEUES if args.max_requeues is None else args.max_requeues


def plan(grid: Grid) -> list[Run]:
    """The grid's runs, each resolved as its command will resolve it (the flags' syntax, and
    what the command refuses: a flag its optimizer does not take, a delay past the run's end),
    so that a bad run is refused before any run of the sweep starts."""
    runs = expand_grid(grid, command_parser(grid.command))
    for run in runs:
        check_run(grid.command, run.flags, f"grid file {grid.path or grid.name}, run {run.name}")
    return runs


class _sigterm_as_interrupt:
    """A killed sweep (SIGTERM, as job schedulers send) stops its runs the way Ctrl-C does."""

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread: leave the signals alone
            self.previous = None

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def parse_devices(text: str | None) -> list[str]:
    """``cuda:0,cuda:1`` or ``0,1`` -> the CUDA_VISIBLE_DEVICES values ``['0', '1']``."""
    if not text:
        return []
    devices = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(?:cuda:)?(\d+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+)", part)
        if not match:
            raise UserError(f"--devices: '{part}' is not a CUDA device (write e.g. cuda:0,cuda:1)")
        devices.append(match.group(1))
    return devices


# --------------------------------------------------------------------------- the index


#: What a sweep.json record may hold, by field: the JSON types admitted.
_RECORD_FIELDS = {"status": (str,), "attempts": (int,), "returncode": (int, type(None)),
                  "wall_time_s": (int, float, type(None)), "device": (str, type(None)),
                  "started": (str, type(None)), "finished": (str, type(None)), "error": (str, type(None)),
                  "flags": (dict,), "in_grid": (bool,), "launcher": (str, type(None)),
                  "job_id": (str, type(None))}


def read_index(path: Path) -> dict[str, dict]:
    """The records of an earlier sweep.json by run name; {} when it is missing or unreadable.

    The index is only a record of earlier attempts (run folders are the truth), so anything
    unexpected is dropped rather than reported: records without a plain folder name (no
    separators, no ``..``), and fields of the wrong JSON type.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON or not UTF-8
        return {}
    runs = data.get("runs") if isinstance(data, dict) else None
    records = {}
    for record in runs if isinstance(runs, list) else []:
        if not isinstance(record, dict):
            continue
        name = record.get("name")
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            continue
        kept = {"name": name}
        for key, types in _RECORD_FIELDS.items():
            value = record.get(key)
            if key in record and type(value) in types and not (key == "attempts" and value < 0):
                kept[key] = value
        records[name] = kept
    return records


class SweepIndex:
    """sweep.json and sweep.csv: one record per run, rewritten after every change.

    The run folders are the truth (a run's own summary.json says whether it finished); the
    index is what a person reads while the sweep runs, and where attempts and errors stay.
    """

    def __init__(self, out: Path, grid: Grid, runs: list[Run], grid_path: str | None):
        self.out = out
        self.lock = threading.Lock()
        self.grid = grid
        self.grid_path = str(grid_path) if grid_path else None
        earlier = read_index(out / "sweep.json")
        self.records: dict[str, dict] = {}
        self.flag_columns: list[str] = []
        for r in runs:
            self.flag_columns += [k for k in r.keys if k not in self.flag_columns]
            record = {"name": r.name, "status": "pending", "attempts": 0, "returncode": None,
                      "wall_time_s": None, "device": None, "started": None, "finished": None,
                      "error": None, "launcher": None, "job_id": None}
            previous = earlier.get(r.name)
            if isinstance(previous, dict):
                record.update({k: previous[k] for k in record if k != "name" and k in previous})
            record["flags"] = r.flags
            state = run_state(out / r.name)
            if state in FINISHED:
                record["status"] = state
            elif record["status"] in FINISHED or record["status"] == "running":
                record["status"] = state  # its folder says otherwise
            self.records[r.name] = record
        # runs of an earlier grid that this grid no longer has are kept in the index
        for name, previous in earlier.items():
            if name not in self.records and isinstance(previous, dict):
                self.records[name] = dict(previous, in_grid=False)

    def update(self, name: str, **changes) -> None:
        with self.lock:
            self.records[name].update(changes)
            self._save()

    def save(self) -> None:
        with self.lock:
            self._save()

    def mark_interrupted(self) -> None:
        with self.lock:
            for record in self.records.values():
                if record.get("status") == "running":
                    record["status"] = "interrupted"
            self._save()

    def _save(self) -> None:
        data = {"command": self.grid.command, "name": self.grid.name, "grid_file": self.grid_path,
                "updated": now(), "runs": list(self.records.values())}
        atomic_write(self.out / "sweep.json", json.dumps(data, indent=1, default=str) + "\n")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        columns = ["name", "status", "returncode", "attempts", "wall_time_s", "device"]
        writer.writerow(columns + self.flag_columns + ["best_test_acc", "final_test_acc"])
        for record in self.records.values():
            summary = read_summary(self.out / record["name"])
            flags = record.get("flags") or {}
            writer.writerow([_cell(record.get(c)) for c in columns] + [_cell(flags.get(k)) for k in self.flag_columns]
                            + [_cell(summary.get("best_test_acc")), _cell(summary.get("final_test_acc"))])
        atomic_write(self.out / "sweep.csv", buf.getvalue())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return format_value(value)


# --------------------------------------------------------------------------- running


@dataclass
class SweepResult:
    completed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished before this sweep started
    elsewhere: list[str] = field(default_factory=list)  # held by another launcher: left to it


def print_plan(runs: list[Run], out: Path, command: str, nproc: int = 1) -> None:
    counts: dict[str, int] = {}
    for r in runs:
        state = run_state(out / r.name)
        counts[state] = counts.get(state, 0) + 1
        print(f"{state:9s} {r.name}")
    todo = counts.get("pending", 0) + counts.get("partial", 0)
    finished = sum(counts.get(status, 0) for status in FINISHED)
    print(f"sweep {out}: {len(runs)} runs of tvlars {command}: {finished} finished, {todo} to run "
          f"({counts.get('partial', 0)} to resume)")
    if runs:
        print("each run: " + shlex.join(run_argv(default_launcher(nproc), command, out / runs[0].name)))


def _flags_text(flags: dict) -> str:
    import yaml

    return yaml.safe_dump(flags, sort_keys=False, default_flow_style=False)


def _check_existing(runs: list[Run], out: Path) -> None:
    """Refuse to mix settings: a run folder must hold the flags the grid gives it now."""
    import yaml

    for r in runs:
        file = out / r.name / runfolder.SWEEP_FLAGS
        if not file.is_file():
            continue
        try:
            old = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(old, dict) and canonical(old) != canonical(r.flags):
            changed = sorted(k for k in set(old) | set(r.flags) if old.get(k) != r.flags.get(k))
            raise UserError(f"run folder {out / r.name} was made with different flags ({', '.join(changed)}); "
                            f"use another --out or remove that folder")


def _prepare_run(out: Path, r: Run) -> Path:
    """The run's folder with its sweep-run.yaml: what every launcher starts from."""
    run_dir = out / r.name
    run_dir.mkdir(parents=True, exist_ok=True)
    flags_file, text = run_dir / runfolder.SWEEP_FLAGS, _flags_text(r.flags)
    if not flags_file.is_file() or flags_file.read_text() != text:
        atomic_write(flags_file, text)
    return run_dir


def _save_grid_copy(out: Path, grid: Grid) -> None:
    """grid.yaml: the grid the folder was run with; an earlier, different one is kept beside it."""
    target = out / "grid.yaml"
    if target.is_file():
        if target.read_text() == grid.text:
            return
        stamp = datetime.fromtimestamp(target.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        os.replace(target, out / f"grid.{stamp}.yaml")
    atomic_write(target, grid.text)


def _sweep_lock(out: Path) -> RunLock:
    """One sweep command at a time per folder: two would write its index over each other."""
    return RunLock(out, f"tvlars sweep (pid {os.getpid()})", name=SWEEP_LOCK)


class _Launcher:
    """Runs one grid run at a time per worker thread, as a subprocess of this process or as
    a job of submitit's local executor (``executor``), and can stop them all."""

    def __init__(self, out: Path, command: str, index: SweepIndex, launcher: Sequence[str], threads: int | None,
                 total: int, log: Callable[[str], None], executor=None):
        self.out, self.command, self.index = out, command, index
        self.launcher, self.threads, self.total, self.log = list(launcher), threads, total, log
        self.executor = executor
        self.owner = f"tvlars sweep (pid {os.getpid()})"
        self.stopping = threading.Event()
        self.running: dict[str, Any] = {}  # run name -> its Popen or submitit job
        self.lock = threading.Lock()
        self.finished_count = itertools.count(1)

    def run(self, r: Run, device: str | None) -> str:
        """The run's status once it has ended: completed, diverged, failed, interrupted,
        elsewhere when another launcher holds it, or skipped when the sweep stopped before
        it started."""
        if self.stopping.is_set():
            return "skipped"
        run_dir = _prepare_run(self.out, r)
        lock = RunLock(run_dir, self.owner) if self.executor is None else None  # a job takes its own
        holder = lock.acquire() if lock is not None else run_holder(run_dir)
        if holder is not None:
            self.log(f"[{next(self.finished_count)}/{self.total}] {'left to':9s} {r.name}: {describe_holder(holder)}")
            return "elsewhere"
        try:
            if run_state(run_dir) in FINISHED:  # by another launcher, since this sweep started
                return run_state(run_dir)
            return self._launch(r, run_dir, device, lock)
        finally:
            if lock is not None:
                lock.release()

    def _launch(self, r: Run, run_dir: Path, device: str | None, lock: RunLock | None) -> str:
        attempt = int(self.index.records[r.name].get("attempts") or 0) + 1
        begin = time.time()
        self.index.update(r.name, status="running", attempts=attempt, device=device, started=now(), finished=None,
                          returncode=None, error=None, launcher="local" if self.executor else "subprocess",
                          job_id=None)
        env = self._environment(device)
        try:
            if self.executor is None:
                note = f"attempt {attempt}" + (f", CUDA_VISIBLE_DEVICES={device}" if device is not None else "")
                returncode = self._wait(r.name, start_run(run_argv(self.launcher, self.command, run_dir), run_dir,
                                                          env, note), lock)
                status, error = outcome(run_dir, returncode)
            else:
                returncode, (status, error) = None, self._run_job(r.name, run_dir, env)
        except OSError as err:
            self.index.update(r.name, status="failed", error=f"cannot start: {err}", finished=now())
            return "failed"
        wall = round(time.time() - begin, 3)
        if self.stopping.is_set() and status not in FINISHED:
            self.index.update(r.name, status="interrupted", returncode=returncode, wall_time_s=wall, finished=now())
            return "interrupted"
        self.index.update(r.name, status=status, returncode=returncode, wall_time_s=wall, finished=now(), error=error)
        self.log(f"[{next(self.finished_count)}/{self.total}] {status:9s} {r.name} ({wall:.1f} s)")
        return status

    def _environment(self, device: str | None) -> dict[str, str | None]:
        """What a run's environment changes: its device, its threads (N runs on a shared CPU:
        one thread pool each, not N oversubscribed ones)."""
        env: dict[str, str | None] = {}
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        elif self.executor is not None:  # the local executor hides every GPU from a job that asked for none
            env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        return env

    def _wait(self, name: str, process: subprocess.Popen, lock: RunLock) -> int:
        lock.add_pid(process.pid)
        with self.lock:
            self.running[name] = process
            if self.stopping.is_set():  # the sweep was stopped while this run was starting
                signal_group(process, signal.SIGTERM)
        returncode = process.wait()
        with self.lock:
            self.running.pop(name, None)
        return returncode

    def _run_job(self, name: str, run_dir: Path, env: dict[str, str | None]) -> tuple[str, str | None]:
        with self.lock:
            if self.stopping.is_set():
                return "interrupted", None
            job = self.executor.submit(RunJob(self.command, run_dir.absolute(), env=env,
                                              max_requeues=self.executor.max_num_timeout))
            self.running[name] = job
        self.index.update(name, job_id=str(job.job_id))
        while not job.done():
            time.sleep(0.5)
        with self.lock:
            self.running.pop(name, None)
        status = run_state(run_dir)
        if status in FINISHED:
            return status, None
        holder = run_holder(run_dir)
        if holder is not None:
            return "failed", f"left to {describe_holder(holder)}"
        why = (cluster.job_error_line(self.executor.folder, str(job.job_id))
               or last_line(run_dir / runfolder.SWEEP_LOG) or "no output")
        return "failed", f"local job {job.job_id}: {why}"

    def stop_all(self) -> None:
        """Stop every running run (they stop like Ctrl-C); SIGKILL what outlives the grace time."""
        self.stopping.set()
        with self.lock:
            running = list(self.running.values())
        for item in running:
            if isinstance(item, subprocess.Popen):
                signal_group(item, signal.SIGTERM)
            else:
                item.cancel(check=False)  # SIGINT to the job, which stops its run
        deadline = time.time() + STOP_GRACE_S
        for item in running:
            if isinstance(item, subprocess.Popen):
                try:
                    item.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    signal_group(item, signal.SIGKILL)
            else:
                while not item.done() and time.time() < deadline:
                    time.sleep(0.1)


def run_sweep(grid: Grid, runs: list[Run], out: Path, *, workers: int = 1, devices: Sequence[str] = (),
              launcher: Sequence[str] | None = None, grid_path: str | None = None,
              threads: int | None = None, log: Callable[[str], None] | None = None, executor=None) -> SweepResult:
    """Run every unfinished run of ``runs`` under ``out``; returns what happened.

    Finished runs are skipped, failures recorded; KeyboardInterrupt stops the running
    subprocesses, records them as interrupted and propagates. ``executor``: submitit's
    LocalExecutor to run each run as its job (``launcher``, the command prefix, is then
    the jobs' own).
    """
    log = log or (lambda msg: print(msg, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_existing(runs, out)
    result = SweepResult()
    with _sweep_lock(out):
        _save_grid_copy(out, grid)
        index = SweepIndex(out, grid, runs, grid_path)
        finished = {r.name for r in runs if run_state(out / r.name) in FINISHED}
        result.skipped = [r.name for r in runs if r.name in finished]
        todo = [r for r in runs if r.name not in finished]
        index.save()
        log(f"sweep {out}: {len(runs)} runs, {len(result.skipped)} already finished, {len(todo)} to run"
            + (f" on {workers} workers" if workers > 1 else ""))
        runner = _Launcher(out, grid.command, index, launcher or default_launcher(), threads, len(todo), log,
                           executor)
        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        futures = {}
        try:
            for i, r in enumerate(todo):
                futures[pool.submit(runner.run, r, devices[i % len(devices)] if devices else None)] = r.name
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    status = future.result()
                    if status in (*FINISHED, "failed", "elsewhere"):
                        getattr(result, status).append(futures[future])
        except BaseException:
            runner.stopping.set()
            for future in futures:
                future.cancel()
            runner.stop_all()
            pool.shutdown(wait=True)
            index.mark_interrupted()
            log(f"sweep interrupted; run the same command again to finish it ({out})")
            raise
        pool.shutdown(wait=True)
        index.save()
    blown = sum(exploded(read_run(out / name)) for name in result.completed)
    log(f"sweep {out}: {len(result.completed)} completed ({blown} with an exploded loss), "
        f"{len(result.diverged)} diverged, {len(result.failed)} failed, {len(result.skipped)} finished before"
        + (f", {len(result.elsewhere)} left to other launchers" if result.elsewhere else ""))
    if result.failed:
        print(f"tvlars sweep: {len(result.failed)} run(s) failed:", file=sys.stderr)
        for name in result.failed:
            print(f"  {name}: {index.records[name].get('error')}", file=sys.stderr)
    return result


# --------------------------------------------------------------------------- SLURM


def submit_to_slurm(grid: Grid, runs: list[Run], out: Path, parameters: dict, *, max_requeues: int,
                    threads: int | None = None, grid_path: str | None = None,
                    log: Callable[[str], None] | None = None) -> list[str]:
    """Submit the runs that are not finished, running or queued as one SLURM job array;
    returns the job ids (one per run submitted). sweep.json records each submitted run as
    ``submitted`` with its job id (what it does next, SLURM and its folder say: --status).
    If sbatch refuses the array, what this call wrote is removed again."""
    log = log or (lambda msg: print(msg, flush=True))
    out = Path(out)
    folder = out.absolute() / cluster.SUBMITIT_FOLDER
    nproc = cluster.processes_per_run(parameters)
    executor = cluster.slurm_executor(folder, parameters, max_requeues)  # bad settings fail before any write
    _check_existing(runs, out)
    created = [path for path in (*out.parents, out) if not path.exists()]
    out.mkdir(parents=True, exist_ok=True)
    refused = False
    try:
        with _sweep_lock(out):
            index = SweepIndex(out, grid, runs, grid_path)
            states = run_statuses(out, runs, index.records)
            busy = [r for r in runs if states[r.name][0] in ("running", "queued")]
            todo = [r for r in runs if states[r.name][0] not in (*FINISHED, "running", "queued")]
            env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
            new_folders = [out / r.name for r in todo if not (out / r.name).exists()]
            jobs = [RunJob(grid.command, _prepare_run(out, r).absolute(), nproc=nproc, env=env,
                           max_requeues=max_requeues) for r in todo]
            try:
                job_ids = cluster.submit_array(executor, jobs) if jobs else []
            except UserError:
                refused = True
                for run_dir in new_folders:  # they hold only the sweep-run.yaml written above
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
            _save_grid_copy(out, grid)
            for r, job_id in zip(todo, job_ids):
                record = index.records[r.name]
                record.update(status="submitted", attempts=int(record.get("attempts") or 0) + 1, launcher="slurm",
                              job_id=job_id, returncode=None, wall_time_s=None, device=None, started=now(),
                              finished=None, error=None)
            index.save()
    except UserError:
        if refused:  # the sweep folder too, if this call made it: nothing left behind
            for path in reversed(created):
                shutil.rmtree(path, ignore_errors=True)
        raise
    finished = len(runs) - len(busy) - len(todo)
    log(f"sweep {out}: {len(runs)} runs, {finished} finished, {len(busy)} already queued or running, "
        f"{len(todo)} submitted")
    if job_ids:
        array = job_ids[0].split("_")[0]
        log(f"SLURM job array {array}: {job_ids[0]} .. {job_ids[-1]}" if len(job_ids) > 1 else f"SLURM job {array}")
        log(f"job scripts and logs: {folder}; each run's output: <run>/log.txt; "
            f"follow with: tvlars sweep {grid_path or grid.name} --out {out} --status")
    return job_ids


# --------------------------------------------------------------------------- status


def run_statuses(out: Path, runs: list[Run], records: dict[str, dict], sweeping: dict | None = None,
                 slurm: cluster.JobStates | None = None) -> dict[str, tuple[str, str]]:
    """(state, detail) of each run: completed or diverged, running (someone holds its
    folder), queued (its SLURM job waits, or the sweep holding the folder, ``sweeping``,
    will run it), failed (with the failure's last line), interrupted, partial (started,
    resumable) or pending. ``slurm``: SLURM's answer about the runs' jobs, asked here
    when not given."""
    out = Path(out)
    if slurm is None:
        slurm = cluster.slurm_states(slurm_jobs(out, runs, records))
    folder = out.absolute() / cluster.SUBMITIT_FOLDER
    statuses = {}
    for r in runs:
        run_dir, record = out / r.name, records.get(r.name, {})
        state, holder, job = run_state(run_dir), run_holder(run_dir), record.get("job_id")
        if state in FINISHED:
            best = read_summary(run_dir).get("best_test_acc")
            statuses[r.name] = (state, f"best test accuracy {best:.2f}%" if isinstance(best, (int, float)) else "")
        elif holder is not None:
            statuses[r.name] = ("running", describe_holder(holder))
        elif record.get("launcher") == "slurm" and job:
            statuses[r.name] = _slurm_status(job, slurm, folder, run_dir)
        elif sweeping is not None and record.get("status") != "failed":
            statuses[r.name] = ("queued", f"{describe_holder(sweeping)} will run it")
        elif record.get("status") in ("failed", "interrupted"):
            statuses[r.name] = (record["status"], record.get("error") or "")
        else:
            statuses[r.name] = (state, "resumes from its checkpoint" if state == "partial" else "")
    return statuses


def slurm_jobs(out: Path, runs: list[Run], records: dict[str, dict]) -> list[str]:
    """The SLURM job ids the sweep recorded for the unfinished ones of ``runs`` (a
    finished run's folder says all there is to say)."""
    return [records[r.name]["job_id"] for r in runs
            if records.get(r.name, {}).get("launcher") == "slurm" and records[r.name].get("job_id")
            and run_state(Path(out) / r.name) not in FINISHED]


def _slurm_status(job: str, slurm: cluster.JobStates, folder: Path, run_dir: Path) -> tuple[str, str]:
    state = slurm.states.get(job)
    if state in cluster.QUEUED:
        return "queued", f"slurm job {job} ({state.lower()})"
    if state in cluster.RUNNING:
        return "running", f"slurm job {job}"
    if state is None and slurm.unasked and not cluster.job_ended(folder, job):
        return "queued", f"slurm job {job} (not known: {slurm.unasked})"  # and so not submitted again
    log = run_dir / runfolder.SWEEP_LOG
    why = cluster.job_error_line(folder, job) or last_line(log) or "no output"
    where = "" if runfolder.SWEEP_LOG in why else f" (the run's output: {log})"  # RunFailed names it already
    return "failed", f"slurm job {job} {state or 'ended'}: {why}{where}"


#: What --status says once where SLURM keeps no accounting.
NO_ACCOUNTING = ("SLURM keeps no job accounting here (no slurmdbd): of a job squeue no longer shows, --status "
                 "reads its log; SLURM's own end state (CANCELLED, TIMEOUT, NODE_FAIL, ...) is not known")


def print_status(out: Path, runs: list[Run], grid: Grid | None = None, grid_path: str | None = None) -> None:
    """The state of each run and a count; sweep.json and sweep.csv are brought up to date
    with it (where a sweep has written them and no sweep command holds the folder)."""
    out = Path(out)
    records = read_index(out / "sweep.json")
    slurm = cluster.slurm_states(slurm_jobs(out, runs, records))
    sweeping = run_holder(out, SWEEP_LOCK)
    statuses = run_statuses(out, runs, records, sweeping=sweeping, slurm=slurm)
    width = max((len(r.name) for r in runs), default=0)
    counts: dict[str, int] = {}
    for r in runs:
        state, detail = statuses[r.name]
        counts[state] = counts.get(state, 0) + 1
        print(f"{state:11s} {r.name:{width}s}  {detail}".rstrip())
    order = ("completed", "diverged", "running", "queued", "failed", "interrupted", "partial", "pending")
    print(f"sweep {out}: {len(runs)} runs: " + ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s)))
    if not slurm.accounting:
        print(f"tvlars sweep: {NO_ACCOUNTING}", file=sys.stderr)
    if grid is not None and sweeping is None and records:
        _refresh_index(out, grid, runs, grid_path, statuses)


def _refresh_index(out: Path, grid: Grid, runs: list[Run], grid_path: str | None,
                   statuses: dict[str, tuple[str, str]]) -> None:
    """sweep.json and sweep.csv as --status found the runs, so that they do not go on
    saying ``submitted`` or ``queued`` of runs that have finished. Best effort: a folder
    another sweep command holds, or one this user cannot write, is left as it is."""
    lock = _sweep_lock(out)
    try:
        if lock.acquire() is not None:
            return
    except OSError:
        return
    try:
        index = SweepIndex(out, grid, runs, grid_path)
        for name, (state, detail) in statuses.items():
            index.records[name]["status"] = state
            if state == "failed":
                index.records[name]["error"] = detail
        index.save()
    except OSError:
        pass
    finally:
        lock.release()
