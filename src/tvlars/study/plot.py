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
``layers_<variant>_B<batch>``  per-layer weight norm ||w||, gradient norm ||g||, their ratio
                      ||w||/||g|| (from layers.csv) and the test loss (ssl: the training
                      loss) against optimizer
                      steps, a row per learning rate (first seed): Figures 2 and 6-59. The
                      layers shown are chosen with ``--layers``: ``auto`` (first, middle and
                      last weight layers, biases and norm layers left out) or a
                      comma-separated list of layer names, substrings of names, indices,
                      ``first``, ``middle``, ``last``.
``tv-factor``         phi_t (Eq. 4, ``tvlars.tv_factor``) against steps for several lam
                      (``--lams``, default the paper's 1e-2 .. 1e-6): Figure 3. For a sweep,
                      the span of steps its runs trained is shaded.
``accuracy-vs-lam``   best test accuracy (ssl: the linear probe's) against lam, when the sweep
                      varies lam: Figure 4.
``epochs-to-target``  per batch size and optimizer variant (each at its best lr), the
                      epochs to reach ``--target`` % of the best accuracy any run reached at
                      that batch size; bars that never get there are marked (classification
                      sweeps: an ssl run has one test accuracy, after its probe).

For a single run folder: its curves, its layer figure and the tv-factor figure.
``--figures`` picks a subset (curves, layers, tv-factor, lam, epochs).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
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
    parser.add_argument("--lams", default="1e-2,5e-3,1e-3,1e-4,1e-5,1e-6", metavar="LIST",
                        help="lam values of the tv-factor figure (default the paper's)")
    parser.add_argument("--delay", type=float, default=0.0, metavar="STEPS",
                        help="delay d_e of the tv-factor figure, in steps (default 0)")
    parser.add_argument("--target", type=float, default=95.0, metavar="PERCENT",
                        help="epochs-to-target figure: %% of the best accuracy at each batch size (default 95)")
    parser.add_argument("--lrs", choices=("all", "best"), default="all",
                        help="curves figure: a line per learning rate, or only each variant's best "
                             "(default all)")
    parser.add_argument("--dpi", type=int, default=120, help="resolution of png files (default 120)")


def run(args: argparse.Namespace) -> int:
    formats = parse_formats(args.format, FORMATS)
    figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    for f in figures:
        if f not in FIGURES:
            raise UserError(f"--figures: unknown figure '{f}' (expected {', '.join(FIGURES)})")
    try:
        lams = [float(x) for x in args.lams.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lams: not a list of numbers: {args.lams}") from None
    if not 0 < args.target <= 100:
        raise UserError(f"--target must be a percentage in (0, 100], not {args.target}")
    written = make_figures(args.path, out=args.out, formats=formats, figures=figures, layers=args.layers,
                           lams=lams, delay=args.delay, target=args.target / 100, dpi=args.dpi,
                           best_lr_only=args.lrs == "best")
    for path in written:
        print(path)
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
    by_epoch: dict[float, list[float]] = {}
    for r in runs:
        for e, v in zip(*r.curve(column)):
            if math.isfinite(v):
                by_epoch.setdefault(e, []).append(v)
    xs = sorted(by_epoch)
    return xs, [sum(by_epoch[x]) / len(by_epoch[x]) for x in xs]


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
        with_curves = [r for r in members if r.metrics]
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
    """Test accuracy and loss against epochs, one figure per batch size (Figures 1, 5, 60-63)."""
    plt = _pyplot()
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
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.6))
        for label in order:
            for i, lr in enumerate(lrs):
                members = groups.get((label, batch, lr))
                if not members:
                    continue
                dash = LINESTYLES[0 if best_lr_only else i % len(LINESTYLES)]
                style = dict(color=colors[label], linestyle=dash, linewidth=1.6)
                n = len(members)
                name = f"{label}, lr {format_value(lr)}" + (f" (mean of {n})" if n > 1 else "")
                xs, ys = _mean_curve(members, acc_column)
                if xs:
                    _plot(ax_acc, xs, ys, label=name, **style)
                xs, ys = _mean_curve(members, loss_column)
                pos = [(x, y) for x, y in zip(xs, ys) if y > 0]
                if pos:
                    _plot(ax_loss, [p[0] for p in pos], [p[1] for p in pos], **style)
        if acc_column == "knn_acc":
            if untrained is not None:
                ax_acc.axhline(untrained, color="grey", linestyle="--", linewidth=1.2,
                               label=f"untrained encoder ({untrained:.2f})")
            ax_acc.set(xlabel="epoch", ylabel="kNN accuracy (%)", title=f"kNN test accuracy, batch size {batch}")
            ax_loss.set(xlabel="epoch", ylabel="Barlow Twins loss (training views, log scale)",
                        title=f"Training loss, batch size {batch}")
        else:
            ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"Test accuracy, batch size {batch}")
            ax_loss.set(xlabel="epoch", ylabel="test loss (cross-entropy, log scale)",
                        title=f"Test loss, batch size {batch}")
        ax_loss.set_yscale("log")
        _clip_exploded(ax_loss)
        for ax in (ax_acc, ax_loss):
            ax.grid(True, alpha=0.3)
        handles, names = ax_acc.get_legend_handles_labels()
        if handles:
            fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
        what = "kNN accuracy and training loss" if acc_column == "knn_acc" else "test accuracy and loss"
        per = "at its best learning rate" if best_lr_only else "and learning rate"
        fig.suptitle(f"{title_prefix}{what} per optimizer {per} (B = {batch})")
        fig.tight_layout()
        written += save(fig, out, f"curves_B{batch}", formats, dpi)
    return written


