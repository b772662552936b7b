"""The harness as a CUDA run executes it, checked on the CPU (issue 12): no host read and no
blocking host-to-device copy inside a training step; ranks that agree on data placement and
micro-batches; the micro-batch probe's failure handling; layers.csv without a host wait."""

import os
from unittest import mock

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

import tvlars
from tvlars.harness import optimizers as opt_lib
from tvlars.harness import run as run_lib
from tvlars.harness.runtime import Runtime

from helpers import read_csv, run_command, run_gloo

aten = torch.ops.aten

# What waits for the device on CUDA: a read of a value (.item(), float(t), bool(t), a Scalar
# overload given a 0-d tensor), a tensor built from Python data (torch.tensor(..., device=)
# copies it from pageable memory and waits), a shape that depends on values.
HOST_WAITS = {aten._local_scalar_dense.default: "read of a value", aten.lift_fresh.default: "tensor from Python data",
              aten.lift_fresh_copy.default: "tensor from Python data", aten.nonzero.default: "value-dependent shape",
              aten.masked_select.default: "value-dependent shape"}


class HostTraffic(TorchDispatchMode):
    """Records, while ``active``, the operations that make the host wait for a CUDA device:
    the HOST_WAITS above, copies from the CPU to another device without ``non_blocking``, and
    (patched while entered) the Python-level reads .item() .tolist() .cpu() .numpy()."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.events = []
        self._patches = []

    def __enter__(self):
        for name in ("item", "tolist", "cpu", "numpy"):
            real = getattr(torch.Tensor, name)

            def counting(t, *args, _real=real, _name=name, **kwargs):
                if self.active:
                    self.events.append(f"Tensor.{_name}()")
                return _real(t, *args, **kwargs)

            patch = mock.patch.object(torch.Tensor, name, counting)
            patch.start()
            self._patches.append(patch)
        return super().__enter__()

    def __exit__(self, *exc):
        for patch in self._patches:
            patch.stop()
        self._patches.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            if func in HOST_WAITS:
                self.events.append(f"{func}: {HOST_WAITS[func]}")
            elif func is aten._to_copy.default:
                target = kwargs.get("device")
                if args[0].device.type == "cpu" and target is not None and torch.device(target).type != "cpu" \
                        and not kwargs.get("non_blocking", False):
                    self.events.append(f"blocking copy to {target}")
            elif func is aten.copy_.default:
                dst, src = args[0], args[1]
                non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
                if src.device.type == "cpu" and dst.device.type != "cpu" and not non_blocking:
                    self.events.append(f"blocking copy to {dst.device}")
        return func(*args, **kwargs)


@pytest.fixture
def traffic_in_steps(monkeypatch):
    """A HostTraffic active over the training steps of the run: from the first batch's fetch
    to the epoch's last step, except inside optimizer.step() (the optimizers' own test of
    every path CUDA uses is in the optimizer suites; on the CPU their default path reads on
    the host by design). The steps that log are left out by the runs' flags."""
    from tvlars.harness.data.loader import DeviceLoader

    traffic = HostTraffic()
    real_iter = DeviceLoader.__iter__

    def iterate(self):
        traffic.active = True
        try:
            yield from real_iter(self)
        finally:
            traffic.active = False

    monkeypatch.setattr(DeviceLoader, "__iter__", iterate)
    saved = []

    def pause(*_):
        saved.append(traffic.active)
        traffic.active = False

    def resume(*_):
        traffic.active = saved.pop()

    pre = register_optimizer_step_pre_hook(pause)
    post = register_optimizer_step_post_hook(resume)
    try:
        with traffic:
            yield traffic
    finally:
        pre.remove()
        post.remove()


def test_train_steps_make_no_host_reads(tmp_path, traffic_in_steps):
    from tvlars.harness.supervised import train

    flags = ["--dataset", "synthetic", "--synthetic-train", "96", "--synthetic-test", "32", "--synthetic-image-size",
             "8", "--model", "cnn", "--batch-size", "32", "--micro-batch-size", "16", "--epochs", "2", "--augment",
             "--data-on-device", "yes", "--no-progress", "--layer-stats-every", "0", "--optimizer", "lamb"]
    assert run_command(train, tmp_path / "run", *flags) == 0
    assert traffic_in_steps.events == []
    assert len(read_csv(tmp_path / "run" / "metrics.csv")) == 2


