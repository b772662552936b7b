"""The prepared GPU check (issue 12): what tvlars has to show on one CUDA GPU, in one run.

    python bench/gpu_check.py --out gpu_check.md     # one GPU, about 5-8 minutes
    python bench/gpu_check.py --cpu-dry-run          # the CPU-safe parts on tiny shapes (the tests run it)
    python bench/gpu_check.py --sections reference,sync-optimizer

Sections, each reported pass / fail / skip on its own (an exception in one is that
section's "fail" with its first line; the others still run):

reference       every optimizer path (tvlars.LARS / LAMB / TVLARS with foreach=False,
                foreach=True and the default) on the device, in float64 and
                float32, against a float64 CPU loop of docs/paper.md's equations written out here
sync-optimizer  torch.cuda.set_sync_debug_mode("error") over optimizer steps of every path
                (after two warm-up steps): a host synchronisation inside step() raises
sync-training   the same over `tvlars train` and `tvlars ssl` training steps (every step but
                the run's first, logging steps included), in this process
step-time       one optimizer step on ResNet-50's and a large transformer's parameter shapes
                (BERT-large: 24 layers, width 1024, 335M parameters), every path, against
                torch's fused SGD (LARS, TVLARS) and fused AdamW (LAMB): its time, and the
                most memory a step held beyond what it began with (CUDA: max_memory_allocated
                after reset_peak_memory_stats, every timed step; the dry run: the profiler's
                memory events over one more step), in MB and in units of the parameters' size
throughput      `tvlars train` on CIFAR-shaped synthetic data, ResNet-18, batch 512 and
                16,384, bf16 + channels_last + torch.compile; images/s of the last epochs
torchrun        1-GPU `torchrun -m tvlars train` smoke runs: DDP (+ SyncBatchNorm), and FSDP2
                when `tvlars train` has the --fsdp flag (skipped with a note otherwise)

The report is Markdown, ready to paste into BENCHMARKS.md: a summary table, then one
table per section. Exit status 1 when a section failed, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tvlars
from tvlars import runfolder

SECTIONS = ("reference", "sync-optimizer", "sync-training", "step-time", "throughput", "torchrun")
WEIGHT_DECAY = 5e-3
PATHS = {"default": {}, "single": {"foreach": False}, "foreach": {"foreach": True}}
# (name, class, our kwargs, reference hyper-parameters)
OPTIMIZERS = [
    ("LARS", tvlars.LARS, dict(lr=0.1), dict(lr=0.1, eta=1e-3, momentum=0.9)),
    ("TVLARS", tvlars.TVLARS, dict(lr=0.1, lam=0.05), dict(lr=0.1, eta=1e-3, momentum=0.9, lam=0.05)),
    ("LAMB", tvlars.LAMB, dict(lr=1e-2), dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6)),
]


# ---------------------------------------------------------------------------------------- report
@dataclass
class Section:
    name: str
    title: str
    status: str = "pass"  # pass | fail | skip
    note: str = ""
    header: tuple = ()
    rows: list = field(default_factory=list)
    seconds: float = 0.0

    def row(self, *cells, ok: bool | None = None) -> None:
        """A table row; ``ok=False`` fails the section (the other rows still run)."""
        self.rows.append([_cell(c) for c in cells])
        if ok is False:
            self.status = "fail"

    def skip(self, note: str) -> "Section":
        self.status, self.note = "skip", note
        return self


def _cell(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:,.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(sections: list[Section], context: dict) -> str:
    lines = ["## GPU check (`bench/gpu_check.py`)", "",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in context.items()), "",
             "| section | status | seconds | note |", "|---|---|---:|---|"]
    for s in sections:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {_cell(s.note)} |")
    for s in sections:
        lines += ["", f"### {s.name}: {s.title}", "", f"Status: **{s.status}**" + (f" ({s.note})" if s.note else "")]
        if s.header and s.rows:
            lines += ["", "| " + " | ".join(s.header) + " |", "|" + "---|" * len(s.header)]
            lines += ["| " + " | ".join(r) + " |" for r in s.rows]
    return "\n".join(lines) + "\n"


def say(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- float64 references
class Net(nn.Module):
    """Conv and linear layers with biases and a batch norm: 4-D, 2-D and 1-D parameters.
    ReLU comes before the norm: a bias straight before BatchNorm has a zero gradient (pure
    rounding noise, which LAMB would normalise into O(1) steps)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.norm = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 6 * 6, 10)

    def forward(self, x):
        return self.fc(self.norm(F.relu(self.conv(x))).flatten(1))


