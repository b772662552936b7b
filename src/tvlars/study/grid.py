"""The grid language of ``tvlars sweep``: a YAML file that names a set of runs.

Apart from the runner (tvlars.study.sweep) because it is a language: what a grid file
means, how it expands into runs and what each run's folder is called, whatever runs them.

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
    slurm:                    # optional defaults for --launcher slurm: submitit's SlurmExecutor
      partition: gpu          # parameters (tvlars.study.cluster); flags override them
      gpus_per_node: 4
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

Run names
---------
Each run gets ``<out>/<name>/`` where the name joins ``flag-value`` for every flag set
under ``grid:`` (in order of first appearance; constants in ``base:`` stay out of the
name), e.g. ``optimizer-lars_batch_size-512_lr-1_seed-0``. Names are stable: adding
values to an axis never renames existing runs (adding a new flag to ``grid:`` does).

GRID.yaml may also name a grid shipped in the package (``tvlars sweep quickstart``; the
files are tvlars/grids/*.yaml): quickstart, digits, the paper's grids as its text describes them
(paper-cifar10, paper-tinyimagenet, paper-barlowtwins-cifar10) and as its authors' code ran
them (official-*), and the Fashion-MNIST study (fashion-mnist-paper, -official, -lam).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tvlars.cli import file_flag
from tvlars.errors import UserError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

COMMANDS = ("train", "ssl")
#: Flags the sweep sets for every run itself.
RESERVED = ("out", "resume", "config", "help")
MAX_NAME = 180  # folder names stay well under the 255 bytes filesystems allow


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
    slurm: dict[str, Any] = field(default_factory=dict)


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
    keys = {"command", "name", "out", "base", "grid", "workers", "threads", "slurm"}
    unknown = sorted(k for k in set(map(str, data)) - keys if not k.startswith("x-"))
    if unknown:
        raise UserError(f"grid file {path}: unknown key '{unknown[0]}' (expected {', '.join(sorted(keys))})")
    for key in ("workers", "threads"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"grid file {path}: {key} must be a positive integer, not {value!r}")
    if not isinstance(data.get("slurm") or {}, dict):
        raise UserError(f"grid file {path}: slurm must map SLURM settings (submitit's names) to values")
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
    name = data.get("name") or Path(file.name).stem
    if not isinstance(name, str) or not _safe(name) == name:
        raise UserError(f"grid file {path}: name must be a simple folder name, not {name!r}")
    out = data.get("out")
    if out is not None and not isinstance(out, str):
        raise UserError(f"grid file {path}: out must be a folder path")
    return Grid(command=command, name=name, base=dict(base), entries=entries, out=out, text=text,
                workers=data.get("workers"), threads=data.get("threads"), path=str(path),
                slurm=dict(data.get("slurm") or {}))


def shipped_grids() -> dict[str, Traversable]:
    """The ready grids, package data of tvlars (so a wheel holds them), by name (file stem)."""
    folder = resources.files("tvlars") / "grids"
    return {Path(f.name).stem: f for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".yaml")}


def find_grid(path: str | os.PathLike) -> Path | Traversable:
    """A grid file by path, or a shipped grid by name (``quickstart`` or ``quickstart.yaml``)."""
    file = Path(path)
    if file.is_file():
        return file
    shipped = shipped_grids().get(file.name.removesuffix(".yaml")) if len(file.parts) == 1 else None
    if shipped is None:
        raise UserError(f"grid file not found: {path}")
    return shipped


def is_linked(value: Any) -> bool:
    """A list of mappings: flags that move together (see the module doc)."""
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
            if not is_linked(value):
                raise UserError(f"{where}: {key} mixes mappings and values")
            for j, sub in enumerate(value):
                _check_entry(sub, f"{where}.{key}[{j}]")


def _expand_entry(entry: dict) -> list[list[tuple[str, Any]]]:
    """The runs of one grid mapping, each as an ordered list of (flag, value)."""
    axes: list[list[list[tuple[str, Any]]]] = []
    for key, value in entry.items():
        if is_linked(value):
            options = [combo for sub in value for combo in _expand_entry(sub)]
        elif isinstance(value, list):
            options = [[(str(key), v)] for v in value]
        else:
            options = [[(str(key), value)]]
        axes.append(options)
    return [[pair for part in combo for pair in part] for combo in itertools.product(*axes)]


def expand_grid(grid: Grid, parser: argparse.ArgumentParser) -> list[Run]:
    """All runs of a grid, in grid order, each flag checked against ``parser`` (the
    command's own, so a grid fails before its first run rather than in its hundredth)."""
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
    for run in runs:
        run.keys = [k for k in name_keys if k in run.keys]  # one order for every run's name
        run.name = run_name(run.flags, run.keys)
        other = seen.get(run.name)
        if other is not None:
            if canonical(other.flags) == canonical(run.flags):
                continue  # the same run twice: run it once
            raise UserError(f"{where}: two different runs get the folder name {run.name}; "
                            f"put the flag that tells them apart under grid:")
        seen[run.name] = run
        unique.append(run)
    return unique


def _dest(key: Any) -> str:
    return str(key).replace("-", "_")


def _coerce(actions: dict, dest: str, value: Any, where: str, command: str = "this command") -> Any:
    """Check one flag value against the command's parser; numbers given as strings become numbers."""
    if dest in RESERVED:
        raise UserError(f"{where}: '{dest}' is set by the sweep for every run; remove it from the grid file")
    return file_flag(actions, dest, value, where, command)[1]


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


def canonical(flags: dict) -> str:
    """One text per set of flags, whatever their order: how runs are compared."""
    return json.dumps(flags, sort_keys=True, default=str)
