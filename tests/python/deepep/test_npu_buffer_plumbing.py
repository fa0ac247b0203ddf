"""PLUMBING tests of the Buffer's NPU path, on CPU. They are NOT NPU correctness tests (marker `plumbing`).

No NPU, CANN or torch_npu exists on the development machines. What these tests can show:

* backend choice: a 'gloo' group takes the CPU path, an 'hccl' group the NPU path, and
  `import deep_ep` never needs torch_npu;
* normal mode on NPU: the Buffer's device path runs on CPU ranks under `StrictDevice`, which
  emulates an accelerator (tensors made on the Buffer's device are tagged; an op that mixes device
  and host tensors, a native kernel or `.numpy()` on a device tensor, rows exchanged from the host
  or metadata exchanged from the device all raise). Its results are compared with the native CPU
  path's: same layout and rows, combine within float tolerance;
* the same device path with DEEP_EP_FORCE_TORCH_OPS=1 (plain CPU tensors) against the native path;
* low-latency mode and fused_deep_moe on NPU through the Buffer, with the recording stand-in for
  torch_npu of npu_stand_in.py (documented signatures and rules; an unknown NPU with one rank
  here), also under StrictDevice;
* the SoC record of build.sh and the HCCL_BUFFSIZE helper.

Whether HCCL and the MC2 operators behave as documented is what they cannot show (docs/npu.md
lists it); the device-parametrized tests of test_intranode.py / test_low_latency.py and
npu_smoke.py do that on an NPU host.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import types
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import make_inputs, reference_of, to_host  # noqa: E402
from fused_cases import scale_bits  # noqa: E402
from npu_stand_in import FakeTorchNpu  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep import npu, npu_env  # noqa: E402
from deep_ep.npu import (
    backend,  # noqa: E402
    versions,  # noqa: E402
)
from deep_ep.npu import operators as npu_ops  # noqa: E402
from deep_ep.reference import reference_combine  # noqa: E402
from deep_ep.testing import spawn_ranks  # noqa: E402
from deep_ep.transport import groups  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.plumbing
DEVICE = torch.device("meta")  # stands for the NPU under StrictDevice


# --------------------------------------------------------------------------- accelerator emulation
class DeviceMisuse(AssertionError):
    pass


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _on_device(t: torch.Tensor) -> bool:
    return getattr(t, "_strict_device", False)


def _tag(obj):
    for t in _tensors(obj):
        t._strict_device = True
    return obj


def _is_device(value) -> bool:
    return (isinstance(value, torch.device) and value.type == "meta") or value == "meta"


def _is_host(value) -> bool:
    return (isinstance(value, torch.device) and value.type == "cpu") or value == "cpu"


class StrictDevice(TorchFunctionMode):
    """Emulates an accelerator on CPU for the code under test.

    Tensors made with device=DEVICE (torch.empty(..., device=DEVICE), x.to(DEVICE)) are CPU tensors
    tagged as device tensors; results of ops on device tensors are device tensors; `.cpu()` /
    `.to("cpu")` make host copies; `t.device` of a device tensor is DEVICE. Mixing device tensors
    with host tensors of one or more dimensions in one op raises DeviceMisuse, as do `.numpy()` and
    `.data_ptr()` (native kernels) on device tensors. Host syncs (.item(), bool(), .tolist()) are
    allowed and counted.
    """

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name == "__get__" and getattr(func, "__self__", None) is torch._C.TensorBase.device:
            return DEVICE if _on_device(args[0]) else func(*args, **kwargs)
        tensors = list(_tensors(args)) + list(_tensors(kwargs))
        device_in = [t for t in tensors if _on_device(t)]
        host_in = [t for t in tensors if not _on_device(t) and t.dim() > 0]
        if name in ("numpy", "data_ptr") and device_in:
            raise DeviceMisuse(f"{name}() of a device tensor (a native kernel or numpy on NPU data)")
        if name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__") and device_in:
            self.syncs += 1
        if name in ("cpu", "to"):
            target = kwargs.get(
                "device",
                args[1]
                if len(args) > 1 and not isinstance(args[1], torch.dtype) and not isinstance(args[1], torch.Tensor)
                else None,
            )
            if name == "cpu" or _is_host(target):
                rest = {k: v for k, v in kwargs.items() if k != "device"}
                result = args[0].clone() if _on_device(args[0]) else args[0]
                return result.to(**rest) if rest else result
            if _is_device(target):
                rest = {k: v for k, v in kwargs.items() if k != "device"}
                positional = [a for a in args[1:] if not _is_device(a)]
                result = func(args[0], *positional, **rest) if positional or rest else args[0]
                if result is args[0] and not _on_device(result):
                    result = result.clone()
                return _tag(result)
        if device_in and host_in:
            raise DeviceMisuse(
                f"{name} mixes device tensors {[tuple(t.shape) for t in device_in]} with host "
                f"tensors {[tuple(t.shape) for t in host_in]}"
            )
        if _is_device(kwargs.get("device")):
            return _tag(func(*args, **{k: v for k, v in kwargs.items() if k != "device"}))
        result = func(*args, **kwargs)
        if device_in and name not in ("__setitem__",):
            _tag(result)
        return result


@contextmanager
def strict_collectives(data_group):
    """Rows (all_to_all_single on the data group) must be device tensors, metadata (all_gather on
    the Buffer's gloo group) host tensors, as HCCL and gloo need."""
    real_a2a, real_all_gather = dist.all_to_all_single, dist.all_gather
    calls = {"all_to_all_single": 0, "all_gather": 0}

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        if not (_on_device(output) and _on_device(input)):
            raise DeviceMisuse("all_to_all_single of host tensors: HCCL exchanges device tensors")
        if group is not data_group:
            raise DeviceMisuse("token rows must travel on the caller's (HCCL) group")
        if not (output.is_contiguous() and input.is_contiguous()):
            raise DeviceMisuse("all_to_all_single needs contiguous tensors")
        if not all(isinstance(n, int) for n in list(output_split_sizes) + list(input_split_sizes)):
            raise DeviceMisuse("split sizes must be host ints")
        calls["all_to_all_single"] += 1
        return real_a2a(output, input, output_split_sizes, input_split_sizes, group=group, **kw)

    def all_gather(tensor_list, tensor, group=None, **kw):
        if any(_on_device(t) for t in list(tensor_list) + [tensor]):
            raise DeviceMisuse("metadata must stay on the host (gloo group)")
        calls["all_gather"] += 1
        return real_all_gather(tensor_list, tensor, group=group, **kw)

    dist.all_to_all_single, dist.all_gather = all_to_all_single, all_gather
    try:
        yield calls
    finally:
        dist.all_to_all_single, dist.all_gather = real_a2a, real_all_gather


def test_plumbing_strict_device_emulation_catches_mixing():
    with StrictDevice():
        d = torch.arange(6).to(DEVICE)
        h = torch.arange(6)
        assert d.device == DEVICE and h.device.type == "cpu"
        assert (d + 1).device == DEVICE and torch.empty(3, device=DEVICE).device == DEVICE
        assert d.cpu().device.type == "cpu" and torch.equal(d.cpu(), h)
        with pytest.raises(DeviceMisuse, match="mixes"):
            d.index_select(0, h[:2])
        with pytest.raises(DeviceMisuse, match="mixes"):
            h[h > 2] = d[:3]
        with pytest.raises(DeviceMisuse, match="numpy"):
            d.numpy()
        d.index_select(0, h[:2].to(d.device))
        d + torch.tensor(1)  # host scalars are fine


# --------------------------------------------------------------------------- NPU stand-in inside a rank
def install_npu_stand_in(monkeypatch_like, device_name="Ascend910_9391", device=DEVICE) -> FakeTorchNpu:
    """A fake torch_npu / torch.npu, 'hccl' as the WORLD group's backend, the fake HCCL comm names for
    the MC2 group, and `device` as the NPU."""
    fake = FakeTorchNpu(device_name=device_name)
    fake.torch_npu_namespace.current_device = lambda: 0
    real_get_backend, real_group_over = dist.get_backend, groups.group_over
    monkeypatch_like(sys.modules, "torch_npu", fake.module, item=True)
    monkeypatch_like(torch, "npu", fake.torch_npu_namespace)
    monkeypatch_like(
        dist, "get_backend", lambda group=None: "hccl" if group in (None, dist.group.WORLD) else real_get_backend(group)
    )
    monkeypatch_like(
        groups,
        "group_over",
        lambda group, backend, timeout=None: (
            fake.new_group(dist.get_process_group_ranks(group), backend)
            if backend == "hccl"
            else real_group_over(group, backend, timeout)
        ),
    )
    monkeypatch_like(npu, "current_device", lambda: device)
    monkeypatch_like(npu_ops, "_npu_device", lambda: torch.device("cpu"))
    if device == DEVICE:
        for name in dir(fake.module):
            if name.startswith("npu_"):
                setattr(fake.module, name, _device_op(getattr(fake.module, name)))
    return fake


def _device_op(op):
    """An NPU operator under StrictDevice: every tensor argument must be a device tensor; the stand-in's
    host-side simulation runs outside the emulation and its outputs are device tensors."""

    def wrapped(*args, **kwargs):
        host = [tuple(t.shape) for t in _tensors((args, kwargs)) if not _on_device(t)]
        if host:
            raise DeviceMisuse(f"{op.__name__} got host tensors of shapes {host}")
        with torch._C.DisableTorchFunction():
            return _tag(op(*args, **kwargs))

    wrapped.__name__ = op.__name__
    return wrapped


class Patcher:
    """A tiny monkeypatch for spawned ranks (pytest's fixture does not cross processes)."""

    def __init__(self):
        self.undo = []

    def __call__(self, target, name, value, item=False):
        if item:
            old = target.get(name, Patcher)
            target[name] = value
            self.undo.append(lambda: target.pop(name) if old is Patcher else target.__setitem__(name, old))
        else:
            old = getattr(target, name, Patcher)
            setattr(target, name, value)
            self.undo.append(lambda: delattr(target, name) if old is Patcher else setattr(target, name, old))

    def restore(self):
        for undo in reversed(self.undo):
            undo()


# --------------------------------------------------------------------------- backend choice
def test_plumbing_import_without_torch_npu():
    for module in (
        "deep_ep/npu/__init__.py",
        "deep_ep/npu/backend.py",
        "deep_ep/npu/env.py",
        "deep_ep/npu/operators.py",
        "deep_ep/npu/versions.py",
        "deep_ep/npu_env.py",
        "deep_ep/buffer.py",
    ):
        tree = ast.parse((REPO_ROOT / module).read_text())
        imported = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
        imported += [node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)]
        assert not any(name.split(".")[0] == "torch_npu" for name in imported), module
    code = (
        "import sys; sys.modules['torch_npu'] = None\n"
        "import deep_ep, deep_ep.npu, deep_ep.npu.env, deep_ep.npu_env\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def backend_choice(rank: int, num_ranks: int, group) -> None:
    buffer = deep_ep.Buffer(group)  # gloo: the CPU path
    assert not buffer.runtime.on_npu and buffer.runtime.device == torch.device("cpu") and not buffer.runtime.device_path
    assert buffer.runtime.shm is not None and buffer.normal_strategy == "default"
    buffer.destroy()
    patch = Patcher()
    try:
        patch(sys.modules, "torch_npu", None, item=True)  # `import torch_npu` fails
        patch(dist, "get_backend", lambda group=None: "hccl")
        with pytest.raises(RuntimeError, match="needs torch_npu and CANN"):
            deep_ep.Buffer(group)
        patch(dist, "get_backend", lambda group=None: "nccl")
        with pytest.raises(ValueError, match="'gloo' for CPU ranks or 'hccl' for Ascend NPUs, got 'nccl'"):
            deep_ep.Buffer(group)
    finally:
        patch.restore()
    patch = Patcher()
    try:
        fake = install_npu_stand_in(patch)
        buffer = deep_ep.Buffer(group)  # hccl: the NPU path
        assert buffer.runtime.on_npu and buffer.runtime.device == DEVICE and buffer.runtime.device_path
        assert buffer.runtime.shm is None and buffer.normal_strategy == "default" and buffer.runtime.data_comm is group
        assert (
            buffer.runtime.low_latency.npu_ll is None and fake.new_group_calls == []
        )  # no MC2 group without low_latency_mode
        buffer.destroy()
        buffer = deep_ep.Buffer(group, low_latency_mode=True, normal_strategy="alltoall")
        assert buffer.low_latency_strategy == "ops" and buffer.runtime.low_latency.npu_ll is not None
        assert fake.new_group_calls == [dict(ranks=list(range(num_ranks)), backend="hccl")]
        assert buffer.runtime.low_latency.npu_ll.comm_name == f"fake_hccl_comm_{rank}"
        buffer.destroy()
        with pytest.raises(ValueError, match="not available on NPU"):
            deep_ep.Buffer(group, low_latency_mode=True, low_latency_strategy="alltoall")
        # Without low_latency_mode the alltoall low-latency strategy is only built, as upstream does.
        buffer = deep_ep.Buffer(group, normal_strategy="alltoall", low_latency_strategy="alltoall")
        assert (buffer.normal_strategy, buffer.low_latency_strategy) == ("alltoall", "alltoall")
        with pytest.raises(RuntimeError, match="low_latency_mode=True"):
            buffer.low_latency_dispatch(torch.zeros(2, 8, device=DEVICE), torch.zeros(2, 1, dtype=torch.int64), 2, 2)
        buffer.destroy()
        os.environ["DEEP_USE_MODE"] = "alltoall"
        buffer = deep_ep.Buffer(group)
        assert (buffer.normal_strategy, buffer.low_latency_strategy) == ("alltoall", "alltoall")
        buffer.destroy()
        os.environ["DEEP_USE_MODE"] = "ops"
        buffer = deep_ep.Buffer(group, low_latency_mode=True)
        assert (buffer.normal_strategy, buffer.low_latency_strategy) == ("default", "ops")
        buffer.destroy()
    finally:
        os.environ.pop("DEEP_USE_MODE", None)
        patch.restore()
    with pytest.raises(ValueError, match="needs torch_npu"):  # and 'ops' stays an error on CPU
        deep_ep.Buffer(group, low_latency_mode=True, low_latency_strategy="ops")


def test_plumbing_backend_choice() -> None:
    spawn_ranks(backend_choice, 2)


# --------------------------------------------------------------------------- normal mode on the device path
NORMAL_CASES = [
    dict(quant="bf16", dtype=torch.bfloat16),
    dict(quant="int8", dtype=torch.bfloat16),
    dict(quant="bf16", dtype=torch.float16, alignment=4, worst=300),
    dict(quant="bf16", dtype=torch.float32, hidden=40),
]


def _run_normal(buffer, inputs, case, move, back):
    """dispatch + combine (recorded and explicit weights, bias) + cached dispatch; host results."""
    x, idx, weights = move(inputs.x), move(inputs.topk_idx), move(inputs.topk_weights)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, case["experts"])
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx,
        topk_weights=weights,
        expert_alignment=case.get("alignment", 1),
        num_worst_tokens=case.get("worst", 0),
        quant_mode=case["quant"],
    )
    rows = (recv_x[0] if isinstance(recv_x, tuple) else recv_x).shape[0]
    values = recv_x[0].float() * recv_x[1].unsqueeze(1) if isinstance(recv_x, tuple) else recv_x.float()
    y = (values * 1.5).to(case["dtype"])
    combined = buffer.combine(y, handle)[0]
    w2 = move(torch.rand(inputs.topk_weights.shape, generator=torch.Generator().manual_seed(5)))
    bias = move(torch.full((inputs.x.shape[0], inputs.x.shape[1]), 0.25, dtype=case["dtype"]))
    combined2 = buffer.combine(y, handle, topk_weights=w2, bias=bias)[0]
    cached = buffer.dispatch((x.float() * 2).to(case["dtype"]), handle=handle)[0] if case["quant"] == "bf16" else None
    out = dict(
        recv_x=recv_x,
        recv_idx=recv_idx,
        recv_w=recv_w,
        combined=combined,
        combined2=combined2,
        cached=cached,
        layout=(per_rank, per_expert, in_rank),
        handle=handle[:8],
    )
    out = {k: back(v) for k, v in out.items()}
    out.update(counts=counts, rows=rows)
    return out


