"""Buffer.fused_deep_moe on CPU ranks: dispatch + SwiGLU expert MLP + combine in one call.

Called as DeepEP-Ascend's callers call it: gmm2_weight [L, H, I] (each expert's down projection in
[out, in] order), quant_mode 0 or 1 with int8 weights (the weights' dtype decides the math), bf16
weights, FuseMode.DISPATCH_FFN_COMBINE (plain [gate | up] gmm1, gmm2 [L, I, H], int64 scale bits),
int32 top-k ids, repeated experts. Every case is checked against
  (a) an independent per-token reference (fused_reference.ref_moe_token: one token and its top-k
      experts at a time, unpermuted gate-then-up weights, float64 math), with the tolerances
      explained in fused_reference.py, and
  (b) the unfused pipeline of the same library, run in the same test on the same Buffer:
      low_latency_dispatch (int8) -> grouped_swiglu_mlp_int8 -> low_latency_combine, which must give
      the same bits;
and ep_recv_count against the counts computed from every rank's topk_idx.

    python tests/python/deepep/test_fused_deep_moe.py --num-processes 2   # checks, then fused vs unfused time
    python -m pytest tests/python/deepep/test_fused_deep_moe.py           # the test suite
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from typing import List

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import gather_objects, make_inputs, our_segments, skip_unless_device  # noqa: E402
from fused_cases import Case, check_case, expert_weights, grouped_weights, local_weights, unfused  # noqa: E402
from fused_reference import assert_bf16_matches, make_weights, ref_moe_token  # noqa: E402
from low_latency_cases import buffer_for  # noqa: E402  (a low-latency Buffer big enough for the cases)

import deep_ep  # noqa: E402
from deep_ep.fused import grouped_swiglu_mlp_int8, quantize_per_token_int8  # noqa: E402
from deep_ep.npu.operators import hccl_buffsize_mb  # noqa: E402
from deep_ep.testing import spawn_ranks  # noqa: E402


def run_cases(rank: int, num_ranks: int, group, cases: List[Case], strategy: str = "default") -> None:
    buffer = buffer_for(group, num_ranks, cases, strategy)
    try:
        for case in cases:
            try:
                check_case(rank, num_ranks, group, buffer, case)
            except Exception as error:
                raise AssertionError(f"rank {rank}, case {case}: {error!r}") from error
    finally:
        buffer.destroy()


def cases_for(num_ranks: int) -> List[Case]:
    single = num_ranks == 1
    base = Case(
        tokens=[13] if single else [17, 0, 9, 5][:num_ranks],  # T = 0 on rank 1
        experts_per_rank=4 if single else 2,
    )
    return [
        base,
        replace(base, inter=192, hidden=200, topk=4, experts_per_rank=3 + 2 * single, seed=1, quant_mode=1),
        replace(base, pattern="one_expert", seed=2),
        # I == H: a gmm2 taken in the wrong order has the right shape, so only the values tell.
        replace(base, inter=128, hidden=128, seed=3, quant_mode=1),
        replace(base, pattern="repeat", int32_ids=True, seed=5),
        replace(base, weights="bf16", seed=6),
        replace(base, weights="ffn", quant_mode=1, pattern="repeat", seed=7),
    ]


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_fused_deep_moe(num_ranks: int, device: str) -> None:
    skip_unless_device(device, num_ranks)
    if device == "npu":
        if num_ranks == 1:
            pytest.skip("NPU run skipped: the MC2 operators need at least 2 ranks (ep_world_size >= 2)")
        cases = [replace(c, hidden=1024) for c in cases_for(num_ranks)]  # A3 needs 1024 <= H <= 8192
        buffsize = max(
            hccl_buffsize_mb(c.max_tokens, c.hidden, num_ranks, c.experts_per_rank * num_ranks, c.topk) for c in cases
        )
        spawn_ranks(run_cases, num_ranks, cases, env={"HCCL_BUFFSIZE": str(buffsize)}, device="npu")
        return
    spawn_ranks(run_cases, num_ranks, cases_for(num_ranks))
    assert not our_segments()


def test_fused_deep_moe_alltoall() -> None:
    """Strategy "alltoall" (the transport of several hosts) gives the same results."""
    spawn_ranks(run_cases, 2, [Case(tokens=[11, 6], inter=128, seed=4)], "alltoall")


def shared_expert_ranks(rank: int, num_ranks: int, group) -> None:
    """MOE_SHARED_EXPERT_RANK_NUM=1: rank 0 runs the shared expert (L = 1) on every token, the other
    ranks the routed ones; each token's output is its routed sum plus the shared expert's output."""
    case = Case(tokens=[9, 0, 13], experts_per_rank=2, topk=3, pattern="repeat", seed=11)
    num_experts = case.experts_per_rank * (num_ranks - 1)
    inputs = make_inputs(
        rank,
        case.tokens[rank % 3],
        case.hidden,
        num_experts,
        case.topk,
        num_ranks,
        pattern=case.pattern,
        seed=case.seed,
    )
    everyone = gather_objects(inputs.topk_idx, group)
    generator = torch.Generator().manual_seed(77)
    routed = make_weights(generator, num_experts, case.hidden, case.inter)
    shared = make_weights(generator, 1, case.hidden, case.inter)
    mine = (
        local_weights(0, replace(case, experts_per_rank=1), shared)
        if rank == 0
        else local_weights(rank - 1, case, routed)
    )
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(case.max_tokens, case.hidden, num_ranks, num_experts)
    buffer = deep_ep.Buffer(group, num_rdma_bytes=size, low_latency_mode=True)
    out, ep_recv_count = buffer.fused_deep_moe(
        inputs.x, inputs.topk_idx, inputs.topk_weights, *mine, case.max_tokens, num_experts, 0
    )
    buffer.destroy()
    if rank == 0:  # one block per source rank: all its tokens
        expected = [everyone[s].shape[0] for s in range(num_ranks)]
    else:
        expected = [
            int((everyone[s] == (rank - 1) * case.experts_per_rank + e).sum())
            for e in range(case.experts_per_rank)
            for s in range(num_ranks)
        ]
    assert ep_recv_count.tolist() == expected
    one = torch.tensor([0])
    for t in range(inputs.x.shape[0]):
        ref, tol = ref_moe_token(inputs.x[t], inputs.topk_idx[t], inputs.topk_weights[t], *routed)
        ref_shared, tol_shared = ref_moe_token(inputs.x[t], one, torch.ones(1), *shared)
        assert_bf16_matches(out[t], ref + ref_shared, tol + tol_shared, f"rank {rank} token {t}")


def test_shared_expert_ranks() -> None:
    spawn_ranks(shared_expert_ranks, 3, env={"MOE_SHARED_EXPERT_RANK_NUM": "1"})
    assert not our_segments()


def errors(rank: int, num_ranks: int, group) -> None:
    """Clear errors on the calling rank before any data moves; the peers name it instead of waiting;
    the Buffer stays usable."""
    case = Case(tokens=[8], max_tokens=8, experts_per_rank=2, topk=2)
    num_experts = 2 * num_ranks
    buffer = buffer_for(group, num_ranks, [case])
    inputs = make_inputs(rank, 8, case.hidden, num_experts, case.topk, num_ranks)
    all_weights = expert_weights(case, num_ranks)
    w1, w1_scale, w2, w2_scale = local_weights(rank, case, all_weights)
    grouped = grouped_weights(rank, case, all_weights)
    good = dict(
        x=inputs.x,
        topk_idx=inputs.topk_idx,
        topk_weights=inputs.topk_weights,
        gmm1_permuted_weight=w1,
        gmm1_permuted_weight_scale=w1_scale,
        gmm2_weight=w2,
        gmm2_weight_scale=w2_scale,
        num_max_dispatch_tokens_per_rank=case.max_tokens,
        num_experts=num_experts,
    )

    def ok() -> None:
        out, _ = buffer.fused_deep_moe(**good)
        assert torch.equal(out, unfused(buffer, inputs, case, num_experts, grouped))

    ok()
    bad_cases = [
        (ValueError, "fuse_mode.*FUSED_DEEP_MOE.*DISPATCH_FFN_COMBINE.*got 7", dict(fuse_mode=7)),
        (ValueError, "quant_mode.*1 \\(W8A8.*got 2", dict(quant_mode=2)),
        (
            TypeError,
            "gmm1_permuted_weight must have dtype torch.int8 or .*, got torch.int32",
            dict(gmm1_permuted_weight=w1.to(torch.int32)),
        ),
        (
            TypeError,
            "gmm2_weight must have dtype torch.bfloat16, got torch.int8",
            dict(gmm1_permuted_weight=w1.bfloat16()),
        ),
        (
            ValueError,
            "DISPATCH_FFN_COMBINE needs int8 weights",
            dict(gmm1_permuted_weight=w1.bfloat16(), gmm2_weight=w2.transpose(1, 2).bfloat16(), fuse_mode=2),
        ),
        (
            ValueError,
            r"gmm1_permuted_weight must have shape \[2, 128, 128\] \(\[L, H, 2I\]: L = num_experts / "
            r"routed ranks = \d+ / \d+, H from x\), got \[3, 128, 128\]",
            dict(gmm1_permuted_weight=torch.cat([w1, w1[:1]])),
        ),
        (
            ValueError,
            r"gmm1_permuted_weight.shape\[2\].*multiple of 128.*got 64",
            dict(gmm1_permuted_weight=w1[:, :, :64].contiguous()),
        ),
        (
            ValueError,
            r"gmm1_permuted_weight must have shape \[2, 128, 128\].*H from x.*got \[2, 64, 128\]",
            dict(gmm1_permuted_weight=w1[:, :64].contiguous()),
        ),
        (
            ValueError,
            r"gmm1_permuted_weight_scale must have shape \[2, 128\]",
            dict(gmm1_permuted_weight_scale=w1_scale[:, :64]),
        ),
        (
            ValueError,
            r"gmm2_weight must have shape \[2, 128, 64\] \(\[L, H, I\].*got \[2, 64, 128\]",
            dict(gmm2_weight=w2.transpose(1, 2).contiguous()),
        ),
        (TypeError, "gmm2_weight_scale must have dtype", dict(gmm2_weight_scale=w2_scale.to(torch.int32))),
        (ValueError, "gmm2_weight_scale must have shape", dict(gmm2_weight_scale=w2_scale[:, :-1])),
        (ValueError, "topk_weights must have shape", dict(topk_weights=inputs.topk_weights[:, :1])),
        (TypeError, "topk_weights must have dtype", dict(topk_weights=inputs.topk_weights.double())),
        (ValueError, "num_experts must be a positive multiple", dict(num_experts=num_experts + 1)),
        (ValueError, "topk_idx", dict(topk_idx=inputs.topk_idx.clamp_max(0) + num_experts)),
        (TypeError, "x must have dtype", dict(x=inputs.x.to(torch.int32))),
    ]
    for error, pattern, change in bad_cases:
        # Both ranks pass the bad argument: each names it.
        with pytest.raises(error, match=pattern):
            buffer.fused_deep_moe(**{**good, **change})
        ok()
        # Only rank 0 does: rank 0 names it, the peers say which rank rejected (no waiting).
        if num_ranks > 1:
            start = time.monotonic()
            with pytest.raises(
                error if rank == 0 else ValueError, match=pattern if rank == 0 else r"ranks \[0\] rejected"
            ):
                buffer.fused_deep_moe(**{**good, **(change if rank == 0 else {})})
            assert time.monotonic() - start < 10
            ok()
    # T > Nmax on one rank: the low-latency checks apply.
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank" if rank == 0 else r"ranks \[0\]"):
        big = torch.cat([inputs.x, inputs.x]) if rank == 0 else inputs.x
        idx = torch.cat([inputs.topk_idx, inputs.topk_idx]) if rank == 0 else inputs.topk_idx
        w = torch.cat([inputs.topk_weights, inputs.topk_weights]) if rank == 0 else inputs.topk_weights
        buffer.fused_deep_moe(**{**good, "x": big, "topk_idx": idx, "topk_weights": w})
    ok()
    buffer.destroy()
    normal = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
    with pytest.raises(RuntimeError, match="low_latency_mode=True"):
        normal.fused_deep_moe(**good)
    normal.destroy()


def test_errors() -> None:
    spawn_ranks(errors, 2)
    assert not our_segments()


# ---- script mode: correctness, then fused vs unfused time ---------------------------------------------------
def bench_rank(rank: int, num_ranks: int, group, args) -> None:
    run_cases(rank, num_ranks, group, cases_for(num_ranks)[:2])
    num_experts, hidden, inter = args.num_experts, args.hidden, args.inter
    local = num_experts // num_ranks
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(args.num_tokens, hidden, num_ranks, num_experts)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=4096, num_rdma_bytes=size, low_latency_mode=True)
    inputs = make_inputs(rank, args.num_tokens, hidden, num_experts, args.num_topk, num_ranks, seed=7)
    generator = torch.Generator().manual_seed(1000 + rank)
    w13, w13_scale, w2, w2_scale = make_weights(generator, local, hidden, inter)
    w1, w1_scale = deep_ep.permute_gmm1_weight(w13, w13_scale)
    weights = (w1, w1_scale, w2, w2_scale)  # grouped_swiglu_mlp_int8's layout: gmm2 [L, I, H]
    fused_weights = (w1, w1_scale, w2.transpose(1, 2).contiguous(), w2_scale)
    case = Case(
        tokens=[args.num_tokens],
        max_tokens=args.num_tokens,
        hidden=hidden,
        inter=inter,
        experts_per_rank=local,
        topk=args.num_topk,
    )

    def fused():
        return buffer.fused_deep_moe(
            inputs.x, inputs.topk_idx, inputs.topk_weights, *fused_weights, args.num_tokens, num_experts
        )[0]

    def separate():
        return unfused(buffer, inputs, case, num_experts, weights)

    def separate_bf16():
        """Dispatch in bf16 (twice the bytes), quantize on the expert side: the same bits again."""
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            inputs.x, inputs.topk_idx, args.num_tokens, num_experts, use_fp8=False
        )
        xq, x_scale = quantize_per_token_int8(recv_x[: int(recv_count.sum())])
        y = grouped_swiglu_mlp_int8(xq, x_scale, recv_count, *weights)
        y = torch.cat([y, y.new_zeros(recv_x.shape[0] - y.shape[0], hidden)])
        return buffer.low_latency_combine(y, inputs.topk_idx, inputs.topk_weights, handle)[0]

    variants = {"fused": fused, "unfused": separate, "unfused_bf16": separate_bf16}
    assert torch.equal(fused(), separate()) and torch.equal(fused(), separate_bf16())
    times = {name: [] for name in variants}
    for i in range(args.warmup + args.iters):
        # Rotate the order, so no variant always runs on the caches another one warmed.
        for name, fn in list(variants.items())[i % 3 :] + list(variants.items())[: i % 3]:
            dist.barrier(group)
            start = time.perf_counter()
            fn()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # the slowest rank decides
            if i >= args.warmup:
                times[name].append(float(elapsed))
    rows = torch.tensor([float(inputs.topk_idx.ge(0).sum())], dtype=torch.float64)
    dist.all_reduce(rows, group=group)
    buffer.destroy()
    if rank == 0:
        us = {name: statistics.median(t) * 1e6 for name, t in times.items()}
        print(
            f"[{num_ranks} ranks, {args.num_tokens} tokens/rank, H={hidden}, I={inter}, K={args.num_topk}, "
            f"E={num_experts}, {int(rows) // num_ranks} expert rows/rank, {torch.get_num_threads()} threads/rank; "
            f"median of {args.iters}, slowest rank]\n"
            f"  fused_deep_moe                                                          {us['fused']:7.0f} us\n"
            f"  unfused: low_latency_dispatch(int8) -> grouped_swiglu_mlp_int8 -> combine "
            f"{us['unfused']:7.0f} us  (fused {us['unfused'] / us['fused']:.2f}x faster)\n"
            f"  unfused: low_latency_dispatch(bf16) -> quantize -> grouped -> combine     "
            f"{us['unfused_bf16']:7.0f} us  (fused {us['unfused_bf16'] / us['fused']:.2f}x faster)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--num-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=512)
    parser.add_argument("--num-topk", type=int, default=8)
    parser.add_argument("--num-experts", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=40)
    args = parser.parse_args()
    spawn_ranks(bench_rank, args.num_processes, args)


if __name__ == "__main__":
    main()