def _ratio(wn: float, un: float, coefficient: float, denominator: float) -> float:
    return 1.0 if wn == 0 or un == 0 else coefficient * wn / denominator


class Reference:
    """docs/paper.md section 1, one parameter at a time, norms as Python floats, float64 CPU."""

    def __init__(self, name: str, groups: list, hp: dict):
        self.name, self.groups, self.hp, self.state, self.t = name, groups, hp, {}, 0

    @torch.no_grad()
    def step(self) -> None:
        for group in self.groups:
            for p in group["params"]:
                getattr(self, self.name.lower())(p, p.grad, group["weight_decay"], group["adapt"],
                                                 self.state.setdefault(p, {}))
        self.t += 1

    def lars(self, p, g, wd, adapt, st):
        h = self.hp
        d = g + wd * p
        trust = _ratio(p.norm().item(), d.norm().item(), h["eta"], d.norm().item()) if adapt else 1.0
        st["buf"] = st.get("buf", torch.zeros_like(p)) * h["momentum"] + trust * d
        p -= h["lr"] * st["buf"]

    def tvlars(self, p, g, wd, adapt, st):  # Algorithm 1: keeps m, starting at w_0
        h = self.hp
        d = g + wd * p
        trust = _ratio(p.norm().item(), d.norm().item(), h["eta"], d.norm().item()) if adapt else 1.0
        gamma = h["lr"] * tvlars.tv_factor(self.t, h["lam"]) * trust
        m_new = p - gamma * d
        p.copy_(m_new + h["momentum"] * (m_new - st.get("m", p.clone())))
        st["m"] = m_new

    def lamb(self, p, g, wd, adapt, st):
        h = self.hp
        b1, b2 = h["betas"]
        t = st["t"] = st.get("t", 0) + 1
        m = st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
        v = st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (v.sqrt() / math.sqrt(1 - b2**t) + h["eps"]) + wd * p
        trust = _ratio(p.norm().item(), u.norm().item(), 1.0, u.norm().item()) if adapt else 1.0
        p -= h["lr"] * trust * u


def _train(model, step, data, device, dtype) -> None:
    for x, y in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.to(device, dtype)), y.to(device)).backward()
        step()


def section_reference(ctx) -> Section:
    s = Section("reference", "every optimizer path on the device against the float64 CPU reference")
    s.header = ("optimizer", "path", "dtype", "error / distance moved", "tolerance", "result")
    steps = 4 if ctx.dry_run else 10
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 10, (16,), generator=gen))
            for _ in range(steps)]
    torch.manual_seed(0)
    start = Net().double()
    paths = list(PATHS)
    for name, cls, kw, ref_hp in OPTIMIZERS:
        ref_model = copy.deepcopy(start)
        ref = Reference(name, tvlars.param_groups(ref_model, WEIGHT_DECAY), ref_hp)
        _train(ref_model, ref.step, data, "cpu", torch.float64)
        expected = [p.detach() for p in ref_model.parameters()]
        moved = math.sqrt(sum((q - p0).square().sum().item() for q, p0 in zip(expected, start.parameters())))
        for path in paths:
            for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 2e-3)):
                model = copy.deepcopy(start).to(ctx.device, dtype)
                opt = cls(tvlars.param_groups(model, WEIGHT_DECAY), **kw, **PATHS[path])
                _train(model, opt.step, data, ctx.device, dtype)
                err = math.sqrt(sum((p.detach().cpu().double() - q).square().sum().item()
                                    for p, q in zip(model.parameters(), expected))) / moved
                ok = err <= tol
                s.row(name, path, str(dtype).replace("torch.", ""), err, tol, "ok" if ok else "MISMATCH", ok=ok)
    if ctx.dry_run:
        s.note = f"on {ctx.device}; torch.compile off in the dry run (compiled paths run eagerly)"
    return s


