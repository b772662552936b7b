"""Checkpoints: what a loop needs to continue exactly where it stopped, written atomically,
read without running anything.

A resumed run must reproduce the uninterrupted one bit for bit, so a checkpoint holds every
random number generator besides the model, optimizer and schedule; and since a crash during
the write must not cost the previous epoch, it goes through tvlars.runfolder.atomic_write.
Only the raw module's state_dict is stored, never a DDP or compiled wrapper's, so a run
resumes on any number of processes.

A checkpoint holds plain data only: what ``torch.load(weights_only=True)`` rebuilds without
help (tensors, dicts, lists, tuples, strings, numbers, booleans, None), so loading one never
runs code from the file. That is why the RNG states are kept as tensors (``rng_state``):
numpy's state is an ndarray and Python's a long tuple, neither of which a restricted loader
should have to admit. Format 1 (tvlars 0.1.0) stored numpy's state as an ndarray; loading it
admits exactly that (uint32 arrays, through checked stand-ins for numpy's reconstructors)
and converts it.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path

from tvlars import runfolder
from tvlars.errors import UserError

FORMAT = "tvlars-checkpoint-2"
#: tvlars 0.1.0: the same keys, numpy's RNG state as an ndarray, Python's as a tuple.
FORMAT_0_1 = "tvlars-checkpoint-1"
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step",
                   "best_test_acc", "best_epoch")


def save_checkpoint(path, state: dict) -> None:
    """A failed write (disk full, quota) is one line and keeps the previous checkpoint."""
    import torch

    path = Path(path)
    state = {"format": FORMAT, **state}
    _check_plain(state)
    try:
        runfolder.atomic_write(path, lambda fh: torch.save(state, fh))
    except OSError as err:  # the user's to fix
        kept = "the previous checkpoint is kept" if path.exists() else "no checkpoint was kept"
        raise UserError(f"cannot write checkpoint {path}: {err.strerror or err}; {kept}") from None


def _check_plain(obj, where: str = "state") -> None:
    """TypeError for anything a ``weights_only`` load would refuse: writing it would be a bug
    (a checkpoint we cannot read back), found at the first save rather than on --resume."""
    import torch

    if isinstance(obj, torch.Tensor) or type(obj) in (str, bytes, int, float, bool, type(None)):
        return  # exact types: a numpy float64 is a float, but pickles as a numpy global
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            _check_plain(key, where)
            _check_plain(value, f"{where}[{key!r}]")
    elif type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    else:
        raise TypeError(f"checkpoint {where}: a {type(obj).__name__} is not plain data")


def _numpy_0_1_globals() -> dict:
    """What a 0.1.0 checkpoint's numpy RNG state (a uint32 ndarray) asks for, as checked
    stand-ins: only the array type and uint32 dtypes can be rebuilt."""
    import numpy as np

    def reconstruct(subtype, shape, dtype_spec):
        if subtype is not np.ndarray or np.dtype(dtype_spec).hasobject:
            raise ValueError("only plain numpy arrays")
        return np.ndarray.__new__(np.ndarray, shape, dtype_spec)

    def dtype(spec, align=False, copy=False):
        result = np.dtype(spec, bool(align), bool(copy))
        if result != np.dtype(np.uint32):
            raise ValueError(f"numpy dtype {result} is not a random state's")
        return result

    allow = {f"numpy.{core}.multiarray._reconstruct": reconstruct for core in ("core", "_core")}
    # the unpickler rebuilds (BUILD) only objects of allowlisted types: ndarray, uint32 dtype
    allow.update({"numpy.ndarray": np.ndarray, "numpy.dtype": dtype,
                  "numpy.dtypes.UInt32DType": type(np.dtype(np.uint32))})
    return allow


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (or by tvlars 0.1.0); UserError
    if unusable. Nothing in the file can run: see the module doc."""
    from tvlars.harness.safeload import first_line, load_torch_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    state = load_torch_file(path, what="checkpoint", map_location=map_location, allow=_numpy_0_1_globals())
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, FORMAT_0_1):
        raise UserError(f"{path} is not a tvlars checkpoint")
    if "rng" in state:  # (restore() reports a checkpoint without one)
        try:
            if state["format"] == FORMAT_0_1:
                state = {**state, "rng": _rng_from_tuples(state["rng"])}
            _check_rng(state["rng"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"checkpoint {path} holds no usable RNG state ({first_line(err)})") from None
    return {**state, "format": FORMAT}


def rng_state() -> dict:
    """Every RNG a run draws from, as tensors and numbers: torch (CPU), cuda (all devices),
    numpy (its Mersenne Twister) and python (``random``)."""
    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return _rng_from_tuples({"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate(), "cuda": cuda})


def _rng_from_tuples(rng: dict) -> dict:
    """numpy's get_state() and Python's getstate() tuples (as 0.1.0 saved them) as plain
    tensors and numbers."""
    import numpy as np
    import torch

    algorithm, key, pos, has_gauss, cached_gaussian = rng["numpy"]
    version, internal, gauss_next = rng["python"]
    if not isinstance(key, np.ndarray):
        raise TypeError("numpy's key is not an array")
    return {"torch": rng["torch"], "cuda": rng.get("cuda"),
            "numpy": {"algorithm": algorithm, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
            "python": {"version": version, "state": torch.tensor(list(internal), dtype=torch.int64),
                       "gauss_next": gauss_next}}


def _check_rng(rng: dict) -> None:
    """Raise (TypeError/ValueError/KeyError) unless ``rng`` is what :func:`rng_state` makes,
    so a damaged file is reported when read, not half-way through restoring."""
    import torch

    def tensor(value, dtype, size=None):
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != 1:
            raise TypeError(f"expected a 1-D {dtype} tensor, got {type(value).__name__}")
        if size is not None and value.numel() != size:
            raise ValueError(f"expected {size} values, got {value.numel()}")

    def number(value, kinds, name):
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise TypeError(f"{name} is a {type(value).__name__}")

    tensor(rng["torch"], torch.uint8)
    if rng.get("cuda") is not None:
        if not isinstance(rng["cuda"], (list, tuple)):
            raise TypeError("cuda is not a list")
        for s in rng["cuda"]:
            tensor(s, torch.uint8)
    numpy_state, python_state = rng["numpy"], rng["python"]
    if numpy_state["algorithm"] != "MT19937":
        raise ValueError(f"numpy algorithm {numpy_state['algorithm']!r}")
    tensor(numpy_state["key"], torch.int64, 624)
    number(numpy_state["pos"], int, "numpy pos")
    number(numpy_state["has_gauss"], int, "numpy has_gauss")
    number(numpy_state["cached_gaussian"], (int, float), "numpy cached_gaussian")
    number(python_state["version"], int, "python version")
    tensor(python_state["state"], torch.int64, 625)
    if python_state["gauss_next"] is not None:
        number(python_state["gauss_next"], (int, float), "python gauss_next")
    for words in (numpy_state["key"], python_state["state"]):
        if bool(((words < 0) | (words >= 2 ** 32)).any()):
            raise ValueError("a state word outside 0..2**32-1")


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["algorithm"], numpy_state["key"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def training_state(model, optimizer, scheduler, *, epoch: int, step: int, best_test_acc=None, best_epoch=None,
                   **extra) -> dict:
    """The checkpoint of a loop after ``epoch`` epochs and ``step`` optimizer steps; ``model``
    is the raw module; ``extra`` keys are the command's own (see CHECKPOINT_KEYS). Every rank
    calls it: a sharded (--fsdp) model is gathered whole onto rank 0 (keyed by parameter
    name), so that the checkpoint is the same file as without sharding."""
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optimizer_state = (get_model_state_dict(model, options=whole),
                                        get_optimizer_state_dict(model, optimizer, options=whole))
    else:
        model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    return {"model": model_state, "optimizer": optimizer_state,
            "scheduler": None if scheduler is None else scheduler.state_dict(), "scaler": None,
            "rng": rng_state(), "epoch": epoch, "step": step, "best_test_acc": best_test_acc,
            "best_epoch": best_epoch, **extra}


def _sharded(model) -> bool:
    """Whether ``model``'s parameters are DTensors (tvlars train --fsdp)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _by_name(optimizer_state: dict, model, optimizer) -> dict:
    """An optimizer state_dict keyed by parameter name, as torch.distributed.checkpoint loads
    it (a checkpoint of an unsharded run keys by position)."""
    groups = optimizer_state["param_groups"]
    if all(isinstance(i, str) for g in groups for i in g["params"]):
        return optimizer_state
    names = {id(p): n for n, p in model.named_parameters()}
    rename = {}
    for saved, group in zip(groups, optimizer.param_groups):
        rename.update({i: names[id(p)] for i, p in zip(saved["params"], group["params"])})
    return {"state": {rename[i]: s for i, s in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [rename[i] for i in g["params"]]} for g in groups]}


def restore(state: dict, path, model, optimizer, scheduler, **others) -> None:
    """The inverse of :func:`training_state` (epoch, step and the extra keys stay for the caller)."""
    try:
        if _sharded(model):  # whole tensors in the file: each rank keeps its shards
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            whole = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, state["model"], options=whole)
            set_optimizer_state_dict(model, optimizer, _by_name(state["optimizer"], model, optimizer), options=whole)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        for key, obj in others.items():
            if obj is not None:
                obj.load_state_dict(state[key])
        rng = state["rng"]
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        from tvlars.harness.safeload import first_line

        raise UserError(f"checkpoint {path} does not match this run: {first_line(err)}") from None
    set_rng_state(rng)
