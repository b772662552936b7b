"""Peak temporary memory of one optimizer step, in units of the parameters' size.

    .venv/bin/python bench/memory.py [--scale 1.0] [--against REV] [--cases NAME,...]
        [--paths foreach,default]

BERT-large's parameter shapes (24 blocks, width 1024: 335M float32 parameters; ``--scale s``
multiplies the width, the feed-forward width and the vocabulary by s, so the size by about
s^2), random gradients, one thread, each case in a fresh subprocess. Each optimizer takes
one step (its state is made), then a second step is measured: the peak, over that step, of
the bytes allocated and not yet freed since it began, from the profiler's memory events
(every allocation of torch's CPU allocator, temporaries made inside a kernel included), so
the figure is what a step holds beyond the parameters, the gradients and the state, and is
the same on every run. "state" is the optimizer state's size, for comparison.

Cases: torch's SGD (momentum 0.9) and AdamW, foreach and fused; tvlars LARS, TVLARS and
LAMB on each of ``--paths`` (foreach: the multi-tensor path CUDA takes by default; default:
the CPU's host path; single: foreach=False). ``--against REV`` adds the tvlars cases of
commit REV (its ``src/tvlars/optim``, extracted as bench/step_time.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
PATHS = {"foreach": dict(foreach=True), "default": dict(), "single": dict(foreach=False)}
TORCH_CASES = ["SGD foreach", "SGD fused", "AdamW foreach", "AdamW fused"]
TVLARS_NAMES = ["LARS", "TVLARS", "LAMB"]
WEIGHT_DECAY = 1e-2


def step_peak_bytes(step) -> int:
    """The most bytes ``step()`` held at once beyond what existed when it began: the running
    sum of the CPU allocator's allocations and frees during the call, at its maximum."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def bert_large_shapes(scale: float = 1.0) -> list[tuple]:
    sys.path.insert(0, str(HERE))
    from gpu_check import transformer_shapes

    width = max(8, int(1024 * scale))
    return transformer_shapes(width=width, ff=4 * width, vocab=max(8, int(30522 * scale)))


def make_optimizer(case: str, params: list, optim_root: str = ""):
    if case.startswith(("SGD", "AdamW")):
        name, mode = case.split()
        kw = dict(foreach=True) if mode == "foreach" else dict(fused=True)
        if name == "SGD":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY, **kw)
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=WEIGHT_DECAY, **kw)
    name, path = case.split()[:2]
    if optim_root:
        sys.path.insert(0, str(HERE))
        from step_time import import_optim

        lib = import_optim(Path(optim_root), "tvlars_optim_against")
    else:
        import tvlars.optim as lib
    cls = getattr(lib, name)
    lr = 1e-3 if name == "LAMB" else 1.0
    return cls(params, lr=lr, weight_decay=WEIGHT_DECAY, **PATHS[path])


def measure(case: str, scale: float, optim_root: str = "") -> dict:
    """One case, in this process: bytes of the parameters, the state and the step's peak."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in bert_large_shapes(scale):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).mul_(0.02))
        p.grad = torch.randn(shape, generator=gen).mul_(1e-3)
        params.append(p)
    opt = make_optimizer(case, params, optim_root)
    opt.step()  # makes the state
    t0 = time.perf_counter()
    peak = step_peak_bytes(opt.step)
    seconds = time.perf_counter() - t0
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                      if torch.is_tensor(v))
    return dict(case=case, params=param_bytes, state=state_bytes, peak=peak, seconds=seconds)


def run_case(case: str, scale: float, optim_root: str = "") -> dict:
    """``measure`` in a fresh Python process (nothing freed earlier is reused), one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--scale", str(scale)]
    if optim_root:
        command += ["--optim-root", optim_root]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return dict(case=case, error=(done.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="width, feed-forward width and vocabulary times this")
    parser.add_argument("--paths", default="foreach,default", help=f"tvlars paths, from {','.join(PATHS)}")
    parser.add_argument("--against", default="", metavar="REV", help="also the tvlars cases of this commit")
    parser.add_argument("--cases", default="", help="only these cases (comma-separated names as printed)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--optim-root", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.scale, args.optim_root)))
        return
    cases = [(case, "") for case in TORCH_CASES]
    cases += [(f"{name} {path}", "") for path in args.paths.split(",") for name in TVLARS_NAMES]
    if args.against:
        sys.path.insert(0, str(HERE))
        from step_time import extract_optim

        root = str(extract_optim(args.against))
        cases += [(f"{name} {path} @{args.against}", root) for path in args.paths.split(",") for name in TVLARS_NAMES]
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c[0] in wanted]
    print(f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; one thread; "
          f"BERT-large shapes times {args.scale}")
    print("| optimizer | parameters MB | state (x params) | step's peak temporaries (x params) |")
    print("|---|---:|---:|---:|")
    for case, root in cases:
        got = run_case(case.split(" @")[0], args.scale, root)
        if "error" in got:
            print(f"| {case} | | | failed: {got['error']} |")
            continue
        params = got["params"]
        print(f"| {case} | {params / 2**20:.0f} | {got['state'] / params:.2f} | {got['peak'] / params:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
