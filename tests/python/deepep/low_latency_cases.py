"""Low-latency cases and their checks against the pure-torch reference, shared by the tests that
run low-latency calls (test_low_latency, test_fused_deep_moe, test_memory, two_host_runner)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import calc_diff, gather_objects, make_inputs, reference_of, to_device, to_host  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep.reference import quantize_reference, reference_combine  # noqa: E402
from deep_ep.testing import rank_device  # noqa: E402


@dataclass
class Case:
    tokens: List[int]  # tokens per rank (cycled over the ranks)
    max_tokens: int = 24
    hidden: int = 96
    experts_per_rank: int = 4
    topk: int = 4
    quant: str = "int8"
    hook: bool = False
    pattern: str = "random"
    seed: int = 0


def expert_output(recv_x, recv_count: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """The 'expert' of the tests: local expert l multiplies its rows by 1 + l / 8. Rows past the
    received ones get a large value, which combine must ignore."""
    values = recv_x[0].float() * recv_x[1].unsqueeze(1) if isinstance(recv_x, tuple) else recv_x.float()
    factor = torch.repeat_interleave(1 + torch.arange(recv_count.numel()) / 8, recv_count)
    out = torch.full_like(values, 1e4)
    out[: factor.numel()] = values[: factor.numel()] * factor.unsqueeze(1)
    return out.to(dtype)


def buffer_for(group, num_ranks: int, cases: List[Case], strategy: str = "default") -> deep_ep.Buffer:
    size = max(
        deep_ep.Buffer.get_low_latency_rdma_size_hint(c.max_tokens, c.hidden, num_ranks, c.experts_per_rank * num_ranks)
        for c in cases
    )
    return deep_ep.Buffer(
        group, num_nvl_bytes=4096, num_rdma_bytes=size, low_latency_mode=True, low_latency_strategy=strategy
    )


def dispatch(buffer, case: Case, inputs, stats=None):
    num_experts = case.experts_per_rank * buffer.group_size
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        to_device(inputs.x),
        to_device(inputs.topk_idx),
        case.max_tokens,
        num_experts,
        cumulative_local_expert_recv_stats=stats,
        use_fp8=case.quant == "int8",
        return_recv_hook=case.hook,
        topk_weights=to_device(inputs.topk_weights),
    )
    event.current_stream_wait()
    assert callable(hook)  # always a callable; a no-op without return_recv_hook
    return recv_x, recv_count, handle, hook


def check_received(rank: int, num_ranks: int, case: Case, everyone, recv_x, recv_count, handle) -> int:
    """recv_x, counts, order and handle against the reference; returns the number of real rows."""
    assert handle[5] is recv_count
    recv_x, recv_count, src_info, layout_range = to_host((recv_x, recv_count, handle[0], handle[1]))
    num_experts = case.experts_per_rank * num_ranks
    ref = reference_of(everyone, num_experts, rank)
    real = ref["src_idx"].numel()
    rows = case.max_tokens * num_ranks * min(case.topk, case.experts_per_rank)
    assert recv_count.dtype == torch.int64 and recv_count.tolist() == ref["rows_per_expert"]
    if case.quant == "int8":
        q, scale = recv_x
        assert q.dtype == torch.int8 and q.shape == (rows, case.hidden) and scale.shape == (rows,)
        q_ref, scale_ref = quantize_reference(ref["x"])
        assert torch.allclose(scale[:real].double(), scale_ref, rtol=1e-6, atol=0)
        # Within half a quantization step of the sent value (scale / 2).
        error = (q[:real].double() * scale[:real].double().unsqueeze(1) - ref["x"].double()).abs()
        assert bool((error <= scale_ref.unsqueeze(1) * (0.5 + 1e-5) + 1e-12).all())
    else:
        assert recv_x.dtype == torch.bfloat16 and recv_x.shape == (rows, case.hidden)
        assert torch.equal(recv_x[:real], ref["x"])
    # Rows in the documented order: expert-major, then source rank, then source token.
    assert handle[2:5] == (case.max_tokens, case.hidden, num_experts)
    assert torch.equal(
        layout_range,
        torch.cumsum(
            torch.tensor(
                [
                    [int((everyone[s].topk_idx == rank * case.experts_per_rank + e).sum()) for s in range(num_ranks)]
                    for e in range(case.experts_per_rank)
                ]
            ).reshape(-1),
            0,
        ),
    )
    if rank_device().type == "npu":  # handle[0] holds the MC2 operators' own per-row data there
        return real
    assert src_info.shape == (rows, 3)
    assert torch.equal(src_info[:real, 0].long(), ref["src_rank"]) and torch.equal(
        src_info[:real, 1].long(), ref["src_idx"]
    )
    assert torch.equal(src_info[:real, 2].long(), ref["src_k"])
    assert bool((src_info[real:] == -1).all())
    return real


def expected_combine(case: Case, inputs, weights) -> torch.Tensor:
    x_used = inputs.x.double()
    if case.quant == "int8":
        q, scale = quantize_reference(inputs.x)
        x_used = q.double() * scale.unsqueeze(1)
    factor = 1 + (inputs.topk_idx.clamp_min(0) % case.experts_per_rank).double() / 8
    selection = (x_used.float().unsqueeze(1) * factor.float().unsqueeze(2)).to(torch.bfloat16)
    return reference_combine(selection, inputs.topk_idx, weights)


def check_case(rank: int, num_ranks: int, buffer, case: Case, group) -> None:
    num_tokens = case.tokens[rank % len(case.tokens)]
    inputs = make_inputs(
        rank,
        num_tokens,
        case.hidden,
        case.experts_per_rank * num_ranks,
        case.topk,
        num_ranks,
        pattern=case.pattern,
        seed=case.seed,
    )
    everyone = gather_objects(inputs, group)
    stats = to_device(torch.arange(case.experts_per_rank, dtype=torch.int32))
    recv_x, recv_count, handle, hook = dispatch(buffer, case, inputs, stats)
    if hook is not None:
        hook()
    check_received(rank, num_ranks, case, everyone, recv_x, recv_count, handle)
    assert torch.equal(
        to_host(stats), torch.arange(case.experts_per_rank, dtype=torch.int32) + to_host(recv_count).to(torch.int32)
    )
    assert len(handle) == 7 and handle[6] is None  # expand_scales: None, as upstream's default strategy

    y = expert_output(to_host(recv_x), to_host(recv_count))
    weights = torch.rand(num_tokens, case.topk)
    out = to_device(torch.empty(num_tokens, case.hidden, dtype=torch.bfloat16))
    combined, event, hook = buffer.low_latency_combine(
        to_device(y), to_device(inputs.topk_idx), to_device(weights), handle, return_recv_hook=case.hook, out=out
    )
    event.current_stream_wait()
    if hook is not None:
        hook()
    assert combined is out and combined.dtype == torch.bfloat16 and combined.shape == (num_tokens, case.hidden)
    combined = to_host(combined)
    assert not bool(torch.isnan(combined).any())
    expected = expected_combine(case, inputs, weights)
    assert calc_diff(combined, expected) < 1e-5, calc_diff(combined, expected)
    tolerance = 0.1 if case.quant == "int8" else 2e-2
    assert torch.allclose(combined.double(), expected, rtol=tolerance, atol=tolerance)