def _compare(native, device, case):
    assert device["counts"] == native["counts"] and device["rows"] == native["rows"]
    for key in ("recv_x", "recv_idx", "recv_w", "cached", "layout", "handle"):
        a, b = native[key], device[key]
        flat_a, flat_b = list(_tensors(a)), list(_tensors(b))
        assert len(flat_a) == len(flat_b), key
        for i, (ta, tb) in enumerate(zip(flat_a, flat_b)):
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, (key, i)
            assert torch.equal(ta, tb), (key, i)  # same layout, same rows, bit for bit
    tolerance = 1e-5 if case["dtype"] == torch.float32 else 1e-2
    for key in ("combined", "combined2"):  # float32 sums on the device path: within float tolerance
        assert native[key].dtype == device[key].dtype and native[key].shape == device[key].shape
        torch.testing.assert_close(device[key].double(), native[key].double(), rtol=tolerance, atol=tolerance)


def normal_mode_device_path(rank: int, num_ranks: int, group, strict: bool) -> None:
    tokens = [37, 0, 20][rank % 3]
    for seed, case in enumerate(NORMAL_CASES):
        case = dict(case, experts=4 * num_ranks, hidden=case.get("hidden", 64))
        inputs = make_inputs(rank, tokens, case["hidden"], case["experts"], 3, num_ranks, case["dtype"], seed=seed)
        native_buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
        native = _run_normal(native_buffer, inputs, case, lambda t: t, lambda t: t)
        native_buffer.destroy()
        patch = Patcher()
        try:
            if strict:
                install_npu_stand_in(patch)
            else:
                os.environ["DEEP_EP_FORCE_TORCH_OPS"] = "1"
            buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
            assert buffer.runtime.device_path and buffer.runtime.shm is None and buffer.normal_strategy == "default"
            if strict:
                mode = StrictDevice()
                with strict_collectives(buffer.runtime.data_comm) as calls, mode:
                    device = _run_normal(buffer, inputs, case, lambda t: t.to(DEVICE), to_host)
                # the rows went over all_to_all_single (dispatch, combine x2, cached), metadata over gloo
                assert calls["all_to_all_single"] == (4 if case["quant"] == "bf16" else 3)
                with StrictDevice(), pytest.raises(ValueError, match="must be on the Buffer's device meta"):
                    buffer.get_dispatch_layout(inputs.topk_idx.to(DEVICE), case["experts"])
                    buffer.dispatch(
                        inputs.x,
                        num_tokens_per_expert=torch.zeros(case["experts"], dtype=torch.int32),
                        topk_idx=inputs.topk_idx.to(DEVICE),
                        topk_weights=inputs.topk_weights,
                    )
            else:
                device = _run_normal(buffer, inputs, case, lambda t: t, lambda t: t)
            buffer.destroy()
        finally:
            os.environ.pop("DEEP_EP_FORCE_TORCH_OPS", None)
            patch.restore()
        try:
            _compare(native, device, case)
            # and the native path against the independent reference, for good measure
            if case["quant"] == "bf16" and not case.get("worst"):
                from common import gather_objects

                everyone = gather_objects(inputs, group)
                ref = reference_of(everyone, case["experts"], rank)
                assert torch.equal(device["recv_x"][: ref["x"].shape[0]], ref["x"])
                selection = (inputs.x.float().unsqueeze(1).expand(-1, 3, -1) * 1.5).to(case["dtype"])
                expected = reference_combine(selection, inputs.topk_idx, inputs.topk_weights)
                torch.testing.assert_close(device["combined"].double(), expected, rtol=1e-2, atol=1e-2)
        except AssertionError as error:
            raise AssertionError(f"rank {rank}, case {case}: {error}") from error


