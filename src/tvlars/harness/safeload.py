"""Turning files into objects without running code from them.

A pickle is a program: unpickled with the standard machinery, a file can import any
function and call it (``os.system``, ``open``, ...) before the caller ever looks at the
result. Run folders and data sets travel between people, so every pickle tvlars reads goes
through one of the two readers here, each admitting only what its format holds:

``load_torch_file(path, what=..., allow=...)``
    ``torch.load(weights_only=True)`` (torch's restricted unpickler: tensors and plain
    containers), plus the few extra globals ``allow`` maps by name; anything else is
    refused by name.
``unpickle_arrays(path, what=...)``
    a plain pickle (such as a CIFAR-10 batch, pickled by Python 2) holding dicts, lists,
    tuples, byte and text strings, numbers and numpy arrays of non-object dtypes; the only
    globals admitted are numpy's array and dtype reconstructors (checked wrappers of them).

Both raise :class:`tvlars.errors.UserError` with one line naming the file; a refused file
is reported by the global it asked for, and nothing from it has run.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tvlars.errors import UserError


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _refused(what: str, path, found: str) -> UserError:
    """``found``: "asks for posix.system", "holds a set", ..."""
    return UserError(f"{what} {path} refused: it {found}, which a {what} never does; nothing from it was run")


# --------------------------------------------------------------------------- torch files


def load_torch_file(path, *, what: str, map_location="cpu", allow: dict[str, Callable] | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with ``allow`` (full dotted name -> the object to
    use for it) added to torch's allowlist for this call only.

    Only torch's zip format is read (every torch.save since torch 1.6 writes it). Globals
    outside torch's allowlist and ``allow`` are named in the error: the pickle is scanned
    first (the scan reads its opcodes and runs nothing), and torch's own unpickler refuses
    them again while loading, so the scan is for the message, not the safety.
    """
    import zipfile

    import torch

    allow = dict(allow or {})
    if not zipfile.is_zipfile(path):
        raise UserError(f"cannot read {what} {path}: truncated, or not written by torch.save")
    try:
        asked = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:
        raise UserError(f"cannot read {what} {path}: damaged ({_short(err)})") from None
    foreign = [name for name in asked if name not in allow]
    if foreign:
        raise _refused(what, path, f"asks for {foreign[0]}")
    # ``allow`` as a whole, and only for a file that asks for some of it: rebuilding an
    # object (BUILD) needs its type allowlisted, which the scan does not see as a global
    extra = [(obj, name) for name, obj in allow.items()] if set(asked) & set(allow) else []
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message: advice on weights_only=False first (not ours to give), the reason last
        reason = str(err).split("WeightsUnpickler error:", 1)[-1].strip()
        name = _global_in_message(reason)
        if name is not None:
            raise _refused(what, path, f"asks for {name}") from None
        raise UserError(f"cannot read {what} {path}: {_short(reason)}") from None
    except Exception as err:  # truncated data, permissions, a storage on a missing device ...
        raise UserError(f"cannot read {what} {path}: {_short(err)}") from None


def _short(err) -> str:
    """The first sentence of the first line of an error message."""
    text = err if isinstance(err, str) else first_line(err)
    return (text.strip().splitlines() or [type(err).__name__])[0].split(". ")[0]


def _global_in_message(message: str) -> str | None:
    """The global torch's restricted unpickler refused, from its error message."""
    import re

    match = re.search(r"GLOBAL (\S+)", message) or re.search(r"unrecognized function (\S+)", message)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- plain pickles


class _Refused(pickle.UnpicklingError):
    """Something the format never holds (a global outside the allowlist, an object array):
    the pickle is refused, its message says what it ``found`` ("asks for posix.system")."""


class _ArrayClass:
    """Stands for ``numpy.ndarray`` inside a pickle: only :func:`_reconstruct` takes it, so a
    pickle cannot call the ndarray constructor itself."""

    def __call__(self, *args, **kwargs):
        raise _Refused("calls numpy.ndarray directly")


_NDARRAY = _ArrayClass()


def _plain_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise _Refused("holds a numpy array of Python objects")
    return dtype


def _dtype(spec, align=False, copy=False) -> np.dtype:
    """numpy.dtype as pickles call it (``dtype('u1', 0, 1)`` then ``__setstate__``)."""
    return _plain_dtype(np.dtype(spec, bool(align), bool(copy)))


def _reconstruct(subtype, shape, dtype_spec):
    """numpy's ``_reconstruct(ndarray, (0,), b'b')``: an empty array that ``__setstate__`` fills
    (with a dtype that :func:`_dtype` built)."""
    if subtype is not _NDARRAY:
        raise _Refused("rebuilds an array of another type than numpy.ndarray")
    _plain_dtype(dtype_spec)
    return np.ndarray.__new__(np.ndarray, shape, dtype_spec)


def _frombuffer(buffer, dtype, shape, order):
    """numpy's protocol-5 array reconstructor (Python 3 pickles)."""
    dtype = _plain_dtype(dtype)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _scalar(dtype, data=None):
    """A numpy scalar (``numpy.int64(3)``): its dtype and raw bytes."""
    dtype = _plain_dtype(dtype)
    if not isinstance(data, (bytes, str)):
        raise pickle.UnpicklingError("a numpy scalar must hold raw bytes")
    raw = data.encode("latin1") if isinstance(data, str) else data
    return np.frombuffer(raw, dtype=dtype, count=1)[0]


def _encode(text, encoding="latin1"):
    """``_codecs.encode``: how Python 3 writes ``bytes`` at pickle protocols 0-2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("asks _codecs.encode for another codec than latin1")
    return text.encode("latin1")


#: (module, name) -> what a pickle gets for it. numpy moved ``core`` to ``_core`` in 2.0;
#: Python 2 pickles (the CIFAR-10 batches as distributed) name the old module.
ARRAY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
}


class ArrayUnpickler(pickle.Unpickler):
    """A pickle.Unpickler that admits only :data:`ARRAY_GLOBALS` and no persistent ids."""

    def find_class(self, module: str, name: str):
        try:
            return ARRAY_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"asks for {module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused("holds a persistent id")


def _check_arrays(obj: Any, depth: int = 0) -> None:
    """Only plain containers, strings, numbers and plain numpy arrays, all the way down."""
    if depth > 100:
        raise _Refused("nests containers more than 100 deep")
    if isinstance(obj, np.ndarray):
        if type(obj) is not np.ndarray or obj.dtype.hasobject:
            raise _Refused("holds a numpy array of Python objects")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_arrays(key, depth + 1)
            _check_arrays(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _check_arrays(item, depth + 1)
    elif not isinstance(obj, (str, bytes, bytearray, int, float, complex, np.generic, type(None))):
        raise _Refused(f"holds a {type(obj).__name__} object")


def unpickle_arrays(path, *, what: str, encoding: str = "bytes") -> Any:
    """The object in the pickle file ``path``, read by :class:`ArrayUnpickler`.

    ``encoding`` decodes Python 2 ``str`` objects: "bytes" keeps them as bytes (what the
    CIFAR-10 documentation does), "latin1" makes them text.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or first_line(err)}") from None
    try:
        obj = ArrayUnpickler(io.BytesIO(data), encoding=encoding).load()
        _check_arrays(obj)
    except _Refused as err:
        raise _refused(what, path, str(err)) from None
    except RecursionError:
        raise UserError(f"{what} is not a readable pickle: {path} (nested too deeply)") from None
    except Exception as err:  # a truncated or foreign file can raise almost anything
        raise UserError(f"{what} is not a readable pickle: {path} ({first_line(err)})") from None
    return obj
