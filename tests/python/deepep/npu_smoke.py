"""Device smoke test for an Ascend machine: 8-rank dispatch + combine on NPUs against the CPU reference.

    python tests/python/deepep/npu_smoke.py            # needs torch_npu and 8 NPUs (A2 or A3)

Runs, on 8 ranks (rank r on NPU r, HCCL), and compares with the pure-torch reference built from
every rank's inputs (deep_ep.reference):

* normal mode: dispatch + combine (bf16);
* low-latency mode: T < Nmax on every rank, uneven T, -1 entries in topk_idx; recv_count, the
  received rows and the weighted combine;
* fused_deep_moe (W8A8): against the per-token reference (quantize, gmm1, SwiGLU, requantize, gmm2, weighted sum).

Prints the torch, torch_npu and CANN versions and the rules deep_ep applies for them first.
Where torch_npu or 8 NPUs are missing it says why and exits 0, so it can run anywhere; pytest
does not collect it (no test_ prefix): it is not part of the CPU suite.
"""

from __future__ import annotations

import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, REPO_ROOT)

import deep_ep  # noqa: E402
from deep_ep.reference import reference_combine, reference_dispatch  # noqa: E402
from deep_ep.testing import npu_skip_reason, spawn_ranks  # noqa: E402

NUM_RANKS = 8
NMAX, HIDDEN, TOPK, EXPERTS_PER_RANK = 16, 1024, 4, 2  # H = 1024: inside A3's 1024..8192 and A2's limits


def _inputs(rank: int, num_tokens: int, num_experts: int, seed: int):
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.randn(num_tokens, HIDDEN, generator=gen).to(torch.bfloat16)
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(TOPK, dim=1).indices
    idx[torch.rand(num_tokens, TOPK, generator=gen) < 0.15] = -1  # -1 entries
    weights = torch.rand(num_tokens, TOPK, generator=gen)
    return x, idx, weights


def _gather(group, *tensors):
    """Every rank's host copies of `tensors` (uneven T: all_gather_object)."""
    objects = [None] * NUM_RANKS
    torch.distributed.all_gather_object(objects, [t.cpu() for t in tensors], group=group)
    return [list(column) for column in zip(*objects)]


def _check_normal(rank: int, group, device, num_experts: int) -> None:
    x, idx, weights = _inputs(rank, 24 + 3 * rank, num_experts, seed=1)
    buffer = deep_ep.Buffer(group)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx.to(device), num_experts)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x.to(device),
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx.to(device),
        topk_weights=weights.to(device),
    )
    combined = buffer.combine((recv_x.float() * 2).to(torch.bfloat16), handle)[0]
    xs, idxs, ws = _gather(group, x, idx, weights)
    ref = reference_dispatch(xs, idxs, ws, num_experts, rank)
    assert torch.equal(recv_x.cpu()[: ref["x"].shape[0]], ref["x"]), "normal dispatch rows"
    expected = reference_combine((x.float().unsqueeze(1).expand(-1, TOPK, -1) * 2).to(torch.bfloat16), idx, weights)
    torch.testing.assert_close(combined.cpu().double(), expected, rtol=2e-2, atol=2e-2)
    buffer.destroy()


def _low_latency_buffer(group, num_experts: int) -> deep_ep.Buffer:
    """(num_rdma_bytes is not used on NPU; it lets the same checks run on CPU ranks.)"""
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(NMAX, HIDDEN, group.size(), num_experts)
    return deep_ep.Buffer(group, num_rdma_bytes=size, low_latency_mode=True)


def _check_low_latency(rank: int, group, device, num_experts: int) -> None:
    x, idx, weights = _inputs(rank, NMAX - 1 - rank % 3, num_experts, seed=2)  # T < Nmax, uneven
    buffer = _low_latency_buffer(group, num_experts)
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
        x.to(device), idx.to(device), NMAX, num_experts, use_fp8=False, topk_weights=weights.to(device)
    )
    xs, idxs, ws = _gather(group, x, idx, weights)
    ref = reference_dispatch(xs, idxs, ws, num_experts, rank)
    rows = ref["x"].shape[0]
    assert recv_count.cpu().tolist() == ref["rows_per_expert"], "low-latency recv_count"
    # within an expert the operators' row order is theirs: compare the sets of rows
    received = recv_x.cpu()[:rows].float()
    assert torch.equal(received.sort(dim=0).values, ref["x"].float().sort(dim=0).values), "low-latency rows"
    combined = buffer.low_latency_combine(
        (recv_x.float() * 2).to(torch.bfloat16), idx.to(device), weights.to(device), handle
    )[0]
    expected = reference_combine((x.float().unsqueeze(1).expand(-1, TOPK, -1) * 2).to(torch.bfloat16), idx, weights)
    torch.testing.assert_close(combined.cpu().double(), expected, rtol=2e-2, atol=2e-2)
    buffer.destroy()


