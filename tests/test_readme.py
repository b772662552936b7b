"""Every ```python block of README.md and of every page of the documentation site (docs/**/*.md,
and the files those pages include with ``--8<-- "FILE"``) runs as written: each in a fresh
interpreter, in an empty folder, on the CPU. A block that appears in several places (the README
keeps the snippets its guides expand on) runs once, under the name of its first place.

A block meant for torchrun says so in a comment naming the command and the file, as in
``# sharded.py:  torchrun --standalone --nproc_per_node 2 sharded.py``: it is saved under
that name and run with that command (gloo on the CPU).

Shell blocks (```bash) are not run: they need data sets, GPUs or a cluster, and the commands
they show are tested through the CLI (tests/test_cli.py and the others). So that a Python
example cannot escape by its fence, a page may fence code only with the tags in ``FENCES``.
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

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT_S = 120
# python: run; bash: shell commands, not run; text: output and listings; yaml: configuration files.
FENCES = {"python", "bash", "text", "yaml"}
SNIPPET = re.compile(r'^--8<--\s+"([^"]+)"\s*$', re.M)  # pymdownx.snippets, base_path = the repository root


def pages() -> list[Path]:
    """README.md, every Markdown file under docs/, and the files those include, each once."""
    found = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    for page in list(found):
        for name in SNIPPET.findall(page.read_text(encoding="utf-8")):
            if ROOT / name not in found:
                found.append(ROOT / name)
    return found


def fences(text: str) -> list[tuple[int, str, str]]:
    """(line number of the block's first line of code, info string, code) of each fenced block."""
    return [(text.count("\n", 0, m.start(3)) + 1, m.group(2).strip(), m.group(3))
            for m in re.finditer(r"^(```+)([^\n`]*)\n(.*?)^\1[ \t]*$", text, re.M | re.S)]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the block's first line of code, code) of each ```python block."""
    return [(line, code) for line, info, code in fences(text) if info == "python"]


def torchrun_command(code: str) -> list[str] | None:
    """The command of a comment line ``# ... torchrun [options] FILE.py``, None when there is none."""
    for line in code.splitlines():
        if line.lstrip().startswith("#") and "torchrun" in line.split():
            words = shlex.split(line[line.index("torchrun"):])
            if words[-1].endswith(".py"):
                return words
    return None


def where(page: Path, line: int) -> str:
    return f"{page.relative_to(ROOT).as_posix()}:{line}"


PAGES = pages()
BLOCKS: dict[str, list[str]] = {}  # code -> every place it appears, in page order
for _page in PAGES:
    for _line, _code in python_blocks(_page.read_text(encoding="utf-8")):
        BLOCKS.setdefault(_code, []).append(where(_page, _line))


def test_the_pages_have_python_blocks_and_a_torchrun_one():
    places = [place for places in BLOCKS.values() for place in places]
    assert any(p.startswith("README.md:") for p in places) and any(p.startswith("docs/") for p in places)
    assert len(BLOCKS) >= 3 and any(torchrun_command(code) for code in BLOCKS)


def test_the_blocks_are_found_as_markdown_fences():
    text = "intro\n\n```python\nprint(1)\n```\n\n````text\n```python\nnot a block\n```\n````\n\n```bash\nls\n```\n"
    assert fences(text) == [(4, "python", "print(1)\n"), (8, "text", "```python\nnot a block\n```\n"),
                            (14, "bash", "ls\n")]
    assert python_blocks(text) == [(4, "print(1)\n")]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_code_block_is_fenced_with_a_known_language(page):
    unknown = [f"{where(page, line)} ```{info}" for line, info, _ in fences(page.read_text(encoding="utf-8"))
               if info not in FENCES]
    assert not unknown, f"fence each block as one of {sorted(FENCES)} (python blocks run in the tests): {unknown}"


@pytest.mark.slow
@pytest.mark.parametrize("code", list(BLOCKS), ids=[places[0] for places in BLOCKS.values()])
def test_python_block_runs_as_written(tmp_path, code):
    place = " and ".join(BLOCKS[code])
    source = str(Path(tvlars.__file__).resolve().parents[1])  # this checkout's tvlars, from any folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    command = torchrun_command(code)
    if command is None:
        (tmp_path / "snippet.py").write_text(code)
        argv = [sys.executable, "snippet.py"]
    else:
        if torchrun() is None:
            pytest.fail(f"{place} is a torchrun example, and torchrun is not installed")
        (tmp_path / command[-1]).write_text(code)
        argv = [torchrun(), *command[1:]]
        env.setdefault("OMP_NUM_THREADS", "1")
    first = code.strip().splitlines()[0]
    try:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{place} ({first!r}) ran past {TIMEOUT_S} s")
    assert done.returncode == 0, (f"{place} ({first!r}) exited {done.returncode}:\n"
                                  f"{done.stdout[-2000:]}{done.stderr[-4000:]}")
