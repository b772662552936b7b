"""Time one optimizer step on the parameter shapes of ResNet-18 and ResNet-50.

    .venv/bin/python bench/step_time.py [--steps 30] [--models resnet18,resnet50] [--quick]
        [--threads default,1] [--paths default,single,foreach] [--device cpu|cuda]
        [--against REV[,REV...]]

Gradients are random; every optimizer owns its parameters and shares the gradients (no
optimizer here writes them). The optimizers are timed round-robin, one step each per round,
so that a change in machine load hits them all alike; the table shows the median time over
the rounds and, for the ratios, the median over rounds of the ratio within the round (robust
to load that drifts between rounds): to the baseline (LARS, TVLARS: torch SGD momentum=0.9
fused; LAMB: torch AdamW fused) and to timm's counterpart (timm Lars, Lamb with
foreach=True). The first step (state allocation) is reported separately.

``--against REV`` also times the optimizers of another commit in the same rounds (its
``tvlars.optim`` extracted with ``git archive`` and imported under another name), and adds
the column "vs REV": the median per-round ratio of this checkout's time to that commit's
(lower is better), so that a change is judged against its parent in the same minutes.
``--threads`` takes a list; "default" is torch's own thread count.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import tvlars

WEIGHT_DECAY = 5e-4
PATHS = {"default": dict(), "single": dict(foreach=False), "foreach": dict(foreach=True)}


def lscpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def extract_optim(rev: str) -> Path:
    """``src/tvlars/optim`` as of commit ``rev``, extracted into a temporary folder: the package's path."""
    root = Path(tempfile.mkdtemp(prefix=f"tvlars-{rev}-"))
    archive = subprocess.run(["git", "archive", rev, "src/tvlars/optim"], capture_output=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout
    archive_path = root / "optim.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(root, filter="data")
    return root / "src" / "tvlars" / "optim"


def import_optim(package: Path, name: str):
    """The package at ``package`` (an extracted ``tvlars.optim``), imported as ``name``."""
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def optim_at(rev: str):
    """``tvlars.optim`` as of commit ``rev``, importable beside this checkout's."""
    name = f"tvlars_optim_{rev.replace('-', '_').replace('~', '_').replace('^', '_')}"
    return import_optim(extract_optim(rev), name)


def make_optimizers(model_name: str, paths: list[str], device: str, against: dict):
    model = getattr(torchvision.models, model_name)().to(device)
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(p.shape, generator=gen) * 1e-2).to(device) for p in model.parameters()]

    def fresh():
        clone = getattr(torchvision.models, model_name)().to(device)
        clone.load_state_dict(model.state_dict())
        for p, g in zip(clone.parameters(), grads):
            p.grad = g
        return clone

    def groups(m):
        return tvlars.param_groups(m, WEIGHT_DECAY)

    def timm_groups(m):
        return [{k: v for k, v in g.items() if k != "adapt"} for g in groups(m)]

    import timm.optim

    makers = {
        "SGD fused (baseline)": lambda m: torch.optim.SGD(groups(m), lr=0.1, momentum=0.9, fused=True),
        "AdamW fused (baseline)": lambda m: torch.optim.AdamW(groups(m), lr=1e-3, fused=True),
        "timm Lars foreach": lambda m: timm.optim.Lars(timm_groups(m), lr=1.0, momentum=0.9, foreach=True),
        "timm Lamb foreach": lambda m: timm.optim.Lamb(timm_groups(m), lr=1e-3, max_grad_norm=None, foreach=True),
    }
    for path in paths:
        kw = PATHS[path]
        for suffix, lib in [("", tvlars)] + [(f" @{rev}", module) for rev, module in against.items()]:
            makers[f"LARS {path}{suffix}"] = lambda m, kw=kw, lib=lib: lib.LARS(groups(m), lr=1.0, **kw)
            makers[f"TVLARS {path}{suffix}"] = lambda m, kw=kw, lib=lib: lib.TVLARS(groups(m), lr=1.0, **kw)
            makers[f"LAMB {path}{suffix}"] = lambda m, kw=kw, lib=lib: lib.LAMB(groups(m), lr=1e-3, **kw)
    return {name: make(fresh()) for name, make in makers.items()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(model_name: str, steps: int, paths: list[str], device: str, against: dict) -> None:
    optimizers = make_optimizers(model_name, paths, device, against)
    first = {}
    for name, opt in optimizers.items():  # first step: state allocation
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        first[name] = time.perf_counter() - t0
        opt.step()
    times = {name: [] for name in optimizers}
    for _ in range(steps):
        for name, opt in optimizers.items():
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"\n### {model_name} ({sum(len(g['params']) for g in optimizers['SGD fused (baseline)'].param_groups)} tensors,"
          f" {torch.get_num_threads()} threads)")
    revs = list(against)
    print("| optimizer | median ms | vs baseline | vs timm | " + "".join(f"vs {r} | " for r in revs) + "first step s |")
    print("|---|---:|---:|---:|" + "---:|" * len(revs) + "---:|")
    for name in optimizers:
        if name.startswith(("LARS", "TVLARS")):
            base, timm_name = "SGD fused (baseline)", "timm Lars foreach"
        elif name.startswith("LAMB"):
            base, timm_name = "AdamW fused (baseline)", "timm Lamb foreach"
        else:
            print(f"| {name} | {med[name]:.2f} | | | " + "| " * len(revs) + f"{first[name]:.2f} |")
            continue
        versus = "".join(f"{ratio(name, f'{name} @{r}'):.2f}x | " if "@" not in name else "| " for r in revs)
        print(f"| {name} | {med[name]:.2f} | {ratio(name, base):.2f}x | {ratio(timm_name, name):.2f}x | {versus}"
              f"{first[name]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--paths", default=",".join(PATHS), help="tvlars paths to time (default: all)")
    parser.add_argument("--threads", default="default",
                        help="comma-separated torch thread counts to run, 'default' for torch's own (default: default)")
    parser.add_argument("--against", default="", metavar="REV[,REV]",
                        help="also time the optimizers of these commits, side by side in the same rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="resnet18 only, 10 rounds")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.models = 10, "resnet18"
    against = {rev: optim_at(rev) for rev in args.against.split(",") if rev}
    default_threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {lscpu_model()}, {os.cpu_count()} CPUs, torch's default {default_threads} threads, "
          f"load average {load:.1f}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("vs baseline: time / fused SGD (LARS, TVLARS) or fused AdamW (LAMB), lower is better; "
          "vs timm: timm's time / ours; vs REV: ours / that commit's; all the median of per-round ratios")
    for threads in args.threads.split(","):
        torch.set_num_threads(default_threads if threads == "default" else int(threads))
        for name in args.models.split(","):
            bench(name, args.steps, args.paths.split(","), args.device, against)


if __name__ == "__main__":
    main()
