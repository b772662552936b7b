"""The study scripts call tvlars with the shipped grids and write where docs/study.md links.

A stand-in ``tvlars`` (the scripts take it from $TVLARS) records its arguments, so the test
checks the commands without running a study."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tvlars.study.grid import shipped_grids

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.name != "posix", reason="bash scripts")
def test_fashion_study_script_runs_every_shipped_grid_and_reports_where_the_docs_link(tmp_path):
    log = tmp_path / "calls"
    fake = tmp_path / "tvlars"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "TVLARS": str(fake), "RUNS": str(tmp_path / "runs")}
    subprocess.run(["bash", str(ROOT / "scripts" / "fashion-study.sh")], check=True, env=env, cwd=tmp_path)
    calls = log.read_text().splitlines()
    shipped = sorted(name for name in shipped_grids() if name.startswith("fashion-mnist-"))
    swept = sorted(c.split()[1] for c in calls if c.startswith("sweep"))
    assert swept == shipped
    outs = {c.split("--out ")[1].split()[0] for c in calls if not c.startswith("sweep")}
    outs |= {out.removesuffix("/figures") for out in outs}  # a folder with only figures counts
    # every folder docs/study.md links to is one the script writes
    linked = set(re.findall(r"\(study/fashion-mnist/([\w-]+)/", (ROOT / "docs" / "study.md").read_text()))
    assert linked and {f"docs/study/fashion-mnist/{name}" for name in linked} <= outs
