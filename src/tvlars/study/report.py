"""``tvlars report SWEEP_DIR``: the paper's Table 1 for a sweep, plus epochs-to-target.

Reads the run folders under SWEEP_DIR (any sub-folder with ``summary.json``,
``config.yaml`` or ``sweep-run.yaml``; SWEEP_DIR may also be one run folder) and writes
``report.md`` and ``report.csv`` (atomically) into ``--out`` (default SWEEP_DIR), and
prints the markdown.

Layout, as Table 1: rows are optimizer variants ("LARS (warm-up)", "LARS (no warm-up)",
"LAMB ...", "TVLARS") for each batch size; columns are that batch size's learning rates in
increasing order ("lr a/b/c"). A cell is the test accuracy (percent) of the runs with that
setting: mean ± sample standard deviation over seeds, with n when there are several;
"—" where no finished run exists; "†" when some of its runs diverged (their accuracy is
the one the run recorded). Only finished runs (summary.json "completed" or "diverged")
count. ``--metric best`` (default) uses each run's best test accuracy over epochs,
``final`` the last epoch's; the report holds both tables, the chosen one first. When the
sweep's dataset and task match a column of the paper's Table 1 (cifar10 / tinyimagenet,
train / ssl), the published numbers are shown beside the measured ones.

Runs that differ in a flag other than the optimizer, warm-up, batch size, lr and seed
(e.g. lam in an ablation) get separate rows, labelled with that flag.

"Epochs to reach X% of the best accuracy": per run, the first epoch whose test accuracy
reaches X% (``--target``, default 95) of the best accuracy ANY run reached at that batch
size (one goal for all optimizers, so a run that plateaus low does not look fast);
averaged over the seeds that reached it, "never" when none did.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tvlars.errors import UserError

FINISHED = ("completed", "diverged")
ORDER = ("lars", "lamb", "tvlars", "sgd", "adamw")
NAMES = {"lars": "LARS", "lamb": "LAMB", "tvlars": "TVLARS", "sgd": "SGD", "adamw": "AdamW"}
# flags that never tell runs apart in a table (bookkeeping, speed, derived values)
IGNORED = {
    "out", "config", "resume", "device", "progress", "data_dir", "download", "num_workers",
    "eval_every", "eval_batch_size", "layer_stats_every", "seed", "data_on_device", "compile",
    "channels_last", "micro_batch_size", "stop_after_epochs", "command", "batch_size", "lr",
    "optimizer", "warmup_epochs", "schedule", "delay_steps", "world_size", "tb", "tensorboard",
    "cache_dir", "log_every", "name", "peak_lr",
}


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", metavar="SWEEP_DIR", help="a sweep folder (or one run folder)")
    parser.add_argument("--out", metavar="DIR", default=None, help="where report.md/report.csv go (default SWEEP_DIR)")
    parser.add_argument("--metric", choices=("best", "final"), default="best",
                        help="test accuracy of a run: best over epochs (default) or the final epoch's")
    parser.add_argument("--format", default="md,csv", metavar="LIST", help="comma-separated: md, csv (default md,csv)")
    parser.add_argument("--target", type=float, default=95.0, metavar="PERCENT",
                        help="epochs-to-target table: first epoch reaching this %% of the best accuracy at the "
                             "batch size (default 95)")


def run(args: argparse.Namespace) -> int:
    formats = parse_formats(args.format, ("md", "csv"))
    if not 0 < args.target <= 100:
        raise UserError(f"--target must be a percentage in (0, 100], not {args.target}")
    text = write_report(args.sweep, out=args.out, metric=args.metric, formats=formats, target=args.target / 100)
    print(text, end="")
    return 0


def parse_formats(text: str, allowed: Sequence[str]) -> list[str]:
    formats = [f.strip().lower().lstrip(".") for f in str(text).split(",") if f.strip()]
    if not formats:
        raise UserError(f"--format: give one or more of {', '.join(allowed)}")
    for f in formats:
        if f not in allowed:
            raise UserError(f"--format: unknown format '{f}' (expected {', '.join(allowed)})")
    return list(dict.fromkeys(formats))


# --------------------------------------------------------------------------- reading runs


@dataclass
class RunData:
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


def _number(text: Any) -> float | None:
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


def _finite(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and math.isfinite(number) else None


def read_metrics(path: Path) -> list[dict[str, float | None]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
        rows = list(csv.DictReader(io.StringIO(text)))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [{k: _number(v) for k, v in row.items() if isinstance(k, str) and k} for row in rows]


def _yaml(path: Path) -> dict:
    import yaml

    try:  # safe_load: plain data only (a python/object tag is a YAMLError, never a call)
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_run(path: Path) -> RunData:
    path = Path(path)
    flags = _yaml(path / "sweep-run.yaml")
    resolved = _yaml(path / "config.yaml")
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        summary = summary if isinstance(summary, dict) else {}
    except (OSError, ValueError):  # ValueError: bad JSON or not UTF-8
        summary = {}
    config = {**flags, **{k: v for k, v in resolved.items() if v is not None}}
    return RunData(name=path.name, path=path, flags=flags or resolved, config=config, summary=summary,
                   metrics=read_metrics(path / "metrics.csv"))


def is_run_dir(path: Path) -> bool:
    return any((Path(path) / f).is_file() for f in ("summary.json", "config.yaml", "sweep-run.yaml", "metrics.csv"))


def load_runs(folder: str | Path) -> list[RunData]:
    """The runs of a sweep folder (its run sub-folders), or the one run of a run folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"not a folder: {folder}")
    if is_run_dir(folder) and not (folder / "sweep.json").is_file():
        return [read_run(folder)]
    runs = [read_run(p) for p in sorted(folder.iterdir()) if p.is_dir() and is_run_dir(p)]
    if not runs:
        raise UserError(f"no run folders in {folder} (a run folder holds summary.json or config.yaml)")
    return runs


