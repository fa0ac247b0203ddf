"""Normal-mode dispatch/combine on CPU ranks, checked against the pure-torch reference.

python tests/python/deepep/test_intranode.py --num-processes 4     # checks, then prints GB/s
python -m pytest tests/python/deepep/test_intranode.py             # the test suite
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import List

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import calc_diff, gather_objects, leaked_segments, make_inputs, skip_unless_device, to_device, to_host  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep.reference import quantize_reference, reference_combine, reference_dispatch  # noqa: E402
from deep_ep.testing import spawn_ranks  # noqa: E402


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
    ref = reference_dispatch(
        [i.x for i in everyone],
        [i.topk_idx for i in everyone],
        [i.topk_weights for i in everyone],
        case.experts,
        rank,
        case.alignment,
    )
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


def run_cases(rank: int, num_ranks: int, group, cases: List[Case]) -> None:
    for case in cases:
        saved = {k: os.environ.get(k) for k in case.env}
        os.environ.update(case.env)
        buffer = deep_ep.Buffer(group, num_nvl_bytes=case.nvl_bytes, normal_strategy=case.strategy)
        try:
            check_dispatch_and_combine(rank, num_ranks, buffer, case, group)
        except Exception as error:
            raise AssertionError(f"rank {rank}, case {case}: {error!r}") from error
        finally:
            buffer.destroy()
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    if rank == 0:
        assert not leaked_segments(), f"leaked shared memory: {leaked_segments()}"


def cases_for(num_ranks: int) -> List[Case]:
    experts = 4 * num_ranks
    base = Case(tokens=[37, 0, 64, 5][: max(1, num_ranks)] if num_ranks > 1 else [53], experts=experts)
    cases = [
        base,
        replace(base, strategy="alltoall"),
        replace(base, quant="int8", hidden=200),
        replace(base, quant="int8", strategy="alltoall"),
        replace(base, alignment=4, worst=400 * num_ranks),
        replace(base, pattern="one_rank", topk=3),
        replace(base, pattern="one_expert", topk=2),
        replace(base, topk=1, experts=num_ranks, seed=1),
        replace(base, dtype=torch.float32, hidden=64, seed=2),
        replace(base, dtype=torch.float16, hidden=80, seed=3, env={"MOE_EXPERT_TOKEN_NUMS_TYPE": "0"}),
        # Data far larger than the buffer: many rounds in dispatch and combine.
        replace(base, nvl_bytes=4096, hidden=128, seed=4),
        replace(base, nvl_bytes=4096, hidden=128, quant="int8", alignment=2, seed=5),
        # A row naming an expert twice: one received row and one combine term per selection.
        replace(base, pattern="repeat", seed=6),
        replace(base, pattern="repeat", strategy="alltoall", quant="int8", alignment=2, worst=400 * num_ranks, seed=7),
    ]
    if num_ranks >= 4:  # keep the largest world sizes quick
        cases = [cases[0], cases[2], cases[4], cases[5], cases[10], cases[12], cases[13]]
    return cases


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
def test_intranode(num_ranks: int, device: str) -> None:
    skip_unless_device(device, num_ranks)
    spawn_ranks(run_cases, num_ranks, cases_for(num_ranks), device=device)
    assert not leaked_segments()


def strategies_agree(rank: int, num_ranks: int, group) -> None:
    """Both strategies, alive at once, give the same bits; 20 repeated calls give the same bits."""
    inputs = make_inputs(rank, [300, 17, 0][rank % 3], 256, 12, 4, num_ranks, seed=7)
    shm_buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20, normal_strategy="default")
    a2a_buffer = deep_ep.Buffer(group, normal_strategy="alltoall")
    results = []
    for buffer in (shm_buffer, a2a_buffer):
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inputs.topk_idx, 12)
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            inputs.x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=inputs.topk_idx,
            topk_weights=inputs.topk_weights,
        )
        y = expert_output(recv_x.float(), counts, torch.bfloat16)
        outputs = [buffer.combine(y, handle)[0] for _ in range(20)]
        for out in outputs[1:]:
            assert torch.equal(out, outputs[0])
        results.append((recv_x, recv_idx, recv_w, counts, handle.state.recv_src_idx, outputs[0]))
    for a, b in zip(*results):
        assert (a == b) if isinstance(a, list) else torch.equal(a, b)
    shm_buffer.destroy()
    a2a_buffer.destroy()


def test_strategies_agree_and_repeat() -> None:
    spawn_ranks(strategies_agree, 3)


# ---- script mode: correctness, then DeepEP-style bandwidth figures -----------------------------------------
def bench_rank(rank: int, num_ranks: int, group, args) -> None:
    run_cases(rank, num_ranks, group, cases_for(num_ranks)[:3])
    inputs = make_inputs(rank, args.num_tokens, args.hidden, args.num_experts, args.num_topk, num_ranks)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=args.nvl_bytes)
    start = time.perf_counter()
    for _ in range(10):
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inputs.topk_idx, args.num_experts)
    layout_us = (time.perf_counter() - start) / 10 * 1e6
    kwargs = dict(
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=inputs.topk_idx,
        topk_weights=inputs.topk_weights,
    )
    for quant in ("bf16", "int8"):
        recv_x, _, _, counts, handle, _ = buffer.dispatch(inputs.x, quant_mode=quant, **kwargs)
        torch.distributed.barrier(group)
        start = time.perf_counter()
        for _ in range(args.iters):
            recv_x, _, _, counts, handle, _ = buffer.dispatch(inputs.x, quant_mode=quant, **kwargs)
        dispatch_s = (time.perf_counter() - start) / args.iters
        y = dequantized(recv_x).to(torch.bfloat16)
        torch.distributed.barrier(group)
        start = time.perf_counter()
        for _ in range(args.iters):
            buffer.combine(y, handle)
        combine_s = (time.perf_counter() - start) / args.iters
        recv_bytes = (recv_x[0].numel() + 4 * recv_x[1].numel()) if quant == "int8" else recv_x.numel() * 2
        if rank == 0:
            print(
                f"[rank 0] layout {layout_us:.0f} us | {quant} dispatch {dispatch_s * 1e6:.0f} us "
                f"{recv_bytes / dispatch_s / 1e9:.2f} GB/s | combine {combine_s * 1e6:.0f} us "
                f"{y.numel() * 2 / combine_s / 1e9:.2f} GB/s",
                flush=True,
            )
    buffer.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--num-tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--num-topk", type=int, default=8)
    parser.add_argument("--num-experts", type=int, default=32)
    parser.add_argument("--nvl-bytes", type=int, default=256 << 20)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    spawn_ranks(bench_rank, args.num_processes, args)


if __name__ == "__main__":
    main()
