"""bench/gpu_check.py: its CPU-safe parts (--cpu-dry-run, tiny shapes), and that one failing
section never hides the others. The CUDA sections skip without a GPU."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_check"]


def statuses(report: str) -> dict:
    """section -> status, from the summary table."""
    rows = [line.split("|")[1:3] for line in report.splitlines() if line.startswith("| ") and line.count("|") == 5]
    return {name.strip(): status.strip() for name, status in rows if name.strip() != "section"}


def test_dry_run_runs_the_cpu_safe_sections(gpu_check, tmp_path):
    real_compile = torch.compile
    out = tmp_path / "report.md"
    assert gpu_check.main(["--cpu-dry-run", "--out", str(out)]) == 0
    assert torch.compile is real_compile  # the dry run's eager stand-in is gone
    report = out.read_text()
    assert statuses(report) == {"reference": "pass", "sync-optimizer": "skip", "sync-training": "skip",
                                "step-time": "pass", "throughput": "pass", "torchrun": "skip"}
    for optimizer in ("LARS", "TVLARS", "LAMB"):
        for path in ("default", "single", "foreach"):
            assert report.count(f"| {optimizer} | {path} | float") == 2  # float64 and float32 vs the reference
            assert f"| {optimizer} | {path} | " in report.split("### step-time")[1]
    assert "does not exist yet" in report or "exists" in report  # the --fsdp flag was looked for


def test_a_failing_section_hides_no_other(gpu_check, tmp_path, monkeypatch, capsys):
    # a wrong learning rate must show as a mismatch against the reference ...
    name, cls, kw, ref = gpu_check.OPTIMIZERS[0]
    monkeypatch.setattr(gpu_check, "OPTIMIZERS", [(name, cls, dict(kw, lr=kw["lr"] * 1.01), ref)])

    def broken(ctx):  # ... and a section that raises is that section's failure alone
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setitem(gpu_check.RUNNERS, "step-time", broken)
    out = tmp_path / "report.md"
    assert gpu_check.main(["--cpu-dry-run", "--sections", "reference,step-time,throughput", "--out", str(out)]) == 1
    report = out.read_text()
    assert statuses(report) == {"reference": "fail", "step-time": "fail", "throughput": "pass"}
    assert "RuntimeError: CUDA error: an illegal memory access was encountered |" in report
    mismatches = [line for line in report.splitlines() if "MISMATCH" in line]
    assert len(mismatches) == 6  # every path, both dtypes


def test_unknown_sections_are_refused(gpu_check):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--cpu-dry-run", "--sections", "reference,benchmarks"])
    assert exit_info.value.code == 2
