"""The version means something: `tvlars.__version__` is the newest section of CHANGELOG.md, and
state written by each released version keeps loading, tested with the fixture that version wrote.

tests/data/optimizer_state_0.2.0.pt was written by tests/data/make_state_0_2_0.py (the commit is
in the file); 0.1.0's fixture is tests/test_optim_state.py's.
"""

import re
from pathlib import Path

import pytest
import torch

import tvlars
from tvlars import param_groups

from test_optim import WEIGHT_DECAY, make_data, make_model, train

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_0_2_0 = Path(__file__).parent / "data" / "optimizer_state_0.2.0.pt"
SAVED_0_2_0 = torch.load(FIXTURE_0_2_0, weights_only=True)
CASES_0_2_0 = sorted(name for name, value in SAVED_0_2_0.items() if isinstance(value, dict))
CLASSES = {"lars": tvlars.LARS, "lamb": tvlars.LAMB, "tvlars": tvlars.TVLARS}


def test_the_version_is_the_changelogs_newest():
    sections = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), re.M)
    assert sections and sections[0] == tvlars.__version__, (sections[:2], tvlars.__version__)
    assert sections == sorted(sections, key=lambda v: tuple(map(int, v.split("."))), reverse=True)


def test_every_version_that_wrote_a_fixture_has_a_section():
    written = {m.group(1) for p in (ROOT / "tests" / "data").iterdir()
               if (m := re.search(r"_(\d+\.\d+\.\d+)\.pt$", p.name))}
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert written >= {"0.1.0", "0.2.0"} and all(f"## {v}" in changelog for v in written)
    assert SAVED_0_2_0["tvlars_version"] == "0.2.0"


@pytest.mark.parametrize("name", CASES_0_2_0)
def test_state_dict_saved_by_0_2_0_loads_and_resumes(name):
    """7 steps and 1 skipped step saved by 0.2.0, loaded today: the next steps are those of a run
    that never stopped, and the counters come back per parameter."""
    saved = SAVED_0_2_0[name]
    kwargs = saved["kwargs"]
    cls = CLASSES[name.split("-")[0]]
    data = make_data()

    model = make_model()
    opt = cls(param_groups(model, WEIGHT_DECAY), **kwargs)
    train(model, opt, data[:7])
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    train(model, opt, data[7:])
    straight = [p.detach().clone() for p in model.parameters()]

    model = make_model(seed=4)
    opt = cls(param_groups(model, WEIGHT_DECAY), **kwargs)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    assert all(opt.state[p]["step"].item() == 7 for p in model.parameters())
    assert opt.skipped_steps == 1
    train(model, opt, data[7:])
    for a, b in zip(model.parameters(), straight):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