def _check_fused(rank: int, group, device, num_experts: int) -> None:
    from deep_ep.fused import permute_gmm1_weight, quantize_per_token_int8

    inter = 128
    gen = torch.Generator().manual_seed(7)  # the same weights on every rank; rank r holds experts r*L..
    w13 = torch.randint(-127, 128, (num_experts, 2 * inter, HIDDEN), generator=gen, dtype=torch.int8)
    s13 = torch.rand(num_experts, 2 * inter, generator=gen) * 1e-3
    # gmm2_weight [E, H, I]: each expert's down projection in [out, in] order, as DeepEP-Ascend's callers pass it
    w2 = torch.randint(-127, 128, (num_experts, HIDDEN, inter), generator=gen, dtype=torch.int8)
    s2 = torch.rand(num_experts, HIDDEN, generator=gen) * 1e-3
    mine = slice(rank * EXPERTS_PER_RANK, (rank + 1) * EXPERTS_PER_RANK)
    w1, s1 = permute_gmm1_weight(w13[mine], s13[mine])
    x, idx, weights = _inputs(rank, NMAX - 2, num_experts, seed=3)
    buffer = _low_latency_buffer(group, num_experts)
    out, _ = buffer.fused_deep_moe(
        x.to(device),
        idx.to(device),
        weights.to(device),
        w1.to(device),
        s1.to(device),
        w2[mine].to(device),
        s2[mine].to(device),
        NMAX,
        num_experts,
    )
    xq, sx = quantize_per_token_int8(x)
    expected = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(TOPK):
            e = int(idx[t, k])
            if e < 0:
                continue
            h = (xq[t].double() @ w13[e].double().T) * float(sx[t]) * s13[e].double()
            a = torch.nn.functional.silu(h[:inter]) * h[inter:]
            aq, sa = quantize_per_token_int8(a.float().unsqueeze(0))
            expected[t] += float(weights[t, k]) * (aq[0].double() @ w2[e].double().T) * float(sa[0]) * s2[e].double()
    torch.testing.assert_close(out.cpu().double(), expected, rtol=5e-2, atol=5e-2 * float(expected.abs().max()))
    buffer.destroy()


def _run(rank: int, num_ranks: int, group) -> None:
    device = torch.device("npu", torch.npu.current_device())
    num_experts = EXPERTS_PER_RANK * num_ranks
    for name, check in (("normal", _check_normal), ("low-latency", _check_low_latency), ("fused", _check_fused)):
        check(rank, group, device, num_experts)
        if rank == 0:
            print(f"{name}: ok", flush=True)


def main() -> int:
    reason = npu_skip_reason(NUM_RANKS)
    if reason:
        print(f"npu_smoke skipped: {reason}")
        return 0
    import torch_npu

    from deep_ep.npu import operators, versions

    print(
        f"torch {torch.__version__}, torch_npu {getattr(torch_npu, '__version__', 'unknown')}, "
        f"CANN {versions.cann_version(torch_npu) or 'unknown'}, SoC {operators.detect_soc() or 'other'}"
    )
    print(versions.describe(operators.detect_release()))
    buffsize = operators.hccl_buffsize_mb(NMAX, HIDDEN, NUM_RANKS, EXPERTS_PER_RANK * NUM_RANKS, TOPK)
    spawn_ranks(
        _run,
        NUM_RANKS,
        env={"HCCL_BUFFSIZE": str(max(buffsize, int(os.environ.get("HCCL_BUFFSIZE", 0))))},
        device="npu",
    )
    print("npu_smoke: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
