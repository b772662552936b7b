"""Helpers shared by the end-to-end suites (test_train, test_train_ddp, test_ssl)."""

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path


def run_command(module, out, *flags) -> int:
    """A command module (tvlars.harness.supervised.train or tvlars.harness.ssl.pretrain) run in
    this process, --out ``out``."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(["--out", str(out), *flags]))


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def weights(out) -> dict:
    """The model state_dict of the checkpoint in run folder ``out``."""
    import torch

    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)["model"]


def torchrun() -> str | None:
    """The torchrun next to this interpreter, else on PATH, else None."""
    exe = Path(sys.executable).with_name("torchrun")
    return str(exe) if exe.exists() else shutil.which("torchrun")


def tvlars_cli(*argv, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    """`python -m tvlars ARGV` in a fresh interpreter; ``env`` adds to the environment."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tvlars", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def tvlars_torchrun(nproc: int, *argv, env=None, timeout=120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node NPROC -m tvlars ARGV` (CPU: gloo)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([torchrun(), "--standalone", "--nproc_per_node", str(nproc), "-m", "tvlars", *argv],
                          capture_output=True, text=True, env=env, timeout=timeout)


def run_gloo(world: int, worker, out_dir) -> list:
    """Runs ``worker(rank, world)`` in ``world`` spawned processes joined in a gloo process
    group on loopback, and returns what each rank's worker returned (rank order).
    ``worker`` must be a module-level function (it is pickled by reference)."""
    import socket
    import warnings

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(_gloo_main, args=(world, port, worker, str(out_dir)), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]


def _gloo_main(rank, world, port, worker, out_dir):
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(worker(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # skip interpreter teardown: a late C++ thread destructor can abort (SIGABRT) a finished worker
    os._exit(0)


def python2_pickle_dump(obj, file) -> None:
    """Writes ``obj`` as Python 2's ``cPickle.dump(obj, file, 2)`` did, which is how the
    CIFAR-10 batches were distributed: every string an 8-bit string (SHORT_BINSTRING /
    BINSTRING, no unicode), numpy's reduce arguments with ints for bools, and numpy's
    module named ``numpy.core`` (numpy 2 calls it ``numpy._core``)."""
    import pickle
    import struct

    class Python2Pickler(pickle._Pickler):
        dispatch = pickle._Pickler.dispatch.copy()

        def save_8bit_string(self, obj):
            raw = obj.encode("latin1") if isinstance(obj, str) else obj
            if len(raw) < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
            else:
                self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
            self.memoize(obj)

        def save_bool_as_int(self, obj):
            self.save_long(int(obj))

        def save_global(self, obj, name=None):
            module = obj.__module__.replace("numpy._core", "numpy.core")
            self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
            self.memoize(obj)

        dispatch[str] = save_8bit_string
        dispatch[bytes] = save_8bit_string
        dispatch[bool] = save_bool_as_int

    Python2Pickler(file, protocol=2).dump(obj)
