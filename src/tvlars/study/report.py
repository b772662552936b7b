"""``tvlars report SWEEP_DIR``: the paper's Table 1 for a sweep, plus epochs-to-target.

Reads the run folders under SWEEP_DIR (any sub-folder with ``summary.json``,
``config.yaml`` or ``sweep-run.yaml``; SWEEP_DIR may also be one run folder) and writes
``report.md`` and ``report.csv`` (atomically) into ``--out`` (default SWEEP_DIR), and
prints the markdown.

Layout, as Table 1: rows are optimizer variants ("LARS (warm-up)", "LARS (no warm-up)",
"LAMB ...", "TVLARS") for each batch size; columns are that batch size's learning rates in
increasing order ("lr a/b/c"). A cell is the test accuracy (percent) of the runs with that
setting: mean ± sample standard deviation over seeds, with n when there are several;
"—" where no finished run has an accuracy; "†" when some of its runs diverged (their accuracy
is the one the run recorded; "— †" when they diverged before their first test), in every
table, as ``n_diverged`` counts them in report.csv, "‡" when some exploded: completed, but with a training loss that
ended non-finite or at least 10 times an untrained classifier's (runs.exploded), so that its
accuracy is a broken network's or from before the blow-up. Only finished runs (summary.json
"completed" or "diverged") count. ``--metric best`` (default) uses each run's best test accuracy over epochs,
``final`` the last epoch's; the report holds both tables, the chosen one first. A
``tvlars ssl`` sweep has one table: each run's linear probe after the probe's last epoch (the
probe's best epoch is chosen on the test set, so it is no run's accuracy), and no
epochs-to-target table (an ssl run tests once); the report says which probe measured it
(``tvlars ssl --probe-norm``: ``bn``, standardised features, or ``none``, the raw features
of the Barlow Twins reference; an ssl run from before the flag probed raw), and
report.csv has it per row (``probe_norm``). When the
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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tvlars import runfolder
from tvlars.cli import parse_formats
from tvlars.errors import UserError
from tvlars.runfolder import number
from tvlars.study.grid import format_value
from tvlars.study.runs import (EXPLODED_FACTOR, RunData, best_per_batch, epochs_to_accuracy, exploded,
                               group_by_setting, headline_metric, label_order, load_runs, mean_std, run_accuracy,
                               variant)

# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", metavar="SWEEP_DIR", help="a sweep folder (or one run folder)")
    parser.add_argument("--out", metavar="DIR", default=None, help="where report.md/report.csv go (default SWEEP_DIR)")
    parser.add_argument("--metric", choices=("best", "final"), default=None,
                        help="test accuracy of a run: best over epochs (the default) or the final epoch's; "
                             "a tvlars ssl run has only the final one, its linear probe's after the probe's "
                             "last epoch")
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


@dataclass
class Cell:
    best: tuple[float | None, float | None, int]
    final: tuple[float | None, float | None, int]
    epochs: tuple[float | None, float | None, int]
    diverged: int = 0
    exploded: int = 0   # completed runs whose loss blew up (runs.exploded)
    runs: int = 0
    reached: int = 0   # runs that reached the epochs-to-target goal
    peak_lr: float | None = None   # the schedule's peak (config.yaml's peak_lr: lr after --lr-scaling)
    knn: tuple[float | None, float | None, int] = (None, None, 0)   # tvlars ssl: the final encoder's kNN
    probe_norm: str = ""   # tvlars ssl: the linear probe's --probe-norm ("bn", "none"; "bn+none" if mixed)


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
    headline: str = "best"                # the metric runs are compared by (runs.headline_metric)

    @property
    def metrics(self) -> dict[str, str]:
        """The accuracies a run of this table has, and what each is."""
        if self.headline == "final":  # tvlars ssl
            return {"final": "linear probe top-1 after its last epoch"}
        return {"best": "best test accuracy over epochs", "final": "final test accuracy"}

    @property
    def seeded(self) -> bool:
        """Whether any cell averages several runs (then every cell shows its n)."""
        return any(c.runs > 1 for c in self.cells.values())

    @property
    def width(self) -> int:
        return max((len(v) for v in self.lrs.values()), default=0)


def build_table(runs: Sequence[RunData], target: float = 0.95) -> Table:
    """Aggregate finished runs into Table 1's cells (row label, batch size, lr); a setting
    whose runs have not finished keeps its row and lr column, with an empty cell."""
    groups = group_by_setting(runs)
    finished = {key: [r for r in members if r.finished] for key, members in groups.items()}
    lrs: dict[int, set[float]] = {}
    paper_optimizer: dict[str, str] = {}
    for (label, batch, lr), members in groups.items():
        lrs.setdefault(batch, set()).add(lr)
        paper_optimizer[label] = variant(members[-1])[0]
    best_at_batch = best_per_batch(finished)
    cells = {}
    for key, members in finished.items():
        if not members:
            continue
        goal = target * best_at_batch.get(key[1], math.nan)
        epochs = [epochs_to_accuracy(*r.curve("test_acc"), goal) for r in members]
        cells[key] = Cell(
            best=mean_std(run_accuracy(r, "best") for r in members),
            final=mean_std(run_accuracy(r, "final") for r in members),
            epochs=mean_std(e for e in epochs if e is not None),
            diverged=sum(r.status == "diverged" for r in members),
            exploded=sum(exploded(r) for r in members),
            runs=len(members),
            reached=sum(e is not None for e in epochs),
            peak_lr=number(members[0].get("peak_lr")),
            knn=mean_std(number(r.summary.get("knn_acc")) for r in members),
            probe_norm="+".join(sorted({probe_norm(r) for r in members} - {""})),
        )
    datasets = {str(r.get("dataset", "?")).lower() for r in runs}
    tasks = {str(r.get("command", "train")).lower() for r in runs}
    rows = sorted({label for label, _, _ in groups}, key=label_order)
    return Table(dataset=",".join(sorted(datasets)), task=",".join(sorted(tasks)), rows=rows,
                 batch_sizes=sorted(lrs), lrs={b: sorted(v) for b, v in lrs.items()}, cells=cells,
                 paper_optimizer=paper_optimizer, unfinished=sum(not r.finished for r in runs), total=len(runs),
                 headline=headline_metric(runs))


def probe_norm(run: RunData) -> str:
    """The --probe-norm a tvlars ssl run's linear probe ran with; "none" (raw features) for one
    from before the flag (2026-12-07), "" for a tvlars train run."""
    if not run.ssl:
        return ""
    return str(run.summary.get("probe_norm") or run.get("probe_norm") or "none")


#: How report.md names each linear probe.
PROBE_NAMES = {"bn": "standardised features (--probe-norm bn: a parameter-free batch norm before the head)",
               "none": "raw features (--probe-norm none: the Barlow Twins reference's protocol)"}


# --------------------------------------------------------------------------- formatting


def fmt_stat(stat: tuple[float | None, float | None, int], digits: int = 2, diverged: int = 0,
             show_n: bool = False, exploded: int = 0) -> str:
    """``mean ± std (n)``; a single value shows ``(1)`` only with ``show_n`` (a table with seeds)."""
    mean, std, n = stat
    if mean is None:
        return "—" + _marks(diverged, exploded)
    text = f"{mean:.{digits}f}"
    if std is not None:
        text += f" ± {std:.{digits}f} ({n})"
    elif show_n:
        text += f" ({n})"
    return text + _marks(diverged, exploded)


def _marks(diverged: int, exploded: int) -> str:
    return (" †" if diverged else "") + (" ‡" if exploded else "")


def fmt_epochs(cell: Cell | None) -> str:
    if cell is None:
        return "—"
    if cell.reached == 0:
        return "never" + _marks(cell.diverged, cell.exploded)
    text = fmt_stat(cell.epochs, digits=1, show_n=cell.runs > 1)
    return text + (f" ({cell.reached}/{cell.runs} reached)" if cell.reached < cell.runs else "") + _marks(
        cell.diverged, cell.exploded)


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
            lr_texts = "/".join(format_value(lr) for lr in lrs)
            row = [label, f"{batch} ({lr_texts}){_peak_text(table, label, batch)}"] + cells
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
    mixed = len(probe_norms(table)) > 1

    def text(cell):
        if not cell:
            return "—"
        return fmt_stat(getattr(cell, metric), diverged=cell.diverged, show_n=table.seeded,
                        exploded=cell.exploded) + (f" [{cell.probe_norm}]" if mixed and cell.probe_norm else "")

    return _markdown_lr_table(table, text, (lambda label, batch: paper_values(table, label, batch))
                              if with_paper else None)


def markdown_epochs(table: Table) -> str:
    return _markdown_lr_table(table, fmt_epochs)


def best_over_lrs(table: Table, metric: str) -> dict[tuple[str, int], tuple[float | None, float | None, Cell | None]]:
    """(row, batch) -> (accuracy of the best lr by mean, that lr, its cell)."""
    out = {}
    for label in table.rows:
        for batch in table.batch_sizes:
            best = (None, None, None)
            for lr in table.lrs[batch]:
                cell = table.cells.get((label, batch, lr))
                mean = getattr(cell, metric)[0] if cell else None
                if mean is not None and (best[0] is None or mean > best[0]):
                    best = (mean, lr, cell)
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
            acc, lr, cell = best[(label, batch)]
            if acc is None:  # no lr has an accuracy: say whether its runs diverged
                cells = [table.cells.get((label, batch, x)) for x in table.lrs[batch]]
                row.append("—" + _marks(sum(c.diverged for c in cells if c), sum(c.exploded for c in cells if c)))
                continue
            std = getattr(cell, metric)[1]
            row.append(f"{acc:.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" (lr {format_value(lr)})"
                       + _marks(cell.diverged, cell.exploded))
        for _, first, others in claims:
            a = best[(first, batch)][0]
            b = [best[(o, batch)][0] for o in others if best[(o, batch)][0] is not None]
            row.append("—" if a is None or not b else f"{a - max(b):+.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(table: Table, metric: str | None = None, target: float = 0.95, title: str = "") -> str:
    from tvlars.study import paper

    metric = checked_metric(table, metric)
    words = table.metrics
    finished = sum(c.runs for c in table.cells.values())
    diverged = sum(c.diverged for c in table.cells.values())
    blown = sum(c.exploded for c in table.cells.values())
    parts = [f"# {title or 'Report'}\n",
             f"{table.total} run{'s' if table.total != 1 else ''}: {finished} finished ({diverged} diverged, "
             f"{blown} exploded), {table.unfinished} not finished "
             f"(not counted). Dataset {table.dataset}, tvlars {table.task}.\n",
             "Cells: accuracy in %, mean ± sample std over seeds (n) where there are several; "
             "— no accuracy (no finished run, or — † runs that diverged before their first test); "
             "† some runs diverged; ‡ some runs exploded (completed, but the training loss "
             f"ended non-finite or at least {EXPLODED_FACTOR:g}x an untrained classifier's).\n"]
    with_paper = has_paper(table)
    if table.headline == "final":
        parts.append("An ssl run's accuracy is its linear probe's, on the whole test set after the probe's last "
                     "epoch; the probe's best epoch, chosen on the test set, stays in summary.json "
                     "(probe_best_acc).\n")
        norms = probe_norms(table)
        if len(norms) == 1:
            parts.append(f"The linear probe saw {PROBE_NAMES.get(norms[0], norms[0])}.\n")
        elif norms:
            parts.append("The runs' linear probes differ, so each cell names its probe: "
                         + "; ".join(f"[{n}] {PROBE_NAMES.get(n, n)}" for n in norms) + ".\n")
    parts.append(f"\n## Table 1: {words[metric]} (%)\n")
    if with_paper:
        parts.append(f"\nBeside it, the paper's Table 1 ({paper.TITLES[(table.dataset, table.task)]}); "
                     "the paper does not say whether its LARS/LAMB rows used warm-up, so they stand beside both.\n")
    parts.append("\n" + markdown_accuracy(table, metric, with_paper))
    for other in words:
        if other != metric:
            parts.append(f"\n## Table 1: {words[other]} (%)\n\n" + markdown_accuracy(table, other, False))
    if any(c.knn[0] is not None for c in table.cells.values()):
        parts.append("\n## kNN accuracy of the final encoder (%)\n\nA second reading of the same encoders "
                     "that trains nothing: the weighted kNN vote (--knn-k) on features of the un-augmented "
                     "images.\n\n" + _markdown_lr_table(
                         table, lambda c: fmt_stat(c.knn, show_n=table.seeded) if c else "—"))
    parts.append(f"\n## Best over learning rates: {words[metric]} (%)\n\n" + markdown_best(table, metric))
    if table.headline == "final":
        return "".join(parts)
    parts.append(f"\n## Epochs to reach {target * 100:g}% of the best test accuracy at the batch size\n\n"
                 "The goal is the same for every optimizer at a batch size: "
                 f"{target * 100:g}% of the best accuracy any run reached at it; "
                 "the first epoch whose test accuracy reaches it (mean ± std over the seeds that did).\n\n"
                 + markdown_epochs(table))
    return "".join(parts)


def probe_norms(table: Table) -> list[str]:
    """The --probe-norm settings of the table's ssl runs (none for tvlars train)."""
    return sorted({n for c in table.cells.values() for n in c.probe_norm.split("+") if n})


