"""``tvlars sweep GRID.yaml``: every run a grid names, each in its own process, resumably.

What a grid file says and how its runs are named: tvlars.study.grid.

Each run is its own ``tvlars`` process::

    python -m tvlars COMMAND --config <run>/sweep-run.yaml --out <run> --resume

with stdout and stderr appended to ``<run>/log.txt``. A separate process, not a function
call, so that one run's crash, memory or CUDA state cannot take the others down, and
``--resume`` makes the launch the same whether the run is new or half done.

Resuming and failures
---------------------
A run whose ``summary.json`` says ``completed`` or ``diverged`` is finished and never run
again. Starting an interrupted sweep again runs only the unfinished runs (partial ones
resume from their checkpoints) and never deletes or rewrites a run folder's results. A run
that exits non-zero (or exits 0 without a finished ``summary.json``) is recorded as failed
and the sweep goes on; at the end the sweep lists the failures and exits 1. The sweep's
index ``<out>/sweep.json`` (full state) and ``<out>/sweep.csv`` (one row per run) are
rewritten atomically after every change; ``<out>/grid.yaml`` is a copy of the grid file.
If an existing run folder holds different flags than the grid now gives it, the sweep
refuses to start (rather than mixing two settings under one name).

``--workers N`` runs N subprocesses at a time; ``--devices cuda:0,cuda:1`` hands runs to
the devices round-robin through ``CUDA_VISIBLE_DEVICES``; ``--threads`` sets each run's
``OMP_NUM_THREADS`` (default: CPU count // workers, so parallel CPU runs do not
oversubscribe the cores). ``--dry-run`` validates the grid and lists the runs with their
state, writing nothing. ``--report`` runs ``tvlars report`` on the sweep at the end.

The command launched can be replaced (tests, wrappers, job schedulers) with the
environment variable ``TVLARS_SWEEP_LAUNCHER``: a command prefix (split like a shell
would) that takes the place of ``python -m tvlars``.
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
from tvlars.runfolder import FINISHED, atomic_write, read_summary, run_state
from tvlars.study.grid import Grid, Run, canonical, expand_grid, format_value, load_grid, shipped_grids

LAUNCHER_ENV = "TVLARS_SWEEP_LAUNCHER"
#: Seconds a stopped sweep gives its runs to write their state before killing them.
STOP_GRACE_S = 15


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


def run(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    out = Path(args.out or grid.out or Path("runs") / grid.name)
    workers = args.workers if args.workers is not None else (grid.workers or 1)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")
    devices = parse_devices(args.devices)
    threads = args.threads if args.threads is not None else grid.threads
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, not {threads}")
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, (os.cpu_count() or 1) // workers)
    runs = plan(grid)
    if args.dry_run:
        print_plan(runs, out, grid.command)
        return 0
    with _sigterm_as_interrupt():
        result = run_sweep(grid, runs, out, workers=workers, devices=devices, grid_path=args.grid,
                           threads=threads)
    if args.report:
        from tvlars.study import report

        print(report.write_report(out), end="")
    return 0 if not result.failed else 1


def plan(grid: Grid) -> list[Run]:
    """The grid's runs, checked against the real command's flags."""
    return expand_grid(grid, command_parser(grid.command))


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


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


#: What a sweep.json record may hold, by field: the JSON types admitted.
_RECORD_FIELDS = {"status": (str,), "attempts": (int,), "returncode": (int, type(None)),
                  "wall_time_s": (int, float, type(None)), "device": (str, type(None)),
                  "started": (str, type(None)), "finished": (str, type(None)), "error": (str, type(None)),
                  "flags": (dict,), "in_grid": (bool,)}


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
                      "error": None}
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
                "updated": _now(), "runs": list(self.records.values())}
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


def default_launcher() -> list[str]:
    """The command prefix that runs ``tvlars``: $TVLARS_SWEEP_LAUNCHER or ``python -m tvlars``."""
    prefix = os.environ.get(LAUNCHER_ENV)
    if prefix:
        return shlex.split(prefix)
    return [sys.executable, "-m", "tvlars"]


def run_argv(launcher: Sequence[str], command: str, run_dir: Path) -> list[str]:
    return [*launcher, command, "--config", str(run_dir / runfolder.SWEEP_FLAGS), "--out", str(run_dir), "--resume"]


def print_plan(runs: list[Run], out: Path, command: str) -> None:
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
        print("each run: " + shlex.join(run_argv(default_launcher(), command, out / runs[0].name)))


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


def _save_grid_copy(out: Path, grid: Grid) -> None:
    """grid.yaml: the grid the folder was run with; an earlier, different one is kept beside it."""
    target = out / "grid.yaml"
    if target.is_file():
        if target.read_text() == grid.text:
            return
        stamp = datetime.fromtimestamp(target.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        os.replace(target, out / f"grid.{stamp}.yaml")
    atomic_write(target, grid.text)


class _Lock:
    """One sweep at a time per folder: two would launch the same runs twice."""

    def __init__(self, out: Path):
        self.path = out / ".sweep.lock"

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if not 0 < pid < 2 ** 31:  # kill(-1, 0) would probe every process; huge ints overflow
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise UserError(f"another sweep (pid {pid}) is running in {self.path.parent}") from None
                self.path.unlink(missing_ok=True)  # left by a sweep that died
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return self
        raise UserError(f"cannot lock the sweep folder {self.path.parent}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Launcher:
    """Runs one grid run at a time per worker thread, as a subprocess, and can stop them all."""

    def __init__(self, out: Path, command: str, index: SweepIndex, launcher: Sequence[str], threads: int | None,
                 total: int, log: Callable[[str], None]):
        self.out, self.command, self.index = out, command, index
        self.launcher, self.threads, self.total, self.log = list(launcher), threads, total, log
        self.stopping = threading.Event()
        self.processes: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.finished_count = itertools.count(1)

    def run(self, r: Run, device: str | None) -> str:
        """The run's status once its process has exited: completed, diverged, failed,
        interrupted, or skipped when the sweep stopped before it started."""
        if self.stopping.is_set():
            return "skipped"
        run_dir = self.out / r.name
        run_dir.mkdir(parents=True, exist_ok=True)
        flags_file, text = run_dir / runfolder.SWEEP_FLAGS, _flags_text(r.flags)
        if not flags_file.is_file() or flags_file.read_text() != text:
            atomic_write(flags_file, text)
        attempt = int(self.index.records[r.name].get("attempts") or 0) + 1
        begin = time.time()
        self.index.update(r.name, status="running", attempts=attempt, device=device, started=_now(),
                          finished=None, returncode=None, error=None)
        try:
            returncode = self._wait_for_process(r.name, run_dir, device, attempt)
        except OSError as err:
            self.index.update(r.name, status="failed", error=f"cannot start: {err}", finished=_now())
            return "failed"
        wall = round(time.time() - begin, 3)
        if self.stopping.is_set() and returncode != 0:
            self.index.update(r.name, status="interrupted", returncode=returncode, wall_time_s=wall, finished=_now())
            return "interrupted"
        status, error = _outcome(run_dir, returncode)
        self.index.update(r.name, status=status, returncode=returncode, wall_time_s=wall, finished=_now(),
                          error=error)
        self.log(f"[{next(self.finished_count)}/{self.total}] {status:9s} {r.name} ({wall:.1f} s)")
        return status

    def _wait_for_process(self, name: str, run_dir: Path, device: str | None, attempt: int) -> int:
        argv = run_argv(self.launcher, self.command, run_dir)
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        if self.threads:  # N runs on a shared CPU: one thread pool each, not N oversubscribed ones
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        with open(run_dir / runfolder.SWEEP_LOG, "a", encoding="utf-8") as logfile:
            logfile.write(f"=== tvlars sweep {_now()}: attempt {attempt}"
                          + (f", CUDA_VISIBLE_DEVICES={device}" if device is not None else "")
                          + f"\n=== {shlex.join(argv)}\n")
            logfile.flush()
            process = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)
            with self.lock:
                self.processes[name] = process
                if self.stopping.is_set():  # the sweep was stopped while this run was starting
                    _signal_group(process, signal.SIGTERM)
            returncode = process.wait()
            with self.lock:
                self.processes.pop(name, None)
        return returncode

    def stop_all(self) -> None:
        """SIGTERM every running run (they stop like Ctrl-C), SIGKILL what outlives the grace time."""
        self.stopping.set()
        with self.lock:
            running = list(self.processes.values())
        for process in running:
            _signal_group(process, signal.SIGTERM)
        deadline = time.time() + STOP_GRACE_S
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)


def _outcome(run_dir: Path, returncode: int) -> tuple[str, str | None]:
    """(status, error) of a run whose process exited: its folder's word first, since
    `tvlars train` exits 1 on a diverged run, which is a finished run, not a failure."""
    status = run_state(run_dir)
    if status in FINISHED:
        return status, None
    log = run_dir / runfolder.SWEEP_LOG
    if returncode != 0:
        return "failed", f"exit status {returncode}; see {log}"
    return "failed", f"exited 0 without a finished summary.json; see {log}"


def run_sweep(grid: Grid, runs: list[Run], out: Path, *, workers: int = 1, devices: Sequence[str] = (),
              launcher: Sequence[str] | None = None, grid_path: str | None = None,
              threads: int | None = None, log: Callable[[str], None] | None = None) -> SweepResult:
    """Run every unfinished run of ``runs`` under ``out``; returns what happened.

    Finished runs are skipped, failures recorded; KeyboardInterrupt stops the running
    subprocesses, records them as interrupted and propagates.
    """
    log = log or (lambda msg: print(msg, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_existing(runs, out)
    result = SweepResult()
    with _Lock(out):
        _save_grid_copy(out, grid)
        index = SweepIndex(out, grid, runs, grid_path)
        finished = {r.name for r in runs if run_state(out / r.name) in FINISHED}
        result.skipped = [r.name for r in runs if r.name in finished]
        todo = [r for r in runs if r.name not in finished]
        index.save()
        log(f"sweep {out}: {len(runs)} runs, {len(result.skipped)} already finished, {len(todo)} to run"
            + (f" on {workers} workers" if workers > 1 else ""))
        runner = _Launcher(out, grid.command, index, launcher or default_launcher(), threads, len(todo), log)
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
                    if status in (*FINISHED, "failed"):
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
    log(f"sweep {out}: {len(result.completed)} completed, {len(result.diverged)} diverged, "
        f"{len(result.failed)} failed, {len(result.skipped)} finished before")
    if result.failed:
        print(f"tvlars sweep: {len(result.failed)} run(s) failed:", file=sys.stderr)
        for name in result.failed:
            print(f"  {name}: {index.records[name].get('error')}", file=sys.stderr)
    return result


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the run and its children (it leads its own session)
    except (ProcessLookupError, PermissionError):
        pass