# ------------------------------------------------------------------------ sync debug mode "error"
@contextlib.contextmanager
def sync_debug_error():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def section_sync_optimizer(ctx) -> Section:
    s = Section("sync-optimizer", 'torch.cuda.set_sync_debug_mode("error") over optimizer steps')
    if ctx.device.type != "cuda":
        return s.skip("needs CUDA (sync debug mode is a CUDA feature; the CPU tests count host reads instead)")
    s.header = ("optimizer", "path", "dtype", "result")
    torch.manual_seed(0)
    for name, cls, kw, _ in OPTIMIZERS:
        for path in PATHS:
            for dtype in (torch.float32, torch.bfloat16) if path in ("default", "foreach") else (torch.float32,):
                model = Net(32).to(ctx.device, dtype)
                opt = cls(tvlars.param_groups(model, WEIGHT_DECAY), **kw, **PATHS[path])
                x = torch.randn(64, 3, 8, 8, device=ctx.device, dtype=dtype)
                y = torch.randint(0, 10, (64,), device=ctx.device)
                try:
                    for i in range(5):
                        model.zero_grad(set_to_none=True)
                        F.cross_entropy(model(x).float(), y).backward()
                        with sync_debug_error() if i >= 2 else contextlib.nullcontext():
                            opt.step()
                    torch.cuda.synchronize()
                    s.row(name, path, str(dtype).replace("torch.", ""), "no synchronisation")
                except RuntimeError as err:
                    s.row(name, path, str(dtype).replace("torch.", ""), _first_line(err), ok=False)
    return s


@contextlib.contextmanager
def sync_debug_over_training_steps():
    """Sync debug mode "error" over every batch a DeviceLoader yields but the run's first
    (lazy initialisation), from the batch's fetch to the end of its step: the training steps
    and the evaluation batches; off between epochs (metrics, checkpoints and summaries are
    read on the host by design)."""
    from tvlars.harness.data.loader import DeviceLoader

    real_iter = DeviceLoader.__iter__
    seen = [0]

    def guarded(self):
        if seen[0]:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in real_iter(self):
                seen[0] += 1
                yield batch
                torch.cuda.set_sync_debug_mode("error")
        finally:
            torch.cuda.set_sync_debug_mode(0)

    DeviceLoader.__iter__ = guarded
    try:
        yield
    finally:
        DeviceLoader.__iter__ = real_iter
        torch.cuda.set_sync_debug_mode(0)


def run_command(module, flags: list) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(flags))


def _synthetic(train: int, size: int = 32, test: int = 512) -> list:
    return ["--dataset", "synthetic", "--synthetic-train", str(train), "--synthetic-test", str(test),
            "--synthetic-image-size", str(size), "--synthetic-channels", "3"]


