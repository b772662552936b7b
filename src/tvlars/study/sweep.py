"""``tvlars sweep GRID.yaml``: run the Cartesian product of ``tvlars train`` / ``tvlars ssl`` flags.

Grid file
---------
A YAML mapping::

    command: train            # or ssl: the tvlars command every run uses (required)
    name: paper-cifar10       # optional; the default output folder is runs/<name>
                              # (runs/<grid file stem> without it)
    out: runs/paper-cifar10   # optional output folder; --out overrides it; a relative
                              # path is relative to the current directory
    workers: 2                # optional defaults for --workers and --threads
    threads: 1
    base:                     # flags common to all runs (optional)
      dataset: cifar10
      epochs: 100
    grid:                     # what varies (required): a mapping, or a list of mappings
      optimizer: [lars, lamb] #   flag: [values]  -> one axis of the product
      seed: [0, 1, 2]
      lam: 1.0e-4             #   flag: value     -> a one-value axis
      warmup:                 #   label: [mappings] -> a linked axis (see below)
        - {warmup_epochs: 20, schedule: warmup-cosine}
        - {warmup_epochs: 0, schedule: poly}

Keys are the destinations of the command's flags (``batch_size`` or ``batch-size``), as in
``--config`` files. A mapping expands to the Cartesian product of its axes. A value that is
a list of mappings is a *linked axis*: its key is only a label, and each mapping in the list
is itself a grid mapping, expanded and joined (union), so several flags move together and
one flag's values may depend on another's::

      size:
        - {batch_size: 512, lr: [1, 2, 3]}
        - {batch_size: 1024, lr: [2, 3, 4]}

``grid:`` given as a list of mappings is the union of their products (e.g. TVLARS has no
warm-up variant, so it gets its own entry). YAML anchors (``&sizes`` / ``*sizes``) avoid
repeating a linked axis. A flag that takes a list as ONE value is written ``[[a, b]]``.
Flags in ``grid:`` override ``base:``. Runs that come out identical are run once. Top-level
keys starting with ``x-`` are ignored (a place to define YAML anchors).
Note that YAML reads ``1e-4`` as a string: the sweep converts strings for int/float flags,
but ``1.0e-4`` is the portable spelling.

Run folders
-----------
Each run gets ``<out>/<name>/`` where the name joins ``flag-value`` for every flag set
under ``grid:`` (in order of first appearance; constants in ``base:`` stay out of the
name), e.g. ``optimizer-lars_batch_size-512_lr-1_seed-0``. Names are stable: adding
values to an axis never renames existing runs (adding a new flag to ``grid:`` does). The run's flags go to
``<run>/sweep-run.yaml`` and the run is launched as::

    python -m tvlars COMMAND --config <run>/sweep-run.yaml --out <run> --resume

with stdout and stderr appended to ``<run>/log.txt``. ``--resume`` continues from the
run's checkpoint, or starts fresh when there is none.

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

GRID.yaml may also name a shipped grid (``tvlars sweep quickstart``): grids/quickstart.yaml,
grids/digits.yaml, grids/paper-cifar10.yaml, grids/paper-tinyimagenet.yaml and
grids/paper-barlowtwins-cifar10.yaml.

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
import math
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

from tvlars.errors import UserError

COMMANDS = ("train", "ssl")
FINISHED = ("completed", "diverged")
RESERVED = ("out", "resume", "config", "help")
LAUNCHER_ENV = "TVLARS_SWEEP_LAUNCHER"
RUN_FLAGS_FILE = "sweep-run.yaml"
MAX_NAME = 180


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", metavar="GRID.yaml",
                        help="grid file (format: `pydoc tvlars.study.sweep`), or the name of a shipped grid: "
                             "quickstart, digits, paper-cifar10, paper-tinyimagenet, paper-barlowtwins-cifar10")
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
    runs = expand_grid(grid)
    if args.dry_run:
        print_plan(runs, out, grid.command)
        return 0
    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(signum, frame):  # a killed sweep stops its runs like Ctrl-C does
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        previous = None
    try:
        result = run_sweep(grid, runs, out, workers=workers, devices=devices, grid_path=args.grid,
                           threads=threads)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.report:
        from tvlars.study import report

        print(report.write_report(out), end="")
    return 0 if not result.failed else 1


# --------------------------------------------------------------------------- grid


@dataclass
class Grid:
    command: str
    name: str
    base: dict[str, Any]
    entries: list[dict[str, Any]]
    out: str | None = None
    text: str = ""
    workers: int | None = None
    threads: int | None = None
    path: str = ""


@dataclass
class Run:
    name: str
    flags: dict[str, Any]
    keys: list[str] = field(default_factory=list)  # the flags that name it


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and check a grid file's structure (not yet its flags: see :func:`expand_grid`)."""
    import yaml

    file = find_grid(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or "not UTF-8 text"
        raise UserError(f"cannot read grid file {path}: {why}") from None
    try:  # safe_load: plain data only (a python/object tag is a YAMLError, never a call)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"grid file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"grid file {path} must be a mapping with command:, base: and grid:")
    keys = {"command", "name", "out", "base", "grid", "workers", "threads"}
    unknown = sorted(k for k in set(map(str, data)) - keys if not k.startswith("x-"))
    if unknown:
        raise UserError(f"grid file {path}: unknown key '{unknown[0]}' (expected {', '.join(sorted(keys))})")
    for key in ("workers", "threads"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"grid file {path}: {key} must be a positive integer, not {value!r}")
    command = data.get("command")
    if command not in COMMANDS:
        raise UserError(f"grid file {path}: command must be one of {', '.join(COMMANDS)}, not {command!r}")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise UserError(f"grid file {path}: base must map flag names to values")
    for key, value in base.items():
        if isinstance(value, dict):
            raise UserError(f"grid file {path}: base: {key} must be a value, not a mapping")
    if "grid" not in data or data["grid"] is None:
        raise UserError(f"grid file {path}: grid: is missing (a mapping of flag -> list of values)")
    entries = data["grid"]
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list) or not entries:
        raise UserError(f"grid file {path}: grid must be a mapping of flag -> list of values, or a non-empty list of such mappings")
    for i, entry in enumerate(entries):
        _check_entry(entry, f"grid file {path}: grid[{i}]")
    name = data.get("name") or file.stem
    if not isinstance(name, str) or not _safe(name) == name:
        raise UserError(f"grid file {path}: name must be a simple folder name, not {name!r}")
    out = data.get("out")
    if out is not None and not isinstance(out, str):
        raise UserError(f"grid file {path}: out must be a folder path")
    return Grid(command=command, name=name, base=dict(base), entries=entries, out=out, text=text,
                workers=data.get("workers"), threads=data.get("threads"), path=str(path))


