"""Checkpoints: atomic writes, clear errors on bad files, RNG state round trip."""

import os
import random

import numpy as np
import pytest
import torch

from tvlars.errors import UserError
from tvlars.harness import checkpoint as ckpt


def test_round_trip(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"epoch": 3, "model": {"w": torch.arange(4.0)}})
    state = ckpt.load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_crash_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj, fh, *a, **kw):
        fh.write(b"partial garbage")  # half a file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_replace_is_atomic_rename(tmp_path, monkeypatch):
    """The new file appears only through os.replace of a fully written temp file."""
    path = tmp_path / "checkpoint.pt"
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.basename(src), os.path.basename(dst), ckpt.load_checkpoint(src)["epoch"]))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    ckpt.save_checkpoint(path, {"epoch": 7})
    assert seen and seen[0][1] == "checkpoint.pt" and seen[0][0] != "checkpoint.pt" and seen[0][2] == 7


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_unreadable_checkpoint_is_a_user_error(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content is None:  # a truncated real checkpoint
        ckpt.save_checkpoint(path, {"epoch": 1, "model": {"w": torch.randn(100)}})
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as err:
        ckpt.load_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_foreign_file_and_missing_file(tmp_path):
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a tvlars checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UserError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