def test_ssl_steps_make_no_host_reads(tmp_path, traffic_in_steps, monkeypatch):
    from tvlars.harness.ssl import pretrain as ssl
    from tvlars.harness.ssl.augment import OneViewAugment

    real_init = OneViewAugment.__init__

    def sync_free_init(self, *args, **kwargs):  # the selection by masks that CUDA uses
        real_init(self, *args, **kwargs)
        self.sync_free = True

    monkeypatch.setattr(OneViewAugment, "__init__", sync_free_init)
    flags = ["--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test", "32", "--synthetic-image-size",
             "16", "--model", "cnn", "--projector", "16-16", "--batch-size", "32", "--micro-batch-size", "16",
             "--epochs", "1", "--probe-epochs", "1", "--data-on-device", "yes", "--no-progress",
             "--layer-stats-every", "0", "--augment-preset", "reference", "--optimizer", "lars"]
    assert run_command(ssl, tmp_path / "run", *flags) == 0
    assert traffic_in_steps.events == []


def test_the_counter_sees_what_it_should():
    """The test above cannot pass by counting nothing."""
    traffic = HostTraffic()
    with traffic:
        traffic.active = True
        t = torch.ones(3)
        t.sum().item()
        torch.tensor([1.0, 2.0])
        t.tolist()
        t.to("meta")
        t.to("meta", non_blocking=True)  # not a wait
        torch.empty(3, device="meta").copy_(t)
        (t > 0).nonzero()
        traffic.active = False
        t.sum().item()  # inactive: not counted
    assert [e.split(":")[0] for e in traffic.events] == [
        "Tensor.item()", "aten._local_scalar_dense.default", "aten.lift_fresh.default", "Tensor.tolist()",
        "blocking copy to meta", "blocking copy to meta", "aten.nonzero.default"], traffic.events


# ---- copies to the device ----------------------------------------------------------------
def test_to_device_copies_without_waiting():
    from tvlars.harness.data.transfer import to_device

    tensors = [torch.randn(5, 3, dtype=torch.float64), torch.tensor(True), torch.arange(7), torch.rand(0),
               torch.rand(4) < 0.5, torch.randn(3, dtype=torch.bfloat16), torch.randn(2, 2).t()]
    traffic = HostTraffic()
    with traffic:
        traffic.active = True
        moved = to_device(tensors, "meta")
        traffic.active = False
    assert traffic.events == []
    for t, m in zip(tensors, moved):
        assert m.device.type == "meta" and m.dtype == t.dtype and m.shape == t.shape
    assert to_device(tensors, "cpu") == tensors  # already there: the same tensors


def test_to_device_round_trip_through_the_staging_buffer(monkeypatch):
    """The packing itself (views of one byte buffer) gives back every tensor bit for bit."""
    from tvlars.harness.data import transfer

    tensors = [torch.randn(5, 3, dtype=torch.float64), torch.tensor(True), torch.arange(7), torch.rand(0),
               torch.rand(4) < 0.5, torch.randn(3, dtype=torch.bfloat16), torch.randn(2, 2).t(), torch.tensor(3.5)]
    real_to = torch.Tensor.to

    def fake_device_copy(self, *args, **kwargs):  # the staging buffer "moves" to another CPU tensor
        if args and args[0] == torch.device("meta"):
            return self.clone()
        return real_to(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "to", fake_device_copy):
        back = transfer.to_device(tensors, "meta")
    for t, b in zip(tensors, back):
        assert b.dtype == t.dtype and torch.equal(t, b)


def test_loader_and_augmentation_copy_without_waiting():
    """A DeviceLoader on another device (meta) with the crop+flip augmentation, and the SSL
    views' parameters: every copy of the steps is non-blocking."""
    from tvlars.harness.data.augment import RandomCropFlip
    from tvlars.harness.data.loader import DeviceLoader
    from tvlars.harness.ssl.augment import OneViewAugment, reference_views

    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(40) % 10, batch_size=16, mean=(0.5,) * 3, std=(0.25,) * 3,
                          device="meta", shuffle=True, drop_last=False, augment=RandomCropFlip(2))
    view = OneViewAugment(8, 3, (0.5,) * 3, (0.25,) * 3, reference_views(8)[0])
    traffic = HostTraffic()
    with traffic:
        traffic.active = True
        batches = list(loader)
        params = OneViewAugment.slice_params(view.draw(16, torch.Generator().manual_seed(0)), 0, 8, "meta")
        traffic.active = False
    assert traffic.events == []
    assert [len(y) for _, y in batches] == [16, 16, 8]
    assert all(t.device.type == "meta" for t in params.values())


def test_ssl_mean_and_std_are_built_once_per_device_and_dtype():
    from tvlars.harness.ssl.augment import TwoViewAugment

    aug = TwoViewAugment(16, 3, (0.5,) * 3, (0.25,) * 3, input_range="normalized")
    x = torch.rand(4, 3, 16, 16)
    aug(x, torch.Generator().manual_seed(0))
    traffic = HostTraffic()
    with traffic:
        traffic.active = True
        aug.view1.sync_free = aug.view2.sync_free = True
        aug(x, torch.Generator().manual_seed(1))
        traffic.active = False
    assert traffic.events == []