def shipped_grids() -> list[Path]:
    """Folders holding the ready grids: the repository's grids/ (source checkout) and
    tvlars/grids (package data), where they exist."""
    here = Path(__file__).resolve()
    return [p for p in (here.parents[3] / "grids", here.parents[1] / "grids") if p.is_dir()]


def find_grid(path: str | os.PathLike) -> Path:
    """A grid file by path, or a shipped grid by name (``quickstart`` -> grids/quickstart.yaml)."""
    file = Path(path)
    if file.is_file():
        return file
    if len(file.parts) == 1:
        for folder in shipped_grids():
            for candidate in (folder / file.name, folder / f"{file.name}.yaml"):
                if candidate.is_file():
                    return candidate
    raise UserError(f"grid file not found: {path}")


def _is_linked(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise UserError(f"{where} must be a mapping of flag -> list of values, not {type(entry).__name__}")
    for key, value in entry.items():
        if isinstance(value, list) and not value:
            raise UserError(f"{where}: {key} has an empty list of values")
        if isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a value or a list of values, not a mapping "
                            f"(a linked axis is a list of mappings)")
        if isinstance(value, list) and any(isinstance(v, dict) for v in value):
            if not _is_linked(value):
                raise UserError(f"{where}: {key} mixes mappings and values")
            for j, sub in enumerate(value):
                _check_entry(sub, f"{where}.{key}[{j}]")