# --------------------------------------------------------------------------- aggregation


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


def run_accuracy(run: RunData, metric: str = "best") -> float | None:
    """A run's test accuracy (percent): summary.json's best/final, else from metrics.csv."""
    key = "best_test_acc" if metric == "best" else "final_test_acc"
    value = _finite(run.summary.get(key))
    if value is not None:
        return value
    _, accs = run.curve("test_acc")
    accs = [a for a in accs if math.isfinite(a)]
    if not accs:
        return None
    return max(accs) if metric == "best" else accs[-1]


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


def variant(run: RunData) -> tuple[str, bool]:
    """(optimizer, with warm-up) of a run."""
    optimizer = str(run.get("optimizer", "?")).lower()
    warm = _number(run.get("warmup_epochs")) or 0.0
    schedule = str(run.get("schedule") or "").lower()
    return optimizer, bool(warm > 0 or (schedule.startswith("warmup") and run.get("warmup_epochs") is None))


def variant_label(optimizer: str, warm: bool) -> str:
    name = NAMES.get(optimizer, optimizer.upper())
    if optimizer == "tvlars":
        return name + (" + warm-up" if warm else "")
    return f"{name} ({'warm-up' if warm else 'no warm-up'})"


def _fmt_flag(value: Any) -> str:
    from tvlars.study.sweep import format_value

    return format_value(value)


def row_labels(runs: Sequence[RunData]) -> dict[str, str]:
    """Each run's row label: its variant, plus any other flag that varies within the variant."""
    groups: dict[tuple[str, bool], list[RunData]] = {}
    for r in runs:
        groups.setdefault(variant(r), []).append(r)
    labels = {}
    for key, members in groups.items():
        keys = sorted({k for r in members for k in r.flags})
        varying = [k for k in keys if k not in IGNORED
                   and len({json.dumps(r.flags.get(k), sort_keys=True, default=str) for r in members}) > 1]
        for r in members:
            extra = ", ".join(f"{k}={_fmt_flag(r.flags.get(k))}" for k in varying)
            labels[str(r.path)] = variant_label(*key) + (f" [{extra}]" if extra else "")
    return labels


def _label_order(label: str) -> tuple:
    base = label.split(" ")[0].lower()
    idx = ORDER.index(base) if base in ORDER else len(ORDER)
    return (idx, "no warm-up" in label, label)


@dataclass
class Cell:
    best: tuple[float | None, float | None, int]
    final: tuple[float | None, float | None, int]
    epochs: tuple[float | None, float | None, int]
    diverged: int = 0
    runs: int = 0
    reached: int = 0   # runs that reached the epochs-to-target goal
    peak_lr: float | None = None   # the schedule's peak (config.yaml's peak_lr: lr after --lr-scaling)


