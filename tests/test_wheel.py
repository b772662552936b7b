"""The wheel stands alone: built from the checkout and installed in a fresh virtual
environment that holds it but not the checkout, it runs a shipped grid and imports every
integration.

The fresh environment sees this one's third-party packages (torch, timm, ...) through a
.pth line naming their folder: a plain path line adds the folder to sys.path without
processing the .pth files in it, so an editable install of tvlars there stays inactive.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, **kw) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, **kw)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.skipif(os.name != "posix", reason="the venv layout of POSIX (bin/)")
def test_the_wheel_runs_a_shipped_grid_and_imports_the_integrations_without_the_checkout(tmp_path):
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", source)
    (wheel,) = (tmp_path / "dist").glob("tvlars-*.whl")

    fresh = tmp_path / "fresh"
    run(sys.executable, "-m", "venv", "--without-pip", fresh)
    python = fresh / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    shared = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "shared_environment.pth").write_text("".join(f"{path}\n" for path in shared))

    plan = run(fresh / "bin" / "tvlars", "sweep", "quickstart", "--dry-run", cwd=tmp_path)
    assert "sweep runs/quickstart: 15 runs of tvlars train" in plan, plan
    report = run(python, "-c", "import importlib.metadata, tvlars, tvlars.integrations.timm, tvlars.integrations.lightning; "
                               "print(tvlars.__file__, tvlars.__version__, importlib.metadata.version('tvlars'))",
                 cwd=tmp_path)
    file, version, installed = report.split()
    assert Path(file).is_relative_to(fresh) and version == installed
    assert (Path(file).parent / "py.typed").is_file()
