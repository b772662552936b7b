"""tvlars report: aggregation against hand-computed numbers, Table 1 layout, files."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml

from tvlars.errors import UserError
from tvlars.study import report, runs
from tvlars.study.runs import epochs_to_accuracy, epochs_to_fraction, mean_std


def make_run(folder: Path, name: str, *, optimizer="lars", batch_size=512, lr=1.0, seed=0, warmup_epochs=None,
             accs=(10.0, 50.0, 70.0, 65.0), losses=None, status="completed", dataset="cifar10", command="train",
             extra=None, layers=True, summary=True) -> Path:
    """A fabricated run folder as `tvlars train` writes it (docs/ARCHITECTURE.md, "Run folder")."""
    d = Path(folder) / name
    d.mkdir(parents=True)
    if warmup_epochs is None:
        warmup_epochs = 0 if optimizer == "tvlars" else 2
    flags = {"dataset": dataset, "optimizer": optimizer, "batch_size": batch_size, "lr": lr, "seed": seed,
             "warmup_epochs": warmup_epochs, "epochs": len(accs), **(extra or {})}
    (d / "sweep-run.yaml").write_text(yaml.safe_dump(flags))
    config = dict(flags, command=command, schedule="none" if optimizer == "tvlars" else
                  ("warmup-cosine" if warmup_epochs else "poly"), out=str(d), device="cpu", delay_steps=batch_size)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    losses = losses or [3.0 / (i + 1) for i in range(len(accs))]
    rows = ["epoch,step,lr,train_loss,train_acc,test_loss,test_acc,epoch_time,images_per_sec"]
    for i, (a, l) in enumerate(zip(accs, losses), 1):
        rows.append(f"{i},{i * 10},{lr},{l},{a},{l},{a},0.5,1000")
    (d / "metrics.csv").write_text("\n".join(rows) + "\n")
    if layers:
        lines = ["step,epoch,layer,weight_norm,grad_norm,trust_ratio,step_size"]
        names = ["conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer2.0.conv1.weight",
                 "layer3.0.conv1.weight", "fc.weight", "fc.bias"]
        for step in range(0, 10 * len(accs) + 1, 5):
            for k, layer in enumerate(names):
                w = 1.0 + k + 0.01 * step
                g = (0.5 + k) * math.exp(-step / 20) + 1e-3
                lines.append(f"{step},{step // 10},{layer},{w},{g},{1e-3 * w / g},{lr * 1e-3 * w / g}")
        (d / "layers.csv").write_text("\n".join(lines) + "\n")
    if summary:
        finite = [a for a in accs if a == a]
        (d / "summary.json").write_text(json.dumps({
            "status": status, "epochs_done": len(accs), "final_test_acc": accs[-1] if status == "completed" else None,
            "best_test_acc": max(finite) if finite else None,
            "best_epoch": accs.index(max(finite)) + 1 if finite else None, "wall_time_s": 1.0}))
    return d


def fabricate_sweep(folder: Path, seeds=(0, 1), batch_lrs=None) -> Path:
    """A whole Table-1-shaped sweep: 5 variants x batch sizes x 3 lrs x seeds, accuracies known."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text("{}")
    batch_lrs = batch_lrs or {512: (1.0, 2.0, 3.0), 1024: (2.0, 3.0, 4.0)}
    variants = [("lars", 2), ("lars", 0), ("lamb", 2), ("lamb", 0), ("tvlars", 0)]
    for opt_i, (opt, warm) in enumerate(variants):
        for batch, lrs in batch_lrs.items():
            for lr_i, lr in enumerate(lrs):
                for seed in seeds:
                    base = 40 + 5 * opt_i + lr_i + batch / 1024 + seed
                    accs = (base - 30, base - 10, base, base - 2)
                    make_run(folder, f"o-{opt}_w-{warm}_b-{batch}_lr-{lr:g}_s-{seed}", optimizer=opt,
                             warmup_epochs=warm, batch_size=batch, lr=lr, seed=seed, accs=accs,
                             extra={"lam": 1e-4} if opt == "tvlars" else None)
    return folder