def render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    ssl = table.headline == "final"
    writer.writerow(["dataset", "task", "row", "optimizer", "batch_size", "lr", "lr_index", "n", "n_diverged",
                     "best_mean", "best_std", "final_mean", "final_std", "epochs_to_target_mean",
                     "epochs_to_target_std", "n_reached_target", "paper_acc", "peak_lr", "knn_mean", "knn_std",
                     "n_exploded"] + (["probe_norm"] if ssl else []))

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
                                 num(lr), _letters(i + 1)[-1], getattr(cell, table.headline)[2], cell.diverged,
                                 num(cell.best[0]), num(cell.best[1]), num(cell.final[0]), num(cell.final[1]),
                                 num(cell.epochs[0]), num(cell.epochs[1]), cell.reached,
                                 num(papers[i] if i < len(papers) else None), num(cell.peak_lr),
                                 num(cell.knn[0]), num(cell.knn[1]), cell.exploded]
                                + ([cell.probe_norm] if ssl else []))
    return buf.getvalue()


def checked_metric(table: Table, metric: str | None) -> str:
    """``metric``, or the table's headline when None; one the table's runs do not have is a UserError."""
    metric = metric or table.headline
    if metric not in table.metrics:
        raise UserError(f"--metric {metric}: a tvlars ssl run has one test accuracy, its linear probe's after "
                        "the probe's last epoch (--metric final, the default)")
    return metric


def write_report(folder: str | Path, *, out: str | Path | None = None, metric: str | None = None,
                 formats: Sequence[str] = ("md", "csv"), target: float = 0.95) -> str:
    """Build the report of a sweep folder, write report.md / report.csv, return the markdown."""
    folder = Path(folder)
    runs = load_runs(folder)
    table = build_table(runs, target=target)
    text = render_markdown(table, metric=metric, target=target, title=f"Report: {folder.name}")
    destination = Path(out) if out else folder
    destination.mkdir(parents=True, exist_ok=True)
    if "md" in formats:
        runfolder.atomic_write(destination / "report.md", text)
    if "csv" in formats:
        runfolder.atomic_write(destination / "report.csv", render_csv(table))
    return text
