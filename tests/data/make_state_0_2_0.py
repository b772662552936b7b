"""Writes tests/data/optimizer_state_0.2.0.pt with tvlars 0.2.0's optimizers first on the path:

    git archive COMMIT src | tar -x -C /tmp/v020 && PYTHONPATH=/tmp/v020/src python tests/data/make_state_0_2_0.py COMMIT

Each optimizer (and what 0.2.0 added: TVLARS-anneal, LAMB's max_weight_norm) after 7 steps and
one skipped step, per-parameter counters in the state; tests/test_version.py loads it with
today's code and checks that the run continues as if it had never stopped.
"""
import sys

import torch

sys.path.insert(0, "tests")
from test_optim import WEIGHT_DECAY, make_data, make_model, train  # noqa: E402

import tvlars  # noqa: E402
from tvlars import LAMB, LARS, TVLARS, param_groups  # noqa: E402

CASES = {"lars": (LARS, dict(lr=0.1, nesterov=True)),
         "tvlars": (TVLARS, dict(lr=0.1, lam=0.2, delay=3, min_factor=0.01)),
         "tvlars-official": (TVLARS, dict(lr=0.1, lam=0.2, variant="official")),
         "tvlars-anneal": (TVLARS, dict(lr=0.1, total_steps=12)),
         "lamb": (LAMB, dict(lr=1e-2)),
         "lamb-capped": (LAMB, dict(lr=1e-2, bias_correction=False, max_weight_norm=0.5)),
         "lars-no-momentum": (LARS, dict(lr=0.1, momentum=0.0))}

assert tvlars.__version__ == "0.2.0", tvlars.__version__
out = {"tvlars_version": tvlars.__version__, "commit": sys.argv[1] if len(sys.argv) > 1 else None,
       "torch_version": str(torch.__version__)}
for name, (cls, kw) in CASES.items():
    model = make_model()
    opt = cls(param_groups(model, WEIGHT_DECAY), **kw)
    data = make_data()
    train(model, opt, data[:7])
    opt.zero_grad()  # one skipped step, so the saved skipped_steps is not 0
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert opt.skipped_steps == 1
    out[name] = {"model": model.state_dict(), "optimizer": opt.state_dict(), "kwargs": kw}
torch.save(out, "tests/data/optimizer_state_0.2.0.pt")
print(tvlars.__file__, out["commit"], sorted(k for k, v in out.items() if isinstance(v, dict)))