# ------------------------------------------------------------------ plain functions


def test_mean_std_hand_computed():
    mean, std, n = mean_std([80.0, 82.0, 84.0])
    assert (mean, n) == (82.0, 3) and std == pytest.approx(2.0)
    mean, std, n = mean_std([78.0, 80.0, 85.0])
    assert mean == pytest.approx(81.0) and std == pytest.approx(math.sqrt(13.0))  # ((-3)^2+(-1)^2+4^2)/2
    assert mean_std([70.0]) == (70.0, None, 1)
    assert mean_std([]) == (None, None, 0)
    assert mean_std([1.0, float("nan"), None, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)), 2)


def test_epochs_to_target():
    epochs, accs = [1, 2, 3, 4, 5], [10.0, 60.0, 76.0, 80.0, 79.0]
    assert epochs_to_fraction(epochs, accs, 0.95) == 3      # 0.95 * 80 = 76
    assert epochs_to_fraction(epochs, accs, 1.0) == 4
    assert epochs_to_fraction(epochs, accs, 0.5) == 2
    assert epochs_to_fraction([], [], 0.9) is None
    assert epochs_to_accuracy(epochs, accs, 70) == 3 and epochs_to_accuracy(epochs, accs, 90) is None


def test_epochs_cell_text():
    cell = report.Cell((None, None, 0), (None, None, 0), (4.0, 1.0, 2), runs=3, reached=2)
    assert report.fmt_epochs(cell) == "4.0 ± 1.0 (2) (2/3 reached)"
    assert report.fmt_epochs(None) == "—"
    assert report.fmt_epochs(report.Cell((None, None, 0), (None, None, 0), (None, None, 0), runs=2)) == "never"


def test_best_and_final_and_fallback_to_metrics(tmp_path):
    run = runs.read_run(make_run(tmp_path, "a", accs=(10.0, 70.0, 65.0)))
    assert runs.run_accuracy(run, "best") == 70.0 and runs.run_accuracy(run, "final") == 65.0
    bare = runs.read_run(make_run(tmp_path, "b", accs=(10.0, 72.0, 60.0), summary=False))
    assert runs.run_accuracy(bare, "best") == 72.0 and runs.run_accuracy(bare, "final") == 60.0
    assert not bare.finished


def test_exploded_runs_are_flagged_and_keep_their_status(tmp_path):
    def classified(name, **kw):  # config.yaml records num_classes: ln 10 = 2.30, exploded from 23.03 on
        d = make_run(tmp_path, name, **kw)
        config = yaml.safe_load((d / "config.yaml").read_text())
        (d / "config.yaml").write_text(yaml.safe_dump({**config, "num_classes": 10}))

    classified("fine", accs=(50.0, 70.0, 80.0), losses=(2.0, 1.0, 0.5))
    classified("came-back", lr=2.0, accs=(10.0, 30.0, 60.0), losses=(1e4, 50.0, 2.0))
    classified("just-below", lr=3.0, accs=(10.0, 10.0, 10.0), losses=(2.3, 9.0, 23.0))
    classified("blew-up", lr=4.0, accs=(60.0, 83.0, 10.0), losses=(1.5, 0.9, 1e4))
    make_run(tmp_path, "old-folder", lr=5.0, accs=(60.0, 50.0, 10.0), losses=(2.0, 30.0, 20.0))  # 10x epoch 1
    make_run(tmp_path, "old-at-once", lr=6.0, accs=(10.0, 10.0, 10.0), losses=(1e4, 1e4, 1e4))  # unseen: no classes
    (tmp_path / "sweep.json").write_text("{}")
    found = {r.name: runs.exploded(r) for r in runs.load_runs(tmp_path)}
    assert found == {"fine": False, "came-back": False, "just-below": False, "blew-up": True, "old-folder": True,
                     "old-at-once": False}
    table = report.build_table(runs.load_runs(tmp_path))
    assert all(r.status == "completed" for r in runs.load_runs(tmp_path))
    md = report.render_markdown(table)
    assert "6 finished (0 diverged, 2 exploded)" in md and "‡ some runs exploded" in md
    # the best epoch of the blown-up run (83) is marked wherever it shows
    assert "| LARS (warm-up) | 512 (1/2/3/4/5/6) | 80.00 | 60.00 | 10.00 | 83.00 ‡ | 60.00 ‡ | 10.00 |" in md
    assert "83.00 (lr 4) ‡" in md
    rows = list(csv.DictReader(io.StringIO(report.render_csv(table))))
    assert [r["n_exploded"] for r in rows] == ["0", "0", "0", "1", "1", "0"]


