"""Normal-mode cases and their checks against the pure-torch reference, shared by the tests of one
and of several nodes (test_intranode, test_internode, two_host_runner)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import calc_diff, gather_objects, make_inputs, reference_of, to_device, to_host  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep.reference import quantize_reference, reference_combine, reference_dispatch  # noqa: E402


@dataclass
class Case:
    tokens: List[int]  # tokens per rank (cycled over the ranks)
    hidden: int = 96
    experts: int = 16
    topk: int = 4
    strategy: str = "default"
    quant: str = "bf16"
    dtype: torch.dtype = torch.bfloat16
    alignment: int = 1
    worst: int = 0
    nvl_bytes: int = 4 << 20
    pattern: str = "random"
    seed: int = 0
    env: dict = field(default_factory=dict)


def expert_output(recv_x: torch.Tensor, rows_per_expert: List[int], dtype: torch.dtype) -> torch.Tensor:
    """The 'expert' of the tests: local expert l multiplies its rows by 1 + l / 8.
    Padding rows get a large value, which combine must ignore."""
    factor = torch.repeat_interleave(1 + torch.arange(len(rows_per_expert)) / 8, torch.tensor(rows_per_expert))
    out = torch.full((recv_x.shape[0], recv_x.shape[1]), 1e4, dtype=torch.float32)
    out[: factor.numel()] = recv_x[: factor.numel()].float() * factor.unsqueeze(1)
    return out.to(dtype)


def dequantized(recv_x) -> torch.Tensor:
    return recv_x[0].float() * recv_x[1].unsqueeze(1) if isinstance(recv_x, tuple) else recv_x.float()


def check_dispatch_and_combine(rank: int, num_ranks: int, buffer: deep_ep.Buffer, case: Case, group) -> None:
    num_tokens = case.tokens[rank % len(case.tokens)]
    inputs = make_inputs(
        rank, num_tokens, case.hidden, case.experts, case.topk, num_ranks, case.dtype, case.pattern, case.seed
    )
    everyone = gather_objects(inputs, group)
    local_experts = case.experts // num_ranks

    # Inputs live on the rank's device (NPU under --device npu); results come back to the host for the checks.
    x_dev, idx_dev, weights_dev = to_device((inputs.x, inputs.topk_idx, inputs.topk_weights))
    # Layout: counted independently here.
    layout_dev = buffer.get_dispatch_layout(idx_dev, case.experts)
    per_rank, per_node, per_expert, in_rank, _ = to_host(layout_dev)
    owner = torch.where(inputs.topk_idx >= 0, inputs.topk_idx // local_experts, -1)
    expected_in_rank = (
        torch.stack([(owner == r).any(1) for r in range(num_ranks)], 1).to(torch.int32)
        if num_tokens
        else torch.zeros(0, num_ranks, dtype=torch.int32)
    )
    assert torch.equal(in_rank, expected_in_rank)
    assert torch.equal(per_rank, expected_in_rank.sum(0).to(torch.int32))
    assert torch.equal(
        per_expert, torch.tensor([int((inputs.topk_idx == e).sum()) for e in range(case.experts)], dtype=torch.int32)
    )
    node_size = int(os.environ.get("DEEP_EP_RANKS_PER_NODE") or num_ranks)
    if node_size >= num_ranks:
        assert per_node is None
    else:  # tokens with at least one expert on each (simulated) node
        expected_per_node = [
            int(expected_in_rank[:, n * node_size : (n + 1) * node_size].any(1).sum())
            for n in range(-(-num_ranks // node_size))
        ]
        assert per_node.tolist() == expected_per_node

    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(
        x_dev,
        num_tokens_per_rank=layout_dev[0],
        is_token_in_rank=layout_dev[3],
        num_tokens_per_expert=layout_dev[2],
        topk_idx=idx_dev,
        topk_weights=weights_dev,
        expert_alignment=case.alignment,
        num_worst_tokens=case.worst,
        quant_mode=case.quant,
    )
    event.current_stream_wait()
    recv_x, recv_topk_idx, recv_topk_weights = to_host((recv_x, recv_topk_idx, recv_topk_weights))
    ref = reference_of(everyone, case.experts, rank, case.alignment)
    real_rows = ref["src_idx"].numel()
    out_rows = case.worst or real_rows
    recv_q = recv_x[0] if isinstance(recv_x, tuple) else recv_x
    assert recv_q.shape == (out_rows, case.hidden), recv_q.shape
    if case.quant == "int8":
        q_ref, scale_ref = quantize_reference(ref["x"].double())
        q, scale = recv_x
        assert q.dtype == torch.int8 and scale.dtype == torch.float32
        assert torch.allclose(scale[:real_rows].double(), scale_ref, rtol=1e-6, atol=0)
        assert bool(((q[:real_rows].int() - q_ref.int()).abs() <= 1).all())
        error = (q[:real_rows].double() * scale[:real_rows].double().unsqueeze(1) - ref["x"].double()).abs()
        assert bool((error <= scale_ref.unsqueeze(1) * (0.5 + 1e-5) + 1e-12).all())
    else:
        assert recv_x.dtype == case.dtype
        assert torch.equal(recv_x[:real_rows], ref["x"])
    assert torch.equal(recv_topk_idx[:real_rows], ref["topk_idx"])
    assert torch.equal(recv_topk_weights[:real_rows], ref["weights"])
    # Rows past the real ones (num_worst_tokens) are zero with no expert.
    assert bool((recv_q[real_rows:] == 0).all()) and bool((recv_topk_idx[real_rows:] == -1).all())
    if os.environ.get("MOE_EXPERT_TOKEN_NUMS_TYPE") == "0":
        assert counts == torch.cumsum(torch.tensor(ref["rows_per_expert"]), 0).tolist()
    else:
        assert counts == ref["rows_per_expert"]
    # Handle: rank prefix matrix and source indices hold real values.
    sent = torch.tensor(
        [
            [
                int(((i.topk_idx >= d * local_experts) & (i.topk_idx < (d + 1) * local_experts)).sum())
                for d in range(num_ranks)
            ]
            for i in everyone
        ]
    )
    if isinstance(handle, dict):  # "alltoall": upstream's dict handle
        assert handle["input_splits"] == sent[rank].tolist()
        assert handle["output_splits"] == sent[:, rank].tolist()
        assert torch.equal(to_host(handle["topk_weights"]), inputs.topk_weights)
    elif len(handle) == 9:  # several nodes: upstream's internode handle
        assert torch.equal(to_host(handle[0])[:real_rows].long(), ref["src_idx"])
        assert torch.equal(to_host(handle[3]), inputs.topk_idx)
        assert torch.equal(to_host(handle[4]), inputs.topk_weights)
        # expand_scales: the weight of every row's own (token, k) selection, 0 for padding; a token
        # naming an expert twice has two rows, each with its own column's weight.
        src_k = ref["src_k"]
        expected = ref["weights"].gather(1, src_k.clamp(min=0).unsqueeze(1)).flatten() * (src_k >= 0)
        scales = to_host(handle[8])
        assert torch.equal(scales[:real_rows], expected.to(scales.dtype))
        assert bool((scales[real_rows:] == 0).all())
    else:
        assert len(handle) == 8
        assert torch.equal(to_host(handle[0]), torch.cumsum(sent, 0).to(torch.int32))
        # [1] first row of block (source s, local expert l), [2] inclusive prefix of the padded
        # rows per local expert, [5] rows per (local expert, source): from every rank's topk_idx.
        mine = [rank * local_experts + j for j in range(local_experts)]
        block_rows = torch.tensor([[int((i.topk_idx == e).sum()) for i in everyone] for e in mine], dtype=torch.int32)
        padded = torch.tensor(ref["rows_per_expert"], dtype=torch.int32)
        expert_first = torch.cumsum(padded, 0) - padded
        block_first = expert_first.unsqueeze(1) + torch.cumsum(block_rows, 1) - block_rows  # [L, R]
        assert torch.equal(to_host(handle[1]), block_first.t())
        assert torch.equal(to_host(handle[2]), torch.cumsum(padded, 0).to(torch.int32))
        assert torch.equal(to_host(handle[5]), block_rows)
        assert torch.equal(to_host(handle[3])[:real_rows].long(), ref["src_idx"])
        assert torch.equal(to_host(handle[6]), inputs.topk_idx)
        assert torch.equal(to_host(handle[7]), inputs.topk_weights)

    # Combine with the weights recorded at dispatch, and with explicit weights plus biases.
    y = expert_output(
        dequantized(recv_x),
        counts if os.environ.get("MOE_EXPERT_TOKEN_NUMS_TYPE") != "0" else ref["rows_per_expert"],
        case.dtype,
    )
    combined = to_host(buffer.combine(to_device(y), handle)[0])
    x_used = dequantized(quantize_reference(inputs.x.double())) if case.quant == "int8" else inputs.x.float()
    factor = 1 + (inputs.topk_idx.clamp_min(0) % local_experts).float() / 8
    selection = (x_used.unsqueeze(1) * factor.unsqueeze(2)).to(case.dtype)
    expected = reference_combine(selection, inputs.topk_idx, inputs.topk_weights)
    assert combined.dtype == case.dtype and combined.shape == (num_tokens, case.hidden)
    assert calc_diff(combined, expected) < 1e-5
    tolerance = 1e-5 if case.dtype == torch.float32 else 2e-2
    if case.quant == "int8":  # a value may round to the neighbouring int8 step here and there
        tolerance = 0.1
    assert torch.allclose(combined.double(), expected, rtol=tolerance, atol=tolerance)
    weights2 = torch.rand(num_tokens, case.topk)
    bias = (torch.ones(num_tokens, case.hidden, dtype=case.dtype), torch.full((num_tokens, case.hidden), 0.5))
    combined2 = to_host(buffer.combine(to_device(y), handle, topk_weights=to_device(weights2), bias=to_device(bias))[0])
    expected2 = reference_combine(selection, inputs.topk_idx, weights2) + 1.5
    assert torch.allclose(combined2.double(), expected2, rtol=tolerance, atol=tolerance)

    # Cached mode: a new x along the same routes.
    if case.quant == "bf16":
        x2 = (inputs.x.float() * 2 + 1).to(case.dtype)
        recv2, none1, none2, none3, none4, _ = buffer.dispatch(to_device(x2), handle=handle)
        recv2 = to_host(recv2)
        assert none1 is None and none2 is None and none3 is None and none4 is None
        ref2 = reference_dispatch(
            [(i.x.float() * 2 + 1).to(case.dtype) for i in everyone],
            [i.topk_idx for i in everyone],
            [i.topk_weights for i in everyone],
            case.experts,
            rank,
            case.alignment,
        )
        assert recv2.shape == recv_x.shape
        assert torch.equal(recv2[:real_rows], ref2["x"]) and bool((recv2[real_rows:] == 0).all())


NODE_ENV = "DEEP_EP_RANKS_PER_NODE"


def run_all_calls(buffer: deep_ep.Buffer, inputs, num_experts: int, quant: str, alignment: int = 1):
    """Every normal-mode result for these inputs (dispatch, two combines, cached dispatch)."""
    _, per_node, per_expert, _, _ = buffer.get_dispatch_layout(inputs.topk_idx, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        inputs.x,
        num_tokens_per_expert=per_expert,
        topk_idx=inputs.topk_idx,
        topk_weights=inputs.topk_weights,
        quant_mode=quant,
        expert_alignment=alignment,
    )
    values = recv_x[0].float() * recv_x[1].unsqueeze(1) if quant == "int8" else recv_x.float()
    y = (values * 1.25 + 0.5).to(torch.bfloat16)
    combined = buffer.combine(y, handle)[0]
    weights = inputs.topk_weights.flip(1).contiguous()
    bias = torch.full((inputs.x.shape[0], inputs.x.shape[1]), 0.25, dtype=torch.bfloat16)
    combined2 = buffer.combine(y, handle, topk_weights=weights, bias=bias)[0]
    cached = buffer.dispatch((inputs.x.float() * 3).to(torch.bfloat16), handle=handle)[0]
    flat = list(recv_x) if quant == "int8" else [recv_x]
    if buffer.get_num_rdma_ranks() > 1:  # upstream's internode handle: topk_weights at [4]
        assert len(handle) == 9 and handle[3] is inputs.topk_idx and handle[4] is inputs.topk_weights
    state = handle.state
    return flat + [
        recv_idx,
        recv_w,
        torch.tensor(counts),
        state.recv_src_rank,
        state.recv_src_idx,
        combined,
        combined2,
        cached,
    ]
