"""``tvlars plot RUN_OR_SWEEP_DIR``: the paper's figures for one run or a whole sweep.

Figures (written atomically into ``--out``, default ``<dir>/figures/``, one file per
``--format``: png, svg, pdf; default png and svg). A series of a few points (a 1-epoch run,
layers.csv with one row, kNN every few epochs) has its points marked: a line needs two.

``curves_B<batch>``   test accuracy and test loss against epochs for one batch size, a
                      line per optimizer variant and learning rate (mean over seeds):
                      the counterpart of the paper's Figures 1, 5 and 60-63. For a
                      ``tvlars ssl`` sweep, whose test accuracy exists only after the final
                      probe, the kNN accuracy and the Barlow Twins training loss, with the
                      untrained encoder's kNN accuracy (``--epochs 0`` runs) as a line.
                      ``--lrs best`` keeps one line per variant, at its best lr (the
                      highest mean best-epoch accuracy, as the report's best-over-lrs
                      table chooses): several variants on one page stay readable.
``layers_<variant>_B<batch>``  what layers.csv records per layer: the weight norm ||w||, the
                      norm in the trust ratio's denominator (||g + wd w|| for LARS,
                      ||u|| for LAMB), the trust ratio and the step size; and the test
                      loss (ssl: the training loss), against optimizer steps, smoothed
                      past 200 points, a row per learning rate (first seed): Figures 2
                      and 6-59. The
                      layers shown are chosen with ``--layers``: ``auto`` (first, middle and
                      last weight layers, biases and norm layers left out) or a
                      comma-separated list of layer names, substrings of names, indices,
                      ``first``, ``middle``, ``last``.
``tv-factor``         phi_t (Eq. 4, ``tvlars.tv_factor``) against steps for the lam, delay,
                      alpha and min-factor the runs' TVLARS trained with (config.yaml), or
                      for ``--lams`` at ``--delay`` (default, without TVLARS runs: the
                      paper's 1e-2 .. 1e-6): Figure 3. The span of steps the runs trained
                      (diverged runs left out) is shaded.
``accuracy-vs-lam``   best test accuracy (ssl: the linear probe's) against lam, when the sweep
                      varies lam: Figure 4.
``epochs-to-target``  per batch size and optimizer variant (each at its best lr), the
                      epochs to reach ``--target`` % of the best accuracy any run reached at
                      that batch size; bars that never get there are marked (classification
                      sweeps: an ssl run has one test accuracy, after its probe).

For a single run folder: its curves, its layer figure and the tv-factor figure.
``--figures`` picks a subset (curves, layers, tv-factor, lam, epochs). A figure that cannot
be drawn from the runs is named with the reason: on stderr when it was only part of the
default set, as an error (exit status 2) when ``--figures`` asked for it or nothing was drawn.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from tvlars import runfolder
from tvlars.cli import parse_formats
from tvlars.errors import UserError
from tvlars.runfolder import number
from tvlars.study.grid import format_value
from tvlars.study.runs import (UNTRAINED, best_per_batch, epochs_to_accuracy, group_by_setting, headline_metric,
                               is_ssl, label_order, load_runs, mean_std, run_accuracy, variant)

FIGURES = ("curves", "layers", "tv-factor", "lam", "epochs")
FORMATS = ("png", "svg", "pdf")
DEFAULT_FORMATS = ("png", "svg")  # a raster to look at and a vector to print
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
#: The decay coefficients of the paper's Figure 3.
PAPER_LAMS = (1e-2, 5e-3, 1e-3, 1e-4, 1e-5, 1e-6)
#: Series of at most this many points are drawn with their points marked: one point alone
#: draws no line at all, and a few read better as points.
MARKED_UP_TO = 20


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_OR_SWEEP_DIR", help="a run folder or a sweep folder")
    parser.add_argument("--out", metavar="DIR", default=None, help="where the figures go (default DIR/figures)")
    parser.add_argument("--format", default=",".join(DEFAULT_FORMATS), metavar="LIST",
                        help=f"comma-separated: {', '.join(FORMATS)} (default {','.join(DEFAULT_FORMATS)})")
    parser.add_argument("--figures", default=",".join(FIGURES), metavar="LIST",
                        help=f"comma-separated subset of {', '.join(FIGURES)} (default all)")
    parser.add_argument("--layers", default="auto", metavar="LIST",
                        help="layers of the per-layer figures: auto, or names / substrings / indices / "
                             "first, middle, last, comma-separated")
    parser.add_argument("--lams", default=None, metavar="LIST",
                        help="lam values of the tv-factor figure (default: the lam and delay the runs' TVLARS "
                             "trained with, else the paper's 1e-2,5e-3,1e-3,1e-4,1e-5,1e-6)")
    parser.add_argument("--delay", type=float, default=0.0, metavar="STEPS",
                        help="delay d_e of the tv-factor figure with --lams, in steps (default 0)")
    parser.add_argument("--target", type=float, default=95.0, metavar="PERCENT",
                        help="epochs-to-target figure: %% of the best accuracy at each batch size (default 95)")
    parser.add_argument("--lrs", choices=("all", "best"), default="all",
                        help="curves figure: a line per learning rate, or only each variant's best "
                             "(default all)")
    parser.add_argument("--dpi", type=int, default=120, help="resolution of png files (default 120)")


def run(args: argparse.Namespace) -> int:
    formats = parse_formats(args.format, FORMATS)
    figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    chosen = figures != list(FIGURES)  # asked for by name: each one must be drawn
    for f in figures:
        if f not in FIGURES:
            raise UserError(f"--figures: unknown figure '{f}' (expected {', '.join(FIGURES)})")
    try:
        lams = [float(x) for x in (args.lams or "").split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lams: not a list of numbers: {args.lams}") from None
    if not 0 < args.target <= 100:
        raise UserError(f"--target must be a percentage in (0, 100], not {args.target}")
    skipped: dict[str, str] = {}
    written = make_figures(args.path, out=args.out, formats=formats, figures=figures, layers=args.layers,
                           lams=lams, delay=args.delay, target=args.target / 100, dpi=args.dpi,
                           best_lr_only=args.lrs == "best", skipped=skipped)
    for path in written:
        print(path)
    why = "; ".join(f"{figure}: {reason}" for figure, reason in skipped.items())
    if skipped and (chosen or not written):
        raise UserError(f"drew {'nothing' if not written else 'only some figures'} of --figures "
                        f"{','.join(figures)}: {why}")
    if skipped:
        print(f"tvlars plot: not drawn: {why}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- helpers


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig, out: Path, stem: str, formats: Sequence[str], dpi: int = 120, tight: bool = True) -> list[Path]:
    """Save a figure in every format, atomically (a report page never shows half a png); close it."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{stem}.{fmt}"
        runfolder.atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi,
                                                            bbox_inches="tight" if tight else None))
        paths.append(path)
    _pyplot().close(fig)
    return paths