def test_cells_against_hand_computed(tmp_path):
    # three seeds of one setting: best 80/82/84, final 77/80/83
    for seed, accs in enumerate([(50.0, 80.0, 77.0), (60.0, 82.0, 80.0), (84.0, 83.0, 83.0)]):
        make_run(tmp_path, f"s{seed}", seed=seed, accs=accs)
    make_run(tmp_path, "other-lr", lr=2.0, accs=(30.0, 40.0, 20.0))
    make_run(tmp_path, "running", lr=3.0, accs=(30.0,), status="running", extra={"epochs": 3})
    (tmp_path / "sweep.json").write_text("{}")
    table = report.build_table(runs.load_runs(tmp_path), target=0.95)
    cell = table.cells[("LARS (warm-up)", 512, 1.0)]
    assert cell.best == (82.0, pytest.approx(2.0), 3)
    assert cell.final == (pytest.approx(80.0), pytest.approx(3.0), 3)
    # epochs to 95% of the best at B=512 (84 -> 79.8): seed0 epoch 2, seed1 2, seed2 1 => mean 5/3
    assert cell.epochs[0] == pytest.approx(5 / 3) and cell.epochs[2] == 3 and cell.reached == 3
    assert table.cells[("LARS (warm-up)", 512, 2.0)].reached == 0
    assert table.cells[("LARS (warm-up)", 512, 2.0)].best == (40.0, None, 1)
    assert ("LARS (warm-up)", 512, 3.0) not in table.cells  # unfinished: not counted
    assert table.unfinished == 1 and table.lrs[512] == [1.0, 2.0, 3.0]
    md = report.render_markdown(table)
    assert "| LARS (warm-up) | 512 (1/2/3) | 82.00 ± 2.00 (3) | 40.00 (1) | — |" in md
    assert "| LARS (warm-up) | 512 (1/2/3) | 80.00 ± 3.00 (3) | 20.00 (1) | — |" in md  # the final table
    assert "1 not finished" in md
    assert "| LARS (warm-up) | 512 (1/2/3) | 1.7 ± 0.6 (3) | never | — |" in md


def test_full_sweep_every_cell_present_with_paper(tmp_path):
    folder = fabricate_sweep(tmp_path / "sw")
    text = report.write_report(folder)
    assert (folder / "report.md").read_text() == text
    table = report.build_table(runs.load_runs(folder))
    assert table.rows == ["LARS (warm-up)", "LARS (no warm-up)", "LAMB (warm-up)", "LAMB (no warm-up)", "TVLARS"]
    assert len(table.cells) == 5 * 2 * 3 and all(c.best[2] == 2 for c in table.cells.values())
    # a hand check: TVLARS (opt 4), B=1024, lr index 2, seeds 0/1: best = 40+20+2+1+seed = 63, 64
    assert table.cells[("TVLARS", 1024, 4.0)].best[0] == pytest.approx(63.5)
    assert table.cells[("TVLARS", 1024, 4.0)].best[1] == pytest.approx(math.sqrt(0.5))
    # the table body holds no missing cell; the paper's numbers stand beside
    body = text.split("## Table 1: best")[1].split("## Table 1: final")[0]
    assert "—" not in body.split("|---|")[1]
    assert "paper a" in body and "| TVLARS | 512 (1/2/3) | 61.00 ± 0.71 (2) | 62.00 ± 0.71 (2) | 63.00 ± 0.71 (2) " \
                                 "| 78.92 | 81.42 | 81.56 |" in body
    assert "| LARS (no warm-up) | 1024 (2/3/4) |" in body and "74.70 | 78.83 | 80.52 |" in body
    rows = list(csv.DictReader(io.StringIO((folder / "report.csv").read_text())))
    assert len(rows) == 30
    tv = [r for r in rows if r["row"] == "TVLARS" and r["batch_size"] == "512" and r["lr_index"] == "a"][0]
    assert float(tv["best_mean"]) == pytest.approx(61.0) and float(tv["paper_acc"]) == 78.92
    assert float(tv["final_mean"]) == pytest.approx(59.0) and tv["n"] == "2"
    assert "## Epochs to reach 95% of the best test accuracy at the batch size" in text
    best = text.split("## Best over learning rates")[1]
    assert "| 512 | 43.00 ± 0.71 (lr 3) |" in best  # the best lr's mean, with its seed spread
    # TVLARS 63.0 - max(LARS no warm-up 48.0, LAMB no warm-up 58.0); LARS 43.0 - 48.0
    assert "| 63.00 ± 0.71 (lr 3) | +5.00 | -5.00 |" in best
    one_seed = report.render_markdown(report.build_table(runs.load_runs(fabricate_sweep(tmp_path / "s1", seeds=(0,)))))
    assert "| 512 | 42.50 (lr 3) |" in one_seed.split("## Best over learning rates")[1]


