"""Every optimizer flag a run records is applied or refused (tvlars.harness.optimizers.OPTIMIZER_INFO).

For every (command, optimizer, flag) the flag is set to a value other than its default, the
configuration is resolved as the command line resolves it, and either the resolution refuses
it in one line naming the flag and the optimizers it applies to, or the optimizer (and its
schedule, stepped a few times) built from that configuration differs from the one built
without the flag. The shipped grids must resolve run by run under the same rules.
"""

import argparse
import warnings

import pytest
import torch
from torch import nn

from tvlars.cli import command_parser
from tvlars.errors import UserError
from tvlars.harness import flags, optimizers
from tvlars.harness.config import SSLConfig, TrainConfig, check_run
from tvlars.harness.optimizers import OPTIMIZERS, PHI_FLAGS, TABLE_FLAGS, takes, taken_by
from tvlars.study.grid import expand_grid, load_grid, shipped_grids

KINDS = {"train": TrainConfig, "ssl": SSLConfig}
STEPS_PER_EPOCH, EPOCHS = 5, 4
BASE = ["--epochs", str(EPOCHS), "--out", "unused"]

#: A value other than the default, for every flag of the optimizer, phi_t and schedule groups
#: that reaches the optimizer; the test fails if the parser grows a flag missing here.
OTHER_VALUE = {
    "lr": ["--lr", "0.5"], "momentum": ["--momentum", "0.5"], "weight_decay": ["--weight-decay", "0.01"],
    "trust_coefficient": ["--trust-coefficient", "0.02"], "trust_form": ["--trust-form", "separate"],
    "trust_clip": ["--trust-clip"], "eps": ["--eps", "1e-3"], "nesterov": ["--nesterov"],
    "betas": ["--betas", "0.8", "0.99"], "bias_correction": ["--no-bias-correction"],
    "max_weight_norm": ["--max-weight-norm", "5"], "layer_adaptation": ["--no-layer-adaptation"],
    "exclude_1d_decay": ["--no-exclude-1d-decay"], "exclude_1d_adapt": ["--no-exclude-1d-adapt"],
    "lam": ["--lam", "0.05"], "delay_epochs": ["--delay-epochs", "1"], "delay_steps": ["--delay-steps", "3"],
    "alpha": ["--alpha", "0.5"], "min_factor": ["--min-factor", "0.1"], "variant": ["--variant", "official"],
    "tv_factor": ["--tv-factor"], "phi_anneal": ["--phi-anneal"],
}


def model():
    """Weights and 1-D parameters (bias, batch norm), as param_groups splits them."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def resolve(command, argv):
    parser = argparse.ArgumentParser()
    KINDS[command].add_arguments(parser)
    return KINDS[command].from_flags(parser.parse_args([*BASE, *argv]))


def groups_after_steps(cfg):
    """The optimizer's param_groups (parameters left out) after its schedule took 3 steps."""
    optimizer = optimizers.build_optimizer(model(), **optimizers.optimizer_kwargs(cfg, STEPS_PER_EPOCH))
    scheduler = optimizers.build_scheduler(optimizer, **optimizers.scheduler_kwargs(
        cfg, STEPS_PER_EPOCH, STEPS_PER_EPOCH * cfg.epochs))
    with warnings.catch_warnings():  # the schedule alone: no optimizer step is needed to move it
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(3):
            if scheduler is not None:
                scheduler.step()
    return [repr({k: v for k, v in group.items() if k != "params"}) for group in optimizer.param_groups]


def test_the_table_covers_every_optimizer_flag():
    parser = argparse.ArgumentParser()
    flags.add_train_arguments(parser)
    groups = {g.title: g for g in parser._action_groups}
    dests = {a.dest for title, g in groups.items() if title and (title == "optimizer" or title.startswith("TVLARS"))
             for a in g._group_actions} - {"optimizer"}
    assert dests == set(OTHER_VALUE), "a new optimizer flag needs a row in OPTIMIZER_INFO and a value here"
    assert set(TABLE_FLAGS) <= dests and set(PHI_FLAGS) <= set(TABLE_FLAGS)