@pytest.mark.parametrize("strict", [True, False], ids=["strict-device-emulation", "forced-torch-ops"])
def test_plumbing_normal_mode_device_path(strict: bool) -> None:
    """The NPU path's normal mode (collective transport, host routing, torch ops) run on CPU ranks,
    against the native CPU path: same layout and rows, combine within float tolerance."""
    spawn_ranks(normal_mode_device_path, 3, strict)


# --------------------------------------------------------------------------- low-latency mode and fused_deep_moe
def _reference_rows(x, idx, num_local):
    rows = [x[t] for e in range(num_local) for t in range(idx.shape[0]) if (idx[t] == e).any()]
    counts = torch.tensor([int((idx == e).sum()) for e in range(num_local)], dtype=torch.int64)
    return (torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])), counts


def low_latency_on_npu(rank: int, num_ranks: int, group) -> None:
    patch = Patcher()
    try:
        # an unknown SoC: the stand-in simulates one rank, below the A2/A3 minimum of 2 (checked below)
        fake = install_npu_stand_in(patch, device_name="FakeNPU")
        buffer = deep_ep.Buffer(group, low_latency_mode=True)
        nmax, hidden, num_experts, num_topk = 8, 32, 4, 2
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5, hidden, generator=gen).to(torch.bfloat16)
        idx = torch.tensor([[0, 1], [2, -1], [-1, -1], [3, 0], [1, 2]])
        weights = torch.rand(5, num_topk, generator=gen)
        ref_rows, ref_counts = _reference_rows(x, idx, num_experts)
        real = ref_rows.shape[0]
        rows_m = nmax * num_ranks * min(num_topk, num_experts)
        with StrictDevice():
            d = lambda t: t.to(DEVICE)  # noqa: E731
            stats = d(torch.ones(num_experts, dtype=torch.int32))
            for quant in ("bf16", "int8"):
                recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
                    d(x),
                    d(idx),
                    nmax,
                    num_experts,
                    cumulative_local_expert_recv_stats=stats,
                    use_fp8=quant == "int8",
                    return_recv_hook=True,
                    topk_weights=d(weights),
                )
                hook()
                event.current_stream_wait()
                args = fake.args_of("npu_moe_distribute_dispatch_v2")
                assert args["quant_mode"] == (2 if quant == "int8" else 0) and args["comm_alg"] == ""
                assert args["global_bs"] == nmax * num_ranks and args["expert_token_nums_type"] == 1
                assert args["group_ep"] == f"fake_hccl_comm_{rank}"
                assert args["moe_expert_num"] == num_experts + num_topk  # an unknown NPU, one rank: K sink experts
                # the documented shapes: recv_x 2-D [M, H] (a pair with int8), recv_count int64 [L], handle fields
                assert recv_count.device == DEVICE and recv_count.dtype == torch.int64
                assert torch.equal(recv_count.cpu(), ref_counts) and handle[5] is recv_count
                assert handle[1].dtype == torch.int64 and torch.equal(handle[1].cpu(), ref_counts.cumsum(0))
                assert len(handle) == 7 and handle[2:5] == (nmax, hidden, num_experts) and handle[6] is None
                if quant == "int8":
                    q, scale = recv_x
                    assert q.dtype == torch.int8 and q.shape == (rows_m, hidden) and scale.shape == (rows_m,)
                    deq = (q[:real].float() * scale[:real].unsqueeze(1)).cpu()
                    assert bool(((deq - ref_rows.float()).abs() <= scale[:real].cpu().unsqueeze(1) / 2 + 1e-6).all())
                    y = (q.float() * scale.unsqueeze(1) * 2).to(torch.bfloat16)
                else:
                    assert recv_x.dtype == torch.bfloat16 and recv_x.shape == (rows_m, hidden)
                    assert torch.equal(recv_x[:real].cpu(), ref_rows)
                    y = (recv_x.float() * 2).to(torch.bfloat16)
                out = d(torch.empty(5, hidden, dtype=torch.bfloat16))
                combined, _, hook = buffer.low_latency_combine(
                    y, d(idx), d(weights), handle, out=out, return_recv_hook=True
                )
                hook()
                assert combined is out
                expected = x.float() * 2 * torch.where(idx >= 0, weights, 0.0).sum(1, keepdim=True)
                torch.testing.assert_close(out.cpu().float(), expected, rtol=3e-2, atol=3e-2)
                # an entry set to -1 after the dispatch drops out of the sum
                dropped = idx.clone()
                dropped[0, 1] = -1
                combined = buffer.low_latency_combine(y, d(dropped), d(weights), handle)[0]
                expected = x.float() * 2 * torch.where(dropped >= 0, weights, 0.0).sum(1, keepdim=True)
                torch.testing.assert_close(combined.cpu().float(), expected, rtol=3e-2, atol=3e-2)
            assert torch.equal(stats.cpu(), 1 + 2 * ref_counts.int())
            buffer.clean_low_latency_buffer(nmax, hidden, num_experts)

            # argument errors, before any operator call
            calls = len(fake.calls)
            with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank=4"):
                buffer.low_latency_dispatch(d(x), d(idx), 4, num_experts)
            with pytest.raises(TypeError, match="bfloat16 or torch.float16"):
                buffer.low_latency_dispatch(d(x.float()), d(idx), nmax, num_experts)
            bad = idx.clone()
            bad[0, 0] = num_experts
            with pytest.raises(ValueError, match=r"topk_idx values must lie in \[-1, 4\)"):
                buffer.low_latency_dispatch(d(x), d(bad), nmax, num_experts)
            with pytest.raises(ValueError, match="must be on the Buffer's device"):
                buffer.low_latency_dispatch(x, d(idx), nmax, num_experts)
            with pytest.raises(ValueError, match="1 to 16 columns"):
                buffer.low_latency_dispatch(d(x), d(torch.zeros(5, 17, dtype=torch.int64)), nmax, num_experts)
            recv_x, _, handle, _, _ = buffer.low_latency_dispatch(d(x), d(idx), nmax, num_experts, use_fp8=False)
            calls = len(fake.calls)
            with pytest.raises(ValueError, match="x must have shape"):
                buffer.low_latency_combine(recv_x[:, :16], d(idx), d(weights), handle)
            with pytest.raises(TypeError, match="handle must be"):
                buffer.low_latency_combine(recv_x, d(idx), d(weights), handle[:7])
            assert len(fake.calls) == calls
            # a topk_idx that differs from the dispatch's (beyond entries set to -1): the CPU path's ValueError
            changed = idx.clone()
            changed[0, 0] = 3
            with pytest.raises(ValueError, match="topk_idx must be the one given to low_latency_dispatch"):
                buffer.low_latency_combine(recv_x, d(changed), d(weights), handle)
            assert len(fake.calls) == calls

            # fused_deep_moe: MC2 dispatch + grouped matmul + dequant/swiglu/quant + grouped matmul + MC2 combine
            inter = 128
            w1 = torch.randint(-127, 128, (num_experts, hidden, 2 * inter), generator=gen, dtype=torch.int8)
            s1 = torch.rand(num_experts, 2 * inter, generator=gen) * 1e-2
            w2 = torch.randint(-127, 128, (num_experts, hidden, inter), generator=gen, dtype=torch.int8)  # [L, H, I]
            s2 = torch.rand(num_experts, hidden, generator=gen) * 1e-2
            del fake.calls[:]
            output, ep_recv_count = buffer.fused_deep_moe(
                d(x), d(idx), d(weights), d(w1), d(s1), d(w2), d(s2), nmax, num_experts
            )
            assert fake.names_called() == [
                "npu_moe_distribute_dispatch_v2",
                "npu_grouped_matmul",
                "npu_dequant_swiglu_quant",
                "npu_grouped_matmul",
                "npu_moe_distribute_combine_v2",
            ]
            assert output.dtype == torch.bfloat16 and output.shape == (5, hidden) and output.device == DEVICE
            assert ep_recv_count.dtype == torch.int32 and ep_recv_count.cpu().tolist() == ref_counts.tolist()
            with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank"):
                buffer.fused_deep_moe(d(x), d(idx), d(weights), d(w1), d(s1), d(w2), d(s2), 4, num_experts)
            # DISPATCH_FFN_COMBINE: the same operators from upstream's plain layout ([gate | up] gmm1, gmm2
            # [L, I, H], scales as int64 bits, the most rows a rank receives): the same bits.
            w13, w13_scale = deep_ep.unpermute_gmm1_weight(w1, s1)
            plain = (w13.transpose(1, 2).contiguous(), scale_bits(w13_scale), w2.transpose(1, 2).contiguous())
            del fake.calls[:]
            ffn_output, expert_token_nums = buffer.fused_deep_moe(
                d(x),
                d(idx),
                d(weights),
                d(plain[0]),
                d(plain[1]),
                d(plain[2]),
                d(scale_bits(s2)),
                nmax * num_ranks * num_topk,
                num_experts,
                fuse_mode=deep_ep.FuseMode.DISPATCH_FFN_COMBINE,
            )
            assert fake.names_called()[1:4] == ["npu_grouped_matmul", "npu_dequant_swiglu_quant", "npu_grouped_matmul"]
            assert fake.args_of("npu_moe_distribute_dispatch_v2")["global_bs"] == nmax * num_ranks
            assert torch.equal(ffn_output.cpu().view(torch.int16), output.cpu().view(torch.int16))
            assert expert_token_nums.dtype == torch.int32 and expert_token_nums.cpu().tolist() == ref_counts.tolist()
            with pytest.raises(ValueError, match=r"gmm2_weight.*\[L, I, H\]"):  # FUSED_DEEP_MOE's [L, H, I]
                buffer.fused_deep_moe(
                    d(x),
                    d(idx),
                    d(weights),
                    d(plain[0]),
                    d(plain[1]),
                    d(w2),
                    d(scale_bits(s2)),
                    32,
                    num_experts,
                    fuse_mode=deep_ep.FuseMode.DISPATCH_FFN_COMBINE,
                )
        buffer.destroy()
    finally:
        patch.restore()


