"""tvlars train --fsdp on CPU (gloo): 2 processes sharding the model with FSDP2, stopped and
resumed from the (whole) checkpoint, end where 1 process training the unsharded model ends."""

import pytest
import torch

from helpers import read_csv, run_gloo, torchrun, tvlars_cli, tvlars_torchrun
from test_train_ddp import FLAGS

ENV = {"OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or torchrun() is None, reason="needs torch.distributed")
def test_two_sharded_processes_stopped_and_resumed_match_one(tmp_path):
    # the DDP test's run; tvlars here: per-layer trust ratios of whole layers, not of shards
    flags = FLAGS
    one = tvlars_cli(*flags, "--out", str(tmp_path / "one"), env=ENV)
    assert one.returncode == 0, one.stderr[-4000:]
    first = tvlars_torchrun(2, *flags, "--fsdp", "--stop-after-epochs", "1", "--out", str(tmp_path / "two"), env=ENV)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "sync-bn" not in first.stderr  # an MLP has no batch norm to synchronise
    # the checkpoint is whole: parameters keyed as without sharding, full shapes
    saved = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    reference = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    assert {k: v.shape for k, v in saved["model"].items()} == {k: v.shape for k, v in reference["model"].items()}
    again = tvlars_torchrun(2, "train", "--out", str(tmp_path / "two"), "--resume", "--fsdp", "--no-progress", env=ENV)
    assert again.returncode == 0, again.stderr[-4000:]

    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    assert {s["step"].item() for s in b["optimizer"]["state"].values()} == {22.0}
    for r1, r2 in zip(read_csv(tmp_path / "one" / "metrics.csv"), read_csv(tmp_path / "two" / "metrics.csv"),
                      strict=True):
        assert r1["step"] == r2["step"], (r1, r2)
        assert float(r1["test_acc"]) == pytest.approx(float(r2["test_acc"]), abs=0.23), (r1, r2)  # <= 1 of 450
        assert float(r1["train_loss"]) == pytest.approx(float(r2["train_loss"]), rel=1e-4)


def test_ssl_refuses_fsdp(tmp_path):
    done = tvlars_cli("ssl", "--dataset", "digits", "--fsdp", "--out", str(tmp_path / "run"), env=ENV)
    assert done.returncode == 2 and "--fsdp" in done.stderr, done.stderr[-2000:]


def _sync_bn_notes(rank, world):
    """What preparing an MLP (sharded) and an MLP with batch norm (DDP) says on 2 CPU processes."""
    import contextlib
    import io
    import os

    from tvlars.harness.models import build_model
    from tvlars.harness.runtime import prepare_model, setup_runtime

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    runtime = setup_runtime("cpu")
    notes = []
    for name, fsdp in (("mlp", True), ("mlp-bn", False)):
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            prepare_model(build_model(name, 10, 1, 8), runtime, sync_bn=True, fsdp=fsdp)
        notes.append(said.getvalue())
    return notes


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_the_sync_bn_note_only_where_batch_norm_is(tmp_path):
    (mlp, mlp_bn), (quiet, also_quiet) = run_gloo(2, _sync_bn_notes, tmp_path)
    assert mlp == ""  # nothing about batch norm, and no warning, for a model without
    assert mlp_bn.startswith("tvlars: note: batch norm statistics stay per process: --sync-bn")
    assert mlp_bn.count("\n") == 1
    assert quiet == also_quiet == ""
