"""fused_deep_moe cases: expert weights in the layouts fused_deep_moe takes, and the check of one call
against the per-token reference (fused_reference.py) and the unfused pipeline; shared by
test_fused_deep_moe, test_memory and test_soak."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import gather_objects, make_inputs, to_device, to_host  # noqa: E402
from fused_reference import assert_bf16_matches, make_weights, ref_moe_token, ref_moe_token_float  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep.fused import grouped_swiglu_mlp_int8  # noqa: E402
from deep_ep.testing import rank_device  # noqa: E402


@dataclass
class Case:
    tokens: List[int]  # tokens per rank (cycled over the ranks)
    max_tokens: int = 24
    hidden: int = 128
    inter: int = 64
    experts_per_rank: int = 2
    topk: int = 3
    pattern: str = "random"
    seed: int = 0
    weights: str = "int8"  # "int8" (W8A8), "bf16" (a bf16 MLP), "ffn" (FuseMode.DISPATCH_FFN_COMBINE, int8)
    quant_mode: int = 0  # DeepEP-Ascend's fused test passes 0 with int8 weights
    int32_ids: bool = False


def expert_weights(case: Case, num_ranks: int):
    """Every expert's weights (the same on every rank): unpermuted w13 [E, 2I, H], scales, w2 [E, I, H],
    scales; bf16 weights are the int8 ones times their scales."""
    generator = torch.Generator().manual_seed(100 + case.seed)
    w13, w13_scale, w2, w2_scale = make_weights(generator, case.experts_per_rank * num_ranks, case.hidden, case.inter)
    if case.weights == "bf16":
        return (
            (w13.float() * w13_scale.unsqueeze(2)).bfloat16(),
            None,
            (w2.float() * w2_scale.unsqueeze(1)).bfloat16(),
            None,
        )
    return w13, w13_scale, w2, w2_scale


def scale_bits(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales as int64 bit patterns, as DeepEP-Ascend's DISPATCH_FFN_COMBINE callers pass them."""
    return scale.view(torch.int32).to(torch.int64)


def local_weights(rank: int, case: Case, weights):
    """This rank's L experts in the layout fused_deep_moe takes for the case's fuse mode."""
    w13, w13_scale, w2, w2_scale = weights
    mine = slice(rank * case.experts_per_rank, (rank + 1) * case.experts_per_rank)
    if case.weights == "ffn":  # gmm1 [L, H, 2I] gate | up, gmm2 [L, I, H], int64 scale bits
        return (
            w13[mine].transpose(1, 2).contiguous(),
            scale_bits(w13_scale[mine]),
            w2[mine].contiguous(),
            scale_bits(w2_scale[mine]),
        )
    w1, w1_scale = deep_ep.permute_gmm1_weight(w13[mine], None if w13_scale is None else w13_scale[mine])
    # gmm2 [L, H, I]: the down projection as a model stores it ([out, in]).
    return (
        w1,
        w1_scale,
        w2[mine].transpose(1, 2).contiguous(),
        None if w2_scale is None else w2_scale[mine].contiguous(),
    )


def grouped_weights(rank: int, case: Case, weights):
    """This rank's experts as grouped_swiglu_mlp_int8 takes them (gmm2 [L, I, H])."""
    w13, w13_scale, w2, w2_scale = weights
    mine = slice(rank * case.experts_per_rank, (rank + 1) * case.experts_per_rank)
    return (
        *deep_ep.permute_gmm1_weight(w13[mine], w13_scale[mine]),
        w2[mine].contiguous(),
        w2_scale[mine].contiguous(),
    )


def unfused(buffer, inputs, case: Case, num_experts: int, weights):
    """The same layer through the library's separate steps."""
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
        inputs.x, inputs.topk_idx, case.max_tokens, num_experts, quant_mode="int8"
    )
    y = grouped_swiglu_mlp_int8(recv_x[0], recv_x[1], recv_count, *weights)
    return buffer.low_latency_combine(y, inputs.topk_idx, inputs.topk_weights, handle)[0]


def check_case(rank: int, num_ranks: int, group, buffer, case: Case) -> Tuple[torch.Tensor, torch.Tensor]:
    """One fused_deep_moe call of `case` on every rank, checked: its counts against every rank's topk_idx,
    its output against the unfused pipeline (CPU, int8 weights) and the per-token reference.
    Returns the call's (output, counts) on the host."""
    num_experts = case.experts_per_rank * num_ranks
    num_tokens = case.tokens[rank % len(case.tokens)]
    inputs = make_inputs(
        rank, num_tokens, case.hidden, num_experts, case.topk, num_ranks, pattern=case.pattern, seed=case.seed
    )
    everyone = gather_objects(inputs.topk_idx, group)
    weights = expert_weights(case, num_ranks)
    mine = local_weights(rank, case, weights)
    ffn = case.weights == "ffn"

    # Inputs on the rank's device (NPU under --device npu), results back on the host for the checks;
    # the positional call of DeepEP-Ascend's scripts (quant_mode, fuse_mode after num_experts).
    ids = inputs.topk_idx.int() if case.int32_ids else inputs.topk_idx
    limit = case.max_tokens * case.topk * num_ranks if ffn else case.max_tokens  # FFN_COMBINE: max received rows
    out, counts = to_host(
        buffer.fused_deep_moe(
            *to_device((inputs.x, ids, inputs.topk_weights)),
            *to_device(mine),
            limit,
            num_experts,
            case.quant_mode,
            deep_ep.FuseMode.DISPATCH_FFN_COMBINE if ffn else deep_ep.FuseMode.FUSED_DEEP_MOE,
        )
    )
    assert out.dtype == torch.bfloat16 and out.shape == (num_tokens, case.hidden)
    # FUSED_DEEP_MOE: ep_recv_count[e * R + r] = rows local expert e received from rank r (selections);
    # DISPATCH_FFN_COMBINE: rows per local expert.
    expected = [
        [int((everyone[r] == rank * case.experts_per_rank + e).sum()) for r in range(num_ranks)]
        for e in range(case.experts_per_rank)
    ]
    expected = [sum(row) for row in expected] if ffn else [n for row in expected for n in row]
    assert counts.dtype == torch.int32 and counts.tolist() == expected

    # (b) the unfused pipeline: the same bits (CPU; on NPU the expert MLP is CANN's, not fused.py's).
    if rank_device().type == "cpu" and case.weights != "bf16":
        assert torch.equal(out, unfused(buffer, inputs, case, num_experts, grouped_weights(rank, case, weights)))

    # (a) the per-token reference.
    for t in range(num_tokens):
        if case.weights == "bf16":
            ref = ref_moe_token_float(inputs.x[t], inputs.topk_idx[t], inputs.topk_weights[t], weights[0], weights[2])
            assert torch.allclose(out[t].double(), ref, rtol=3e-2, atol=3e-2 * float(ref.abs().max())), (
                f"rank {rank} token {t}: {(out[t].double() - ref).abs().max()}"
            )
            continue
        ref, tol = ref_moe_token(inputs.x[t], inputs.topk_idx[t], inputs.topk_weights[t], *weights)
        assert_bf16_matches(out[t], ref, tol, f"rank {rank} token {t}")
    no_expert = (inputs.topk_idx < 0).all(1)
    assert not out[no_expert].any()
    return out, counts
