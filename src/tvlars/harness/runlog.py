"""The run folder: config.yaml, metrics.csv, layers.csv, summary.json, tb/ (ARCHITECTURE.md).

Only rank 0 writes; build ``RunLog(..., enabled=rt.is_main)`` on every rank and call it
unconditionally (the methods do nothing when disabled).

API (reusable by ``tvlars ssl``)::

    METRIC_COLUMNS, LAYER_COLUMNS           the CSV headers of ``tvlars train``
    RUN_FILES                               files whose presence marks a folder as holding a run
    read_config(out) -> dict | None         the saved config.yaml (None if absent);
                                            UserError if unreadable
    read_summary(out) -> dict               the saved summary.json ({} if absent or unreadable)
    write_yaml(path, mapping) -> None       atomic
    atomic_write_text(path, text) -> None   temp file + fsync + os.replace (probe.csv, ...)
    RunLog(out, *, enabled=True, metric_columns=METRIC_COLUMNS, resume_epoch=None,
           resume_step=0, tensorboard=True)
        resume_epoch=None: a fresh run -- old metrics.csv / layers.csv / summary.json / tb
        events are removed. resume_epoch=k: keep the metrics rows with epoch <= k and the
        layers rows with step <= resume_step (rows a crashed run wrote after its last
        checkpoint are dropped, so a resumed run never duplicates rows); TensorBoard
        events after resume_step are purged.
        .write_config(config: dict)         config.yaml
        .log_epoch(row: dict)               one metrics.csv row (missing keys -> empty cell)
                                            + TensorBoard scalars "epoch/<key>" at row["step"]
        .log_scalars(step: int, values: dict)   TensorBoard only
        .log_layers(rows: list[dict])       layers.csv rows (LAYER_COLUMNS keys)
        .write_summary(**fields)            merged into summary.json (atomic); keeps earlier keys
        .close()
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

from tvlars.errors import UserError

METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                  "epoch_time", "images_per_sec")
LAYER_COLUMNS = ("step", "epoch", "layer", "weight_norm", "grad_norm", "trust_ratio", "step_size")
RUN_FILES = ("config.yaml", "metrics.csv", "summary.json", "checkpoint.pt")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder, fsync, os.replace."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _plain(value):
    """YAML/JSON-friendly scalars (tuples -> lists, paths -> str)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)  # also str subclasses such as torch's TorchVersion
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def write_yaml(path, mapping: dict) -> None:
    import yaml

    atomic_write_text(Path(path), yaml.safe_dump(_plain(mapping), sort_keys=False))


def read_config(out) -> dict | None:
    import yaml

    path = Path(out) / "config.yaml"
    if not path.exists():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {path}: {str(err).strip().splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a run configuration")
    return data


def read_summary(out) -> dict:
    """summary.json as a dict; {} when it is missing or not a JSON object."""
    try:
        data = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON or not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _keep_rows(path: Path, columns, keep) -> None:
    """Rewrite a CSV keeping the rows for which keep(row) is true (header always)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if keep(r)]
    with open(path.with_name(path.name + ".tmp"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(path.with_name(path.name + ".tmp"), path)


class RunLog:
    def __init__(self, out, *, enabled: bool = True, metric_columns=METRIC_COLUMNS, resume_epoch=None,
                 resume_step: int = 0, tensorboard: bool = True):
        self.out = Path(out)
        self.enabled = enabled
        self.metric_columns = tuple(metric_columns)
        self._tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.csv"
        self.layers_path = self.out / "layers.csv"
        self.summary_path = self.out / "summary.json"
        if resume_epoch is None:
            for p in (self.metrics_path, self.layers_path, self.summary_path):
                p.unlink(missing_ok=True)
            shutil.rmtree(self.out / "tb", ignore_errors=True)
        else:
            def _num(r, key):
                try:
                    return float(r.get(key) or "nan")
                except ValueError:
                    return math.nan
            _keep_rows(self.metrics_path, self.metric_columns, lambda r: _num(r, "epoch") <= resume_epoch)
            _keep_rows(self.layers_path, LAYER_COLUMNS, lambda r: _num(r, "step") <= resume_step)
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
                self._tb = SummaryWriter(log_dir=str(self.out / "tb"), purge_step=purge)

    # ---- files -------------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        if self.enabled:
            write_yaml(self.out / "config.yaml", config)

    def log_epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", newline="") as fh:
            csv.writer(fh).writerow([_fmt(row.get(c)) for c in self.metric_columns])
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
            w = csv.writer(fh)
            if new:
                w.writerow(LAYER_COLUMNS)
            for r in rows:
                w.writerow([_fmt(r.get(c)) for c in LAYER_COLUMNS])

    def write_summary(self, **fields) -> None:
        if not self.enabled:
            return
        summary = read_summary(self.summary_path.parent)
        summary.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                        for k, v in _plain(fields).items()})
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2, allow_nan=True) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
