"""The run folder: its file names, columns and states, how it is written and how it is read.

`tvlars train` and `tvlars ssl` write run folders; `tvlars sweep`, `report` and `plot` read
them, often while a run is still writing. Keeping the format in this one module is what
lets the two sides agree: a file name, a column or a status changes here or nowhere.
No torch here: the study reads run folders without it.

Every whole-file write goes through :func:`atomic_write`, so a reader (or a crash) never
sees half a file: the study reads summary.json while runs rewrite it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Sequence

from tvlars.errors import UserError

CONFIG = "config.yaml"        # the resolved configuration, every flag (plus `command`)
METRICS = "metrics.csv"       # one row per epoch
LAYERS = "layers.csv"         # per-layer statistics every --layer-stats-every steps
SUMMARY = "summary.json"      # the status, and the numbers the study reports
CHECKPOINT = "checkpoint.pt"  # the last finished epoch
PROBE = "probe.csv"           # tvlars ssl: the linear probe, per epoch
TENSORBOARD = "tb"            # a folder
SWEEP_FLAGS = "sweep-run.yaml"  # the flags `tvlars sweep` gives the run (the folder may not have started)
SWEEP_LOG = "log.txt"         # the run's output, appended by `tvlars sweep`
RUN_LOCK = ".run.lock"        # who runs the run now (RunLock): one owner at a time

#: The files a run writes: a folder holding any of them holds a started run.
RUN_FILES = (CONFIG, METRICS, SUMMARY, CHECKPOINT)

RUNNING, COMPLETED, DIVERGED = "running", "completed", "diverged"
#: A finished run is never run again, by --resume or by a sweep.
FINISHED = (COMPLETED, DIVERGED)

METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                  "epoch_time", "images_per_sec")
SSL_METRIC_COLUMNS = METRIC_COLUMNS + ("knn_acc", "knn20_acc", "online_acc")
LAYER_COLUMNS = ("step", "epoch", "layer", "weight_norm", "grad_norm", "trust_ratio", "step_size")
PROBE_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_top1", "test_top5")

# summary.json: the status and the numbers the study reports (accuracies in percent).
#   status, epochs_done, wall_time_s, world_size;
#   final_test_acc: the finished model's test accuracy: train's last epoch; ssl's linear probe
#       after its last epoch (the ssl headline)
#   train: best_test_acc and best_epoch, the best epoch's test accuracy (chosen on the test set,
#       as the paper's Table 1 does)
#   ssl: linear_top5 (the probe after its last epoch), probe_best_acc and probe_best_epoch (the
#       probe's best epoch, chosen on the test set: a diagnostic, never a run's accuracy),
#       probe_lr, probe_norm (--probe-norm: "bn" standardised features, "none" raw); knn_acc,
#       knn20_acc, online_acc of the last evaluated encoder


# --------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` by ``content`` (text, bytes, or a function writing to a binary file).

    A temp file in the same folder, fsync, os.replace, then fsync of the folder: the old
    file stays whole until the new one is, and the rename survives a power cut. The temp
    name holds the process and thread, since a sweep's threads write side by side.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the original failure is the one to report
            pass
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems cannot fsync a folder; the file itself is durable
        pass


def plain(value: Any) -> Any:
    """YAML/JSON-safe values: tuples become lists, paths and other objects strings
    (torch's TorchVersion is a str subclass that safe_dump refuses)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def write_yaml(path: str | os.PathLike, mapping: dict) -> None:
    import yaml

    atomic_write(path, yaml.safe_dump(plain(mapping), sort_keys=False))


def update_summary(folder: str | os.PathLike, **fields) -> None:
    """Merge ``fields`` into summary.json; keys written earlier stay (a resumed run keeps
    what the first invocation recorded). Non-finite numbers are stored as null."""
    summary = read_summary(folder)
    summary.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in plain(fields).items()})
    _rename_old_fields(summary)  # a resumed run's summary goes by today's names too
    atomic_write(Path(folder) / SUMMARY, json.dumps(summary, indent=2, allow_nan=True) + "\n")


def csv_cell(value: Any) -> str:
    """A CSV cell: empty for None, repr for floats (round trips exactly)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict]) -> None:
    """A whole CSV file at once (a missing key is an empty cell). Lines end as the csv
    module's appends end them (CRLF), so a file rewritten on resume and then appended to
    stays byte-identical to one written in one go."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in columns])
    atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------- reading