def test_plumbing_low_latency_and_fused_on_npu() -> None:
    """Buffer.low_latency_dispatch / combine / fused_deep_moe on an 'hccl' group: the MC2 calls through the
    recording stand-in (which simulates one rank) and their outputs mapped to the documented shapes."""
    spawn_ranks(low_latency_on_npu, 1)


def low_latency_limits(rank: int, num_ranks: int, group) -> None:
    patch = Patcher()
    try:
        fake = install_npu_stand_in(patch, device_name="Ascend910B3")  # A2: R = 1 is below its minimum
        buffer = deep_ep.Buffer(group, low_latency_mode=True)
        x = torch.zeros(2, 32, dtype=torch.bfloat16)
        limit = r"NPU A2-fullmesh MC2 operators \(torch_npu 7.3.0\) support num_ranks in \[8, 16"
        with StrictDevice(), pytest.raises(ValueError, match=limit):
            buffer.low_latency_dispatch(x.to(DEVICE), torch.zeros(2, 1, dtype=torch.int64).to(DEVICE), 4, 4)
        assert fake.calls == []
        buffer.destroy()
    finally:
        patch.restore()


def test_plumbing_low_latency_checks_limits_of_detected_soc() -> None:
    spawn_ranks(low_latency_limits, 1)


# --------------------------------------------------------------------------- SoC record, HCCL_BUFFSIZE
@pytest.mark.parametrize(
    "recorded,detected,warns",
    [
        ("A3", "A3", False),
        ("A2", "A2", False),
        ("A3", "A2", True),
        ("A2", "A3", True),
        ("A3", None, True),
        ("cpu", "A2", False),
        ("cpu", None, False),
    ],
)
def test_plumbing_soc_record(monkeypatch, recorded, detected, warns):
    monkeypatch.setattr(backend, "build_target_soc", lambda: recorded)
    monkeypatch.setattr(backend, "_soc_warned", False)
    message = backend.soc_mismatch(recorded, detected)
    assert (message is not None) == warns
    if warns:
        assert f"built for Atlas {recorded}" in message
        assert ("-a deepep2" if detected == "A2" else "-a deepep" if detected == "A3" else "build.sh") in message.split(
            "Rebuild"
        )[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.check_build_soc(detected)
        backend.check_build_soc(detected)  # once per process
    assert len(caught) == (1 if warns else 0)


def test_plumbing_build_info_records_target_soc(tmp_path):
    """setup.py writes DEEP_EP_TARGET_SOC (set by build.sh -a deepep / deepep2) into _build_info.py."""
    text = (REPO_ROOT / "setup.py").read_text()
    assert 'os.environ.get("DEEP_EP_TARGET_SOC", "cpu")' in text and "_build_info.py" in text
    build = (REPO_ROOT / "build.sh").read_text()
    assert 'deepep) SOC="A3"' in build and 'deepep2) SOC="A2"' in build
    assert npu.build_target_soc() in ("A2", "A3", "cpu")


def test_plumbing_hccl_buffsize_check(monkeypatch):
    """Every mode checks HCCL_BUFFSIZE against its own requirement; an unknown device checks nothing."""
    release = versions.release_for_cann("8.3.RC1")
    monkeypatch.delenv("HCCL_BUFFSIZE", raising=False)
    for mode in versions.MODES:
        npu_ll = types.SimpleNamespace(mode=mode, num_ranks=16, release=release)
        needed = npu_ops.hccl_buffsize_mb(256, 7168, 16, 256, 8, mode, release)
        assert needed > 200
        monkeypatch.delenv("HCCL_BUFFSIZE", raising=False)
        with pytest.raises(ValueError, match=f"HCCL_BUFFSIZE=200 MB is too small .* {mode} needs {needed} MB"):
            backend.check_hccl_buffsize(npu_ll, 256, 7168, 256, 8)
        monkeypatch.setenv("HCCL_BUFFSIZE", str(needed))
        backend.check_hccl_buffsize(npu_ll, 256, 7168, 256, 8)
    monkeypatch.setenv("HCCL_BUFFSIZE", "1")
    backend.check_hccl_buffsize(types.SimpleNamespace(mode=None, num_ranks=16, release=release), 256, 7168, 256, 8)


def test_plumbing_npu_env_prints_hccl_buffsize(capsys):
    sizes = [
        "--num-max-dispatch-tokens-per-rank",
        "128",
        "--hidden",
        "7168",
        "--num-ranks",
        "16",
        "--num-experts",
        "256",
        "--num-topk",
        "8",
    ]
    # the worked examples of test_npu_plumbing.py::test_plumbing_hccl_buffsize_worked_examples
    for mode, cann, expected in (
        ("A2-fullmesh", "8.3.RC1", 452),
        ("A2-hierarchy", "8.3.RC1", 496),
        ("A3", "8.3.RC1", 960),
        ("A3", "8.2.RC1", 1018),
    ):
        assert npu_env.main(sizes + ["--mode", mode, "--cann", cann]) == 0
        assert capsys.readouterr().out.strip() == f"HCCL_BUFFSIZE={expected}"
    # with a shared-expert rank, E counts the routed experts (the worked example of
    # test_npu_plumbing.py::test_plumbing_hccl_buffsize_with_shared_expert_ranks)
    shared = sizes[:7] + ["240", "--num-topk", "8", "--num-shared-ranks", "1", "--mode", "A3", "--cann", "8.5.0"]
    assert npu_env.main(shared) == 0
    assert capsys.readouterr().out.strip() == "HCCL_BUFFSIZE=960"
    with pytest.raises(SystemExit):  # 256 routed experts on 15 routed ranks
        npu_env.main(sizes + ["--num-shared-ranks", "1", "--mode", "A3"])
    assert "R - MOE_SHARED_EXPERT_RANK_NUM" in capsys.readouterr().err
    assert npu_env.main(["--report"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "deep_ep built for:" in out and "HCCL_BUFFSIZE=" in out and "rules of torch_npu" in out
    with pytest.raises(SystemExit):
        npu_env.main(["--hidden", "7168"])
    with pytest.raises(SystemExit):
        npu_env.main(
            [
                "--nmax",
                "8",
                "--hidden",
                "128",
                "--num-ranks",
                "3",
                "--num-experts",
                "4",
                "--num-topk",
                "2",
                "--mode",
                "A3",
            ]
        )
    with pytest.raises(SystemExit):  # no NPU here: the mode must be given
        npu_env.main(sizes)
    assert "give the mode" in capsys.readouterr().err
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    for module in ("deep_ep.npu_env", "deep_ep.npu.env"):  # the old name and the package's
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                module,
                "--nmax",
                "1",
                "--hidden",
                "128",
                "--num-ranks",
                "2",
                "--num-experts",
                "4",
                "--num-topk",
                "2",
                "--mode",
                "A2-fullmesh",
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0 and result.stdout.strip() == "HCCL_BUFFSIZE=200", result.stderr
