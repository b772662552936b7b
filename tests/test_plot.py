"""tvlars plot: every figure is written, as a valid image, for fabricated run folders."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_report import fabricate_sweep, make_run  # noqa: E402

from tvlars.errors import UserError  # noqa: E402
from tvlars.study import plot  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path, min_kb: float = 10) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG, path
    assert len(data) > min_kb * 1024, (path, len(data))
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    folder = fabricate_sweep(tmp_path_factory.mktemp("plot") / "sw", seeds=(0, 1))
    for lam in (1e-3, 1e-5):  # a small lam ablation beside the main grid
        for seed in (0, 1):
            make_run(folder, f"lam-{lam}_s{seed}", optimizer="tvlars", batch_size=512, lr=1.0, seed=seed,
                     accs=(20.0, 50.0 + 1e4 * lam, 60.0 + 1e3 * lam, 58.0), extra={"lam": lam})
    return folder


def test_sweep_figures(sweep_dir):
    written = plot.make_figures(sweep_dir, formats=("png", "svg"), figures=("curves", "tv-factor", "lam", "epochs"))
    names = {p.name for p in written}
    expected = {"curves_B512.png", "curves_B1024.png", "tv-factor.png", "epochs-to-target.png", "accuracy-vs-lam.png"}
    assert expected | {n.replace(".png", ".svg") for n in expected} == names
    assert all(p.parent == sweep_dir / "figures" for p in written)
    for p in written:
        if p.suffix == ".png":
            check_png(p)
        else:
            assert p.read_text().lstrip().startswith("<?xml") and "</svg>" in p.read_text()
    assert not [p for p in (sweep_dir / "figures").iterdir() if p.name.startswith(".")]  # no temp files left


def test_layer_figures(tmp_path):
    folder = tmp_path / "sw"
    folder.mkdir()
    (folder / "sweep.json").write_text("{}")
    for lr in (10.0, 12.0, 15.0):
        make_run(folder, f"lr{lr:g}", optimizer="tvlars", batch_size=8192, lr=lr)
    make_run(folder, "lamb", optimizer="lamb", warmup_epochs=0, batch_size=16384, lr=15.0)
    written = plot.make_figures(folder, formats=("png",), figures=("layers",))
    assert sorted(p.name for p in written) == ["layers_lamb-no-warm-up_B16384.png", "layers_tvlars_B8192.png"]
    for p in written:
        check_png(p, min_kb=30)


def test_single_run_and_cli(tmp_path, capsys):
    from tvlars import cli

    run = make_run(tmp_path, "one", accs=(10.0, 40.0, 60.0, 70.0, 72.0))
    parser = cli._Parser(prog="tvlars plot")
    plot.add_arguments(parser)
    out = tmp_path / "figs"
    assert plot.run(parser.parse_args([str(run), "--out", str(out), "--layers", "conv1,fc.weight,2"])) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == ["curves_B512.png", "curves_B512.svg", "layers.png", "layers.svg",
                                                     "tv-factor.png", "tv-factor.svg"]  # README: PNG + SVG
    for p in printed[::2]:
        check_png(Path(p))
    with pytest.raises(UserError, match="no layer matches 'nope'"):
        plot.run(parser.parse_args([str(run), "--out", str(out), "--layers", "nope", "--figures", "layers"]))
    with pytest.raises(UserError, match="unknown figure"):
        plot.run(parser.parse_args([str(run), "--figures", "pie"]))
    with pytest.raises(UserError, match="unknown format"):
        plot.run(parser.parse_args([str(run), "--format", "gif"]))


def test_select_layers():
    names = ["conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer2.0.conv1.weight",
             "layer3.0.conv1.weight", "fc.weight", "fc.bias"]
    assert plot.select_layers(names) == ["conv1.weight", "layer2.0.conv1.weight", "fc.weight"]
    assert plot.select_layers(names, "first,last,-1,layer1") == ["conv1.weight", "fc.bias", "layer1.0.conv1.weight"]
    assert plot.select_layers([], "auto") == []


def test_epochs_to_target_hand_computed(tmp_path):
    (tmp_path / "sweep.json").write_text("{}")
    # B=512: best accuracy anywhere 80 -> target 76 at 95%
    make_run(tmp_path, "a1", optimizer="lars", lr=1.0, accs=(50.0, 70.0, 80.0))   # epoch 3
    make_run(tmp_path, "a2", optimizer="lars", lr=2.0, accs=(50.0, 60.0, 70.0))   # worse lr: not chosen
    make_run(tmp_path, "t1", optimizer="tvlars", lr=1.0, accs=(77.0, 78.0, 78.0))  # epoch 1
    make_run(tmp_path, "m1", optimizer="lamb", lr=1.0, accs=(10.0, 20.0, 30.0))   # never
    from tvlars.study import runs

    table, order = plot.epochs_to_target_table(runs.load_runs(tmp_path), 0.95)
    assert table[("LARS (warm-up)", 512)][:2] == (3.0, 1.0)
    assert table[("TVLARS", 512)][0] == 1.0 and table[("TVLARS", 512)][2] == pytest.approx(76.0)
    assert table[("LAMB (warm-up)", 512)][0] == float("inf")
    check_png(plot.figure_epochs_to_target(runs.load_runs(tmp_path), tmp_path / "f", ("png",))[0])


def test_ssl_sweep_curves_show_knn_against_the_untrained_encoder(tmp_path, monkeypatch):
    import json

    folder = tmp_path / "sw"
    folder.mkdir()
    (folder / "sweep.json").write_text("{}")
    untrained = make_run(folder, "untrained", command="ssl", accs=(76.0,), extra={"epochs": 0}, layers=False)
    (untrained / "metrics.csv").write_text("epoch,step,lr,train_loss,knn_acc\n")
    summary = json.loads((untrained / "summary.json").read_text())
    (untrained / "summary.json").write_text(json.dumps({**summary, "knn_acc": 74.5}))
    for lr in (1.0, 2.0):
        d = make_run(folder, f"lars{lr:g}", command="ssl", lr=lr, accs=(80.0, 81.0, 82.0))
        rows = [f"{e},{e * 10},{lr},{300 / e},,,,1,1,{75 + e * lr}" for e in (1, 2, 3)]
        (d / "metrics.csv").write_text("epoch,step,lr,train_loss,train_acc,test_loss,test_acc,epoch_time,"
                                       "images_per_sec,knn_acc\n" + "\n".join(rows) + "\n")
    figures = {}
    real_save = plot.save

    def capture(fig, out, stem, formats, *args, **kwargs):
        figures[stem] = [(ax.get_ylabel(), {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()})
                         for ax in fig.axes]
        return real_save(fig, out, stem, formats, *args, **kwargs)

    monkeypatch.setattr(plot, "save", capture)
    written = plot.make_figures(folder, formats=("png",))
    assert "epochs-to-target" not in figures  # one test accuracy per ssl run: nothing to count epochs on
    (acc_label, acc_lines), (loss_label, loss_lines) = figures["curves_B512"]
    assert acc_label == "kNN accuracy (%)" and "Barlow Twins" in loss_label
    assert acc_lines["LARS (warm-up), lr 2"] == [77.0, 79.0, 81.0]
    assert acc_lines["untrained encoder (74.50)"] == [74.5, 74.5]
    assert sorted(loss_lines[next(iter(loss_lines))]) == [100.0, 150.0, 300.0]
    layer_axes = figures["layers_lars-warm-up_B512"]
    assert layer_axes[-1][0] == "training loss (Barlow Twins)" and list(layer_axes[-1][1].values())[0] == [300, 150, 100]
    for p in written:
        check_png(p)


def test_a_one_epoch_ssl_run_draws_every_series_in_png_and_svg(tmp_path, monkeypatch):
    """tvlars ssl --epochs 1 with one layers.csv row per layer: every series has one point,
    which a line alone does not show. The default formats are the README's, PNG and SVG."""
    import torch

    from helpers import read_csv, run_command
    from test_ssl import TINY
    from tvlars import cli
    from tvlars.harness.ssl import pretrain

    run = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_command(pretrain, run, *TINY, "--epochs", "1", "--layer-stats-every", "4") == 0
    finally:
        torch.set_num_threads(threads)
    assert {r["step"] for r in read_csv(run / "layers.csv")} == {"4"}

    drawn = {}
    real_save = plot.save

    def capture(fig, out, stem, formats, *args, **kwargs):
        drawn[stem] = [line for ax in fig.axes for line in ax.get_lines()]
        return real_save(fig, out, stem, formats, *args, **kwargs)

    monkeypatch.setattr(plot, "save", capture)
    assert cli.main(["plot", str(run), "--figures", "curves,layers"]) == 0
    assert sorted(p.name for p in (run / "figures").iterdir()) == [
        "curves_B16.png", "curves_B16.svg", "layers.png", "layers.svg"]
    assert set(drawn) == {"curves_B16", "layers"}
    for stem, lines in drawn.items():
        shown = [line for line in lines if len(line.get_xdata())]
        assert len(shown) >= (2 if stem.startswith("curves") else 4), stem
        for line in shown:
            assert len(line.get_xdata()) >= 2 or line.get_marker() not in (None, "None", "", " "), (stem, line)


