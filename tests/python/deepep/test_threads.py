"""Threads of the native kernels: each rank's share of the usable cores (affinity, cgroup quota),
DEEP_EP_NUM_THREADS overriding; and results that do not depend on the thread counts."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from common import gather_objects, make_topk_idx  # noqa: E402

from deep_ep import Buffer  # noqa: E402
from deep_ep.reference import reference_combine, reference_dispatch  # noqa: E402
from deep_ep.testing import spawn_ranks  # noqa: E402
from deep_ep.utils import cgroup_cpu_limit, num_threads, usable_cores  # noqa: E402


@pytest.fixture
def four_cores(monkeypatch):
    """This process may run on 4 cores; DEEP_EP_NUM_THREADS unset."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("DEEP_EP_NUM_THREADS", raising=False)


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_affinity_shared_by_local_ranks(four_cores):
    no_quota = 1e9
    assert usable_cores(no_quota) == 4
    assert [num_threads(ranks, no_quota) for ranks in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]


def test_cgroup_quota_caps_the_cores(four_cores):
    assert usable_cores(1.5) == 1  # 1.5 cores of quota: one thread, not two oversubscribed ones
    assert usable_cores(0.2) == 1  # at least one
    assert num_threads(1, 3.0) == 3 and num_threads(2, 3.0) == 1


def test_cgroup_v2_cpu_max(tmp_path):
    assert cgroup_cpu_limit(write(tmp_path / "cpu.max", "150000 100000\n"), str(tmp_path)) == 1.5
    assert cgroup_cpu_limit(write(tmp_path / "cpu.max", "max 100000\n"), str(tmp_path)) is None
    assert cgroup_cpu_limit(write(tmp_path / "cpu.max", "garbled\n"), str(tmp_path)) is None


def test_cgroup_v1_quota_and_period(tmp_path):
    missing = str(tmp_path / "no-cpu.max")
    write(tmp_path / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "cpu.cfs_quota_us", "200000\n")
    assert cgroup_cpu_limit(missing, str(tmp_path)) == 2.0
    write(tmp_path / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(missing, str(tmp_path)) is None
    assert cgroup_cpu_limit(missing, str(tmp_path / "absent")) is None


def test_this_machine_has_at_least_one_core(monkeypatch):
    monkeypatch.delenv("DEEP_EP_NUM_THREADS", raising=False)
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
    assert num_threads(10**6) == 1


def test_override(four_cores, monkeypatch):
    monkeypatch.setenv("DEEP_EP_NUM_THREADS", "7")
    assert num_threads(2, 1e9) == 7  # more than the cores: the caller asked for it
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv("DEEP_EP_NUM_THREADS", bad)
        with pytest.raises(ValueError, match=f"DEEP_EP_NUM_THREADS.*{bad!r}"):
            num_threads(1)


def run_calls(
    rank: int, group, x: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor, num_experts: int
) -> list:
    """Normal (bf16 and int8) and low-latency dispatch + combine; every output, in call order."""
    outputs = []
    buffer = Buffer(group, num_nvl_bytes=64 << 20)
    _, _, per_expert, _, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    for quant in ("bf16", "int8"):
        recv_x, _, _, _, handle, _ = buffer.dispatch(
            x, num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=weights, quant_mode=quant
        )
        y = recv_x if quant == "bf16" else (recv_x[0].float() * recv_x[1].unsqueeze(1)).to(torch.bfloat16)
        outputs += [t.clone() for t in (recv_x if quant == "int8" else (recv_x,))]
        outputs.append(buffer.combine(y, handle)[0].clone())
    buffer.destroy()
    num_max = x.shape[0]
    size = Buffer.get_low_latency_rdma_size_hint(num_max, x.shape[1], dist.get_world_size(group), num_experts)
    buffer = Buffer(group, num_nvl_bytes=4096, num_rdma_bytes=size, low_latency_mode=True)
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts, use_fp8=False)
    # Rows past each expert's count are unused space, not results.
    outputs += [torch.cat([recv_x[e, :n] for e, n in enumerate(recv_count.tolist())]), recv_count.clone()]
    outputs.append(buffer.low_latency_combine(recv_x, topk_idx, weights, handle)[0].clone())
    buffer.destroy()
    return outputs


def same_results_any_threads(rank: int, num_ranks: int, group) -> None:
    # ~16 MB per kernel: 4 threads split it (a kernel hands each thread at least 4 MB: csrc/cpu.hpp)
    num_tokens, hidden, num_experts, num_topk = 1024, 2048, 8, 4
    generator = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(num_tokens, hidden, generator=generator).to(torch.bfloat16)
    topk_idx = make_topk_idx(num_tokens, num_experts, num_topk, generator)
    weights = torch.rand(num_tokens, num_topk, generator=generator)
    torch_default = torch.get_num_threads()
    assert torch_default == (os.cpu_count() or 1), "the ranks must keep torch's default thread count"

    runs = {}
    # torch's default threads, native default; then 1 thread everywhere; then 4 native threads.
    for name, torch_threads, native in (("default", torch_default, None), ("one", 1, "1"), ("four", 1, "4")):
        torch.set_num_threads(torch_threads)
        if native is None:
            os.environ.pop("DEEP_EP_NUM_THREADS", None)
        else:
            os.environ["DEEP_EP_NUM_THREADS"] = native
        runs[name] = run_calls(rank, group, x, topk_idx, weights, num_experts)
    os.environ.pop("DEEP_EP_NUM_THREADS", None)
    torch.set_num_threads(torch_default)
    for name in ("one", "four"):
        for index, (a, b) in enumerate(zip(runs["default"], runs[name])):
            assert torch.equal(a, b), f"rank {rank}: output {index} differs between default threads and {name}"

    everyone = gather_objects((x, topk_idx, weights), group)
    ref = reference_dispatch(
        [e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone], num_experts, rank
    )
    assert torch.equal(runs["default"][0], ref["x"])
    expected = reference_combine(x.float().unsqueeze(1).expand(-1, num_topk, -1), topk_idx, weights)
    assert torch.allclose(runs["default"][1].double(), expected, rtol=1e-2, atol=1e-2)
    assert torch.allclose(runs["default"][-1].double(), expected, rtol=1e-2, atol=1e-2)

    buffer = Buffer(group, num_nvl_bytes=1 << 20)
    assert buffer.num_threads == num_threads(len(buffer.runtime.local_ranks))
    buffer.destroy()
    os.environ["DEEP_EP_NUM_THREADS"] = "zero"
    try:
        Buffer(group, num_nvl_bytes=1 << 20)
    except ValueError as error:
        assert "DEEP_EP_NUM_THREADS" in str(error)
    else:
        raise AssertionError("an invalid DEEP_EP_NUM_THREADS must raise ValueError")
    finally:
        os.environ.pop("DEEP_EP_NUM_THREADS", None)


def test_same_results_with_default_and_one_thread():
    spawn_ranks(same_results_any_threads, 2, share_threads=False)
