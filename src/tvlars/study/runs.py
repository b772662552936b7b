"""The runs of a sweep as the study reads them, and the numbers both report and plot take from them.

One owner for "which row of Table 1 is this run, at which batch size and lr, and what
accuracy did it reach", so that the report's table and the plot's figures group and rank
runs the same way.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tvlars import runfolder
from tvlars.errors import UserError
from tvlars.runfolder import COMPLETED, FINISHED, number
from tvlars.study.grid import format_value

ORDER = ("lars", "lamb", "tvlars", "tvlars-anneal", "sgd", "adamw")
NAMES = {"lars": "LARS", "lamb": "LAMB", "tvlars": "TVLARS", "tvlars-anneal": "TVLARS-anneal", "sgd": "SGD",
         "adamw": "AdamW"}
# flags that never tell runs apart in a table (bookkeeping, speed, derived values)
IGNORED = {
    "out", "config", "resume", "device", "progress", "data_dir", "download", "num_workers",
    "eval_every", "eval_batch_size", "layer_stats_every", "seed", "data_on_device", "compile",
    "channels_last", "micro_batch_size", "stop_after_epochs", "command", "batch_size", "lr",
    "optimizer", "warmup_epochs", "schedule", "delay_steps", "world_size", "tb", "tensorboard",
    "cache_dir", "log_every", "name", "peak_lr", "num_classes",
}

#: A setting of Table 1: (row label, batch size, learning rate).
Setting = tuple[str, int, float]


@dataclass
class RunData:
    """One run folder, read once: what report and plot both need."""

    name: str
    path: Path
    flags: dict[str, Any]          # the sweep's flags (sweep-run.yaml) or the resolved config
    config: dict[str, Any]         # config.yaml over sweep-run.yaml
    summary: dict[str, Any]
    metrics: list[dict[str, float | None]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.summary.get("status") or ("pending" if not self.metrics else "running"))

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def ssl(self) -> bool:
        """A tvlars ssl run: its one test accuracy is its linear probe's, after pre-training."""
        return str(self.get("command", "train")).lower() == "ssl"

    def get(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value is None else value

    def curve(self, column: str = "test_acc") -> tuple[list[float], list[float]]:
        """(epochs, values) of a metrics.csv column, rows with a value only."""
        xs, ys = [], []
        for i, row in enumerate(self.metrics):
            v = row.get(column)
            if v is None:
                continue
            e = row.get("epoch")
            xs.append(float(e) if e is not None else float(i + 1))
            ys.append(v)
        return xs, ys


def _finite(value: Any) -> float | None:
    value = number(value)
    return value if value is not None and math.isfinite(value) else None


def read_run(path: Path) -> RunData:
    """A run as the study sees it: the sweep's flags, overlaid by the resolved config.yaml
    (a run that has not started yet still has its place in the table)."""
    path = Path(path)
    flags = runfolder.read_yaml(path / runfolder.SWEEP_FLAGS)
    resolved = runfolder.read_yaml(path / runfolder.CONFIG)
    summary = runfolder.read_summary(path)
    config = {**flags, **{k: v for k, v in resolved.items() if v is not None}}
    return RunData(name=path.name, path=path, flags=flags or resolved, config=config, summary=summary,
                   metrics=runfolder.read_metrics(path / runfolder.METRICS))


def load_runs(folder: str | Path) -> list[RunData]:
    """The runs of a sweep folder (its run sub-folders), or the one run of a run folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"not a folder: {folder}")
    if runfolder.is_run_folder(folder) and not (folder / "sweep.json").is_file():
        return [read_run(folder)]
    runs = [read_run(p) for p in sorted(folder.iterdir()) if p.is_dir() and runfolder.is_run_folder(p)]
    if not runs:
        raise UserError(f"no run folders in {folder} (a run folder holds summary.json or config.yaml)")
    return runs


# --------------------------------------------------------------------------- one number per run


def mean_std(values: Iterable[float]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation (n-1), n); std is None for fewer than 2 values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return None, None, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, None, n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var), n


def is_ssl(runs: Sequence[RunData]) -> bool:
    return any(r.ssl for r in runs)


def headline_metric(runs: Sequence[RunData]) -> str:
    """What a sweep's runs are compared by: classification, the best epoch's test accuracy
    (the paper's Table 1); ssl, the linear probe after its last epoch (its best epoch would
    be chosen on the test set)."""
    return "final" if is_ssl(runs) else "best"


def run_accuracy(run: RunData, metric: str = "best") -> float | None:
    """A run's test accuracy (percent), summary.json's else from metrics.csv: ``final``, the
    finished model's (ssl: the linear probe after its last epoch), or ``best``, the best
    epoch's (tvlars train; None for an ssl run, which tests once)."""
    if metric == "best" and run.ssl:
        return None
    key = "best_test_acc" if metric == "best" else "final_test_acc"
    value = _finite(run.summary.get(key))
    if value is not None:
        return value
    _, accs = run.curve("test_acc")
    accs = [a for a in accs if math.isfinite(a)]
    if not accs:
        return None
    return max(accs) if metric == "best" else accs[-1]


#: How far above an untrained classifier's loss a run's training loss must end to count as
#: exploded (see exploded).
EXPLODED_FACTOR = 10.0


def exploded(run: RunData) -> bool:
    """Whether a completed classification run blew up without diverging: its last training
    loss is non-finite or at least EXPLODED_FACTOR times an untrained classifier's, ln(number
    of classes), the loss of a uniform guess (config.yaml's num_classes; the run's first-epoch
    loss for folders older than that record, which misses a blow-up inside the first epoch).
    Its recorded accuracies are then those of a broken network or of epochs before the
    blow-up. The harness stops only on non-finite values (status "diverged"); a finite blow-up
    may come back down, so the study judges the whole run, and its status stays as written.
    tvlars ssl runs never count: the Barlow Twins loss is bounded."""
    if run.ssl or run.status != COMPLETED:
        return False
    losses = [m.get("train_loss") for m in run.metrics if m.get("train_loss") is not None]
    if not losses:
        return False
    classes = number(run.get("num_classes"))
    untrained = math.log(classes) if classes and classes > 1 else losses[0]
    return not math.isfinite(losses[-1]) or losses[-1] >= EXPLODED_FACTOR * untrained


def epochs_to_fraction(epochs: Sequence[float], accs: Sequence[float], fraction: float) -> float | None:
    """The first epoch whose accuracy reaches ``fraction`` of the best in ``accs``."""
    pairs = [(e, a) for e, a in zip(epochs, accs) if a is not None and math.isfinite(a)]
    if not pairs:
        return None
    goal = fraction * max(a for _, a in pairs)
    for e, a in pairs:
        if a >= goal - 1e-12:
            return e
    return None


def epochs_to_accuracy(epochs: Sequence[float], accs: Sequence[float], target: float) -> float | None:
    """The first epoch whose accuracy reaches ``target`` (percent), None if never."""
    for e, a in zip(epochs, accs):
        if a is not None and math.isfinite(a) and a >= target:
            return e
    return None


#: The variant of ``tvlars ssl --epochs 0``: its optimizer never stepped, so the row is the
#: untrained encoder, the baseline every self-supervised number is read against.
UNTRAINED = "untrained"


def variant(run: RunData) -> tuple[str, bool]:
    """(optimizer, with warm-up) of a run."""
    if number(run.get("epochs")) == 0:
        return UNTRAINED, False
    optimizer = str(run.get("optimizer", "?")).lower()
    if optimizer == "tvlars" and run.get("phi_anneal") is True:  # phi_t from the run's length: its own row
        optimizer = "tvlars-anneal"
    warm = number(run.get("warmup_epochs")) or 0.0
    schedule = str(run.get("schedule") or "").lower()
    return optimizer, bool(warm > 0 or (schedule.startswith("warmup") and run.get("warmup_epochs") is None))


#: Decay schedules by name, and the one the paper pairs with each variant (warm-up then cosine,
#: polynomial without warm-up, none for TVLARS): only another pairing is named in a row label.
SCHEDULE_NAMES = {"warmup-cosine": "cosine", "poly": "poly", "constant": "constant", "none": "no schedule"}


def schedule_note(run: RunData) -> str:
    """The run's schedule where it is not the paper's pairing for its variant, else ""."""
    optimizer, warm = variant(run)
    schedule = str(run.get("schedule") or "").lower()
    if run.get("tv_factor") is True:  # phi_t as the learning-rate schedule (TVFactorLR)
        return "phi_t" + (" anneal" if run.get("phi_anneal") is True else "")
    if optimizer == UNTRAINED or schedule not in SCHEDULE_NAMES:
        return ""
    paired = "none" if optimizer.startswith("tvlars") else ("warmup-cosine" if warm else "poly")
    return "" if schedule == paired else SCHEDULE_NAMES[schedule]


def variant_label(optimizer: str, warm: bool, schedule: str = "") -> str:
    """Table 1's row names; TVLARS has no warm-up in the paper, so only its exception is named."""
    if optimizer == UNTRAINED:
        return "Untrained encoder"
    name = NAMES.get(optimizer, optimizer.upper())
    if optimizer.startswith("tvlars"):
        return name + (" + warm-up" if warm else "") + (f" + {schedule}" if schedule else "")
    return f"{name} ({'warm-up' if warm else 'no warm-up'}{', ' + schedule if schedule else ''})"


def row_labels(runs: Sequence[RunData]) -> dict[str, str]:
    """Each run's row label: its variant and schedule, plus any other flag that varies within them."""
    groups: dict[tuple[str, bool, str], list[RunData]] = {}
    for r in runs:
        groups.setdefault((*variant(r), schedule_note(r)), []).append(r)
    labels = {}
    for key, members in groups.items():
        keys = sorted({k for r in members for k in r.flags})
        varying = [k for k in keys if k not in IGNORED
                   and len({json.dumps(r.flags.get(k), sort_keys=True, default=str) for r in members}) > 1]
        for r in members:
            extra = ", ".join(f"{k}={format_value(r.flags.get(k))}" for k in varying)
            labels[str(r.path)] = variant_label(*key) + (f" [{extra}]" if extra else "")
    return labels


def label_order(label: str) -> tuple:
    """Sort key of row labels: the paper's optimizer order, warm-up before no warm-up, then
    flag values by number ("lam=1e-05" before "lam=0.0001"), not by their spelling."""
    base = label.split(" ")[0].lower()
    idx = ORDER.index(base) if base in ORDER else len(ORDER)
    return (idx, "no warm-up" in label, [_natural(part) for part in re.split(r"([-+]?\d[\d.]*(?:e[-+]?\d+)?)", label)])


def _natural(part: str) -> tuple:
    try:
        return (0, float(part), "")
    except ValueError:
        return (1, 0.0, part)


def group_by_setting(runs: Sequence[RunData]) -> dict[Setting, list[RunData]]:
    """The runs of each (row label, batch size, lr), seeds together; runs without a batch
    size or lr (not started, or not from this harness) are left out."""
    labels = row_labels(runs)
    groups: dict[Setting, list[RunData]] = {}
    for r in runs:
        batch, lr = number(r.get("batch_size")), number(r.get("lr"))
        if batch is not None and lr is not None:
            groups.setdefault((labels[str(r.path)], int(batch), lr), []).append(r)
    return groups


def best_per_batch(groups: dict[Setting, list[RunData]]) -> dict[int, float]:
    """The best accuracy any run reached at each batch size: the epochs-to-target goal is
    a fraction of it, one goal for every optimizer so that a run plateauing low does not
    look fast."""
    best: dict[int, float] = {}
    for (_, batch, _), members in groups.items():
        for r in members:
            acc = run_accuracy(r, "best")
            if acc is not None:
                best[batch] = max(best.get(batch, acc), acc)
    return best