def test_curves_at_the_best_lr_keep_one_line_per_variant(tmp_path, monkeypatch):
    """--lrs best: each variant at the lr whose mean best accuracy is highest, the seeds averaged
    (the schedule study's figure of every method at batch 16384)."""
    from tvlars import cli

    (tmp_path / "sweep.json").write_text("{}")
    for seed in (0, 1):
        for lr, top in ((1.0, 70.0), (2.0, 80.0 + seed)):       # LARS: lr 2 is better on both seeds
            make_run(tmp_path, f"lars{lr:g}s{seed}", optimizer="lars", lr=lr, seed=seed, accs=(50.0, top, top - 1))
        for lr, top in ((1.0, 75.0 + seed), (2.0, 60.0)):       # TVLARS: lr 1
            make_run(tmp_path, f"tv{lr:g}s{seed}", optimizer="tvlars", lr=lr, seed=seed, accs=(50.0, top, top))
    figures = {}
    real_save = plot.save

    def capture(fig, out, stem, formats, *args, **kwargs):
        figures[stem] = {line.get_label(): (list(line.get_ydata()), line.get_linestyle())
                         for line in fig.axes[0].get_lines()}
        return real_save(fig, out, stem, formats, *args, **kwargs)

    monkeypatch.setattr(plot, "save", capture)
    parser = cli._Parser(prog="tvlars plot")
    plot.add_arguments(parser)
    assert plot.run(parser.parse_args([str(tmp_path), "--figures", "curves", "--format", "png", "--lrs", "best"])) == 0
    lines = figures["curves_B512"]
    assert sorted(lines) == ["LARS (warm-up), lr 2 (mean of 2)", "TVLARS, lr 1 (mean of 2)"]
    assert lines["LARS (warm-up), lr 2 (mean of 2)"][0] == [50.0, 80.5, 79.5]
    assert {style for _, style in lines.values()} == {"-"}
    plot.run(parser.parse_args([str(tmp_path), "--figures", "curves", "--format", "png"]))
    assert len(figures["curves_B512"]) == 4                      # the default: every lr
    check_png(tmp_path / "figures" / "curves_B512.png")