# ---- layers.csv ----------------------------------------------------------------------------
class _Rows:
    def __init__(self):
        self.rows = []

    def log_layers(self, rows):
        self.rows += rows


@pytest.mark.parametrize("path", [dict(), dict(foreach=True), dict(foreach=False)],
                         ids=["default", "foreach", "single"])
@pytest.mark.parametrize("cls", [tvlars.LARS, tvlars.LAMB, tvlars.TVLARS])
def test_layer_stats_log_writes_what_last_stats_reads(cls, path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = cls(tvlars.param_groups(model, 1e-3), stats=True, **path)
    model(torch.randn(16, 4)).square().sum().backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    log = _Rows()
    stats_log = opt_lib.LayerStatsLog(log, names)
    stats_log.capture(opt, step=7, epoch=2)
    stats_log.flush(wait=True)
    st = opt.last_stats()
    assert [r["layer"] for r in log.rows] == [names[id(p)] for p in st.params]
    for r, w, g, t, s in zip(log.rows, st.weight_norm.tolist(), st.grad_norm.tolist(), st.trust_ratio.tolist(),
                             st.step_size.tolist()):
        assert (r["step"], r["epoch"]) == (7, 2)
        assert (r["weight_norm"], r["grad_norm"], r["trust_ratio"], r["step_size"]) == (w, g, t, s)


def test_layer_stats_log_for_torch_optimizers():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    model(torch.randn(5, 3)).sum().backward()
    log = _Rows()
    stats_log = opt_lib.LayerStatsLog(log, {id(model.weight): "weight", id(model.bias): "bias"})
    stats_log.capture(opt, step=1, epoch=1)
    stats_log.flush()
    assert [r["layer"] for r in log.rows] == ["weight", "bias"]
    assert log.rows[0]["weight_norm"] == pytest.approx(model.weight.norm().item())
    assert log.rows[1]["grad_norm"] == pytest.approx(model.bias.grad.norm().item())
    assert all(r["step_size"] == 0.25 and r["trust_ratio"] is None for r in log.rows)


def test_layer_stats_rows_wait_for_their_copy_in_step_order():
    """A step whose copy has not arrived holds back itself and every later step."""
    log = _Rows()
    stats_log = opt_lib.LayerStatsLog(log, {})

    class Event:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    table = torch.ones(2, 1, dtype=torch.float64)
    host = {"trust_ratio": [None], "step_size": [None]}
    stats_log._pending = [(1, 1, ["a"], table, Event(False), host), (2, 1, ["a"], table, None, host)]
    stats_log.flush()
    assert log.rows == []
    stats_log.flush(wait=True)
    assert [r["step"] for r in log.rows] == [1, 2]


# ---- micro-batches and the probe -------------------------------------------------------------
def test_every_rank_gets_the_same_number_of_micro_batches():
    # a short last batch of 67 rows over 2 ranks: 34 and 33 rows; micro-batches of 33
    for rows in (34, 33):
        x, y = torch.zeros(rows, 2), torch.zeros(rows)
        chunks = run_lib.micro_batches(x, y, 33, most_rows=34)
        assert len(chunks) == 2 and sum(len(c[1]) for c in chunks) == rows
    assert [len(c[1]) for c in run_lib.micro_batches(torch.zeros(0, 2), torch.zeros(0), 8, most_rows=1)] == [0]


@pytest.mark.parametrize("message,is_oom", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
    ("CUDA error: out of memory", True),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
    ("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x2)", False),
])
def test_allocation_failures_are_recognised(message, is_oom):
    assert run_lib.is_allocation_failure(RuntimeError(message)) is is_oom
    assert run_lib.is_allocation_failure(torch.cuda.OutOfMemoryError("anything"))
    assert not run_lib.is_allocation_failure(ValueError("out of memory"))


class _FitsUpTo(nn.Module):
    """A model whose step 'runs out of memory' above ``limit`` rows, with the given error."""

    def __init__(self, limit, error):
        super().__init__()
        self.limit, self.error = limit, error
        self.net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
        self.rows_tried = []

    def forward(self, x):
        self.rows_tried.append(len(x))
        if len(x) > self.limit:
            raise self.error
        return self.net(x)


CPU = Runtime(0, 1, 0, torch.device("cpu"), False)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasSgemm"),
                                   RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")])
def test_probe_halves_on_any_allocation_failure(error):
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_FitsUpTo(24, error))  # SyncBN cannot run on the CPU
    made = []

    def make_optimizer(m):
        made.append(tvlars.LARS(tvlars.param_groups(m, 1e-4), lr=1.0, foreach=True))
        return made[-1]

    cpu_state = torch.get_rng_state()
    micro = run_lib.probe_micro_batch(model, CPU, input_shape=(1, 6, 6), per_rank=100, make_optimizer=make_optimizer)
    assert micro == 12  # 100 -> 50 -> 25 -> 12
    assert torch.equal(torch.get_rng_state(), cpu_state)  # the probe did not move the RNG
    assert len(made) == 1 and len(made[0].state) > 0  # an optimizer state existed during the probe
    assert isinstance(model.net[1], nn.SyncBatchNorm) and model.rows_tried == []  # the real model untouched