def test_missing_cells_marked_and_no_paper_for_other_datasets(tmp_path):
    (tmp_path / "sweep.json").write_text("{}")
    make_run(tmp_path, "a", dataset="digits", batch_size=14, lr=1.0)
    make_run(tmp_path, "b", dataset="digits", batch_size=14, lr=2.0, optimizer="tvlars")
    make_run(tmp_path, "c", dataset="digits", batch_size=14, lr=3.0, optimizer="tvlars", status="diverged",
             accs=(10.0, 30.0, float("nan"), float("nan")))
    text = report.render_markdown(report.build_table(runs.load_runs(tmp_path)))
    assert "paper a" not in text
    assert "| TVLARS | 14 (1/2/3) | — | 70.00 | 30.00 † |" in text
    assert "| LARS (warm-up) | 14 (1/2/3) | 70.00 | — | — |" in text


def test_extra_varying_flag_splits_rows(tmp_path):
    (tmp_path / "sweep.json").write_text("{}")
    for lam in (1e-3, 1e-4):
        make_run(tmp_path, f"lam{lam}", optimizer="tvlars", extra={"lam": lam})
    table = report.build_table(runs.load_runs(tmp_path))
    assert table.rows == ["TVLARS [lam=0.0001]", "TVLARS [lam=0.001]"]


def ssl_summary(probe: float, knn: float, *, epochs: int = 1, written_before_2026_12_05: bool = False) -> dict:
    """summary.json of a completed tvlars ssl run (the probe's best epoch 2 points above its last),
    today's or as written before the probe's numbers had their own names."""
    summary = {"status": "completed", "epochs_done": epochs, "final_test_acc": probe, "wall_time_s": 1.0,
               "world_size": 1, "knn_acc": knn, "knn20_acc": knn, "online_acc": None, "linear_top5": 99.0,
               "probe_best_epoch": 40, "probe_lr": 0.3}
    if written_before_2026_12_05:
        return {**summary, "best_test_acc": probe + 2, "best_epoch": epochs}
    return {**summary, "probe_best_acc": probe + 2}