# ------------------------------------------------------------- issue 27: every run shown

NAN = float("nan")


@pytest.fixture()
def diverged_sweep(tmp_path):
    """Issue 27's case, fabricated: at batch 55, LAMB without warm-up diverges in epoch 1 (no
    finite number at all), LAMB with warm-up in epoch 3 after its loss exploded; LARS with
    warm-up has two seeds (a band); TVLARS trained with lam 1e-4 and a 48-step delay."""
    folder = tmp_path / "sw"
    folder.mkdir()
    (folder / "sweep.json").write_text("{}")
    accs = tuple(60.0 + 30 * (1 - math.exp(-e / 3)) for e in range(20))
    for seed in (0, 1):
        make_run(folder, f"lars-w-s{seed}", optimizer="lars", warmup_epochs=4, batch_size=55, lr=5.0, seed=seed,
                 accs=tuple(a + seed for a in accs), losses=[2.0 / (e + 1) for e in range(20)])
    make_run(folder, "lars-nw", optimizer="lars", warmup_epochs=0, batch_size=55, lr=5.0,
             accs=tuple(a + 0.5 for a in accs), losses=[1.5 / (e + 1) for e in range(20)])
    make_run(folder, "lamb-w", optimizer="lamb", warmup_epochs=4, batch_size=55, lr=5.0, status="diverged",
             accs=(3.0, 10.0, NAN), losses=[8e11, 3e18, NAN], extra={"diverged_at_epoch": 3})
    make_run(folder, "lamb-nw", optimizer="lamb", warmup_epochs=0, batch_size=55, lr=5.0, status="diverged",
             accs=(NAN,), losses=[NAN])
    make_run(folder, "tvlars", optimizer="tvlars", batch_size=55, lr=5.0, accs=tuple(a + 0.2 for a in accs),
             losses=[1.8 / (e + 1) for e in range(20)], extra={"lam": 1e-4, "lam_resolved": 1e-4,
                                                                "delay_steps_resolved": 48})
    for name, epoch in (("lamb-w", 3), ("lamb-nw", 1)):
        summary_path = folder / name / "summary.json"
        summary = json.loads(summary_path.read_text())
        summary_path.write_text(json.dumps({**summary, "diverged_at_epoch": epoch, "final_test_acc": None}))
    return folder