def _expand_entry(entry: dict) -> list[list[tuple[str, Any]]]:
    """The runs of one grid mapping, each as an ordered list of (flag, value)."""
    axes: list[list[list[tuple[str, Any]]]] = []
    for key, value in entry.items():
        if _is_linked(value):
            options = [combo for sub in value for combo in _expand_entry(sub)]
        elif isinstance(value, list):
            options = [[(str(key), v)] for v in value]
        else:
            options = [[(str(key), value)]]
        axes.append(options)
    return [[pair for part in combo for pair in part] for combo in itertools.product(*axes)]


def expand_grid(grid: Grid, parser: argparse.ArgumentParser | None = None) -> list[Run]:
    """All runs of a grid, flags checked against the command's parser, in grid order."""
    parser = parser or command_parser(grid.command)
    actions = {a.dest: a for a in parser._actions}
    for flag in ("out", "resume", "config"):
        if flag not in actions:
            raise UserError(f"tvlars {grid.command} has no --{flag} flag, which the sweep needs")
    where = f"grid file {grid.path or grid.name}"
    command = f"tvlars {grid.command}"
    base = {_dest(k): _coerce(actions, _dest(k), v, f"{where}: base", command) for k, v in grid.base.items()}
    combos = [combo for entry in grid.entries for combo in _expand_entry(entry)]
    name_keys: list[str] = []
    runs: list[Run] = []
    seen: dict[str, Run] = {}
    for combo in combos:
        flags = dict(base)
        keys = []
        for key, value in combo:
            dest = _dest(key)
            flags[dest] = _coerce(actions, dest, value, f"{where}: grid", command)
            if dest not in keys:
                keys.append(dest)
            if dest not in name_keys:
                name_keys.append(dest)
        runs.append(Run(name="", flags=flags, keys=keys))
    unique: list[Run] = []
    for r in runs:
        ordered = [k for k in name_keys if k in r.keys]
        r.keys = ordered
        r.name = run_name(r.flags, ordered)
        other = seen.get(r.name)
        if other is not None:
            if _canonical(other.flags) == _canonical(r.flags):
                continue  # the same run twice: run it once
            raise UserError(f"{where}: two different runs get the folder name {r.name}; "
                            f"put the flag that tells them apart under grid:")
        seen[r.name] = r
        unique.append(r)
    return unique


def _dest(key: Any) -> str:
    return str(key).replace("-", "_")


def _coerce(actions: dict, dest: str, value: Any, where: str, command: str = "this command") -> Any:
    """Check one flag value against the command's parser; numbers given as strings become numbers."""
    if dest in RESERVED:
        raise UserError(f"{where}: '{dest}' is set by the sweep for every run; remove it from the grid file")
    action = actions.get(dest)
    if action is None or not action.option_strings:
        raise UserError(f"{where}: unknown flag '{dest}' for {command} (see {command} --help)")
    flag = action.option_strings[-1]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: {flag} takes true or false, not {value!r}")
        return value
    kind = action.type
    if value is not None and kind in (int, float) and action.nargs is None:
        if isinstance(value, bool):
            raise UserError(f"{where}: {flag} takes a number, not {value!r}")
        try:
            number = kind(value) if not (kind is int and isinstance(value, float)) else None
        except (TypeError, ValueError):
            number = None
        if kind is int and isinstance(value, float) and value.is_integer():
            number = int(value)
        if number is None:
            raise UserError(f"{where}: {flag} takes {'an integer' if kind is int else 'a number'}, not {value!r}")
        value = number
    if action.choices is not None and value is not None:
        values = value if isinstance(value, list) and action.nargs not in (None, "?") else [value]
        for v in values:
            if v not in action.choices and str(v) not in {str(c) for c in action.choices}:
                choices = ", ".join(map(str, action.choices))
                raise UserError(f"{where}: {flag} must be one of {choices}, not {v!r}")
    return value


