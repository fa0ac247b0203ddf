"""A DeepSeek-style MoE block with expert parallelism over deep_ep, checked against one process.

The block: a router (sigmoid scores with group-limited top-k, DeepSeek-V3 style, or softmax top-k),
routed SwiGLU experts sharded across the ranks (rank r holds experts [r*L, (r+1)*L)), and a shared
SwiGLU expert that every rank runs on its own tokens, all in bfloat16. Tokens reach their experts
with deep_ep's normal-mode dispatch and come back, weighted, with combine (the prefill path); the
decode path runs the routed experts in one fused_deep_moe call on a low-latency Buffer, with the
weights as the model stores them (w13 permuted once into gate/up tiles, w2 [L, H, I] as is).

Each rank feeds its own tokens through both EP paths; then rank 0 runs the same block, with every
expert, on all ranks' tokens in one process and checks that the outputs agree.

    python examples/moe_layer.py --num-processes 2                  # local CPU ranks (deep_ep.testing)
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 examples/moe_layer.py
    python examples/moe_layer.py --num-processes 4 --scoring softmax --tokens 33
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import deep_ep
from deep_ep.testing import spawn_ranks


@dataclass
class Config:
    hidden: int = 256
    moe_inter: int = 128  # intermediate size of one routed expert
    shared_inter: int = 256  # intermediate size of the shared expert
    num_experts: int = 16
    top_k: int = 4
    n_group: int = 4  # group-limited routing (sigmoid scoring): experts form n_group groups ...
    topk_group: int = 2  # ... and a token picks its experts from its best topk_group groups
    routed_scaling_factor: float = 2.5
    scoring: str = "sigmoid"  # "sigmoid" (DeepSeek-V3) or "softmax" (DeepSeek-V2 style)


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP in bf16: w13 [2I, H] (gate rows, then up rows), w2 [H, I]."""
    gate, up = (x @ w13.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.t()


class MoEBlock(torch.nn.Module):
    """Router + routed experts (all of them, or this rank's shard) + a shared expert.

    Every rank builds it from the same seed, so all ranks agree on the router, the shared expert
    and each routed expert's weights; an EP rank keeps only its experts.
    """

    def __init__(self, cfg: Config, experts: range, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        h, i, e = cfg.hidden, cfg.moe_inter, cfg.num_experts

        def randn(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

        self.cfg = cfg
        self.router = torch.randn(e, h, generator=g) / h**0.5  # float32, as DeepSeek's gate
        self.correction_bias = torch.randn(e, generator=g) * 0.1  # e_score_correction_bias (selection only)
        w13 = randn(e, 2 * i, h, scale=h**-0.5)
        w2 = randn(e, h, i, scale=i**-0.5)
        self.experts = experts  # global ids of the routed experts held here
        self.w13, self.w2 = w13[experts.start : experts.stop], w2[experts.start : experts.stop]
        self.shared_w13 = randn(2 * cfg.shared_inter, h, scale=h**-0.5)
        self.shared_w2 = randn(h, cfg.shared_inter, scale=cfg.shared_inter**-0.5)

    def route(self, x: torch.Tensor):
        """Returns topk_idx int64 [T, K] and topk_weights float32 [T, K] (scaled)."""
        cfg = self.cfg
        logits = x.float() @ self.router.t()
        if cfg.scoring == "softmax":
            scores = logits.softmax(dim=-1)
            weights, idx = scores.topk(cfg.top_k, dim=-1)
        else:
            scores = logits.sigmoid()
            biased = scores + self.correction_bias  # the bias steers the choice, not the weights
            groups = biased.view(x.shape[0], cfg.n_group, -1)
            group_score = groups.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(cfg.topk_group, dim=-1).indices, 1)
            masked = groups.masked_fill(keep.unsqueeze(-1) == 0, float("-inf")).view(x.shape[0], -1)
            idx = masked.topk(cfg.top_k, dim=-1).indices
            weights = scores.gather(1, idx)
            weights = weights / weights.sum(-1, keepdim=True)
        return idx, (weights * cfg.routed_scaling_factor).float()

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.shared_w13, self.shared_w2)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The whole block in this process (needs every expert)."""
        assert len(self.experts) == self.cfg.num_experts
        idx, weights = self.route(x)
        routed = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        for e in range(self.cfg.num_experts):
            token, k = (idx == e).nonzero(as_tuple=True)
            if token.numel():
                y = swiglu(x[token], self.w13[e], self.w2[e])
                routed.index_add_(0, token, y.float() * weights[token, k, None])
        return routed.to(torch.bfloat16) + self.shared(x)

    def forward_ep(self, x: torch.Tensor, buffer: deep_ep.Buffer) -> torch.Tensor:
        """The block with routed experts on their ranks: dispatch -> local experts -> combine."""
        idx, weights = self.route(x)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, self.cfg.num_experts)
        recv_x, _, _, rows_per_expert, handle, _ = buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=weights,
        )
        # recv_x: one row per (token, local expert) pair, expert-major: local expert l owns the next
        # rows_per_expert[l] rows.
        out = torch.empty_like(recv_x)
        start = 0
        for local, rows in enumerate(rows_per_expert):
            if rows:
                out[start : start + rows] = swiglu(recv_x[start : start + rows], self.w13[local], self.w2[local])
            start += rows
        routed, _, _ = buffer.combine(out, handle)  # sum over k of weights[t, k] * out[row(t, k)]
        return routed + self.shared(x)

    def forward_fused(self, x: torch.Tensor, buffer: deep_ep.Buffer, max_tokens: int) -> torch.Tensor:
        """The decode path: dispatch + routed experts + combine in one fused_deep_moe call. bf16 weights
        select the bf16 SwiGLU MLP (int8 weights with scales would select W8A8); gmm2 is the stored
        down projection [L, H, I]; only gmm1 needs the tiled gate/up column order."""
        idx, weights = self.route(x)
        w1, _ = deep_ep.permute_gmm1_weight(self.w13, None)  # a real model does this once, at load time
        routed, _ = buffer.fused_deep_moe(x, idx, weights, w1, None, self.w2, None, max_tokens, self.cfg.num_experts)
        return routed + self.shared(x)


def run(rank: int, num_ranks: int, group, args) -> None:
    cfg = Config(scoring=args.scoring)
    if cfg.num_experts % num_ranks:
        raise SystemExit(f"{cfg.num_experts} experts cannot be split over {num_ranks} ranks")
    local = cfg.num_experts // num_ranks
    block = MoEBlock(cfg, range(rank * local, (rank + 1) * local))
    # Uneven batches: rank r has tokens + 7 * r tokens.
    x = torch.randn(args.tokens + 7 * rank, cfg.hidden, generator=torch.Generator().manual_seed(1 + rank))
    x = x.to(torch.bfloat16)

    buffer = deep_ep.Buffer(group)  # collective: every rank of the group constructs it
    y = block.forward_ep(x, buffer)
    buffer.destroy()
    max_tokens = args.tokens + 7 * (num_ranks - 1)  # the most tokens any rank has (the same on every rank)
    ll_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens, cfg.hidden, num_ranks, cfg.num_experts)
    low_latency = deep_ep.Buffer(group, low_latency_mode=True, num_rdma_bytes=ll_bytes)
    y_fused = block.forward_fused(x, low_latency, max_tokens)
    low_latency.destroy()

    # The same block in one process: rank 0 runs it on every rank's tokens with all experts.
    xs, ys, ys_fused = ([None] * num_ranks for _ in range(3))
    dist.all_gather_object(xs, x, group=group)
    dist.all_gather_object(ys, y, group=group)
    dist.all_gather_object(ys_fused, y_fused, group=group)
    if rank == 0:
        reference = MoEBlock(cfg, range(cfg.num_experts)).forward_dense(torch.cat(xs)).float()
        for path, outputs in (("dispatch/combine", ys), ("fused_deep_moe", ys_fused)):
            got = torch.cat(outputs).float()
            # bf16 tolerance: a few bf16 ulps of the output's scale. A row sent to the wrong expert or
            # combined with the wrong weight is off by the size of the output itself.
            error = (got - reference).abs().max().item()
            bound = 2e-2 * reference.abs().max().item()
            print(
                f"EP ({path}) on {num_ranks} ranks vs one process: {got.shape[0]} tokens, max |diff| "
                f"{error:.4f} (bound {bound:.4f}), max |y| {reference.abs().max().item():.2f}"
            )
            if not error <= bound:
                raise SystemExit(f"MISMATCH: the EP block ({path}) differs from the single-process block")
        print("OK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2, help="local CPU ranks (ignored under torchrun)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens on rank 0 (rank r has 7 * r more)")
    parser.add_argument("--scoring", choices=("sigmoid", "softmax"), default="sigmoid")
    args = parser.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun: one process per rank, env:// init
        dist.init_process_group("gloo")
        try:
            run(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, args)
        finally:
            dist.destroy_process_group()
    else:
        spawn_ranks(run, args.num_processes, args)


if __name__ == "__main__":
    main()
