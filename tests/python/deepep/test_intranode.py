"""Normal-mode dispatch/combine on CPU ranks, checked against the pure-torch reference.

python tests/python/deepep/test_intranode.py --num-processes 4     # checks, then prints GB/s
python -m pytest tests/python/deepep/test_intranode.py             # the test suite
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import List

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import leaked_segments, make_inputs, skip_unless_device  # noqa: E402
from normal_cases import Case, check_dispatch_and_combine, dequantized, expert_output  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep.testing import spawn_ranks  # noqa: E402


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