def test_ssl_sweep_reports_the_final_probe_untrained_row_and_knn_table(tmp_path):
    (tmp_path / "sweep.json").write_text("{}")

    def ssl_run(name, knn, probe, old=False, **kw):
        d = make_run(tmp_path, name, command="ssl", dataset="fashion-mnist", accs=(probe,), **kw)
        (d / "summary.json").write_text(json.dumps(ssl_summary(probe, knn, written_before_2026_12_05=old)))

    ssl_run("untrained", 74.0, 76.0, extra={"epochs": 0})
    for seed, (knn, probe) in enumerate([(82.0, 84.0), (84.0, 86.0)]):
        ssl_run(f"lars{seed}", knn, probe, old=seed == 1, seed=seed)
    table = report.build_table(runs.load_runs(tmp_path))
    assert table.rows == ["LARS (warm-up)", "Untrained encoder"]  # not a row of the optimizer it was given
    text = report.render_markdown(table)
    probe = text.split("## Table 1: linear probe top-1 after its last epoch (%)")[1].split("##")[0]
    # the probe after its last epoch, never its best epoch (chosen on the test set), old folders too
    assert "| LARS (warm-up) | 512 (1) | 85.00 ± 1.41 (2) |" in probe
    assert "| Untrained encoder | 512 (1) | 76.00 (1) |" in probe
    assert "best test accuracy" not in text and "Epochs to reach" not in text
    knn = text.split("## kNN accuracy of the final encoder (%)")[1].split("##")[0]
    assert "| LARS (warm-up) | 512 (1) | 83.00 ± 1.41 (2) |" in knn
    assert "| Untrained encoder | 512 (1) | 74.00 (1) |" in knn
    rows = {r["row"]: r for r in csv.DictReader(io.StringIO(report.render_csv(table)))}
    assert rows["LARS (warm-up)"]["knn_mean"] == "83" and rows["LARS (warm-up)"]["n"] == "2"
    assert (rows["Untrained encoder"]["final_mean"], rows["Untrained encoder"]["best_mean"]) == ("76", "")
    with pytest.raises(UserError, match="--metric best: a tvlars ssl run has one test accuracy"):
        report.render_markdown(table, "best")
    # a classification sweep has no kNN section
    assert "kNN" not in report.render_markdown(report.build_table(runs.load_runs(fabricate_sweep(tmp_path / "c"))))


def test_an_old_ssl_summary_is_read_under_todays_names(tmp_path):
    from tvlars import runfolder

    (tmp_path / "summary.json").write_text(json.dumps(ssl_summary(80.0, 70.0, epochs=20,
                                                                  written_before_2026_12_05=True)))
    summary = runfolder.read_summary(tmp_path)
    assert summary["probe_best_acc"] == 82.0 and summary["final_test_acc"] == 80.0
    assert "best_test_acc" not in summary and "best_epoch" not in summary


def test_cli(tmp_path, capsys):
    from tvlars import cli

    folder = fabricate_sweep(tmp_path / "sw", seeds=(0,))
    parser = cli._Parser(prog="tvlars report")
    report.add_arguments(parser)
    assert report.run(parser.parse_args([str(folder), "--metric", "final", "--format", "csv",
                                         "--out", str(tmp_path / "o")])) == 0
    assert "## Table 1: final test accuracy" in capsys.readouterr().out
    assert (tmp_path / "o" / "report.csv").is_file() and not (tmp_path / "o" / "report.md").exists()
    with pytest.raises(UserError, match="unknown format 'pdf'"):
        report.run(parser.parse_args([str(folder), "--format", "pdf"]))
    with pytest.raises(UserError, match="no run folders"):
        report.run(parser.parse_args([str(tmp_path / "o")]))
    with pytest.raises(UserError, match="not a folder"):
        report.run(parser.parse_args([str(tmp_path / "nope")]))


def test_rows_name_a_schedule_other_than_the_papers_pairing(tmp_path):
    """Warm-up goes with cosine decay, no warm-up with polynomial decay and TVLARS with no
    schedule (the paper's pairings, named by warm-up alone); any other schedule is named, so
    an ablation's rows say what they ran (warm-up then constant, cosine without warm-up,
    phi_t as LARS's schedule, TVLARS-anneal)."""
    (tmp_path / "sweep.json").write_text("{}")
    specs = {"paper-warm": (2, "warmup-cosine", {}), "paper-cold": (0, "poly", {}),
             "ramp-constant": (2, "constant", {}), "cosine-cold": (0, "warmup-cosine", {}),
             "phi": (0, "none", {"tv_factor": True, "phi_anneal": True})}
    for name, (warmup, schedule, extra) in specs.items():
        d = make_run(tmp_path, name, warmup_epochs=warmup, extra=extra)
        config = yaml.safe_load((d / "config.yaml").read_text())
        (d / "config.yaml").write_text(yaml.safe_dump(dict(config, schedule=schedule)))
    make_run(tmp_path, "anneal", optimizer="tvlars", extra={"phi_anneal": True})
    make_run(tmp_path, "tvlars", optimizer="tvlars")
    labels = {Path(path).name: label for path, label in runs.row_labels(runs.load_runs(tmp_path)).items()}
    assert labels == {"paper-warm": "LARS (warm-up)", "paper-cold": "LARS (no warm-up)",
                      "ramp-constant": "LARS (warm-up, constant)", "cosine-cold": "LARS (no warm-up, cosine)",
                      "phi": "LARS (no warm-up, phi_t anneal)", "anneal": "TVLARS-anneal", "tvlars": "TVLARS"}