def section_sync_training(ctx) -> Section:
    s = Section("sync-training", 'torch.cuda.set_sync_debug_mode("error") over harness training steps')
    if ctx.device.type != "cuda":
        return s.skip("needs CUDA (tests/test_gpu_ready.py counts host reads over the same steps on the CPU)")
    from tvlars.harness.ssl import pretrain as ssl
    from tvlars.harness.supervised import train

    s.header = ("command", "flags", "result")
    common = [*_synthetic(2048), "--model", "cnn", "--batch-size", "256", "--micro-batch-size", "128",
              "--no-progress", "--layer-stats-every", "3", "--device", "cuda", "--data-on-device", "yes"]
    runs = [(train, ["--optimizer", "tvlars", "--augment", "--epochs", "2"]),
            (train, ["--optimizer", "lamb", "--augment", "--epochs", "2", "--amp", "bf16", "--channels-last"]),
            (train, ["--optimizer", "lars", "--epochs", "2", "--no-drop-last", "--synthetic-train", "2000"]),
            (ssl, ["--optimizer", "lars", "--epochs", "2", "--projector", "256-256", "--probe-epochs", "1",
                   "--knn-every", "0", "--augment-preset", "reference"])]
    for module, flags in runs:
        command = "ssl" if module is ssl else "train"
        out = Path(tempfile.mkdtemp(dir=ctx.tmp))
        try:
            with sync_debug_over_training_steps():
                status = run_command(module, [*common, *flags, "--out", str(out)])
            s.row(command, " ".join(flags), "no synchronisation" if status == 0 else f"exit {status}", ok=status == 0)
        except RuntimeError as err:
            s.row(command, " ".join(flags), _first_line(err), ok=False)
    return s


# ------------------------------------------------------------------------------- step time
def resnet50_shapes() -> list[tuple]:
    import torchvision

    return [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]


def transformer_shapes(layers: int = 24, width: int = 1024, ff: int = 4096, vocab: int = 30522) -> list[tuple]:
    """BERT-large's parameter shapes (335M parameters)."""
    shapes = [(vocab, width), (512, width), (2, width), (width,), (width,)]
    for _ in range(layers):
        shapes += [(width, width), (width,)] * 4  # q, k, v, attention output
        shapes += [(width,), (width,), (ff, width), (ff,), (width, ff), (width,), (width,), (width,)]
    return shapes + [(width, width), (width,)]


class _Shapes(nn.Module):
    def __init__(self, shapes, device, gen):
        super().__init__()
        self.params = nn.ParameterList(
            nn.Parameter(torch.randn(shape, generator=gen).mul_(0.02).to(device)) for shape in shapes)


def _step_peak_bytes(opt, device) -> int:
    """The most bytes one ``opt.step()`` holds beyond what existed when it began."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from memory import step_peak_bytes  # bench/memory.py: the profiler's memory events

    return step_peak_bytes(opt.step)


def _time_steps(opt, steps: int, device) -> tuple[float, float, int]:
    """(first step s, median step ms after two warm-up steps, the most bytes a step held
    beyond what it began with: over the timed steps on CUDA, over one more step elsewhere)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    opt.step()
    sync()
    first = time.perf_counter() - t0
    opt.step()
    times, peak = [], 0
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            opt.step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
            peak = max(peak, torch.cuda.max_memory_allocated(device) - before)
        else:
            t0 = time.perf_counter()
            opt.step()
            times.append(1000 * (time.perf_counter() - t0))
    if device.type != "cuda":
        peak = _step_peak_bytes(opt, device)
    return first, statistics.median(times), peak