@dataclass
class Table:
    dataset: str
    task: str
    rows: list[str]                       # row labels, in order
    batch_sizes: list[int]
    lrs: dict[int, list[float]]           # the learning rates of each batch size, increasing
    cells: dict[tuple[str, int, float], Cell]
    paper_optimizer: dict[str, str]       # row label -> lars/lamb/tvlars for Table 1
    unfinished: int = 0
    total: int = 0

    @property
    def seeded(self) -> bool:
        """Whether any cell averages several runs (then every cell shows its n)."""
        return any(c.runs > 1 for c in self.cells.values())

    @property
    def width(self) -> int:
        return max((len(v) for v in self.lrs.values()), default=0)


def build_table(runs: Sequence[RunData], target: float = 0.95) -> Table:
    """Aggregate finished runs into Table 1's cells (row label, batch size, lr)."""
    labels = row_labels(runs)
    groups: dict[tuple[str, int, float], list[RunData]] = {}
    lrs: dict[int, set[float]] = {}
    paper_optimizer: dict[str, str] = {}
    unfinished = 0
    for r in runs:
        batch, lr = _number(r.get("batch_size")), _number(r.get("lr"))
        if batch is None or lr is None:
            unfinished += 0 if r.finished else 1
            continue
        batch = int(batch)
        label = labels[str(r.path)]
        lrs.setdefault(batch, set()).add(lr)
        paper_optimizer[label] = variant(r)[0]
        if not r.finished:
            unfinished += 1
            groups.setdefault((label, batch, lr), [])
            continue
        groups.setdefault((label, batch, lr), []).append(r)
    best_at_batch: dict[int, float] = {}
    for (label, batch, lr), members in groups.items():
        for r in members:
            acc = run_accuracy(r, "best")
            if acc is not None:
                best_at_batch[batch] = max(best_at_batch.get(batch, acc), acc)
    cells = {}
    for key, members in groups.items():
        if not members:
            continue  # only unfinished runs: a missing cell
        goal = target * best_at_batch.get(key[1], math.nan)
        epochs = [epochs_to_accuracy(*r.curve("test_acc"), goal) for r in members]
        cells[key] = Cell(
            best=mean_std(run_accuracy(r, "best") for r in members),
            final=mean_std(run_accuracy(r, "final") for r in members),
            epochs=mean_std(e for e in epochs if e is not None),
            diverged=sum(r.status == "diverged" for r in members),
            runs=len(members),
            reached=sum(e is not None for e in epochs),
            peak_lr=_number(members[0].get("peak_lr")),
        )
    datasets = {str(r.get("dataset", "?")).lower() for r in runs}
    tasks = {str(r.get("command", "train")).lower() for r in runs}
    rows = sorted({k[0] for k in groups}, key=_label_order)
    return Table(dataset=",".join(sorted(datasets)), task=",".join(sorted(tasks)), rows=rows,
                 batch_sizes=sorted(lrs), lrs={b: sorted(v) for b, v in lrs.items()}, cells=cells,
                 paper_optimizer=paper_optimizer, unfinished=unfinished, total=len(runs))


# --------------------------------------------------------------------------- formatting


def fmt_stat(stat: tuple[float | None, float | None, int], digits: int = 2, diverged: int = 0,
             show_n: bool = False) -> str:
    """``mean ± std (n)``; a single value shows ``(1)`` only with ``show_n`` (a table with seeds)."""
    mean, std, n = stat
    if mean is None:
        return "—"
    text = f"{mean:.{digits}f}"
    if std is not None:
        text += f" ± {std:.{digits}f} ({n})"
    elif show_n:
        text += f" ({n})"
    return text + (" †" if diverged else "")


def fmt_epochs(cell: Cell | None) -> str:
    if cell is None:
        return "—"
    if cell.reached == 0:
        return "never"
    text = fmt_stat(cell.epochs, digits=1, show_n=cell.runs > 1)
    return text + (f" ({cell.reached}/{cell.runs} reached)" if cell.reached < cell.runs else "")


def _lr_text(lr: float) -> str:
    return _fmt_flag(lr)


