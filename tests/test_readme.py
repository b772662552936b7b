"""Every ```python block of README.md runs as written: each in a fresh interpreter, in an empty
folder, on the CPU.

A block meant for torchrun says so in a comment naming the command and the file, as in
``# sharded.py:  torchrun --standalone --nproc_per_node 2 sharded.py``: it is saved under
that name and run with that command (gloo on the CPU).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import tvlars
from helpers import torchrun

README = Path(__file__).resolve().parents[1] / "README.md"
TIMEOUT_S = 120


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the block's first line of code, code) of each ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, re.M | re.S)]


def torchrun_command(code: str) -> list[str] | None:
    """The command of a comment line ``# ... torchrun [options] FILE.py``, None when there is none."""
    for line in code.splitlines():
        if line.lstrip().startswith("#") and "torchrun" in line.split():
            words = shlex.split(line[line.index("torchrun"):])
            if words[-1].endswith(".py"):
                return words
    return None


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks_and_a_torchrun_one():
    assert len(BLOCKS) >= 3 and any(torchrun_command(code) for _, code in BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs_as_written(tmp_path, line, code):
    source = str(Path(tvlars.__file__).resolve().parents[1])  # this checkout's tvlars, from any folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    command = torchrun_command(code)
    if command is None:
        (tmp_path / "snippet.py").write_text(code)
        argv = [sys.executable, "snippet.py"]
    else:
        if torchrun() is None:
            pytest.fail(f"README.md line {line} is a torchrun example, and torchrun is not installed")
        (tmp_path / command[-1]).write_text(code)
        argv = [torchrun(), *command[1:]]
        env.setdefault("OMP_NUM_THREADS", "1")
    first = code.strip().splitlines()[0]
    try:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md line {line} ({first!r}) ran past {TIMEOUT_S} s")
    assert done.returncode == 0, (f"README.md line {line} ({first!r}) exited {done.returncode}:\n"
                                  f"{done.stdout[-2000:]}{done.stderr[-4000:]}")
