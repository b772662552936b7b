"""`tvlars train` flags: parsing, automatic defaults, --config files, help text."""

import argparse

import pytest
import yaml

from tvlars import cli
from tvlars.errors import UserError
from tvlars.harness import config as cfg
from tvlars.harness.config import TrainConfig
from tvlars.harness.supervised import train


def parse(*argv):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.command = "train"
    return args


def test_every_flag_is_documented():
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    flags = {opt for a in parser._actions for opt in a.option_strings}
    for required in ("--config", "--dataset", "--data-dir", "--download", "--model", "--stem", "--init",
                     "--optimizer", "--batch-size", "--lr", "--epochs", "--warmup-epochs", "--schedule",
                     "--min-lr", "--out", "--seed", "--resume", "--lam", "--delay-epochs", "--delay-steps",
                     "--alpha", "--min-factor", "--variant", "--trust-coefficient", "--trust-form",
                     "--trust-clip", "--eps", "--nesterov", "--betas", "--weight-decay", "--momentum",
                     "--bias-correction", "--no-exclude-1d-decay", "--no-exclude-1d-adapt", "--tv-factor",
                     "--micro-batch-size", "--drop-last", "--no-drop-last", "--augment", "--no-augment",
                     "--data-on-device", "--num-workers", "--amp", "--channels-last", "--compile", "--sync-bn",
                     "--layer-stats-every", "--eval-every", "--device", "--progress", "--no-progress",
                     "--synthetic-train", "--synthetic-test", "--power"):
        assert required in flags, required
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 10, action.dest


def test_paper_defaults_and_auto_resolution():
    args = parse()
    assert (args.weight_decay, args.momentum, args.trust_coefficient) == (5e-4, 0.9, 1e-3)
    assert TrainConfig.from_flags(args).lam == 1e-4  # the paper's, unless --phi-anneal derives it
    args = TrainConfig.from_flags(args)
    assert args.optimizer == "tvlars" and args.schedule == "none" and args.warmup_epochs == 0
    assert args.model == "mlp" and args.augment is False

    args = TrainConfig.from_flags(parse("--optimizer", "lars", "--epochs", "100", "--dataset", "cifar10"))
    assert (args.schedule, args.warmup_epochs, args.model, args.augment) == ("warmup-cosine", 20, "resnet18", True)
    args = TrainConfig.from_flags(parse("--optimizer", "lamb", "--epochs", "10"))
    assert args.warmup_epochs == 5  # at most half the run
    args = TrainConfig.from_flags(parse("--optimizer", "lars", "--warmup-epochs", "0", "--schedule", "poly"))
    assert (args.schedule, args.warmup_epochs) == ("poly", 0)  # "without warm-up"


@pytest.mark.parametrize("argv, message", [
    (["--tv-factor", "--schedule", "poly"], "--tv-factor"),
    (["--delay-epochs", "1", "--delay-steps", "5"], "not both"),
    (["--micro-batch-size", "big"], "--micro-batch-size"),
    (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--schedule", "none", "--warmup-epochs", "2"], "--warmup-epochs"),
    (["--warmup-epochs", "50", "--epochs", "10", "--optimizer", "lars"], "longer than the run"),
    (["--lr", "-1"], "--lr"),
    (["--epochs", "0"], "--epochs"),
])
def test_bad_combinations_are_user_errors(argv, message):
    args = parse(*argv)
    with pytest.raises(UserError, match=message):
        TrainConfig.from_flags(args)


def test_unknown_choice_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--schedule", "step"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--schedule" in err[0]


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--micro-batch-size" in out and "GLOBAL batch" in out and "--tv-factor" in out


def test_config_file_gives_defaults_and_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"dataset": "digits", "model": "mlp", "optimizer": "sgd", "epochs": 1,
                                      "batch-size": 128, "lr": 0.3, "progress": False,
                                      "layer_stats_every": 0}))
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--lr", "0.05", "--out", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.05 and saved["batch_size"] == 128 and saved["model"] == "mlp"
    assert saved["epochs"] == 1 and saved["command"] == "train"


@pytest.mark.parametrize("text, message", [
    ("batch-sise: 128\n", "unknown flag 'batch-sise' for tvlars train; did you mean 'batch-size'?"),
    ("warmup_epoch: 2\n", "unknown flag 'warmup_epoch' for tvlars train; did you mean 'warmup-epochs'?"),
    ("lr: fast\n", "--lr takes a number, not 'fast'"),
    ("batch-size: 4k\n", "--batch-size takes an integer, not '4k'"),
    ("schedule: cosine\n", "--schedule must be one of warmup-cosine, poly, constant, none, not 'cosine'"),
    ("progress: 3\n", "--progress takes true or false, not 3"),
    ("lr: -1\n", "--lr must be positive"),  # checked where the flag is, still the file's
])
def test_config_file_errors_name_the_file_and_the_setting(tmp_path, capsys, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tvlars: error: config file {config}: {message}"), err
    # the same value on the command line is not the file's
    if text.startswith("lr: -1"):
        assert cli.main(["train", "--lr", "-1", "--out", str(tmp_path / "run")]) == 2
        assert "config file" not in capsys.readouterr().err


def test_resume_merge_rule():
    defaults = TrainConfig.defaults()
    saved = {"lr": 2.0, "batch_size": 1024, "epochs": 50, "progress": False}
    # untouched flags take the saved values, runtime flags come from the command line
    merged = cfg.merge_resume(parse("--resume", "--progress"), saved, defaults)
    assert (merged.lr, merged.batch_size, merged.epochs, merged.progress) == (2.0, 1024, 50, True)
    # the same value again is fine; a different one is an error naming the flag
    assert cfg.merge_resume(parse("--batch-size", "1024"), saved, defaults).batch_size == 1024
    with pytest.raises(UserError, match="--epochs 60 conflicts"):
        cfg.merge_resume(parse("--epochs", "60"), saved, defaults)


@pytest.mark.parametrize("kind", ["train", "ssl"])
def test_the_configuration_has_one_field_per_flag(kind):
    """argparse is the schema, the dataclass its resolved form: they must not drift apart."""
    import dataclasses

    from tvlars.harness.config import SSLConfig

    config_type = {"train": TrainConfig, "ssl": SSLConfig}[kind]
    parser = argparse.ArgumentParser()
    config_type.add_arguments(parser)
    dests = [a.dest for a in parser._actions if a.dest != "help"]
    assert [f.name for f in dataclasses.fields(config_type)] == dests  # config.yaml keeps the flags' order


def test_the_configuration_is_immutable():
    import dataclasses

    resolved = TrainConfig.from_flags(parse("--optimizer", "lars"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.lr = 2.0
    assert resolved.betas == (0.9, 0.999) and resolved.out == "runs/digits-mlp-lars-b256-lr1-s0"



def test_version(capsys):
    import tvlars

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"tvlars {tvlars.__version__}\n"
