"""``tvlars sweep --launcher slurm|local``: a sweep's runs as submitit jobs.

submitit (facebookincubator/submitit; an optional extra, ``pip install tvlars[slurm]``)
writes the sbatch script, submits the unfinished runs as one job array and, at a job's
time limit, calls :meth:`tvlars.study.launch.RunJob.checkpoint` and requeues the job, at
most ``--max-requeues`` times. Its files (sbatch scripts, pickled jobs, each job's stdout
and stderr) go to ``<sweep>/submitit/``; the sweep records each run's job id in sweep.json.

``--launcher local`` runs the same jobs through submitit's LocalExecutor, as local
processes with the same time limit and requeue rules (try a cluster configuration on a
workstation first).

SLURM settings: the grid file's ``slurm:`` mapping holds parameters of submitit's
SlurmExecutor (``partition``, ``account``, ``qos``, ``constraint``, ``gpus_per_node``,
``cpus_per_task``, ``mem``, ``time`` in minutes, ``array_parallelism``, ``setup``,
``additional_parameters`` for any other sbatch option, ...); the flags below override it.
``gpus_per_node`` is also the number of processes torchrun starts for each run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tvlars.errors import UserError
from tvlars.study.launch import RunJob, failure_line

SUBMITIT_FOLDER = "submitit"  # under the sweep folder
#: SLURM job states (sacct) of a job that waits to run, and of one that runs.
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "PREEMPTED",
          "CONFIGURING"}
RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}
DEFAULT_MAX_REQUEUES = 3
#: The shortest time limit (minutes) --launcher slurm accepts. SLURM sends its time-limit
#: signal (USR2, asked for 90 s before the limit) up to 60 s earlier than asked (sbatch's
#: manual; 100-121 s before the limit here, Debian's 22.05); a job signalled while it is
#: still starting (Python, torch: 5-10 s) has no handler yet and is killed instead of
#: requeued, which a limit of 1 or 2 minutes did 3 times out of 3.
MIN_TIME_LIMIT_MIN = 3
#: The local executor's time limit (minutes) when none is given: none, in practice.
NO_TIME_LIMIT_MIN = 60 * 24 * 365
#: Flags that set a SlurmExecutor parameter of the same meaning.
FLAG_PARAMETERS = {"slurm_partition": "partition", "slurm_account": "account", "slurm_qos": "qos",
                   "slurm_constraint": "constraint", "gpus_per_run": "gpus_per_node",
                   "cpus_per_run": "cpus_per_task", "time_limit": "time", "array_parallelism": "array_parallelism"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "cluster (--launcher slurm|local, through submitit; defaults from the grid file's slurm: mapping)")
    group.add_argument("--slurm-partition", metavar="NAME", default=None, help="SLURM partition")
    group.add_argument("--slurm-account", metavar="NAME", default=None, help="SLURM account")
    group.add_argument("--slurm-qos", metavar="NAME", default=None, help="SLURM quality of service")
    group.add_argument("--slurm-constraint", metavar="EXPR", default=None, help="SLURM node constraint")
    group.add_argument("--gpus-per-run", type=_positive, metavar="N", default=None,
                       help="GPUs of one node per run; N > 1 runs the run under torchrun with N processes")
    group.add_argument("--cpus-per-run", type=_positive, metavar="N", default=None, help="CPU cores per run")
    group.add_argument("--time-limit", type=parse_minutes, metavar="TIME", default=None,
                       help="time limit of one job: minutes, or [D-]HH:MM:SS; a run still going then is "
                            "stopped and requeued, and resumes from its last epoch (slurm: required, "
                            "here or as the grid's slurm: time, at least 3 minutes; local: none by default)")
    group.add_argument("--array-parallelism", type=_positive, metavar="N", default=None,
                       help="slurm: at most N runs of the job array at a time (local: --workers)")
    group.add_argument("--max-requeues", type=int, metavar="N", default=None,
                       help=f"requeues of a run after a time limit before it counts as failed (default: "
                            f"{DEFAULT_MAX_REQUEUES}); "
                            "a run that fails for its own reasons is never requeued")
    group.add_argument("--slurm-setup", action="append", metavar="LINE", default=None,
                       help="a shell line the job script runs first, e.g. 'source ~/venv/bin/activate' "
                            "(repeatable)")
    group.add_argument("--slurm-option", action="append", metavar="KEY=VALUE", default=None,
                       help="any other sbatch option, e.g. mail-user=me@lab.org (repeatable)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def parse_minutes(text: Any) -> int:
    """A time limit in whole minutes (rounded up): minutes, or SLURM's [D-]HH:MM:SS."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)|(\d+)", str(text).strip())
    if not match or match.group(0) in ("0", "0:00:00"):
        raise argparse.ArgumentTypeError(f"a time limit is minutes or [D-]HH:MM:SS, not {text!r}")
    if match.group(5):
        return int(match.group(5))
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups()[:4])
    return days * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher slurm and local run through submitit, which is not installed: "
                        "pip install 'tvlars[slurm]'") from None
    return submitit