def test_probe_reraises_other_errors_and_gives_up_at_one_row():
    with pytest.raises(RuntimeError, match="shapes"):
        run_lib.probe_micro_batch(_FitsUpTo(0, RuntimeError("shapes cannot be multiplied")), CPU,
                                  input_shape=(1, 6, 6), per_rank=8)
    from tvlars.errors import UserError

    with pytest.raises(UserError, match="one image"):
        run_lib.probe_micro_batch(_FitsUpTo(0, torch.cuda.OutOfMemoryError("oom")), CPU,
                                  input_shape=(1, 6, 6), per_rank=8)


def test_plain_batch_norm_keeps_parameters_and_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4))
    net[1].running_mean.uniform_()
    net[4].weight.requires_grad_(False)
    expected = net(torch.randn(5, 2, 4, 4))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    plain = run_lib.plain_batch_norm(synced)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    assert not plain[4].weight.requires_grad
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4))
    ref.load_state_dict(plain.state_dict())
    x = torch.randn(5, 2, 4, 4)
    torch.testing.assert_close(plain(x), ref(x))
    assert expected.shape == (5, 4)


def test_one_process_torchrun_is_distributed(monkeypatch):
    import socket

    from tvlars.harness.runtime import setup_runtime

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(TORCHELASTIC_RUN_ID="test", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    rt = setup_runtime("cpu")
    try:
        assert rt.distributed and rt.world_size == 1 and torch.distributed.get_world_size() == 1
    finally:
        rt.shutdown()


# ---- two ranks (gloo) ------------------------------------------------------------------------
def _agreement_worker(rank, world):
    import argparse
    from types import SimpleNamespace

    from tvlars.harness.data import loader

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    rt = Runtime(rank, world, rank, torch.device("cpu"), True)
    args = argparse.Namespace(data_on_device="auto", micro_batch_size="auto", amp="none", channels_last=False)
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with mock.patch.object(loader, "fits_on_device", lambda size, device: rank == 0):
        placed = run_lib.data_on_device(args, rt, images)
    # the CUDA branch of the automatic micro-batch size, with each rank's probe answering differently
    cuda_rt = SimpleNamespace(device=SimpleNamespace(type="cuda"), all_reduce_min_int=rt.all_reduce_min_int)
    data = SimpleNamespace(in_channels=1, image_size=2)
    with mock.patch.object(run_lib, "probe_micro_batch", lambda *a, **k: 64 if rank == 0 else 16):
        micro = run_lib.micro_batch_size(args, None, data, cuda_rt, 128)

    # the real training loop on a short last batch: count each rank's training forwards
    from tvlars.harness import runtime as runtime_mod
    from tvlars.harness.supervised import train

    forwards = []
    real_build = run_lib.build_classifier

    def counted(*a, **k):
        model = real_build(*a, **k)
        model.register_forward_pre_hook(lambda m, inp: forwards.append(len(inp[0])) if m.training else None)
        return model

    out = os.environ["TVLARS_TEST_OUT"]
    with mock.patch.object(run_lib, "build_classifier", counted), \
            mock.patch.object(runtime_mod.Runtime, "shutdown", lambda self: None):
        parser = argparse.ArgumentParser()
        train.add_arguments(parser)
        status = train.run(parser.parse_args(
            ["--out", out, "--dataset", "digits", "--model", "mlp", "--optimizer", "sgd", "--batch-size", "128",
             "--epochs", "1", "--no-drop-last", "--micro-batch-size", "33", "--no-progress", "--device", "cpu"]))
    return dict(placed=placed, micro=micro, forwards=forwards, status=status)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_ranks_agree_on_placement_micro_batch_and_micro_batch_count(tmp_path, monkeypatch):
    monkeypatch.setenv("TVLARS_TEST_OUT", str(tmp_path / "run"))
    ranks = run_gloo(2, _agreement_worker, tmp_path)
    assert [r["placed"] for r in ranks] == [False, False]  # only rank 0 had room: neither keeps it
    assert [r["micro"] for r in ranks] == [16, 16]
    assert [r["status"] for r in ranks] == [0, 0]
    # 1347 = 10 x 128 + 67: ten steps of 2 x 33 + 31 rows... and the last of 34 / 33 rows
    a, b = (r["forwards"] for r in ranks)
    assert len(a) == len(b) == 11 * 2
    assert a[-2:] == [33, 1] and b[-2:] == [33, 0]