def _letters(n: int) -> list[str]:
    return [chr(ord("a") + i) for i in range(n)]


def paper_values(table: Table, label: str, batch: int) -> list[float | None] | None:
    from tvlars.study import paper

    key = (table.dataset, table.task)
    if key not in paper.TABLE1:
        return None
    optimizer = table.paper_optimizer.get(label)
    return [paper.published(table.dataset, table.task, optimizer, batch, lr) for lr in table.lrs.get(batch, [])]


def has_paper(table: Table) -> bool:
    from tvlars.study import paper

    return (table.dataset, table.task) in paper.TABLE1


def _markdown_lr_table(table: Table, cell_text, paper_row=None) -> str:
    """Rows optimizer x batch size, columns that batch size's lrs (the Table 1 layout).

    ``cell_text(cell_or_None) -> str``; ``paper_row(label, batch) -> list`` adds the paper's
    columns beside the measured ones.
    """
    letters = _letters(table.width)
    head = ["Optimizer", "Batch (lrs)"] + [f"lr {x}" for x in letters]
    if paper_row is not None:
        head += [f"paper {x}" for x in letters]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for batch in table.batch_sizes:
        lrs = table.lrs[batch]
        for label in table.rows:
            if not any((label, batch, lr) in table.cells for lr in lrs):
                continue
            cells = [cell_text(table.cells.get((label, batch, lr))) for lr in lrs]
            cells += [""] * (table.width - len(lrs))
            row = [label, f"{batch} ({'/'.join(_lr_text(lr) for lr in lrs)}){_peak_text(table, label, batch)}"] + cells
            if paper_row is not None:
                values = paper_row(label, batch) or []
                row += [f"{v:.2f}" if v is not None else "—" for v in values] + [""] * (table.width - len(values))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _peak_text(table: Table, label: str, batch: int) -> str:
    """", peak x16" where --lr-scaling made the schedule's peak differ from the lr column."""
    for lr in table.lrs[batch]:
        cell = table.cells.get((label, batch, lr))
        if cell is not None and cell.peak_lr is not None and not math.isclose(cell.peak_lr, lr):
            return f", peak ×{cell.peak_lr / lr:.4g}"
    return ""


def markdown_accuracy(table: Table, metric: str, with_paper: bool) -> str:
    def text(cell):
        return fmt_stat(getattr(cell, metric), diverged=cell.diverged, show_n=table.seeded) if cell else "—"

    return _markdown_lr_table(table, text, (lambda label, batch: paper_values(table, label, batch))
                              if with_paper else None)


def markdown_epochs(table: Table) -> str:
    return _markdown_lr_table(table, fmt_epochs)


def best_over_lrs(table: Table, metric: str) -> dict[tuple[str, int], tuple[float | None, float | None]]:
    """(row, batch) -> (accuracy of the best lr by mean, that lr)."""
    out = {}
    for label in table.rows:
        for batch in table.batch_sizes:
            best = (None, None)
            for lr in table.lrs[batch]:
                cell = table.cells.get((label, batch, lr))
                mean = getattr(cell, metric)[0] if cell else None
                if mean is not None and (best[0] is None or mean > best[0]):
                    best = (mean, lr)
            out[(label, batch)] = best
    return out


