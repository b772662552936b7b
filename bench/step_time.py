"""Time one optimizer step on the parameter shapes of ResNet-18 and ResNet-50.

    .venv/bin/python bench/step_time.py [--steps 30] [--models resnet18,resnet50] [--quick]
        [--threads N] [--paths default,single,foreach,fused] [--device cpu|cuda]

Gradients are random; every optimizer owns its parameters and shares the gradients (no
optimizer here writes them). The optimizers are timed round-robin, one step each per round,
so that a change in machine load hits them all alike; the table shows the median time over
the rounds and, for the ratios, the median over rounds of the ratio within the round (robust
to load that drifts between rounds): to the baseline (LARS, TVLARS: torch SGD momentum=0.9
fused; LAMB: torch AdamW fused) and to timm's counterpart (timm Lars, Lamb with
foreach=True). The first step of each fused optimizer includes torch.compile; it is
reported separately.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torchvision

import tvlars

WEIGHT_DECAY = 5e-4
PATHS = {"default": dict(), "single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def lscpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_optimizers(model_name: str, paths: list[str], device: str):
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
        makers[f"LARS {path}"] = lambda m, kw=kw: tvlars.LARS(groups(m), lr=1.0, **kw)
        makers[f"TVLARS {path}"] = lambda m, kw=kw: tvlars.TVLARS(groups(m), lr=1.0, **kw)
        makers[f"LAMB {path}"] = lambda m, kw=kw: tvlars.LAMB(groups(m), lr=1e-3, **kw)
    return {name: make(fresh()) for name, make in makers.items()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(model_name: str, steps: int, paths: list[str], device: str) -> None:
    optimizers = make_optimizers(model_name, paths, device)
    first = {}
    for name, opt in optimizers.items():  # first step: state allocation and compilation
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
    print(f"\n### {model_name} ({sum(len(g['params']) for g in optimizers['SGD fused (baseline)'].param_groups)} tensors)")
    print("| optimizer | median ms | vs baseline | vs timm | first step s |")
    print("|---|---:|---:|---:|---:|")
    for name in optimizers:
        if name.startswith(("LARS", "TVLARS")):
            base, timm_name = "SGD fused (baseline)", "timm Lars foreach"
        elif name.startswith("LAMB"):
            base, timm_name = "AdamW fused (baseline)", "timm Lamb foreach"
        else:
            print(f"| {name} | {med[name]:.2f} | | | {first[name]:.2f} |")
            continue
        print(f"| {name} | {med[name]:.2f} | {ratio(name, base):.2f}x | {ratio(timm_name, name):.2f}x "
              f"| {first[name]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--paths", default=",".join(PATHS), help="tvlars paths to time (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 gives steadier numbers on a busy machine")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="resnet18 only, 10 rounds")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.models = 10, "resnet18"
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {lscpu_model()}, {torch.get_num_threads()} threads, load average {load:.1f}; "
          f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("vs baseline: time / fused SGD (LARS, TVLARS) or fused AdamW (LAMB), lower is better; "
          "vs timm: timm's time / ours; both the median of per-round ratios")
    for name in args.models.split(","):
        bench(name, args.steps, args.paths.split(","), args.device)


if __name__ == "__main__":
    main()
