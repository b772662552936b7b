"""The ``tvlars`` command: one sub-command per module, imported only when used.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``. A
command whose parser has ``--config`` reads a YAML file of flag values first; flags
given on the command line override it.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import tvlars
from tvlars.errors import UserError

COMMANDS = {
    "train": ("tvlars.harness.supervised.train", "train a classifier with LARS, LAMB, TVLARS or SGD"),
    "ssl": ("tvlars.harness.ssl.pretrain", "Barlow Twins pre-training, then linear-probe and kNN evaluation"),
    "sweep": ("tvlars.study.sweep", "run the Cartesian product of train/ssl flags from a grid file"),
    "report": ("tvlars.study.report", "Table 1 of a sweep: accuracy per optimizer, batch size and lr"),
    "plot": ("tvlars.study.plot", "the paper's figures for a run or a sweep"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def file_flag(actions: dict[str, argparse.Action], key: Any, value: Any, where: str, command: str) -> tuple[str, Any]:
    """(destination, value) of a flag set in a file (a --config file, a sweep's grid), checked
    as argparse checks it on a command line: an unknown key names the closest flag; switches
    take true or false, numbers numbers (given as strings too), choices one of theirs."""
    dest = str(key).replace("-", "_")
    action = actions.get(dest)
    if action is None or not action.option_strings:
        flags = [d.replace("_", "-") for d, a in actions.items() if a.option_strings]
        close = difflib.get_close_matches(dest.replace("_", "-"), flags, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (see {command} --help)"
        raise UserError(f"{where}: unknown flag '{key}' for {command}{hint}")
    flag = next((o for o in action.option_strings if o.lstrip("-").replace("-", "_") == dest),
                action.option_strings[-1])
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: {flag} takes true or false, not {value!r}")
        return dest, value
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
    return dest, value


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Flag values from a YAML file, checked against the parser's flags."""
    import yaml  # the harness extra; the optimizers never get here

    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or "not UTF-8 text"
        raise UserError(f"cannot read config file {path}: {why}") from None
    except yaml.YAMLError as err:  # also a python/object tag: safe_load builds plain data only
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must map flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    return dict(file_flag(actions, key, value, f"config file {path}", parser.prog) for key, value in values.items())


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``tvlars NAME`` alone: what `tvlars sweep` checks a grid's flags against."""
    if name not in COMMANDS:
        raise UserError(f"unknown command {name!r} (expected {', '.join(COMMANDS)})")
    parser = _Parser(prog=f"tvlars {name}")
    try:
        importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    except ImportError as err:
        raise UserError(f"tvlars {name} is not available ({err})") from None
    return parser


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = _Parser(prog="tvlars", description="Large-batch training with layer-wise adaptive optimizers.")
    parser.add_argument("--version", action="version", version=f"tvlars {tvlars.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers = {}
    for name, (module, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        importlib.import_module(module).add_arguments(p)
        subparsers[name] = p
    return parser, subparsers


def parse_formats(text: str, allowed: Sequence[str]) -> list[str]:
    """``--format png,svg``: the formats in order, each once (report and plot take it)."""
    formats = [f.strip().lower().lstrip(".") for f in str(text).split(",") if f.strip()]
    if not formats:
        raise UserError(f"--format: give one or more of {', '.join(allowed)}")
    for f in formats:
        if f not in allowed:
            raise UserError(f"--format: unknown format '{f}' (expected {', '.join(allowed)})")
    return list(dict.fromkeys(formats))


def exit_status(command: Callable[[], int | None]) -> int:
    """Runs ``command``; a UserError becomes one line on stderr and status 2, Ctrl-C 130."""
    try:
        return int(command() or 0)
    except UserError as err:
        print(f"tvlars: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tvlars: interrupted", file=sys.stderr)
        return 130


def _dispatch(argv: list[str]) -> int:
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    sub = subparsers[args.command]
    run = importlib.import_module(COMMANDS[args.command][0]).run
    if not getattr(args, "config", None):
        return run(args)
    from_file = _config_defaults(sub, args.config)
    sub.set_defaults(**from_file)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as err:  # "--lr must be positive": name the file when it set --lr
        dest = {opt: a.dest for a in sub._actions for opt in a.option_strings}.get(str(err).split(" ", 1)[0])
        if dest in from_file and getattr(args, dest) == from_file[dest]:
            raise UserError(f"config file {args.config}: {err}") from None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    return exit_status(lambda: _dispatch(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