def test_runs_that_diverged_before_their_first_test_are_marked_in_every_table(tmp_path):
    """Issue 27: a setting whose only run diverged in epoch 1 showed "—" ("no finished run")
    while the header counted it as finished and diverged and report.csv had n_diverged=1."""
    (tmp_path / "sweep.json").write_text("{}")
    make_run(tmp_path, "lars", optimizer="lars", warmup_epochs=0, batch_size=55, lr=5.0, accs=(80.0, 90.0),
             dataset="digits")
    make_run(tmp_path, "lamb", optimizer="lamb", warmup_epochs=0, batch_size=55, lr=5.0, status="diverged",
             accs=(float("nan"),), dataset="digits")
    table = report.build_table(runs.load_runs(tmp_path))
    text = report.render_markdown(table)
    assert "2 finished (1 diverged" in text
    sections = text.split("\n## ")[1:]
    assert len(sections) == 4  # best, final, best over lrs, epochs to target
    for section in sections:
        lamb = [line for line in section.splitlines() if line.startswith(("| LAMB", "| 55 |"))]
        assert lamb and all("†" in line for line in lamb), section
    assert "| LAMB (no warm-up) | 55 (5) | — † |" in text
    assert "| LAMB (no warm-up) | 55 (5) | never † |" in text
    assert "— † runs that diverged before their first test" in text  # the header says what it means
    rows = {r["row"]: r for r in csv.DictReader(io.StringIO(report.render_csv(table)))}
    assert rows["LAMB (no warm-up)"]["n_diverged"] == "1" and rows["LAMB (no warm-up)"]["best_mean"] == ""


def test_ssl_report_names_the_probe_each_number_comes_from(tmp_path):
    (tmp_path / "sweep.json").write_text("{}")

    def ssl_run(folder, name, probe, norm, **kw):
        d = make_run(folder, name, command="ssl", dataset="fashion-mnist", accs=(probe,), **kw)
        summary = ssl_summary(probe, 80.0)
        if norm is not None:  # None: a run from before --probe-norm, whose probe was raw
            summary["probe_norm"] = norm
        (d / "summary.json").write_text(json.dumps(summary))

    ssl_run(tmp_path, "bn", 84.0, "bn")
    table = report.build_table(runs.load_runs(tmp_path))
    assert "standardised features (--probe-norm bn" in report.render_markdown(table)
    assert next(csv.DictReader(io.StringIO(report.render_csv(table))))["probe_norm"] == "bn"

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "sweep.json").write_text("{}")
    ssl_run(mixed, "new", 84.0, "bn", optimizer="lars")
    ssl_run(mixed, "old", 70.0, None, optimizer="tvlars")
    table = report.build_table(runs.load_runs(mixed))
    text = report.render_markdown(table)
    assert "[none] raw features (--probe-norm none" in text and "[bn] standardised" in text
    assert "| TVLARS | 512 (1) | 70.00 [none] |" in text and "| LARS (warm-up) | 512 (1) | 84.00 [bn] |" in text
    rows = {r["row"]: r["probe_norm"] for r in csv.DictReader(io.StringIO(report.render_csv(table)))}
    assert rows == {"LARS (warm-up)": "bn", "TVLARS": "none"}
    # a classification report has no probe column
    assert "probe_norm" not in report.render_csv(report.build_table(runs.load_runs(fabricate_sweep(tmp_path / "c"))))
