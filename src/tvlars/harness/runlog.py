"""RunLog: a run's live writer of its folder (the format itself is tvlars.runfolder's).

Every rank builds one and calls it unconditionally; only rank 0's is enabled, so the loops
need no ``if rank == 0`` around their logging, and two processes never append to one file.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

from tvlars import runfolder
from tvlars.runfolder import LAYER_COLUMNS, METRIC_COLUMNS


class RunLog:
    """metrics.csv and layers.csv rows, TensorBoard scalars, config.yaml and summary.json.

    ``resume_epoch=None`` starts a fresh run: an earlier attempt's metrics, layers, summary
    and events are removed. ``resume_epoch=k`` keeps the metrics rows up to epoch k and the
    layers rows up to ``resume_step``: rows a crashed run wrote after its last checkpoint
    would otherwise be written twice.
    """

    def __init__(self, out, *, enabled: bool = True, metric_columns=METRIC_COLUMNS, resume_epoch=None,
                 resume_step: int = 0, tensorboard: bool = True):
        self.out = Path(out)
        self.enabled = enabled
        self.metric_columns = tuple(metric_columns)
        self._tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / runfolder.METRICS
        self.layers_path = self.out / runfolder.LAYERS
        if resume_epoch is None:
            for path in (self.metrics_path, self.layers_path, self.out / runfolder.SUMMARY):
                path.unlink(missing_ok=True)
            shutil.rmtree(self.out / runfolder.TENSORBOARD, ignore_errors=True)
        else:
            _keep_rows(self.metrics_path, self.metric_columns, "epoch", resume_epoch)
            _keep_rows(self.layers_path, LAYER_COLUMNS, "step", resume_step)
        if not self.metrics_path.exists():
            with open(self.metrics_path, "w", newline="") as fh:
                csv.writer(fh).writerow(self.metric_columns)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the CSVs still hold everything
                SummaryWriter = None
            if SummaryWriter is not None:
                purge = resume_step + 1 if resume_epoch is not None else None
                self._tb = SummaryWriter(log_dir=str(self.out / runfolder.TENSORBOARD), purge_step=purge)

    def write_config(self, config: dict) -> None:
        if self.enabled:
            runfolder.write_yaml(self.out / runfolder.CONFIG, config)

    def log_epoch(self, row: dict) -> None:
        """One metrics.csv row (a missing column is an empty cell), and its numbers in
        TensorBoard as epoch/<column> at the row's optimizer step."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a", newline="") as fh:
            csv.writer(fh).writerow([runfolder.csv_cell(row.get(c)) for c in self.metric_columns])
            fh.flush()
        if self._tb is not None:
            step = int(row.get("step", 0))
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"epoch/{key}", value, step)
            self._tb.flush()

    def log_scalars(self, step: int, values: dict) -> None:
        if self.enabled and self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)

    def log_layers(self, rows) -> None:
        if not self.enabled or not rows:
            return
        new = not self.layers_path.exists()
        with open(self.layers_path, "a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(LAYER_COLUMNS)
            for row in rows:
                writer.writerow([runfolder.csv_cell(row.get(c)) for c in LAYER_COLUMNS])

    def write_summary(self, **fields) -> None:
        if self.enabled:
            runfolder.update_summary(self.out, **fields)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _keep_rows(path: Path, columns, column: str, last: float) -> None:
    """Rewrite a CSV without the rows whose ``column`` is past ``last`` (or unreadable)."""
    if not path.exists():
        return

    def value(row) -> float:
        number = runfolder.number(row.get(column))
        return math.nan if number is None else number

    with open(path, newline="") as fh:
        rows = [row for row in csv.DictReader(fh) if value(row) <= last]
    runfolder.write_csv(path, columns, rows)