def section_step_time(ctx) -> Section:
    s = Section("step-time", "one optimizer step against torch's fused SGD / AdamW (lower is better)")
    s.header = ("shapes", "optimizer", "path", "median ms", "vs baseline", "peak MB beyond state",
                "x params", "first step s")
    if ctx.dry_run:
        models = {"tiny (dry run)": [(16, 3, 3, 3), (16,), (16,), (32, 16), (32,)]}
    else:
        models = {"ResNet-50": resnet50_shapes(), "BERT-large": transformer_shapes()}
    steps = 3 if ctx.dry_run else 20
    fused_ok = ctx.device.type == "cuda"
    for label, shapes in models.items():
        gen = torch.Generator().manual_seed(0)
        master = _Shapes(shapes, ctx.device, gen)
        grads = [torch.randn(p.shape, generator=gen).mul_(1e-2).to(ctx.device) for p in master.parameters()]
        n = sum(p.numel() for p in master.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in master.parameters())
        makers = [("SGD fused (baseline)", None, lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, fused=fused_ok)),
                  ("AdamW fused (baseline)", None, lambda g: torch.optim.AdamW(g, lr=1e-3, fused=fused_ok)),
                  ("AdamW foreach", None, lambda g: torch.optim.AdamW(g, lr=1e-3, foreach=True))]
        for name, cls, kw, _ in OPTIMIZERS:
            for path, path_kw in PATHS.items():
                makers.append((name, path, lambda g, cls=cls, kw=kw, path_kw=path_kw: cls(g, **kw, **path_kw)))
        base = {}
        for name, path, make in makers:
            model = copy.deepcopy(master)
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            opt = make(tvlars.param_groups(model, 5e-4))
            first, median, peak = _time_steps(opt, steps, ctx.device)
            memory = (peak / 2**20, f"{peak / param_bytes:.2f}")
            if path is None:
                base.setdefault(name.split()[0], median)
                s.row(f"{label} ({len(shapes)} tensors, {n / 1e6:.1f}M)", name, "", median, "", *memory, first)
            else:
                ratio = median / base["AdamW" if name == "LAMB" else "SGD"]
                s.row(f"{label}", name, path, median, f"{ratio:.2f}x", *memory, first)
            del opt, model
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    s.note = (f"{steps} timed steps each, median; float32; {ctx.device}; peak: the most a step held beyond "
              "parameters, gradients and state")
    return s


# ------------------------------------------------------------------------------ throughput
def section_throughput(ctx) -> Section:
    from tvlars.harness.supervised import train

    s = Section("throughput", "`tvlars train`, ResNet-18 on CIFAR-shaped synthetic data (images/s, training only)")
    s.header = ("batch", "flags", "micro-batch", "epochs timed", "images/s", "peak GiB", "result")
    if ctx.dry_run:
        runs = [(64, 256, 2, ["--model", "cnn"], 8)]
        perf = []
    else:
        # enough images for >= 8 steps per epoch at every batch size; epoch 1 compiles
        runs = [(512, 50000, 3, ["--model", "resnet18"], 32), (16384, 131072, 3, ["--model", "resnet18"], 32)]
        perf = ["--amp", "bf16", "--channels-last", "--compile"]
    for batch, n_train, epochs, model, size in runs:
        out = Path(tempfile.mkdtemp(dir=ctx.tmp))
        flags = [*_synthetic(n_train, size, test=1024), *model, "--batch-size", str(batch), "--epochs", str(epochs),
                 "--eval-every", str(epochs), "--optimizer", "lars", "--augment", "--no-progress",
                 "--layer-stats-every", "0", "--device", str(ctx.device), *perf, "--out", str(out)]
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            status = run_command(train, flags)
        except Exception as err:  # noqa: BLE001 -- reported as this row's failure
            s.row(batch, " ".join(perf + model), "", "", "", "", _first_line(err), ok=False)
            continue
        rows = runfolder.read_metrics(out / runfolder.METRICS)
        timed = rows[1:] or rows  # the first epoch compiles
        rate = statistics.median(float(r["images_per_sec"]) for r in timed)
        config = runfolder.read_config(out)
        peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else float("nan")
        s.row(batch, " ".join(perf + model), config.get("micro_batch_size"), len(timed), f"{rate:,.0f}", peak,
              "ok" if status == 0 else f"exit {status}", ok=status == 0)
    s.note = f"{ctx.device}; LARS default path; random crop + flip on the device; median over epochs 2.."
    return s


# -------------------------------------------------------------------------------- torchrun
def has_fsdp_flag() -> bool:
    from tvlars.harness.supervised import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return "--fsdp" in parser.format_help()


