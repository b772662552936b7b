"""tvlars plot: every figure is written, as a valid image, for fabricated run folders."""

from __future__ import annotations

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
