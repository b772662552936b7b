"""Every script in examples/ runs as its docstring says, and shows what it claims to."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, monkeypatch, capsys, *argv) -> str:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["hf_trainer.py", "lightning_module.py", "timm_vit.py"]


def test_timm_vit(monkeypatch, capsys):
    out = run_example("timm_vit.py", monkeypatch, capsys)
    losses = [float(x) for x in re.findall(r"epoch \d+  loss ([\d.]+)", out)]
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], out
    assert "head.weight" in out and "blocks.1.norm1.weight      trust 1.00e+00" in out  # 1-D: not adapted


def test_hf_trainer(monkeypatch, capsys):
    out = run_example("hf_trainer.py", monkeypatch, capsys)  # TVLARS; LAMB's recipe: test_integrations_hf
    losses = [float(x) for x in re.search(r"loss every 3 steps: \[(.*)\]", out).group(1).split(", ")]
    assert losses[-1] < losses[0] - 1.0, out
    assert "the weights at step 12 are the same" in out and "non-finite gradients: 0" in out


def test_lightning_module(monkeypatch, capsys):
    out = run_example("lightning_module.py", monkeypatch, capsys, "--optimizer", "lamb")  # with TVFactorLR
    assert "31 steps taken, 1 skipped" in out and "the weights after epoch 4 are the same" in out, out
