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
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from tvlars.errors import UserError
from tvlars.study.launch import RunJob, failure_line, last_line

SUBMITIT_FOLDER = "submitit"  # under the sweep folder
#: SLURM job states (sacct) of a job that waits to run, and of one that runs.
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "PREEMPTED",
          "CONFIGURING"}
RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}
DEFAULT_MAX_REQUEUES = 3
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
                            "here or as the grid's slurm: time; local: none by default)")
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
    variables: submitit's clean_env hides them."""
    from submitit.helpers import clean_env

    with clean_env():
        return [job.job_id for job in executor.submit_array(list(jobs))]


def _job_paths(folder: Path, job_id: str):
    """submitit's names for a job's files (scripts, logs, result), None without submitit."""
    try:
        from submitit.core.utils import JobPaths
    except ImportError:
        return None
    return JobPaths(folder, job_id=job_id, task_id=0)


def job_error_line(folder: Path, job_id: str) -> str | None:
    """The last line a job wrote to its stderr: the exception that ended it, if one did."""
    paths = _job_paths(folder, job_id)
    return failure_line(last_line(paths.stderr)) if paths is not None else None


def job_ended(folder: Path, job_id: str) -> bool:
    """Whether a job has written its result (only that the file exists: a pickle is never
    read here, as no file from a run folder ever is)."""
    paths = _job_paths(folder, job_id)
    return paths is not None and paths.result_pickle.exists()


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """SLURM's state of each job (one sacct call through submitit), {} without sacct."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    try:
        from submitit.slurm.slurm import SlurmInfoWatcher
    except ImportError:
        return {}

    watcher = SlurmInfoWatcher()
    for job_id in job_ids:
        watcher.register_job(job_id)
    watcher.update()
    states = {}
    for job_id in job_ids:
        state = watcher.get_state(job_id, mode="cache")
        states[job_id] = state.split()[0].upper() if state.strip() else "UNKNOWN"  # "CANCELLED by 42"
    return states