def _capture(monkeypatch):
    figures = {}
    real_save = plot.save

    def capture(fig, out, stem, formats, *args, **kwargs):
        figures[stem] = fig
        paths = real_save(fig, out, stem, formats, *args, **kwargs)
        return paths

    monkeypatch.setattr(plot, "save", capture)
    monkeypatch.setattr(plot._pyplot(), "close", lambda fig: None)  # keep the figures to look at
    return figures


def _x_marks(ax):
    return [line for line in ax.get_lines() if line.get_marker() == "X"]


def test_a_diverged_run_is_drawn_until_it_diverged_and_marked(diverged_sweep, monkeypatch):
    figures = _capture(monkeypatch)
    plot.make_figures(diverged_sweep, formats=("png",), figures=("curves",))
    fig = figures["curves_B55"]
    ax_acc, ax_loss = fig.axes[:2]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "LAMB (no warm-up), lr 5: diverged in epoch 1" in legend
    assert "LAMB (warm-up), lr 5: diverged in epoch 3" in legend
    assert "LARS (warm-up), lr 5 (mean of 2)" in legend and "TVLARS, lr 5" in legend
    # both LAMB runs marked in both panels: warm-up on its last finite point, no-warm-up (no point) on the edge
    for ax in (ax_acc, ax_loss):
        assert len(_x_marks(ax)) == 2
    acc_marks = sorted((float(m.get_xdata()[0]), float(m.get_ydata()[0])) for m in _x_marks(ax_acc))
    assert acc_marks[1] == (2.0, 10.0)           # LAMB warm-up: its epoch-2 accuracy, the last it had
    assert acc_marks[0][0] == 1.0               # LAMB no warm-up: at epoch 1, on the axis' bottom edge
    # the LAMB warm-up accuracy line is drawn up to where it diverged
    lamb = [line for line in ax_acc.get_lines() if line.get_label() == "LAMB (warm-up), lr 5: diverged in epoch 3"]
    assert list(lamb[0].get_xdata()) == [1.0, 2.0]
    # every setting with a finite loss has its loss line (LAMB's too, above the axis, marked where it leaves)
    loss_lines = [line for line in ax_loss.get_lines() if len(line.get_xdata()) > 1]
    assert len(loss_lines) == 4
    low, high = ax_loss.get_ylim()
    assert low >= 1.5 / 20 / 1.3 and high <= 2.0 * 1.3  # the kept lines' range, no empty decades
    assert "▲" in ax_loss.get_title()
    check_png(diverged_sweep / "figures" / "curves_B55.png")


