"""Checkpoints: what a loop needs to continue exactly where it stopped, written atomically.

A resumed run must reproduce the uninterrupted one bit for bit, so a checkpoint holds every
random number generator besides the model, optimizer and schedule; and since a crash during
the write must not cost the previous epoch, it goes through tvlars.runfolder.atomic_write.
Only the raw module's state_dict is stored, never a DDP or compiled wrapper's, so a run
resumes on any number of processes.
"""

from __future__ import annotations

import random
from pathlib import Path

from tvlars import runfolder
from tvlars.errors import UserError

FORMAT = "tvlars-checkpoint-1"
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step",
                   "best_test_acc", "best_epoch")


def save_checkpoint(path, state: dict) -> None:
    import torch

    state = {"format": FORMAT, **state}
    runfolder.atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; UserError if unusable."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: the file holds numpy/python RNG states. Only load your own runs.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, pickle garbage, permissions ...
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        msg = msg.split(". ")[0]
        raise UserError(f"cannot read checkpoint {path}: {msg}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a tvlars checkpoint")
    return state


def rng_state() -> dict:
    """Every RNG a run draws from: torch (CPU), cuda (all devices), numpy, python."""
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "cuda": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def training_state(model, optimizer, scheduler, *, epoch: int, step: int, best_test_acc=None, best_epoch=None,
                   **extra) -> dict:
    """The checkpoint of a loop after ``epoch`` epochs and ``step`` optimizer steps; ``model``
    is the raw module; ``extra`` keys are the command's own (see CHECKPOINT_KEYS)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(), "scaler": None,
            "rng": rng_state(), "epoch": epoch, "step": step, "best_test_acc": best_test_acc,
            "best_epoch": best_epoch, **extra}


def restore(state: dict, path, model, optimizer, scheduler, **others) -> None:
    """The inverse of :func:`training_state` (epoch, step and the extra keys stay for the caller)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        for key, obj in others.items():
            if obj is not None:
                obj.load_state_dict(state[key])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise UserError(f"checkpoint {path} does not match this run: {str(err).strip().splitlines()[0]}") from None
    set_rng_state(state["rng"])