@pytest.mark.parametrize("command", ["train", "ssl"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("tv_factor", [False, True], ids=["", "tv-factor"])
def test_every_flag_changes_the_optimizer_or_is_refused(command, optimizer, tv_factor):
    base = ["--optimizer", optimizer, *(["--tv-factor"] if tv_factor else [])]
    if tv_factor and optimizer == "tvlars":
        refusal = r"^--tv-factor applies to lars, lamb, sgd, adamw, not to --optimizer tvlars"
        with pytest.raises(UserError, match=refusal):
            resolve(command, base)
        return
    reference = groups_after_steps(resolve(command, base))
    for flag, argv in OTHER_VALUE.items():
        if tv_factor and flag == "tv_factor":
            continue
        try:
            cfg = resolve(command, [*base, *argv])
        except UserError as err:
            assert not takes(optimizer, flag, tv_factor=tv_factor), f"{optimizer} takes {flag}: {err}"
            written = argv[0]  # --no-layer-adaptation, as given
            assert str(err).startswith(f"{written} applies to {taken_by(flag)}, not to "
                                       f"--optimizer {optimizer}"), str(err)
            continue
        assert takes(optimizer, flag, tv_factor=tv_factor), f"{flag} accepted for {optimizer}"
        assert groups_after_steps(cfg) != reference, f"{flag} accepted for {optimizer} but changed nothing"


def test_issue_26_cases_are_refused_in_one_line():
    with pytest.raises(UserError, match="^--trust-form applies to lars, not to --optimizer tvlars"):
        resolve("train", ["--optimizer", "tvlars", "--trust-form", "separate"])
    with pytest.raises(UserError, match="^--lam applies to tvlars, or any optimizer with --tv-factor, not to "
                                        "--optimizer lamb"):
        resolve("train", ["--optimizer", "lamb", "--lam", "1e-3"])
    for flag in ("--trust-clip", "--nesterov"):
        with pytest.raises(UserError, match=f"^{flag} applies to"):
            resolve("ssl", ["--optimizer", "tvlars", flag])


def test_a_flag_at_its_default_is_not_refused():
    """Grids set momentum and eta for every optimizer; at their defaults they say nothing false."""
    cfg = resolve("train", ["--optimizer", "lamb", "--momentum", "0.9", "--trust-coefficient", "0.001",
                            "--trust-form", "coupled"])
    assert cfg.optimizer == "lamb"


def test_schedule_flags_act_only_on_their_schedules():
    with pytest.raises(UserError, match="^--min-lr shapes --schedule warmup-cosine or poly, not --schedule none"):
        resolve("train", ["--optimizer", "tvlars", "--min-lr", "0.01"])
    with pytest.raises(UserError, match="^--power shapes --schedule poly"):
        resolve("train", ["--optimizer", "lars", "--power", "3"])
    with pytest.raises(UserError, match="^--base-batch-size acts only with --lr-scaling"):
        resolve("train", ["--optimizer", "lars", "--base-batch-size", "512"])
    assert resolve("train", ["--optimizer", "lars", "--schedule", "poly", "--power", "3"]).power == 3


def test_data_and_model_flags_act_only_where_they_apply():
    with pytest.raises(UserError, match="^--synthetic-classes shapes --dataset synthetic, not --dataset digits"):
        resolve("train", ["--dataset", "digits", "--synthetic-classes", "4"])
    with pytest.raises(UserError, match="^--stem is the ResNets'"):
        resolve("ssl", ["--dataset", "digits", "--model", "mlp", "--stem", "imagenet"])
    assert resolve("train", ["--dataset", "synthetic", "--synthetic-classes", "4"]).synthetic_classes == 4
    assert resolve("train", ["--model", "resnet18", "--stem", "imagenet"]).stem == "imagenet"


def test_a_delay_past_the_end_of_the_run_is_refused_or_said():
    with pytest.raises(UserError, match=r"^--delay-epochs 4 is past the run's end \(--epochs 4\)"):
        resolve("train", ["--optimizer", "tvlars", "--delay-epochs", "4"])
    cfg = resolve("train", ["--optimizer", "tvlars", "--delay-steps", "20"])  # 4 epochs of 5 steps
    with pytest.raises(UserError, match=r"^--delay-steps 20 is past the run's end \(4 epochs of 5 steps\)"):
        cfg.factor_args(STEPS_PER_EPOCH)
    assert resolve("train", ["--optimizer", "tvlars", "--delay-steps", "19"]).factor_args(5)["delay_steps"] == 19
    # the paper's default delay of 10 epochs in a 4-epoch run: said, not refused
    (note,) = resolve("train", ["--optimizer", "tvlars"]).notes()
    assert "past the run's end (4 epochs)" in note
    assert resolve("train", ["--optimizer", "tvlars", "--phi-anneal"]).notes() == []
    assert resolve("train", ["--optimizer", "lars"]).notes() == []
    assert resolve("train", ["--optimizer", "tvlars", "--epochs", "11"]).notes() == []


def test_the_default_delay_note_is_one_line_of_the_command(tmp_path, capsys):
    from tvlars.harness.supervised import train

    from helpers import run_command

    assert run_command(train, tmp_path / "run", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
                       "--batch-size", "512", "--no-progress", "--layer-stats-every", "0") == 0
    lines = capsys.readouterr().err.splitlines()
    notes = [line for line in lines if line.startswith("tvlars: note: phi_t's delay")]
    assert len(notes) == 1 and "past the run's end (1 epochs)" in notes[0]


def test_refusals_are_one_line_and_exit_2(tmp_path, capsys):
    from tvlars import cli

    assert cli.main(["train", "--optimizer", "tvlars", "--trust-form", "separate", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "tvlars: error: --trust-form applies to lars, not to --optimizer tvlars; drop it"]
    assert not (tmp_path / "r").exists()


def test_help_names_who_takes_each_flag():
    """--help is written from the table: each flag's text names the optimizers that take it."""
    parser = argparse.ArgumentParser()
    flags.add_train_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    for flag in TABLE_FLAGS:
        if flag in PHI_FLAGS:
            continue  # their group's description says it once
        for name in OPTIMIZERS:
            if takes(name, flag):
                assert name in helps[flag], (flag, name, helps[flag])
    phi_group = next(g for g in parser._action_groups if g.title and g.title.startswith("TVLARS"))
    assert phi_group.description == taken_by("lam")


def test_every_run_of_every_shipped_grid_resolves():
    """What `tvlars sweep GRID` would launch resolves under the flag rules (config.check_run)."""
    count = 0
    for name in sorted(shipped_grids()):
        grid = load_grid(name)
        for run in expand_grid(grid, command_parser(grid.command)):
            check_run(grid.command, run.flags, f"grid {name}, run {run.name}")
            count += 1
    assert count > 500
    with pytest.raises(UserError, match="^grid g, run r: --nesterov applies to lars, sgd, not to --optimizer tvlars"):
        check_run("ssl", {"optimizer": "tvlars", "nesterov": True}, "grid g, run r")