def command_parser(command: str) -> argparse.ArgumentParser:
    """The argparse parser of ``tvlars COMMAND``, built as :func:`tvlars.cli.build_parser` builds it."""
    import importlib

    from tvlars import cli

    if command not in cli.COMMANDS or command not in COMMANDS:
        raise UserError(f"sweep: unknown command {command!r} (expected {', '.join(COMMANDS)})")
    parser = cli._Parser(prog=f"tvlars {command}")
    try:
        importlib.import_module(cli.COMMANDS[command][0]).add_arguments(parser)
    except ImportError as err:
        raise UserError(f"cannot check the grid: tvlars {command} is not available ({err})") from None
    return parser


def format_value(value: Any) -> str:
    """A flag value as it appears in a run name: 1.0 -> 1, 1e-4 -> 0.0001, True -> true."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-.") or "x"


def run_name(flags: dict[str, Any], keys: Sequence[str]) -> str:
    """The folder name of a run: ``flag-value`` for each naming flag, joined by ``_``."""
    if not keys:
        return "run"
    name = "_".join(f"{_safe(k)}-{_safe(format_value(flags[k]))}" for k in keys)
    if len(name) > MAX_NAME:
        import hashlib

        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name[: MAX_NAME - 11].rstrip("_-") + "-" + digest
    return name


def _canonical(flags: dict) -> str:
    return json.dumps(flags, sort_keys=True, default=str)


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


# --------------------------------------------------------------------------- state of runs


def read_summary(run_dir: Path) -> dict | None:
    try:
        data = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON or not UTF-8
        return None
    return data if isinstance(data, dict) else None


def run_state(run_dir: Path) -> str:
    """completed | diverged (finished), partial (started, not finished) or pending."""
    summary = read_summary(run_dir)
    if summary and summary.get("status") in FINISHED:
        return str(summary["status"])
    run_dir = Path(run_dir)
    if any((run_dir / f).exists() for f in ("checkpoint.pt", "summary.json", "metrics.csv")):
        return "partial"
    return "pending"


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _dump_flags(flags: dict) -> str:
    import yaml

    return yaml.safe_dump(flags, sort_keys=False, default_flow_style=False)


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


class SweepState:
    """The sweep's index: one record per run, saved atomically as sweep.json and sweep.csv."""

    def __init__(self, out: Path, grid: Grid, runs: list[Run], grid_path: str | None):
        self.out = out
        self.lock = threading.Lock()
        self.grid = grid
        self.grid_path = str(grid_path) if grid_path else None
        old = read_index(out / "sweep.json")
        self.records: dict[str, dict] = {}
        self.keys: list[str] = []
        for r in runs:
            for k in r.keys:
                if k not in self.keys:
                    self.keys.append(k)
            rec = {"name": r.name, "status": "pending", "attempts": 0, "returncode": None,
                   "wall_time_s": None, "device": None, "started": None, "finished": None,
                   "error": None}
            prev = old.get(r.name)
            if isinstance(prev, dict):
                for k in ("attempts", "returncode", "wall_time_s", "device", "started", "finished", "error", "status"):
                    if k in prev:
                        rec[k] = prev[k]
            rec["flags"] = r.flags
            state = run_state(out / r.name)
            if state in FINISHED:
                rec["status"] = state
            elif rec["status"] in FINISHED or rec["status"] == "running":
                rec["status"] = state  # its folder says otherwise
            self.records[r.name] = rec
        # runs of an earlier grid that this grid no longer has are kept in the index
        for name, prev in old.items():
            if name not in self.records and isinstance(prev, dict):
                prev = dict(prev)
                prev["in_grid"] = False
                self.records[name] = prev

    def update(self, name: str, **changes) -> None:
        with self.lock:
            self.records[name].update(changes)
            self._save()

    def save(self) -> None:
        with self.lock:
            self._save()

    def _save(self) -> None:
        data = {"command": self.grid.command, "name": self.grid.name, "grid_file": self.grid_path,
                "updated": _now(), "runs": list(self.records.values())}
        atomic_write(self.out / "sweep.json", json.dumps(data, indent=1, default=str) + "\n")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        columns = ["name", "status", "returncode", "attempts", "wall_time_s", "device"]
        writer.writerow(columns + self.keys + ["best_test_acc", "final_test_acc"])
        for rec in self.records.values():
            summary = read_summary(self.out / rec["name"]) or {}
            flags = rec.get("flags") or {}
            writer.writerow([_cell(rec.get(c)) for c in columns] + [_cell(flags.get(k)) for k in self.keys]
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
    return [*launcher, command, "--config", str(run_dir / RUN_FLAGS_FILE), "--out", str(run_dir), "--resume"]


def print_plan(runs: list[Run], out: Path, command: str) -> None:
    counts: dict[str, int] = {}
    for r in runs:
        state = run_state(out / r.name)
        counts[state] = counts.get(state, 0) + 1
        print(f"{state:9s} {r.name}")
    todo = counts.get("pending", 0) + counts.get("partial", 0)
    finished = counts.get("completed", 0) + counts.get("diverged", 0)
    print(f"sweep {out}: {len(runs)} runs of tvlars {command}: {finished} finished, {todo} to run "
          f"({counts.get('partial', 0)} to resume)")
    if runs:
        print("each run: " + shlex.join(run_argv(default_launcher(), command, out / runs[0].name)))


def _check_existing(runs: list[Run], out: Path) -> None:
    """Refuse to mix settings: a run folder must hold the flags the grid gives it now."""
    import yaml

    for r in runs:
        file = out / r.name / RUN_FLAGS_FILE
        if not file.is_file():
            continue
        try:
            old = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(old, dict) and _canonical(old) != _canonical(r.flags):
            changed = sorted(k for k in set(old) | set(r.flags) if old.get(k) != r.flags.get(k))
            raise UserError(f"run folder {out / r.name} was made with different flags ({', '.join(changed)}); "
                            f"use another --out or remove that folder")


def _save_grid_copy(out: Path, grid: Grid) -> None:
    target = out / "grid.yaml"
    if target.is_file():
        old = target.read_text()
        if old == grid.text:
            return
        stamp = datetime.fromtimestamp(target.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        os.replace(target, out / f"grid.{stamp}.yaml")
    atomic_write(target, grid.text)


class _Lock:
    """One sweep at a time per folder."""

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
                self.path.unlink(missing_ok=True)
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


def run_sweep(grid: Grid, runs: list[Run], out: Path, *, workers: int = 1, devices: Sequence[str] = (),
              launcher: Sequence[str] | None = None, grid_path: str | None = None,
              threads: int | None = None, log: Callable[[str], None] | None = None) -> SweepResult:
    """Run every unfinished run of ``runs`` under ``out``; returns what happened.

    Finished runs are skipped, failures recorded; KeyboardInterrupt stops the running
    subprocesses, records them as interrupted and propagates.
    """
    log = log or (lambda msg: print(msg, flush=True))
    launcher = list(launcher) if launcher else default_launcher()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_existing(runs, out)
    result = SweepResult()
    with _Lock(out):
        _save_grid_copy(out, grid)
        state = SweepState(out, grid, runs, grid_path)
        todo = []
        for r in runs:
            status = run_state(out / r.name)
            if status in FINISHED:
                result.skipped.append(r.name)
            else:
                todo.append(r)
        state.save()
        log(f"sweep {out}: {len(runs)} runs, {len(result.skipped)} already finished, {len(todo)} to run"
            + (f" on {workers} workers" if workers > 1 else ""))
        stop = threading.Event()
        procs: dict[str, subprocess.Popen] = {}
        procs_lock = threading.Lock()
        counter = itertools.count(1)

        def one(r: Run, device: str | None) -> str:
            if stop.is_set():
                return "skipped"
            run_dir = out / r.name
            run_dir.mkdir(parents=True, exist_ok=True)
            flags_file = run_dir / RUN_FLAGS_FILE
            text = _dump_flags(r.flags)
            if not flags_file.is_file() or flags_file.read_text() != text:
                atomic_write(flags_file, text)
            argv = run_argv(launcher, grid.command, run_dir)
            env = dict(os.environ)
            if device is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
            if threads:  # N runs on a shared CPU: one thread pool each, not N oversubscribed ones
                env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
            attempts = int(state.records[r.name].get("attempts") or 0) + 1
            begin = time.time()
            state.update(r.name, status="running", attempts=attempts, device=device, started=_now(),
                         finished=None, returncode=None, error=None)
            with open(run_dir / "log.txt", "a", encoding="utf-8") as logfile:
                logfile.write(f"=== tvlars sweep {_now()}: attempt {attempts}"
                              + (f", CUDA_VISIBLE_DEVICES={device}" if device is not None else "")
                              + f"\n=== {shlex.join(argv)}\n")
                logfile.flush()
                try:
                    proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)
                except OSError as err:
                    state.update(r.name, status="failed", error=f"cannot start: {err}", finished=_now())
                    return "failed"
                with procs_lock:
                    procs[r.name] = proc
                    if stop.is_set():  # the sweep was stopped while this run was starting
                        _signal_group(proc, signal.SIGTERM)
                rc = proc.wait()
                with procs_lock:
                    procs.pop(r.name, None)
            wall = round(time.time() - begin, 3)
            if stop.is_set() and rc != 0:
                state.update(r.name, status="interrupted", returncode=rc, wall_time_s=wall, finished=_now())
                return "interrupted"
            status = run_state(run_dir)
            error = None
            if status in FINISHED:
                pass  # the run's own word; `tvlars train` exits 1 on a diverged run
            elif rc != 0:
                status, error = "failed", f"exit status {rc}; see {run_dir / 'log.txt'}"
            else:
                status, error = "failed", f"exited 0 without a finished summary.json; see {run_dir / 'log.txt'}"
            state.update(r.name, status=status, returncode=rc, wall_time_s=wall, finished=_now(), error=error)
            n = next(counter)
            log(f"[{n}/{len(todo)}] {status:9s} {r.name} ({wall:.1f} s)")
            return status

        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        try:
            futures = {}
            for i, r in enumerate(todo):
                device = devices[i % len(devices)] if devices else None
                futures[pool.submit(one, r, device)] = r.name
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    status = fut.result()
                    name = futures[fut]
                    if status == "completed":
                        result.completed.append(name)
                    elif status == "diverged":
                        result.diverged.append(name)
                    elif status == "failed":
                        result.failed.append(name)
        except BaseException:
            stop.set()
            for fut in futures:
                fut.cancel()
            with procs_lock:
                running = list(procs.values())
            for proc in running:
                _signal_group(proc, signal.SIGTERM)
            deadline = time.time() + 15
            for proc in running:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
            pool.shutdown(wait=True)
            with state.lock:
                for rec in state.records.values():
                    if rec.get("status") == "running":
                        rec["status"] = "interrupted"
                state._save()
            log(f"sweep interrupted; run the same command again to finish it ({out})")
            raise
        pool.shutdown(wait=True)
        state.save()
    summary = (f"sweep {out}: {len(result.completed)} completed, {len(result.diverged)} diverged, "
               f"{len(result.failed)} failed, {len(result.skipped)} finished before")
    log(summary)
    if result.failed:
        print(f"tvlars sweep: {len(result.failed)} run(s) failed:", file=sys.stderr)
        for name in result.failed:
            print(f"  {name}: {state.records[name].get('error')}", file=sys.stderr)
    return result


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the run and its children (it leads its own session)
    except (ProcessLookupError, PermissionError):
        pass