def _clip_exploded(ax, factor: float = 1e3) -> None:
    """Keep runs whose loss exploded (1e30 ...) from flattening the others: cap the y axis
    at ``factor`` times the median loss and say so."""
    values = sorted(y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y) and y > 0)
    if not values:
        return
    cap = values[len(values) // 2] * factor
    if values[-1] > cap:
        low = values[0] / 1.5
        ax.set_ylim(low, cap)
        ax.set_title(ax.get_title() + f"\n(axis cut at {cap:.3g}: higher lines exploded)", fontsize=10)


def figure_layers(runs, out: Path, formats, layers_spec="auto", dpi=120, single=False) -> list[Path]:
    """Per-layer ||w||, ||g||, ||w||/||g|| and test loss against steps (Figures 2, 6-59)."""
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
        fig, axes = plt.subplots(len(chosen_runs), 4, figsize=(16, 3.4 * len(chosen_runs)), squeeze=False)
        for row, (lr, r) in enumerate(chosen_runs):
            data = read_layers(r.path / runfolder.LAYERS)
            names = select_layers(list(data), layers_spec)
            cmap = plt.get_cmap("viridis")
            for j, name in enumerate(names):
                series = data[name]
                color = cmap(j / max(1, len(names) - 1) * 0.85)
                steps = series["step"]
                ratio = [w / g if g and g > 0 else float("nan") for w, g in zip(series["weight_norm"], series["grad_norm"])]
                for col, ys in enumerate((series["weight_norm"], series["grad_norm"], ratio)):
                    _plot(axes[row, col], steps, ys, color=color, label=name, linewidth=1.3)
            if r.metrics and all(m.get("step") is not None for m in r.metrics):
                pairs = [(m["step"], m.get(loss_column)) for m in r.metrics if m.get(loss_column) is not None]
                xs, ys, loss_x = [p[0] for p in pairs], [p[1] for p in pairs], "step"
            else:
                (xs, ys), loss_x = r.curve(loss_column), "epoch"
            _plot(axes[row, 3], xs, ys, color="black", linewidth=1.4)
            suffix = f" (lr {format_value(lr)})"
            loss_name = ("Barlow Twins loss", "training loss (Barlow Twins)") if loss_column == "train_loss" else \
                ("test loss", "test loss (cross-entropy)")
            titles = ("weight norm ||w||", "gradient norm ||g||", "ratio ||w|| / ||g||", loss_name[0])
            ylabels = ("||w|| (L2 norm)", "||g|| (L2 norm)", "||w|| / ||g||", loss_name[1])
            for col in range(4):
                ax = axes[row, col]
                ax.set_title(titles[col] + suffix, fontsize=10)
                ax.set_xlabel("optimizer step" if col < 3 or loss_x == "step" else "epoch")
                ax.set_ylabel(ylabels[col])
                ax.grid(True, alpha=0.3)
                if any(line.get_ydata().size for line in ax.get_lines()):
                    data_y = [y for line in ax.get_lines() for y in line.get_ydata() if y == y]
                    if data_y and min(data_y) > 0:
                        ax.set_yscale("log")
            if row == 0 and names:
                axes[row, 0].legend(fontsize=8, title="layer", title_fontsize=8)
        fig.suptitle(f"Per-layer norms and {loss_name[0]}: {label}, batch size {batch}"
                     + (f" ({chosen_runs[0][1].name})" if single else ""), fontsize=12)
        fig.tight_layout()
        stem = "layers" if single else f"layers_{_slug(label)}_B{batch}"
        written += save(fig, out, stem, formats, dpi, tight=False)
    return written


def figure_tv_factor(out: Path, formats, lams: Sequence[float], delay: float = 0.0, runs=(), dpi=120) -> list[Path]:
    """phi_t against steps for several lam (Figure 3)."""
    from tvlars import tv_factor

    plt = _pyplot()
    import numpy as np

    steps = np.unique(np.concatenate([[0], np.geomspace(1, 1e7, 600)]))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    cmap = plt.get_cmap("plasma")
    for i, lam in enumerate(lams):
        phi = [tv_factor(float(t), lam, delay=delay) for t in steps]
        ax.plot(steps + 1, phi, label=f"λ = {lam:g}", color=cmap(i / max(1, len(lams) - 1) * 0.9), linewidth=1.8)
    trained = [r.metrics[-1].get("step") for r in runs if r.metrics and r.metrics[-1].get("step")]
    if trained and min(trained) < max(trained):
        ax.axvspan(1 + min(trained), 1 + max(trained), color="grey", alpha=0.2,
                   label=f"steps trained in this sweep ({int(min(trained))}–{int(max(trained))})")
    elif trained:
        ax.axvline(1 + trained[0], color="grey", linestyle="--", label=f"steps trained here ({int(trained[0])})")
    ax.set_xscale("log")
    ax.set(xlabel="optimizer step t + 1 (log scale)", ylabel="φ_t",
           title="TVLARS time-varying factor φ_t = 1 / (α + exp(λ (t − d_e))) + γ_min"
                 + (f", d_e = {delay:g}" if delay else ", d_e = 0"))
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
    (inf when a run never did)."""
    groups, order = _groups([r for r in runs if r.finished])
    best_at_batch = best_per_batch(groups)
    best_lr = _best_lrs(groups)
    result = {}
    for label in order:
        for batch in sorted(best_at_batch):
            lr = best_lr.get((label, batch))
            if lr is None:
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
    for i, label in enumerate(labels):
        heights, hatches = [], []
        for b in batches:
            value = table.get((label, b), (math.nan, None, None))[0]
            heights.append(top if math.isinf(value) else value)
            hatches.append(math.isinf(value))
        bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, heights, width, color=colors[label], label=label)
        for bar, never in zip(bars, hatches):
            if never:
                bar.set_hatch("//")
                bar.set_alpha(0.35)
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() / 2, "never reached", ha="center",
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
                 delay: float = 0.0, target: float = 0.95, dpi: int = 120, best_lr_only: bool = False) -> list[Path]:
    folder = Path(path)
    runs = load_runs(folder)
    single = len(runs) == 1 and runs[0].path == folder
    destination = Path(out) if out else folder / "figures"
    lams = list(lams) or [1e-2, 5e-3, 1e-3, 1e-4, 1e-5, 1e-6]
    written: list[Path] = []
    if "curves" in figures:
        written += figure_curves(runs, destination, formats, dpi, best_lr_only=best_lr_only)
    if "layers" in figures:
        written += figure_layers(runs, destination, formats, layers, dpi, single=single)
    if "tv-factor" in figures:
        written += figure_tv_factor(destination, formats, lams, delay, runs, dpi)
    if "lam" in figures and not single:
        written += figure_accuracy_vs_lam(runs, destination, formats, dpi)
    if "epochs" in figures and not single and not is_ssl(runs):
        written += figure_epochs_to_target(runs, destination, formats, target, dpi)
    return written
