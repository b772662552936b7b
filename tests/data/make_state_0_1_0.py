"""Writes tests/data/optimizer_state_0.1.0.pt with tvlars 0.1.0 (commit 310e12c) first on the path:

    git archive 310e12c src | tar -x -C /tmp/v010 && PYTHONPATH=/tmp/v010/src python tests/data/make_state_0_1_0.py
"""
import sys
import torch
sys.path.insert(0, "tests")
from test_optim import make_model, make_data, train, WEIGHT_DECAY
import tvlars
from tvlars import LAMB, LARS, TVLARS, param_groups
CASES = {"lars": (LARS, dict(lr=0.1, nesterov=True)), "tvlars": (TVLARS, dict(lr=0.1, lam=0.2, delay=3, min_factor=0.01)),
         "tvlars-official": (TVLARS, dict(lr=0.1, lam=0.2, variant="official")), "lamb": (LAMB, dict(lr=1e-2)),
         "lars-no-momentum": (LARS, dict(lr=0.1, momentum=0.0))}
out = {"tvlars_version": "0.1.0", "torch_version": torch.__version__}
for name, (cls, kw) in CASES.items():
    model = make_model()
    opt = cls(param_groups(model, WEIGHT_DECAY), **kw)
    data = make_data()
    train(model, opt, data[:7])
    # one skipped step, so the saved skipped_steps is not 0
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert opt.skipped_steps == 1
    out[name] = {"model": model.state_dict(), "optimizer": opt.state_dict()}
torch.save(out, "tests/data/optimizer_state_0.1.0.pt")
print(tvlars.__file__, {k: list(v["optimizer"]["state"].keys())[-1] for k, v in out.items() if isinstance(v, dict)})
