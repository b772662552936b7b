"""Helpers shared by the end-to-end suites (test_train, test_train_ddp, test_ssl)."""

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path


def run_command(module, out, *flags) -> int:
    """A command module (tvlars.harness.train or .ssl) run in this process, --out ``out``."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(["--out", str(out), *flags])
    args.command = module.__name__.rsplit(".", 1)[-1]
    return module.run(args)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def weights(out) -> dict:
    """The model state_dict of the checkpoint in run folder ``out``."""
    import torch

    return torch.load(Path(out) / "checkpoint.pt", weights_only=False)["model"]


def torchrun() -> str | None:
    """The torchrun next to this interpreter, else on PATH, else None."""
    exe = Path(sys.executable).with_name("torchrun")
    return str(exe) if exe.exists() else shutil.which("torchrun")


def tvlars_cli(*argv, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    """`python -m tvlars ARGV` in a fresh interpreter; ``env`` adds to the environment."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tvlars", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def tvlars_torchrun(nproc: int, *argv, env=None, timeout=120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node NPROC -m tvlars ARGV` (CPU: gloo)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([torchrun(), "--standalone", "--nproc_per_node", str(nproc), "-m", "tvlars", *argv],
                          capture_output=True, text=True, env=env, timeout=timeout)