def slurm_parameters(grid_slurm: dict, args: argparse.Namespace, job_name: str = "tvlars") -> dict:
    """The SlurmExecutor parameters: the grid's slurm: mapping, the flags over it.
    Jobs are requeueable (``--requeue``) so that a preempted run comes back."""
    parameters = dict(grid_slurm)
    extra = dict(parameters.pop("additional_parameters", None) or {})
    for flag, key in FLAG_PARAMETERS.items():
        if getattr(args, flag, None) is not None:
            parameters[key] = getattr(args, flag)
    if args.slurm_setup:
        parameters["setup"] = list(parameters.get("setup") or []) + list(args.slurm_setup)
    for option in args.slurm_option or ():
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm-option takes KEY=VALUE (an sbatch option), not {option!r}")
        extra[key.strip().lstrip("-")] = value.strip()
    extra.setdefault("requeue", True)
    parameters["additional_parameters"] = extra
    if "time" not in parameters:  # submitit would ask for 5 minutes
        raise UserError("--launcher slurm needs a time limit: --time-limit, or time: (minutes) under the grid's slurm:")
    try:
        parameters["time"] = parse_minutes(parameters["time"])
    except argparse.ArgumentTypeError as err:
        raise UserError(f"slurm: time: {err}") from None
    if parameters["time"] < MIN_TIME_LIMIT_MIN:
        raise UserError(f"a SLURM time limit must be at least {MIN_TIME_LIMIT_MIN} minutes, not {parameters['time']}: "
                        f"SLURM signals a job up to 2.5 minutes before its limit, and a job signalled while it "
                        f"starts is killed, not requeued")
    parameters.setdefault("job_name", job_name)
    return parameters


def processes_per_run(parameters: dict) -> int:
    """One process per GPU of the run: torchrun starts them inside the job."""
    gpus = parameters.get("gpus_per_node") or 1
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise UserError(f"slurm: gpus_per_node must be a positive integer, not {gpus!r}")
    return gpus


def slurm_executor(folder: Path, parameters: dict, max_requeues: int):
    submitit = import_submitit()
    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
    except RuntimeError as err:  # no srun on PATH
        raise UserError(f"--launcher slurm: {err} (run tvlars sweep on a machine that submits SLURM jobs)") from None
    try:
        executor.update_parameters(**parameters)
    except (ValueError, TypeError) as err:  # submitit lists every valid parameter on the lines after
        raise UserError(f"SLURM settings: {str(err).splitlines()[0]} (see submitit's SlurmExecutor)") from None
    return executor


def local_executor(folder: Path, time_limit_min: int | None, max_requeues: int):
    submitit = import_submitit()
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues)
    executor.update_parameters(timeout_min=time_limit_min or NO_TIME_LIMIT_MIN)
    return executor


