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
import threading
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
#: Seconds before its time limit a SLURM job stops its run and requeues itself. SLURM's
#: signal comes 1.5-2.5 minutes before the limit; the run goes on until this margin, which
#: covers stopping it (STOP_GRACE_S), requeueing the job and SLURM's clock.
STOP_MARGIN_S = 30


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


#: Signals a run's process starts with blocked (held, never delivered): SLURM sends its
#: time-limit signal (USR2) to every process of the job, and the run, which does not
#: handle it, would die of it; the job that holds the run (RunJob) handles it.
RUN_BLOCKED_SIGNALS = {signal.SIGUSR2}


def start_run(argv: Sequence[str], run_dir: Path, env: Mapping[str, str | None], note: str) -> subprocess.Popen:
    """The run's process, its output appended to log.txt after a header naming this launch.
    ``env`` changes this process's environment for it (None: a variable removed). The run
    leads its own session, so that stopping it stops its children (torchrun's workers).
    It inherits this thread's signal mask with RUN_BLOCKED_SIGNALS added (blocked here
    only while it starts: a signal meanwhile waits and is handled here after)."""
    environment = {**os.environ, **{k: v for k, v in env.items() if v is not None}}
    for key in [k for k, v in env.items() if v is None]:
        environment.pop(key, None)
    with open(run_dir / runfolder.SWEEP_LOG, "a", encoding="utf-8") as logfile:
        logfile.write(f"=== tvlars sweep {now()}: {note}\n=== {shlex.join(argv)}\n")
        logfile.flush()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, RUN_BLOCKED_SIGNALS)
        try:
            return subprocess.Popen(list(argv), stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=environment, start_new_session=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


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


def timed_out_line(times: int) -> str:
    """Why a run ended unfinished after its last allowed requeue (--max-requeues)."""
    return f"timed out {times} time{'s' if times != 1 else ''}; run the sweep again to continue"


def slurm_end_time() -> float | None:
    """When this SLURM job reaches its time limit (seconds since the epoch, from squeue),
    None outside a SLURM job or when squeue does not say."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        answer = subprocess.run(["squeue", "--noheader", f"--jobs={job}", "--Format=EndTime"], capture_output=True,
                                text=True, timeout=20, env={**os.environ, "SLURM_TIME_FORMAT": "%s"})
        return float(answer.stdout.split()[0])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


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

    Time limits: SLURM signals the job (USR2) 1.5-2.5 minutes before its limit. The run goes
    on until :data:`STOP_MARGIN_S` before the limit (the epochs it finishes meanwhile are
    kept) or until it ends; then the job hands over to submitit's handler of the signal,
    which calls :meth:`checkpoint` (the run is stopped, its last epoch's checkpoint stays)
    and requeues the same job; its ``--resume`` continues from that checkpoint. Under
    submitit's local executor the run stops at the signal, as nothing says when the limit
    falls. After ``max_requeues`` time limits the job ends instead, its run unfinished,
    with :func:`timed_out_line` in the run's log.txt and as its failure.
    """

    def __init__(self, command: str, run_dir: str | os.PathLike, nproc: int = 1,
                 env: Mapping[str, str | None] | None = None, max_requeues: int | None = None, timeouts: int = 0):
        self.command, self.run_dir, self.nproc = command, str(run_dir), nproc
        self.env = dict(env or {})  # set in the run's environment; None: removed from it
        self.max_requeues = max_requeues  # None: submitit's count alone decides
        self.timeouts = timeouts  # time limits this run has met in this submission
        self._process: subprocess.Popen | None = None
        self._signalled: bool = False

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_process", "_signalled")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"max_requeues": None, "timeouts": 0}, **state, _process=None, _signalled=False)

    def __call__(self) -> str:
        run_dir = Path(self.run_dir)
        owner = job_owner()
        lock = RunLock(run_dir, owner)
        holder = lock.acquire()
        if holder is not None:
            return f"left to {describe_holder(holder)}"
        requeue = self._take_time_limit_signal(owner)
        try:
            status = run_state(run_dir)
            if status in FINISHED:
                return status
            argv = run_argv(default_launcher(self.nproc), self.command, run_dir)
            self._process = start_run(argv, run_dir, self.env, f"{owner} on {socket.gethostname()}")
            lock.add_pid(self._process.pid)
            stop_at = None
            while (returncode := self._process.poll()) is None:
                time.sleep(0.5)  # not wait(): a signal handler must be able to poll it too
                if self._signalled and stop_at is None:
                    end = slurm_end_time() if owner.startswith("slurm ") else None
                    stop_at = time.time() if end is None else end - STOP_MARGIN_S
                if stop_at is not None and time.time() >= stop_at:
                    self._time_limit(requeue)
            status, error = outcome(run_dir, returncode)
            if status not in FINISHED:
                time.sleep(SIGNAL_WAIT_S)
                if self._signalled:  # the signal came as the run died: the time limit took it
                    self._time_limit(requeue)
                raise RunFailed(error)
            return status
        finally:
            if requeue is not None:
                signal.signal(signal.SIGUSR2, requeue)
            if self._process is not None and self._process.poll() is None:
                stop_run(self._process)
            self._process = None
            lock.release()

    def _take_time_limit_signal(self, owner: str):
        """Inside a submitit job, note the time-limit signal here instead of letting
        submitit's handler stop the run at once; returns that handler (None elsewhere)."""
        if owner.startswith("pid ") or threading.current_thread() is not threading.main_thread():
            return None
        handler = signal.getsignal(signal.SIGUSR2)
        if not callable(handler):
            return None

        def note(signum, frame):
            self._signalled = True

        signal.signal(signal.SIGUSR2, note)
        return handler

    def _time_limit(self, requeue) -> None:
        """The job's time is up: requeue it through submitit's handler (which calls
        :meth:`checkpoint` and exits), or end it once the run has met ``max_requeues``
        time limits."""
        if self.max_requeues is None or self.timeouts < self.max_requeues:
            requeue(signal.SIGUSR2, None)  # exits, or raises submitit's own refusal
        why = timed_out_line(self.timeouts + 1)
        self._note(why)
        if self._process is not None:
            stop_run(self._process)
        raise RunFailed(why)

    def _note(self, text: str) -> None:
        with open(Path(self.run_dir) / runfolder.SWEEP_LOG, "a", encoding="utf-8") as log:
            log.write(f"=== tvlars sweep {now()}: {text}\n")

    def checkpoint(self):
        """submitit's hook on the time-limit or preemption signal: stop the run and hand
        back the same job to requeue (submitit.helpers.DelayedSubmission)."""
        import submitit

        if self._process is not None:
            self._note("stopped by the job's time limit or a preemption")
            stop_run(self._process)
        return submitit.helpers.DelayedSubmission(
            RunJob(self.command, self.run_dir, self.nproc, self.env, self.max_requeues, self.timeouts + 1))