def read_config(folder: str | os.PathLike) -> dict | None:
    """The saved config.yaml, None when there is none. Unreadable is the user's problem
    to see (a UserError), not a reason to start the run over it."""
    import yaml

    path = Path(folder) / CONFIG
    if not path.exists():
        return None
    try:  # safe_load: plain data only (a python/object tag is a YAMLError, never a call)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {path}: {str(err).strip().splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a run configuration")
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping, {} when missing or unreadable: the study reports what it can."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_summary(folder: str | os.PathLike) -> dict:
    """summary.json under today's field names, {} when missing or unreadable (a run that has
    not got that far)."""
    try:
        data = json.loads((Path(folder) / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON or not UTF-8
        return {}
    return _rename_old_fields(data) if isinstance(data, dict) else {}


def _rename_old_fields(summary: dict) -> dict:
    """An ssl summary written before 2026-12-05 held its probe's best epoch as best_test_acc
    and the pre-training epochs as best_epoch: the probe's number goes by the probe's name."""
    if "probe_best_epoch" in summary:  # ssl, completed
        best = summary.pop("best_test_acc", None)
        summary.pop("best_epoch", None)
        summary.setdefault("probe_best_acc", best)
    return summary


def number(text: Any) -> float | None:
    """A float from a CSV cell or a YAML value; None for empty or non-numeric."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    text = str(text).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics(path: str | os.PathLike) -> list[dict[str, float | None]]:
    """metrics.csv as numbers (None for empty cells), [] when missing."""
    try:
        rows = list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [{k: number(v) for k, v in row.items() if isinstance(k, str) and k} for row in rows]


def holds_run(folder: str | os.PathLike) -> bool:
    """Whether a run has started in ``folder`` (any of RUN_FILES)."""
    return any((Path(folder) / name).exists() for name in RUN_FILES)


def is_run_folder(folder: str | os.PathLike) -> bool:
    """A started run, or one a sweep has planned (its flags written, not yet launched)."""
    return holds_run(folder) or (Path(folder) / SWEEP_FLAGS).is_file()


def run_state(folder: str | os.PathLike) -> str:
    """completed or diverged (finished), partial (started, not finished) or pending."""
    status = read_summary(folder).get("status")
    if status in FINISHED:
        return str(status)
    return "partial" if holds_run(folder) else "pending"


# --------------------------------------------------------------------------- ownership


#: A lock's holder refreshes its mtime this often; a lock left unrefreshed for STALE_S is
#: free (sooner on the holder's own host: when none of its processes lives any more).
LOCK_HEARTBEAT_S = 30
LOCK_STALE_S = 300


def pid_alive(pid: int) -> bool:
    if not 0 < pid < 2 ** 31:  # kill(-1, 0) would probe every process; huge ints overflow
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """The one owner of a run folder: whoever holds it runs the run, every other launcher
    (a second sweep, a job of another array, a local sweep beside a cluster one) leaves the
    folder alone.

    The lock is a file, made whole or not at all by link(2) (atomic on local disks and on
    NFS), saying who holds it: ``owner`` (``slurm job 4242_3``, ``tvlars sweep (pid 812)``),
    host, pids, token. fcntl locks are not used: not every shared filesystem has them, and
    they say nothing about a job that died on another node. So a holder refreshes the file's
    mtime every LOCK_HEARTBEAT_S, and a lock counts as held while it is fresh and, on the
    holder's own host, one of its pids lives. A taker renames a stale lock aside before
    removing it, and puts it back if it is not the one it judged stale (a new holder came
    in between).

    ``name`` other than RUN_LOCK locks something else the same way (the sweep folder).
    """

    def __init__(self, folder: str | os.PathLike, owner: str, name: str = RUN_LOCK):
        self.path = Path(folder) / name
        self.record = {"owner": owner, "host": socket.gethostname(), "pids": [os.getpid()],
                       "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> dict | None:
        """Take the lock: None when taken, else the live holder's record."""
        mine = self.path.with_name(f"{self.path.name}.{self.record['token']}")
        atomic_write(mine, json.dumps(self.record))
        try:
            for _ in range(3):
                if self._link(mine):
                    self._stop.clear()
                    self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=f"lock {self.path}")
                    self._beat.start()
                    return None
                holder = _read_lock(self.path) or {}  # {}: unreadable, held until stale
                if lock_is_live(self.path, holder):
                    return holder
                self._remove_stale(holder)
            return _read_lock(self.path) or {}
        finally:
            mine.unlink(missing_ok=True)

    def _link(self, mine: Path) -> bool:
        """link(2) makes the lock whole or not at all, on NFS too (open(2)'s advice): a
        reader never sees a half-written lock; an error after a link that did happen shows
        in the link count."""
        try:
            os.link(mine, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            return mine.stat().st_nlink == 2

    def add_pid(self, pid: int) -> None:
        """A process that runs for the holder: while it lives, the lock does on this host
        (a launcher killed with SIGKILL leaves its run going; nobody may start a second)."""
        self.record["pids"].append(pid)
        atomic_write(self.path, json.dumps(self.record))

    def release(self) -> None:
        self._stop.set()
        if _read_lock(self.path, token_only=True) == self.record["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        holder = self.acquire()
        if holder is not None:
            raise UserError(f"{self.path.parent} is in use by {describe_holder(holder)}")
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def _remove_stale(self, holder: dict) -> None:
        aside = self.path.with_name(f"{self.path.name}.{self.record['token']}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read_lock(aside, token_only=True) != holder.get("token"):  # a new holder came in between
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)


def _read_lock(path: Path, token_only: bool = False) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return data.get("token") if token_only else data


def lock_is_live(path: Path, holder: dict) -> bool:
    """Fresh, and on the holder's host one of its pids alive (elsewhere freshness is all
    a shared filesystem tells)."""
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    if age > LOCK_STALE_S:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    pids = holder.get("pids")
    return any(isinstance(pid, int) and pid_alive(pid) for pid in pids) if isinstance(pids, list) else False


def run_holder(folder: str | os.PathLike, name: str = RUN_LOCK) -> dict | None:
    """Who holds the folder's lock now (a RunLock's record), None when nobody does."""
    path = Path(folder) / name
    holder = _read_lock(path) or {}
    return holder if lock_is_live(path, holder) else None


def describe_holder(holder: dict) -> str:
    return (f"{holder.get('owner') or 'another process'} on {holder.get('host') or 'an unknown host'}"
            f" since {holder.get('since') or '?'}")