def submit_array(executor, jobs: Sequence[RunJob]) -> list[str]:
    """One job array (one sbatch), the job id of each run in order. Submitted from inside
    a SLURM job (an interactive allocation), the jobs must not inherit its SLURM_*
    variables: submitit's clean_env hides them.

    sbatch refusing the array (a partition, account or limit it does not know) is one
    line, and the files submitit wrote for it (pickled jobs, the job script) are removed."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError
    from submitit.helpers import clean_env

    folder = Path(executor.folder)
    before = set(folder.iterdir()) if folder.is_dir() else None
    refused = io.StringIO()  # submitit prints sbatch's stderr besides raising it
    try:
        with clean_env(), contextlib.redirect_stderr(refused):
            return [job.job_id for job in executor.submit_array(list(jobs))]
    except (FailedJobError, FailedSubmissionError) as err:
        if before is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for path in set(folder.iterdir()) - before:
                path.unlink(missing_ok=True)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        why = next((line for line in reversed(lines) if "error:" in line), lines[-1] if lines else "no reason given")
        raise UserError(f"SLURM refused the job array, nothing was submitted: {why}") from None


def _job_paths(folder: Path, job_id: str):
    """submitit's names for a job's files (scripts, logs, result), None without submitit."""
    try:
        from submitit.core.utils import JobPaths
    except ImportError:
        return None
    return JobPaths(folder, job_id=job_id, task_id=0)


def job_error_line(folder: Path, job_id: str) -> str | None:
    """Why a job ended, from its stderr: the last line that is neither srun's nor submitit's
    own logging (``srun: error: vm: task 0: Exited with exit code 1`` comes after the
    exception that ended the job; slurmstepd's ``*** JOB 7 CANCELLED AT ... ***`` stays)."""
    paths = _job_paths(folder, job_id)
    if paths is None:
        return None
    try:
        with open(paths.stderr, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 16384))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line and not line.startswith(("srun: ", "submitit ")):
            return failure_line(line)
    return None


def job_ended(folder: Path, job_id: str) -> bool:
    """Whether a job has written its result (only that the file exists: a pickle is never
    read here, as no file from a run folder ever is)."""
    paths = _job_paths(folder, job_id)
    return paths is not None and paths.result_pickle.exists()


@dataclass
class JobStates:
    """What SLURM says of a sweep's jobs: ``states`` by job id (``17_2``: ``PENDING``,
    ``RUNNING``, ``COMPLETED``, ``TIMEOUT``, ...) for the jobs it still knows; ``unasked``:
    why SLURM could not be asked (no squeue here, or its error), None when it answered;
    ``accounting``: whether it keeps records of jobs that have left the queue (slurmdbd;
    False: squeue forgets a job minutes after it ended, MinJobAge, and sacct answers
    "Slurm accounting storage is disabled")."""

    states: dict[str, str] = field(default_factory=dict)
    unasked: str | None = None
    accounting: bool = True


def _slurm_command(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return subprocess.CompletedProcess(argv, 1, "", f"{argv[0]}: {err}")


def slurm_states(job_ids: Sequence[str]) -> JobStates:
    """SLURM's state of each job: squeue for the jobs in the queue (or ended minutes ago),
    sacct for the others when SLURM keeps accounting. Their stderr is kept off the
    terminal: without accounting, every sacct call would print that it is disabled."""
    result = JobStates()
    if not job_ids:
        return result
    if shutil.which("squeue") is None:
        result.unasked = "no squeue here to ask SLURM"
        return result
    arrays = sorted({job.split("_")[0] for job in job_ids})
    queue = _slurm_command(["squeue", "--noheader", "--array", "--format=%i|%T", "--jobs=" + ",".join(arrays)])
    if queue.returncode != 0 and "Invalid job id" not in queue.stderr:  # (none of them left in the queue)
        result.unasked = (queue.stderr.strip().splitlines() or ["squeue failed"])[0]
        return result
    for line in queue.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job and state:
            result.states[job] = state.split()[0].upper()
    gone = [job for job in job_ids if job not in result.states]
    if not gone:
        return result
    accounts = _slurm_command(["sacct", "--noheader", "--parsable2", "--format=JobID,State",
                               "--jobs=" + ",".join(sorted({job.split("_")[0] for job in gone}))])
    if accounts.returncode != 0:
        result.accounting = False  # "Slurm accounting storage is disabled", or no sacct at all
        return result
    try:
        from submitit.slurm.slurm import SlurmInfoWatcher  # reads sacct's array ranges (17_[3-5])
    except ImportError:
        return result
    known = SlurmInfoWatcher().read_info("JobID|State\n" + accounts.stdout)
    for job in gone:
        state = (known.get(job) or {}).get("State", "").strip()
        if state:
            result.states[job] = state.split()[0].upper()  # "CANCELLED by 42"
    return result