def markdown_best(table: Table, metric: str) -> str:
    """Best lr per row and batch size, plus the paper's two comparisons where the rows exist:
    TVLARS against the better of LARS and LAMB without warm-up, and LARS with warm-up against
    LARS without (differences in accuracy points)."""
    best = best_over_lrs(table, metric)
    nowarm = [r for r in ("LARS (no warm-up)", "LAMB (no warm-up)") if r in table.rows]
    claims = []
    if "TVLARS" in table.rows and nowarm:
        claims.append(("TVLARS − best no-warm-up", "TVLARS", nowarm))
    if "LARS (warm-up)" in table.rows and "LARS (no warm-up)" in table.rows:
        claims.append(("LARS warm-up − no warm-up", "LARS (warm-up)", ["LARS (no warm-up)"]))
    head = ["Batch"] + table.rows + [c[0] for c in claims]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for batch in table.batch_sizes:
        row = [str(batch)]
        for label in table.rows:
            acc, lr = best[(label, batch)]
            row.append("—" if acc is None else f"{acc:.2f} (lr {_lr_text(lr)})")
        for _, first, others in claims:
            a = best[(first, batch)][0]
            b = [best[(o, batch)][0] for o in others if best[(o, batch)][0] is not None]
            row.append("—" if a is None or not b else f"{a - max(b):+.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(table: Table, metric: str = "best", target: float = 0.95, title: str = "") -> str:
    from tvlars.study import paper

    other = "final" if metric == "best" else "best"
    words = {"best": "best test accuracy over epochs", "final": "final test accuracy"}
    finished = sum(c.runs for c in table.cells.values())
    diverged = sum(c.diverged for c in table.cells.values())
    parts = [f"# {title or 'Report'}\n",
             f"{table.total} run{'s' if table.total != 1 else ''}: {finished} finished ({diverged} diverged), {table.unfinished} not finished "
             f"(not counted). Dataset {table.dataset}, tvlars {table.task}.\n",
             "Cells: accuracy in %, mean ± sample std over seeds (n) where there are several; "
             "— no finished run; † some runs diverged.\n"]
    with_paper = has_paper(table)
    parts.append(f"\n## Table 1: {words[metric]} (%)\n")
    if with_paper:
        parts.append(f"\nBeside it, the paper's Table 1 ({paper.TITLES[(table.dataset, table.task)]}); "
                     "the paper does not say whether its LARS/LAMB rows used warm-up, so they stand beside both.\n")
    parts.append("\n" + markdown_accuracy(table, metric, with_paper))
    parts.append(f"\n## Table 1: {words[other]} (%)\n\n" + markdown_accuracy(table, other, False))
    parts.append(f"\n## Best over learning rates: {words[metric]} (%)\n\n" + markdown_best(table, metric))
    parts.append(f"\n## Epochs to reach {target * 100:g}% of the best test accuracy at the batch size\n\n"
                 "The goal is the same for every optimizer at a batch size: "
                 f"{target * 100:g}% of the best accuracy any run reached at it; "
                 "the first epoch whose test accuracy reaches it (mean ± std over the seeds that did).\n\n"
                 + markdown_epochs(table))
    return "".join(parts)


def render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["dataset", "task", "row", "optimizer", "batch_size", "lr", "lr_index", "n", "n_diverged",
                     "best_mean", "best_std", "final_mean", "final_std", "epochs_to_target_mean",
                     "epochs_to_target_std", "n_reached_target", "paper_acc", "peak_lr"])

    def num(x):
        return "" if x is None else f"{x:.6g}"

    for batch in table.batch_sizes:
        for label in table.rows:
            papers = paper_values(table, label, batch) or [None] * len(table.lrs[batch])
            for i, lr in enumerate(table.lrs[batch]):
                cell = table.cells.get((label, batch, lr))
                if cell is None:
                    if not any((label, batch, x) in table.cells for x in table.lrs[batch]):
                        continue
                    cell = Cell((None, None, 0), (None, None, 0), (None, None, 0))
                writer.writerow([table.dataset, table.task, label, table.paper_optimizer.get(label, ""), batch,
                                 num(lr), _letters(i + 1)[-1], cell.best[2], cell.diverged,
                                 num(cell.best[0]), num(cell.best[1]), num(cell.final[0]), num(cell.final[1]),
                                 num(cell.epochs[0]), num(cell.epochs[1]), cell.reached,
                                 num(papers[i] if i < len(papers) else None), num(cell.peak_lr)])
    return buf.getvalue()


def write_report(folder: str | Path, *, out: str | Path | None = None, metric: str = "best",
                 formats: Sequence[str] = ("md", "csv"), target: float = 0.95) -> str:
    """Build the report of a sweep folder, write report.md / report.csv, return the markdown."""
    from tvlars.study.sweep import atomic_write

    folder = Path(folder)
    runs = load_runs(folder)
    table = build_table(runs, target=target)
    text = render_markdown(table, metric=metric, target=target, title=f"Report: {folder.name}")
    destination = Path(out) if out else folder
    destination.mkdir(parents=True, exist_ok=True)
    if "md" in formats:
        atomic_write(destination / "report.md", text)
    if "csv" in formats:
        atomic_write(destination / "report.csv", render_csv(table))
    return text