def test_seed_spread_is_a_band_and_the_final_band_is_zoomed(diverged_sweep, monkeypatch):
    from matplotlib.collections import PolyCollection

    figures = _capture(monkeypatch)
    plot.make_figures(diverged_sweep, formats=("png",), figures=("curves",))
    fig = figures["curves_B55"]
    ax_acc, _, ax_zoom = fig.axes[:3]
    bands = [c for c in ax_acc.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # only LARS (warm-up) has two seeds
    assert "mean ± std over seeds" in " ".join(t.get_text() for t in fig.legends[0].get_texts())
    low, high = ax_zoom.get_ylim()
    assert 85 < low < high < 93 and ax_zoom.get_xlim()[0] >= 9  # the leaders' last half, not 0-100
    assert ax_acc.get_ylim()[1] - ax_acc.get_ylim()[0] > 5 * (high - low)


def test_a_narrow_loss_range_has_labelled_ticks():
    plt = plot._pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [179.0, 120.0, 87.0])  # the SSL loss of issue 27: one labelled tick before
    ax.set_yscale("log")
    plot._fit_log_axis(ax)
    fig.canvas.draw()
    low, high = ax.get_ylim()
    labelled = [t for t in ax.get_yticklabels() if t.get_text() and low <= t.get_position()[1] <= high]
    assert len(labelled) >= 3
    plt.close(fig)


def test_epochs_to_target_hatches_a_variant_that_diverged_before_its_first_test(diverged_sweep, monkeypatch):
    from tvlars.study import runs

    table, _ = plot.epochs_to_target_table(runs.load_runs(diverged_sweep), 0.95)
    assert table[("LAMB (no warm-up)", 55)][0] == math.inf and table[("LAMB (warm-up)", 55)][0] == math.inf
    figures = _capture(monkeypatch)
    plot.make_figures(diverged_sweep, formats=("png",), figures=("epochs",))
    ax = figures["epochs-to-target"].axes[0]
    hatched = [p for p in ax.patches if p.get_hatch() == "//"]
    assert len(hatched) == 2
    assert [t.get_text() for t in ax.texts].count("never reached (diverged)") == 2


def test_tv_factor_uses_the_runs_own_lam_and_delay_and_ignores_diverged_lengths(diverged_sweep, monkeypatch):
    figures = _capture(monkeypatch)
    plot.make_figures(diverged_sweep, formats=("png",), figures=("tv-factor",))
    ax = figures["tv-factor"].axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "λ = 0.0001, d_e = 48 steps" in labels and not any("0.01" in label for label in labels)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    # the completed runs' 200 steps, not a span down to the diverged runs' 10 and 30
    assert "steps trained here (200)" in legend and not any("–" in text for text in legend)


def test_layer_figures_plot_what_layers_csv_records_smoothed_when_long(tmp_path, monkeypatch):
    import csv

    run = make_run(tmp_path, "long", optimizer="lamb", accs=tuple(50.0 + e / 10 for e in range(300)))
    rows = list(csv.DictReader((run / "layers.csv").open()))
    figures = _capture(monkeypatch)
    plot.make_figures(run, formats=("png",), figures=("layers",))
    fig = figures["layers"]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:4] == ["weight norm ||w|| (lr 1)", "update norm ||u|| (Adam direction + decay) (lr 1)",
                          "trust ratio (lr 1)", "step size (lr 1)"]
    trust = [float(r["trust_ratio"]) for r in rows if r["layer"] == "conv1.weight"]
    raw, smooth = [line for line in fig.axes[2].get_lines() if line.get_color() == fig.axes[2].get_lines()[0].get_color()][:2]
    assert list(raw.get_ydata()) == pytest.approx(trust)           # the recorded trust ratio, not ||w||/||g||
    assert raw.get_alpha() < 0.3 and smooth.get_label() == "conv1.weight" and 0.5 < smooth.get_alpha() < 1
    assert len(trust) > plot.SMOOTH_ABOVE and list(smooth.get_ydata()) != pytest.approx(trust)
    styles = {line.get_linestyle() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
    assert len(styles) == 3  # three layers, three dashes: none hides another


def test_plot_says_why_it_drew_nothing_and_exits_non_zero(diverged_sweep, capsys):
    from tvlars import cli

    assert cli.main(["plot", str(diverged_sweep), "--figures", "lam", "--format", "png"]) == 2
    err = capsys.readouterr().err
    assert "lam" in err and "two or more lam values" in err and len(err.strip().splitlines()) == 1
    assert not (diverged_sweep / "figures" / "accuracy-vs-lam.png").exists()
    # the default set: what cannot be drawn is named on stderr, the rest is drawn
    assert cli.main(["plot", str(diverged_sweep), "--format", "png"]) == 0
    captured = capsys.readouterr()
    assert "not drawn: lam:" in captured.err and "curves_B55.png" in captured.out