def section_torchrun(ctx) -> Section:
    s = Section("torchrun", "1-GPU torchrun smoke runs of `tvlars train`")
    fsdp = has_fsdp_flag()
    if ctx.device.type != "cuda":
        return s.skip("needs CUDA; `tvlars train --fsdp` " + ("exists" if fsdp else "does not exist yet"))
    s.header = ("run", "flags", "result", "seconds")
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    base = [*_synthetic(4096), "--model", "resnet18", "--batch-size", "512", "--epochs", "1", "--device", "cuda",
            "--no-progress", "--layer-stats-every", "4", "--amp", "bf16"]
    runs = [("DDP", ["--sync-bn", "--channels-last"])]
    if fsdp:
        runs.append(("FSDP2", ["--fsdp"]))
    for label, flags in runs:
        out = Path(tempfile.mkdtemp(dir=ctx.tmp))
        t0 = time.perf_counter()
        try:
            done = subprocess.run([*launcher, "--standalone", "--nproc_per_node", "1", "-m", "tvlars", "train", *base,
                                   *flags, "--out", str(out)], capture_output=True, text=True, timeout=240,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            summary = runfolder.read_summary(out)
            ok = done.returncode == 0 and summary.get("status") == "completed"
            tail = (done.stderr.strip().splitlines() or [""])[-1]
            s.row(label, " ".join(flags), "completed" if ok else f"exit {done.returncode}: {tail[:160]}",
                  time.perf_counter() - t0, ok=ok)
        except subprocess.TimeoutExpired:
            s.row(label, " ".join(flags), "timed out after 240 s", time.perf_counter() - t0, ok=False)
    if not fsdp:
        s.note = "FSDP2 skipped: `tvlars train` has no --fsdp flag yet"
    return s


# ------------------------------------------------------------------------------------ main
RUNNERS = {"reference": section_reference, "sync-optimizer": section_sync_optimizer,
           "sync-training": section_sync_training, "step-time": section_step_time,
           "throughput": section_throughput, "torchrun": section_torchrun}


@dataclass
class Context:
    device: torch.device
    dry_run: bool
    tmp: str


def run_sections(names, ctx: Context) -> list[Section]:
    results = []
    for name in names:
        t0 = time.perf_counter()
        say(f"{name} ...")
        try:
            section = RUNNERS[name](ctx)
        except Exception as err:  # noqa: BLE001 -- one failing section never hides the others
            traceback.print_exc(file=sys.stderr)
            section = Section(name, "(did not finish)", status="fail", note=_first_line(err))
        section.seconds = time.perf_counter() - t0
        say(f"{name}: {section.status} ({section.seconds:.1f} s){': ' + section.note if section.note else ''}")
        results.append(section)
    return results


def machine(device: torch.device) -> dict:
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=f"{props.name} ({props.total_memory / 2**30:.0f} GiB)", cuda=torch.version.cuda)
    else:
        info.update(device=f"{device} (dry run, no GPU)", cpus=os.cpu_count())
    return info


@contextlib.contextmanager
def eager_compile():
    """torch.compile returning the function itself: compiling takes minutes on a small CPU,
    so in the dry run what would be compiled (the throughput section's model) runs its Python
    code eagerly."""
    real = torch.compile

    def eager(fn=None, **_options):
        return fn if fn is not None else (lambda f: f)

    torch.compile = eager
    try:
        yield
    finally:
        torch.compile = real


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", metavar="FILE", help="write the Markdown report here (default: stdout)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the CPU-safe parts on tiny shapes; CUDA-only sections are skipped")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.cpu_dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        parser.error("no CUDA device: run with --cpu-dry-run for the CPU-safe parts")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp, \
            eager_compile() if args.cpu_dry_run else contextlib.nullcontext():
        sections = run_sections(names, Context(device, args.cpu_dry_run, tmp))
    context = machine(device)
    context["wall time"] = f"{time.perf_counter() - t0:.0f} s"
    report = render(sections, context)
    if args.out:
        Path(args.out).write_text(report)
        say(f"report written to {args.out}")
    else:
        sys.stdout.write(report)
    return 1 if any(s.status == "fail" for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
