"""One run of a sweep as a process, whoever starts it: its command, its log, its outcome,
and the same run as a submitit job (:class:`RunJob`).

Every launcher of `tvlars sweep` (its own subprocess pool, submitit's local executor, a
SLURM job array) runs a run as the same process::

    python -m tvlars COMMAND --config <run>/sweep-run.yaml --out <run> --resume

(``python -m torch.distributed.run --standalone --nproc_per_node N -m tvlars ...`` for a
run on N GPUs), with its output appended to ``<run>/log.txt``, while holding the run
folder's :class:`tvlars.runfolder.RunLock`. ``--resume`` makes a launch the same whether
the run is new, half done or requeued after a time limit.

The environment variable ``TVLARS_SWEEP_LAUNCHER`` replaces ``python -m tvlars`` (a command
prefix, split like a shell would): tests, wrappers, containers.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

from tvlars import runfolder
from tvlars.runfolder import FINISHED, RunLock, describe_holder, run_state

LAUNCHER_ENV = "TVLARS_SWEEP_LAUNCHER"
#: Seconds a stopped run gets to exit on SIGTERM before SIGKILL.
STOP_GRACE_S = 15
#: Seconds a job whose run died waits before calling it a failure: a time limit or a
#: preemption kills the run too, and the scheduler's signal that requeues the job may come
#: a moment later.
SIGNAL_WAIT_S = 3


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_launcher(nproc: int = 1) -> list[str]:
    """The command prefix that runs ``tvlars``: $TVLARS_SWEEP_LAUNCHER or ``python -m tvlars``,
    under torchrun for a run of ``nproc`` processes (one per GPU)."""
    prefix = os.environ.get(LAUNCHER_ENV)
    if prefix:
        return shlex.split(prefix)
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "tvlars"]
    return [sys.executable, "-m", "tvlars"]


def run_argv(launcher: Sequence[str], command: str, run_dir: Path) -> list[str]:
    return [*launcher, command, "--config", str(run_dir / runfolder.SWEEP_FLAGS), "--out", str(run_dir), "--resume"]


def start_run(argv: Sequence[str], run_dir: Path, env: Mapping[str, str | None], note: str) -> subprocess.Popen:
    """The run's process, its output appended to log.txt after a header naming this launch.
    ``env`` changes this process's environment for it (None: a variable removed). The run
    leads its own session, so that stopping it stops its children (torchrun's workers)."""
    environment = {**os.environ, **{k: v for k, v in env.items() if v is not None}}
    for key in [k for k, v in env.items() if v is None]:
        environment.pop(key, None)
    with open(run_dir / runfolder.SWEEP_LOG, "a", encoding="utf-8") as logfile:
        logfile.write(f"=== tvlars sweep {now()}: {note}\n=== {shlex.join(argv)}\n")
        logfile.flush()
        return subprocess.Popen(list(argv), stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=environment, start_new_session=True)


def signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the run and its children
    except (ProcessLookupError, PermissionError):
        pass


def stop_run(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM (the run keeps its last epoch's checkpoint), SIGKILL after ``grace_s``.
    Polls rather than waits: it also runs inside a signal handler that interrupted a poll."""
    signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is None:
        signal_group(process, signal.SIGKILL)


def last_line(path: Path) -> str | None:
    """The last non-empty line of a text file (its tail only), None without one."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 8192))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    lines = [line.strip() for line in lines if line.strip()]
    return lines[-1] if lines else None


def outcome(run_dir: Path, returncode: int) -> tuple[str, str | None]:
    """(status, error) of a run whose process exited: its folder's word first, since
    `tvlars train` exits 1 on a diverged run, which is a finished run, not a failure."""
    status = run_state(run_dir)
    if status in FINISHED:
        return status, None
    log = run_dir / runfolder.SWEEP_LOG
    why = f"exit status {returncode}" if returncode != 0 else "exited 0 without a finished summary.json"
    return "failed", f"{why}: {last_line(log) or 'no output'} (see {log})"


class RunFailed(RuntimeError):
    """A run ended unfinished for its own reasons: its job ends here, it is not requeued."""


def failure_line(text: str | None) -> str | None:
    """A job's last stderr line as a failure's reason: RunFailed's message as it is, any
    other exception with its name."""
    prefix = f"{RunFailed.__module__}.{RunFailed.__qualname__}: "
    return text[len(prefix):] if text and text.startswith(prefix) else text


def job_owner() -> str:
    """Who runs this process, as a lock and a log name it: ``slurm job 4242_3``, ``local job 812``."""
    try:
        import submitit

        environment = submitit.JobEnvironment()
        return f"{environment.cluster} job {environment.job_id}"
    except (ImportError, RuntimeError):  # RuntimeError: not inside a submitit job
        return f"pid {os.getpid()}"


class RunJob:
    """One run of a sweep as a submitit job: a picklable callable that submitit runs on the
    node (``executor.submit(RunJob(...))``).

    It takes the run folder's lock (a run held by another launcher is left alone, a
    finished one is not run again), runs the run's process and returns its status. A run
    that fails raises :class:`RunFailed`, which ends the job: it is not requeued.

    At the time limit (and on preemption) submitit calls :meth:`checkpoint` from its
    signal handler: the run is stopped (its last epoch's checkpoint stays), and the same
    job is requeued, up to the executor's ``max_num_timeout`` times; its ``--resume``
    continues from that checkpoint.
    """

    def __init__(self, command: str, run_dir: str | os.PathLike, nproc: int = 1,
                 env: Mapping[str, str | None] | None = None):
        self.command, self.run_dir, self.nproc = command, str(run_dir), nproc
        self.env = dict(env or {})  # set in the run's environment; None: removed from it
        self._process: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_process"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _process=None)

    def __call__(self) -> str:
        run_dir = Path(self.run_dir)
        owner = job_owner()
        lock = RunLock(run_dir, owner)
        holder = lock.acquire()
        if holder is not None:
            return f"left to {describe_holder(holder)}"
        try:
            status = run_state(run_dir)
            if status in FINISHED:
                return status
            argv = run_argv(default_launcher(self.nproc), self.command, run_dir)
            self._process = start_run(argv, run_dir, self.env, f"{owner} on {socket.gethostname()}")
            lock.add_pid(self._process.pid)
            while (returncode := self._process.poll()) is None:
                time.sleep(0.5)  # not wait(): a signal handler must be able to poll it too
            status, error = outcome(run_dir, returncode)
            if status not in FINISHED:
                time.sleep(SIGNAL_WAIT_S)
                raise RunFailed(error)
            return status
        finally:
            if self._process is not None and self._process.poll() is None:
                stop_run(self._process)
            self._process = None
            lock.release()

    def checkpoint(self):
        """submitit's hook on the time-limit or preemption signal: stop the run and hand
        back the same job to requeue (submitit.helpers.DelayedSubmission)."""
        import submitit

        if self._process is not None:
            with open(Path(self.run_dir) / runfolder.SWEEP_LOG, "a", encoding="utf-8") as log:
                log.write(f"=== tvlars sweep {now()}: stopped by the job's time limit or a preemption\n")
            stop_run(self._process)
        return submitit.helpers.DelayedSubmission(RunJob(self.command, self.run_dir, self.nproc, self.env))