def _plot(ax, xs, ys, **style) -> None:
    """``ax.plot``, with markers on a short series (MARKED_UP_TO)."""
    if len(xs) <= MARKED_UP_TO:
        style = {"marker": "o", "markersize": 3.5, **style}
    ax.plot(xs, ys, **style)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", text).strip("-").lower()


def read_layers(path: Path) -> dict[str, dict[str, list[float]]]:
    """layers.csv -> {layer: {"step": [...], "weight_norm": [...], "grad_norm": [...], ...}} in file order."""
    try:
        rows = list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    layers: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        name = row.get("layer")
        if not name or not isinstance(name, str):
            continue
        series = layers.setdefault(name, {"step": [], "weight_norm": [], "grad_norm": [], "trust_ratio": [],
                                          "step_size": []})
        for key in series:
            try:
                series[key].append(float(row.get(key) or "nan"))
            except (TypeError, ValueError):
                series[key].append(float("nan"))
    return layers


def _is_weight_layer(name: str) -> bool:
    lowered = name.lower()
    if lowered.endswith(".bias") or "bias" in lowered.split(".")[-1]:
        return False
    return not any(tag in lowered for tag in ("bn", "norm", "downsample.1", "shortcut.1"))


def select_layers(names: Sequence[str], spec: str = "auto") -> list[str]:
    """The layers to draw: ``auto`` = first, middle and last weight layer; else a list of
    names, substrings of names, indices, or first/middle/last (of all layers)."""
    names = list(names)
    if not names:
        return []
    spec = (spec or "auto").strip()
    if spec == "auto":
        pool = [n for n in names if _is_weight_layer(n)] or names
        picks = [pool[0], pool[len(pool) // 2], pool[-1]]
        return list(dict.fromkeys(picks))
    chosen = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token in ("first", "middle", "last"):
            chosen.append({"first": names[0], "middle": names[len(names) // 2], "last": names[-1]}[token])
        elif token in names:
            chosen.append(token)
        elif token.lstrip("-").isdigit() and -len(names) <= int(token) < len(names):
            chosen.append(names[int(token)])
        else:
            matches = [n for n in names if token in n]
            if not matches:
                shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise UserError(f"--layers: no layer matches '{token}' (layers: {shown})")
            chosen.append(matches[0])
    return list(dict.fromkeys(chosen))


def _mean_curve(runs, column: str) -> tuple[list[float], list[float]]:
    """Mean over runs of a metrics.csv column, per epoch."""
    xs, means, _ = _mean_std_curve(runs, column)
    return xs, means


def _mean_std_curve(runs, column: str) -> tuple[list[float], list[float], list[float | None]]:
    """Mean and sample std over runs of a metrics.csv column, per epoch (std None where one
    run has a finite value)."""
    by_epoch: dict[float, list[float]] = {}
    for r in runs:
        for e, v in zip(*r.curve(column)):
            if math.isfinite(v):
                by_epoch.setdefault(e, []).append(v)
    xs = sorted(by_epoch)
    stats = [mean_std(by_epoch[x]) for x in xs]
    return xs, [m for m, _, _ in stats], [sd for _, sd, _ in stats]


def _diverged_epoch(runs) -> float | None:
    """The first epoch in which one of ``runs`` diverged (summary.json diverged_at_epoch, else
    the last epoch it logged), None when none did."""
    epochs = []
    for r in runs:
        if r.status != "diverged":
            continue
        at = number(r.summary.get("diverged_at_epoch"))
        if at is None:
            logged = [m.get("epoch") for m in r.metrics if m.get("epoch") is not None]
            at = max(logged) if logged else 1.0
        epochs.append(at)
    return min(epochs) if epochs else None


def _mark_divergence(ax, xs, ys, epoch: float, color, edge: str) -> None:
    """An X where a series stopped because its run diverged: on its last finite point at or
    before ``epoch``, or, when it has none inside the axis (it diverged before its first
    evaluation, or its loss had left the axis), on the axis' ``edge`` ("bottom" or "top") at
    that epoch."""
    before = [(x, y) for x, y in zip(xs, ys) if x <= epoch and math.isfinite(y)]
    style = dict(marker="X", markersize=10, color=color, markeredgecolor="black", linestyle="none", zorder=5)
    low, high = ax.get_ylim()
    if before and low <= before[-1][1] <= high:
        ax.plot([before[-1][0]], [before[-1][1]], **style)
    else:
        ax.plot([epoch], [0.03 if edge == "bottom" else 0.97], transform=ax.get_xaxis_transform(),
                clip_on=False, **style)


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


# --------------------------------------------------------------------------- figures


def _curve_columns(runs) -> tuple[str, str]:
    """The (accuracy, loss) columns of metrics.csv a sweep's curves show: tvlars ssl has a
    test accuracy only after its final probe, so its curves are the per-epoch kNN accuracy
    and the Barlow Twins loss on the training views."""
    return ("knn_acc", "train_loss") if is_ssl(runs) else ("test_acc", "test_loss")


def _groups(runs):
    """The runs with curves of each setting, and the rows in Table 1's order."""
    groups = {}
    for key, members in group_by_setting(runs).items():
        # a run that diverged before its first logged epoch still belongs: it is drawn as a mark
        with_curves = [r for r in members if r.metrics or r.status == "diverged"]
        if with_curves:
            groups[key] = with_curves
    return groups, sorted({label for label, _, _ in groups}, key=label_order)


def _best_lrs(groups) -> dict[tuple[str, int], float]:
    """Each variant's best lr per batch size: the highest mean best-epoch accuracy over its
    seeds (the report's best-over-lrs choice)."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for (label, batch, lr), members in groups.items():
        mean = mean_std(run_accuracy(r, "best") for r in members)[0]
        if mean is not None and ((label, batch) not in best or mean > best[(label, batch)][0]):
            best[(label, batch)] = (mean, lr)
    return {key: lr for key, (_, lr) in best.items()}


def figure_curves(runs, out: Path, formats, dpi=120, title_prefix="", best_lr_only=False) -> list[Path]:
    """Test accuracy and loss against epochs, one figure per batch size (Figures 1, 5, 60-63).

    Every setting has a legend entry. A mean over seeds is drawn with its spread (mean ±
    std) as a band. A run that diverged is drawn up to where it diverged and marked with an
    X in both panels and the legend. When the final accuracies of the leading lines lie in
    a band much narrower than the axis, a third panel zooms on that band over the last half
    of training (on a 0-100 axis a 2-point gap between optimizers is invisible)."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    groups, order = _groups(runs)
    if best_lr_only:
        best = _best_lrs(groups)
        groups = {key: members for key, members in groups.items() if best.get(key[:2], key[2]) == key[2]}
    colors = _colors(order)
    acc_column, loss_column = _curve_columns(runs)
    untrained = mean_std(number(r.summary.get("knn_acc")) for r in runs
                         if r.finished and variant(r)[0] == UNTRAINED)[0]
    written = []
    for batch in sorted({k[1] for k in groups}):
        lrs = sorted({k[2] for k in groups if k[1] == batch})
        series = []  # (name, style, acc curve, loss curve, diverged epoch)
        for label in order:
            for i, lr in enumerate(lrs):
                members = groups.get((label, batch, lr))
                if not members:
                    continue
                dash = LINESTYLES[0 if best_lr_only else i % len(LINESTYLES)]
                style = dict(color=colors[label], linestyle=dash, linewidth=1.6)
                n = len(members)
                name = f"{label}, lr {format_value(lr)}" + (f" (mean of {n})" if n > 1 else "")
                diverged_at = _diverged_epoch(members)
                if diverged_at is not None:
                    failed = sum(r.status == "diverged" for r in members)
                    name += (f": diverged in epoch {diverged_at:g}" if failed == n
                             else f": {failed} of {n} diverged (first in epoch {diverged_at:g})")
                series.append((name, style, _mean_std_curve(members, acc_column),
                               _mean_std_curve(members, loss_column), diverged_at))
        zoom = _zoom_band([acc for _, _, acc, _, _ in series])
        fig, axes = plt.subplots(1, 3 if zoom else 2, figsize=(17 if zoom else 12, 4.6),
                                 gridspec_kw={"width_ratios": [1, 1, 0.8]} if zoom else None)
        ax_acc, ax_loss = axes[0], axes[1]
        handles, marks = [], []
        for name, style, (xs, ys, sds), (lxs, lys, lsds), diverged_at in series:
            if xs:
                _plot(ax_acc, xs, ys, label=name, **style)
                _band(ax_acc, xs, ys, sds, style["color"])
                if zoom:
                    _plot(axes[2], xs, ys, **style)
                    _band(axes[2], xs, ys, sds, style["color"])
            pos = [(x, y, sd) for x, y, sd in zip(lxs, lys, lsds) if y > 0]
            if pos:
                _plot(ax_loss, [p[0] for p in pos], [p[1] for p in pos], **style)
                _band(ax_loss, [p[0] for p in pos], [p[1] for p in pos], [p[2] for p in pos], style["color"],
                      positive=True)
            if diverged_at is not None:
                marks.append((ax_acc, xs, ys, diverged_at, style["color"], "bottom"))
                marks.append((ax_loss, [p[0] for p in pos], [p[1] for p in pos], diverged_at, style["color"], "top"))
            handles.append(Line2D([], [], label=name, marker="X" if diverged_at is not None else None,
                                  markeredgecolor="black", markersize=8, **style))
        if acc_column == "knn_acc":
            if untrained is not None:
                ax_acc.axhline(untrained, color="grey", linestyle="--", linewidth=1.2,
                               label=f"untrained encoder ({untrained:.2f})")
                handles.append(ax_acc.get_lines()[-1])
                if zoom:
                    axes[2].axhline(untrained, color="grey", linestyle="--", linewidth=1.2)
            ax_acc.set(xlabel="epoch", ylabel="kNN accuracy (%)", title=f"kNN test accuracy, batch size {batch}")
            ax_loss.set(xlabel="epoch", ylabel="Barlow Twins loss (training views, log scale)",
                        title=f"Training loss, batch size {batch}")
        else:
            ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"Test accuracy, batch size {batch}")
            ax_loss.set(xlabel="epoch", ylabel="test loss (cross-entropy, log scale)",
                        title=f"Test loss, batch size {batch}")
        ax_loss.set_yscale("log")
        _fit_log_axis(ax_loss)
        for mark in marks:  # after the limits: a mark beyond them goes on the axis' edge
            _mark_divergence(*mark)
        if zoom:
            (x_low, x_high), (y_low, y_high) = zoom
            axes[2].set(xlim=(x_low, x_high), ylim=(y_low, y_high), xlabel="epoch",
                        ylabel=ax_acc.get_ylabel(), title="the same, zoomed on the leading runs")
            ax_acc.add_patch(plt.Rectangle((x_low, y_low), x_high - x_low, y_high - y_low, fill=False,
                                           edgecolor="0.4", linestyle=":", linewidth=1.0))
        for ax in axes:
            ax.grid(True, alpha=0.3)
        if any(sds for _, _, (_, _, sds), _, _ in series if any(sd is not None for sd in sds)):
            handles.append(plt.Rectangle((0, 0), 1, 1, color="0.6", alpha=0.3, label="band: mean ± std over seeds"))
        if any(d is not None for *_, d in series):
            handles.append(Line2D([], [], marker="X", color="0.3", markeredgecolor="black", linestyle="none",
                                  markersize=8, label="X: where a run diverged"))
        if handles:
            fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
        what = "kNN accuracy and training loss" if acc_column == "knn_acc" else "test accuracy and loss"
        per = "at its best learning rate" if best_lr_only else "and learning rate"
        fig.suptitle(f"{title_prefix}{what} per optimizer {per} (B = {batch})")
        fig.tight_layout()
        written += save(fig, out, f"curves_B{batch}", formats, dpi)
    return written


def _band(ax, xs, means, stds, color, positive: bool = False) -> None:
    """The spread over seeds, mean ± std, as a translucent band (nothing for one seed)."""
    points = [(x, m, sd) for x, m, sd in zip(xs, means, stds) if sd is not None]
    if len(points) < 2:
        return
    low = [m - sd for _, m, sd in points]
    if positive:  # a log axis: the band stops at a tenth of the mean rather than at <= 0
        low = [max(lo, m / 10) for lo, (_, m, _) in zip(low, points)]
    ax.fill_between([x for x, _, _ in points], low, [m + sd for _, m, sd in points], color=color, alpha=0.18,
                    linewidth=0)


def _zoom_band(curves, lead: float = 10.0, narrow: float = 0.3):
    """((x0, x1), (y0, y1)) of the zoomed panel, or None when it is not needed: the last half of
    the epochs, the values there of the lines whose final accuracy is within ``lead`` points
    of the best, when that band is under ``narrow`` of the range all lines span."""
    finals = [(xs, ys) for xs, ys, _ in curves if xs]
    if not finals:
        return None
    best = max(ys[-1] for _, ys in finals)
    x_high = max(xs[-1] for xs, _ in finals)
    x_low = x_high / 2
    leaders = [[y for x, y in zip(xs, ys) if x >= x_low] for xs, ys in finals if ys[-1] >= best - lead]
    band = [y for values in leaders for y in values]
    every = [y for _, ys in finals for y in ys]
    if not band or x_high <= 1:
        return None
    low, high = min(band), max(band)
    if (high - low) >= narrow * (max(every) - min(every)):
        return None
    pad = max(0.2, 0.08 * (high - low))
    return (x_low, x_high + 0.02 * x_high), (low - pad, high + pad)


def _fit_log_axis(ax, factor: float = 1e3) -> None:
    """A log loss axis that follows the data: limits from the lines that did not explode (a
    line whose values exceed ``factor`` times the median of all is drawn up to where it leaves
    the axis and marked there with a triangle), and enough labelled ticks when the range spans
    less than two decades (matplotlib labels only powers of ten)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lines = [line for line in ax.get_lines() if len(line.get_xdata())]
    values = sorted(float(y) for line in lines for y in line.get_ydata() if math.isfinite(y) and y > 0
                    and line.get_transform() == ax.transData)
    if not values:
        return
    cap = values[len(values) // 2] * factor
    kept = [v for v in values if v <= cap]
    low, high = kept[0] / 1.25, kept[-1] * 1.25
    if values[-1] > cap:
        for line in lines:
            if line.get_transform() != ax.transData:
                continue
            points = [(x, y) for x, y in zip(line.get_xdata(), line.get_ydata()) if math.isfinite(y) and y > 0]
            above = [x for x, y in points if y > high]
            if above:
                ax.plot([above[0]], [0.985], marker="^", markersize=9, color=line.get_color(), linestyle="none",
                        transform=ax.get_xaxis_transform(), clip_on=False, zorder=5)
        ax.set_title(ax.get_title() + "\n(▲: a line leaves the axis there: its loss exploded)", fontsize=10)
    ax.set_ylim(low, high)
    if high / low < 100:
        subs = (1.0, 2.0, 5.0) if high / low > 10 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


#: Per-layer series longer than this are drawn smoothed (a moving average over about 1/40th
#: of the run), over the raw values in a faint line: 5,000 noisy steps are otherwise a band.
SMOOTH_ABOVE = 200


def _smoothed(ys: Sequence[float], log: bool) -> list[float]:
    """A centred moving average of ``ys`` over about 1/40th of its length (of the logs for a log
    axis, so a spike does not lift a decade); NaN gaps stay gaps."""
    import numpy as np

    values = np.asarray(ys, dtype=float)
    if log:
        values = np.log(np.where(values > 0, values, np.nan))
    window = max(3, len(values) // 40) | 1
    finite = np.isfinite(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    counts = np.convolve(finite.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite & (counts > 0), sums / np.maximum(counts, 1), np.nan)
    return list(np.exp(mean) if log else mean)


def _layer_panels(optimizer: str) -> tuple[tuple[str, str, str], ...]:
    """(layers.csv column, title, y label) of the per-layer panels: what LayerStats records, the
    norm in the trust ratio's denominator named as the optimizer computes it."""
    denominator = {"lamb": "||u|| (Adam direction + decay)", "adamw": "||g||"}.get(optimizer, "||g + wd·w||")
    return (("weight_norm", "weight norm ||w||", "||w|| (L2 norm)"),
            ("grad_norm", f"update norm {denominator}", denominator),
            ("trust_ratio", "trust ratio", "trust ratio (layers.csv)"),
            ("step_size", "step size", "step size (multiplies the direction)"))


def figure_layers(runs, out: Path, formats, layers_spec="auto", dpi=120, single=False) -> list[Path]:
    """Per-layer ||w||, the trust ratio's denominator norm, the trust ratio and the step size
    that layers.csv records, and the test loss, against steps (Figures 2, 6-59). Long series
    are smoothed (SMOOTH_ABOVE); layers differ in colour and dash, drawn translucent, so none
    hides another."""
    plt = _pyplot()
    groups, order = _groups(runs)
    loss_column = _curve_columns(runs)[1]
    written = []
    keys = sorted({(k[0], k[1]) for k in groups}, key=lambda k: (order.index(k[0]), k[1]))
    for label, batch in keys:
        lrs = sorted({k[2] for k in groups if k[0] == label and k[1] == batch})
        chosen_runs = []
        for lr in lrs:
            members = sorted(groups[(label, batch, lr)], key=lambda r: (str(r.get("seed", "")), r.name))
            members = [r for r in members if (r.path / runfolder.LAYERS).is_file()]
            if members:
                chosen_runs.append((lr, members[0]))
        if not chosen_runs:
            continue
        panels = _layer_panels(str(chosen_runs[0][1].get("optimizer", "")).lower())
        columns = len(panels) + 1
        fig, axes = plt.subplots(len(chosen_runs), columns, figsize=(4 * columns, 3.4 * len(chosen_runs)),
                                 squeeze=False)
        smoothed_any = False
        for row, (lr, r) in enumerate(chosen_runs):
            data = read_layers(r.path / runfolder.LAYERS)
            names = select_layers(list(data), layers_spec)
            cmap = plt.get_cmap("tab10")
            for j, name in enumerate(names):
                series = data[name]
                style = dict(color=cmap(j % 10), linestyle=LINESTYLES[j % len(LINESTYLES)], linewidth=1.4, alpha=0.85)
                steps = series["step"]
                for col, (column, _, _) in enumerate(panels):
                    ys = series[column]
                    if len(ys) > SMOOTH_ABOVE:
                        smoothed_any = True
                        axes[row, col].plot(steps, ys, color=style["color"], linewidth=0.6, alpha=0.15)
                        log = all(y > 0 for y in ys if y == y)
                        axes[row, col].plot(steps, _smoothed(ys, log), label=name, **style)
                    else:
                        _plot(axes[row, col], steps, ys, label=name, **style)
            if r.metrics and all(m.get("step") is not None for m in r.metrics):
                pairs = [(m["step"], m.get(loss_column)) for m in r.metrics if m.get(loss_column) is not None]
                xs, ys, loss_x = [p[0] for p in pairs], [p[1] for p in pairs], "step"
            else:
                (xs, ys), loss_x = r.curve(loss_column), "epoch"
            _plot(axes[row, -1], xs, ys, color="black", linewidth=1.4)
            suffix = f" (lr {format_value(lr)})"
            loss_name = ("Barlow Twins loss", "training loss (Barlow Twins)") if loss_column == "train_loss" else \
                ("test loss", "test loss (cross-entropy)")
            titles = [title for _, title, _ in panels] + [loss_name[0]]
            ylabels = [ylabel for _, _, ylabel in panels] + [loss_name[1]]
            for col in range(columns):
                ax = axes[row, col]
                ax.set_title(titles[col] + suffix, fontsize=10)
                ax.set_xlabel("optimizer step" if col < columns - 1 or loss_x == "step" else "epoch")
                ax.set_ylabel(ylabels[col])
                ax.grid(True, alpha=0.3)
                data_y = [y for line in ax.get_lines() for y in line.get_ydata() if y == y]
                if data_y and min(data_y) > 0 and max(data_y) / min(data_y) > 10:
                    ax.set_yscale("log")
            if row == 0 and names:
                axes[row, 0].legend(fontsize=8, title="layer", title_fontsize=8)
        note = " (long series: moving average over 1/40 of the run, raw values faint)" if smoothed_any else ""
        fig.suptitle(f"Per-layer statistics (layers.csv) and {loss_name[0]}: {label}, batch size {batch}"
                     + (f" ({chosen_runs[0][1].name})" if single else "") + note, fontsize=12)
        fig.tight_layout()
        stem = "layers" if single else f"layers_{_slug(label)}_B{batch}"
        written += save(fig, out, stem, formats, dpi, tight=False)
    return written


def _factor_settings(runs) -> list[tuple[float, float, float, float]]:
    """The (lam, delay in steps, alpha, min_factor) of phi_t each run that used it trained with
    (TVLARS, or --tv-factor), as config.yaml resolved them, in a stable order."""
    settings = set()
    for r in runs:
        if str(r.get("optimizer", "")).lower() != "tvlars" and not r.get("tv_factor"):
            continue
        lam = number(r.get("lam_resolved", r.get("lam")))
        delay = number(r.get("delay_steps_resolved", r.get("delay_steps"))) or 0.0
        alpha, floor = number(r.get("alpha")), number(r.get("min_factor"))
        if lam is not None and lam >= 0:
            settings.add((lam, delay, 1.0 if alpha is None else alpha, 0.0 if floor is None else floor))
    return sorted(settings, key=lambda x: (-x[0], x[1], x[2], x[3]))


def figure_tv_factor(out: Path, formats, lams: Sequence[float] = (), delay: float = 0.0, runs=(), dpi=120) -> list[Path]:
    """phi_t against steps (Figure 3): for the lam, delay, alpha and min-factor that the runs'
    TVLARS trained with (config.yaml), or, with ``lams`` given or no such run, for those lams at
    ``delay``. The span of steps that the runs which did not diverge trained is shaded."""
    from tvlars import tv_factor

    plt = _pyplot()
    import numpy as np

    own = [] if lams else _factor_settings(runs)
    curves = own or [(lam, delay, 1.0, 0.0) for lam in (lams or PAPER_LAMS)]
    steps = np.unique(np.concatenate([[0], np.geomspace(1, 1e7, 600)]))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    cmap = plt.get_cmap("plasma")
    for i, (lam, delay_steps, alpha, floor) in enumerate(curves):
        phi = [tv_factor(float(t), lam, delay=delay_steps, alpha=alpha, min_factor=floor) for t in steps]
        name = f"λ = {lam:g}, d_e = {delay_steps:g} steps" + (f", α = {alpha:g}" if alpha != 1 else "") + (
            f", γ_min = {floor:g}" if floor else "")
        ax.plot(steps + 1, phi, label=name, color=cmap(i / max(1, len(curves) - 1) * 0.9), linewidth=1.8)
    trained = [r.metrics[-1].get("step") for r in runs
               if r.status != "diverged" and r.metrics and r.metrics[-1].get("step")]
    if trained and min(trained) < max(trained):
        ax.axvspan(1 + min(trained), 1 + max(trained), color="grey", alpha=0.2,
                   label=f"steps trained here ({int(min(trained))}–{int(max(trained))})")
    elif trained:
        ax.axvline(1 + trained[0], color="grey", linestyle="--", label=f"steps trained here ({int(trained[0])})")
    if any(r.status == "diverged" for r in runs):
        ax.plot([], [], linestyle="none", label="(diverged runs' steps not counted)")
    ax.set_xscale("log")
    whose = "the runs' own settings" if own else ("the paper's λ" if not lams else "λ given")
    ax.set(xlabel="optimizer step t + 1 (log scale)", ylabel="φ_t",
           title=f"TVLARS time-varying factor φ_t = 1 / (α + exp(λ (t − d_e))) + γ_min\n({whose})")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return save(fig, out, "tv-factor", formats, dpi)


def figure_accuracy_vs_lam(runs, out: Path, formats, dpi=120) -> list[Path]:
    """Test accuracy (best epoch; ssl: the final linear probe) against lam, for the TVLARS
    runs of a sweep that varies lam (Figure 4)."""
    metric = headline_metric(runs)
    points: dict[tuple[int, float], dict[float, list[float]]] = {}
    for r in runs:
        if not r.finished or str(r.get("optimizer", "")).lower() != "tvlars":
            continue
        lam, batch, lr = (number(r.get(k)) for k in ("lam", "batch_size", "lr"))
        acc = run_accuracy(r, metric)
        if None in (lam, batch, lr) or acc is None or lam <= 0:
            continue
        points.setdefault((int(batch), lr), {}).setdefault(lam, []).append(acc)
    if not any(len(v) > 1 for v in points.values()):
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    batches = sorted({k[0] for k in points})
    colors = _colors([str(b) for b in batches])
    for (batch, lr), by_lam in sorted(points.items()):
        if len(by_lam) < 2:
            continue
        lams = sorted(by_lam)
        stats = [mean_std(by_lam[x]) for x in lams]
        lrs = sorted({k[1] for k in points if k[0] == batch})
        ax.errorbar(lams, [s[0] for s in stats], yerr=[s[1] or 0.0 for s in stats], marker="o", capsize=3,
                    color=colors[str(batch)], linestyle=LINESTYLES[lrs.index(lr) % len(LINESTYLES)],
                    label=f"B = {batch}, lr {format_value(lr)}")
    ax.set_xscale("log")
    ax.set(xlabel="decay coefficient λ (log scale)",
           ylabel="linear probe accuracy (%)" if metric == "final" else "best test accuracy (%)",
           title="TVLARS: accuracy against λ (mean ± std over seeds)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return save(fig, out, "accuracy-vs-lam", formats, dpi)


def epochs_to_target_table(runs, fraction: float = 0.95):
    """{(label, batch): (mean epochs or inf, lr, target)}: each variant at its best lr, the epochs
    its runs took to reach ``fraction`` of the best accuracy any run reached at that batch size
    (inf when a run never did). A variant whose runs all diverged before their first test has
    no best lr; it is there too, as never reaching the goal (at its lowest lr)."""
    groups, order = _groups([r for r in runs if r.finished])
    best_at_batch = best_per_batch(groups)
    best_lr = _best_lrs(groups)
    result = {}
    for label in order:
        for batch in sorted(best_at_batch):
            lr = best_lr.get((label, batch))
            if lr is None:
                tried = sorted(k[2] for k in groups if k[:2] == (label, batch))
                if tried:
                    result[(label, batch)] = (math.inf, tried[0], fraction * best_at_batch[batch])
                continue
            members = groups[(label, batch, lr)]
            target = fraction * best_at_batch[batch]
            epochs = []
            for r in members:
                e = epochs_to_accuracy(*r.curve("test_acc"), target)
                epochs.append(math.inf if e is None else e)
            mean = math.inf if any(math.isinf(e) for e in epochs) else sum(epochs) / len(epochs)
            result[(label, batch)] = (mean, lr, target)
    return result, order


def _diverged_settings(runs) -> set:
    """The (label, batch, lr) settings with a diverged run."""
    return {key for key, members in group_by_setting(runs).items() if any(r.status == "diverged" for r in members)}


def figure_epochs_to_target(runs, out: Path, formats, fraction=0.95, dpi=120) -> list[Path]:
    table, order = epochs_to_target_table(runs, fraction)
    if not table:
        return []
    plt = _pyplot()
    import numpy as np

    batches = sorted({k[1] for k in table})
    labels = [label for label in order if any((label, b) in table for b in batches)]
    colors = _colors(order)
    finite = [v[0] for v in table.values() if math.isfinite(v[0])]
    top = (max(finite) if finite else 1.0) * 1.15
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(batches) + 3), 4.8))
    x = np.arange(len(batches))
    diverged = _diverged_settings(runs)
    for i, label in enumerate(labels):
        heights, hatches = [], []
        for b in batches:
            value, lr, _ = table.get((label, b), (math.nan, None, None))
            heights.append(top if math.isinf(value) else value)
            hatches.append("never reached" + (" (diverged)" if (label, b, lr) in diverged else "")
                           if math.isinf(value) else None)
        bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, heights, width, color=colors[label], label=label)
        for bar, never in zip(bars, hatches):
            if never:
                bar.set_hatch("//")
                bar.set_alpha(0.35)
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() / 2, never, ha="center",
                        va="center", fontsize=7, rotation=90)
    ax.set_xticks(x, [str(b) for b in batches])
    ax.set(xlabel="batch size", ylabel="epochs",
           title=f"Epochs to reach {fraction * 100:g}% of the best test accuracy at each batch size\n"
                 "(each optimizer at its best learning rate; hatched: never reached)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return save(fig, out, "epochs-to-target", formats, dpi)


# --------------------------------------------------------------------------- driver


def make_figures(path: str | Path, *, out: str | Path | None = None, formats: Sequence[str] = DEFAULT_FORMATS,
                 figures: Sequence[str] = FIGURES, layers: str = "auto", lams: Sequence[float] = (),
                 delay: float = 0.0, target: float = 0.95, dpi: int = 120, best_lr_only: bool = False,
                 skipped: dict[str, str] | None = None) -> list[Path]:
    """Draw the ``figures`` of a run or sweep folder; return the files written. A figure that
    cannot be drawn from these runs is left out, with the reason in ``skipped`` (figure -> why)."""
    folder = Path(path)
    runs = load_runs(folder)
    single = len(runs) == 1 and runs[0].path == folder
    destination = Path(out) if out else folder / "figures"
    skipped = {} if skipped is None else skipped
    written: list[Path] = []

    def draw(figure: str, paths: list[Path], why: str) -> None:
        written.extend(paths)
        if not paths:
            skipped[figure] = why

    if "curves" in figures:
        draw("curves", figure_curves(runs, destination, formats, dpi, best_lr_only=best_lr_only),
             "no run has logged an epoch (metrics.csv) or diverged")
    if "layers" in figures:
        draw("layers", figure_layers(runs, destination, formats, layers, dpi, single=single),
             "no run has per-layer statistics (layers.csv: train with --layer-stats-every K)")
    if "tv-factor" in figures:
        draw("tv-factor", figure_tv_factor(destination, formats, lams, delay, runs, dpi), "")
    if "lam" in figures:
        draw("lam", [] if single else figure_accuracy_vs_lam(runs, destination, formats, dpi),
             "accuracy-vs-lam needs finished TVLARS runs at two or more lam values at one batch size and lr, "
             f"and {'a single run has one' if single else 'these runs have none'}")
    if "epochs" in figures:
        why = ("epochs-to-target compares the runs of a sweep" if single else
               "a tvlars ssl run has one test accuracy, after its probe: no epochs to count" if is_ssl(runs) else
               "no finished run has a test accuracy")
        draw("epochs", [] if single or is_ssl(runs) else
             figure_epochs_to_target(runs, destination, formats, target, dpi), why)
    return written
