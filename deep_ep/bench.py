"""The main job: a short multi-rank dispatch/combine run on local CPU ranks.

    python -m deep_ep.bench                        # 2 ranks, normal mode, checked, then timed
    python -m deep_ep.bench --num-processes 4 --int8
    python -m deep_ep.bench --mode low_latency     # 128 tokens per rank (Nmax 128), int8 dispatch

Every rank first checks one dispatch/combine against the pure-torch reference, then
times each strategy; all figures in the table come from this one run:
  - dispatch / combine time (slowest rank, median over iterations) and GB/s
    (bytes received on rank 0 / time; in low-latency mode the rows that hold data, at the bytes
    the format moves per (token, expert) selection: int8 = H + 4 scale bytes, bf16 = 2H),
  - plain memcpy GB/s of the same bytes, copied by every rank at the same time,
  - the ratio between the strategies.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

from . import Buffer
from .reference import quantize_reference, reference_combine, reference_dispatch
from .testing import spawn_ranks
from .transport import hierarchical


@dataclass
class Timing:
    """One strategy's figures for the table."""

    dispatch: float  # seconds
    combine: float
    bytes: int  # dispatch bytes received on rank 0
    combine_bytes: int
    network_bytes: int = 0  # dispatch bytes rank 0 sends to other nodes, per call
    network_rows: int = 0


def make_rank_inputs(rank: int, args: argparse.Namespace):
    generator = torch.Generator().manual_seed(rank)
    num_tokens = args.num_tokens
    x = torch.randn(num_tokens, args.hidden, generator=generator).to(torch.bfloat16)
    scores = torch.rand(num_tokens, args.num_experts, generator=generator)
    topk_idx = scores.topk(args.num_topk, dim=1).indices
    topk_weights = torch.softmax(scores.gather(1, topk_idx), dim=1)
    return x, topk_idx, topk_weights


def timed(group: dist.ProcessGroup, fn: Callable[[], object], iters: int, batch: int = 1) -> float:
    """Median over iterations of the slowest rank's time per call, in seconds (ranks start together).
    With batch > 1 an iteration times `batch` calls in a row, so that the ranks' skew on leaving the
    barrier (tens of microseconds) does not count as latency of a call that takes about as long."""
    times = []
    for _ in range(iters):
        dist.barrier(group)
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        times.append((time.perf_counter() - start) / batch)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return statistics.median(slowest.tolist())


def recv_bytes(recv_x) -> int:
    if isinstance(recv_x, tuple):
        return recv_x[0].numel() + recv_x[1].numel() * 4
    return recv_x.numel() * recv_x.element_size()


def check_against_reference(rank: int, group, buffer: Buffer, args, x, topk_idx, topk_weights, quant: str) -> None:
    everyone: List = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (x, topk_idx, topk_weights), group=group)
    _, _, per_expert, _, _ = buffer.get_dispatch_layout(topk_idx, args.num_experts)
    recv_x, _, _, counts, handle, _ = buffer.dispatch(x, num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                                      topk_weights=topk_weights, quant_mode=quant)
    ref = reference_dispatch([e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone],
                             args.num_experts, rank)
    if quant == "int8":
        q_ref, scale_ref = quantize_reference(ref["x"])
        ok = bool(((recv_x[0].int() - q_ref.int()).abs() <= 1).all()) and \
            torch.allclose(recv_x[1].double(), scale_ref, rtol=1e-6, atol=0)
        y = (recv_x[0].float() * recv_x[1].unsqueeze(1)).to(torch.bfloat16)
    else:
        ok = torch.equal(recv_x, ref["x"])
        y = recv_x
    if not ok or counts != ref["rows_per_expert"]:
        raise AssertionError(f"rank {rank}: dispatch differs from the reference")
    combined, _, _ = buffer.combine(y, handle)
    x_used = x.float() if quant == "bf16" else \
        (lambda q: q[0].double() * q[1].unsqueeze(1))(quantize_reference(x)).float()
    selection = x_used.to(torch.bfloat16).unsqueeze(1).expand(-1, args.num_topk, -1)
    expected = reference_combine(selection, topk_idx, topk_weights)
    if not torch.allclose(combined.double(), expected, rtol=2e-2, atol=5e-2 if quant == "int8" else 2e-2):
        raise AssertionError(f"rank {rank}: combine differs from the reference")


def alltoall_network_rows(topk_idx: torch.Tensor, args: argparse.Namespace, rank: int, num_ranks: int) -> int:
    """Rows the alltoall strategy sends to other nodes: one per (token, rank of another node)."""
    per_node = args.ranks_per_node or num_ranks
    owner = torch.where(topk_idx >= 0, topk_idx // (args.num_experts // num_ranks), -1)
    return sum(int((owner == r).any(1).sum()) for r in range(num_ranks) if r // per_node != rank // per_node)


def bench_normal(rank: int, group, args: argparse.Namespace, quant: str) -> Dict[str, Timing]:
    x, topk_idx, topk_weights = make_rank_inputs(rank, args)
    num_ranks = dist.get_world_size(group)
    rows: Dict[str, Timing] = {}
    for strategy in ("default", "alltoall"):
        buffer = Buffer(group, num_nvl_bytes=args.nvl_bytes, normal_strategy=strategy)
        check_against_reference(rank, group, buffer, args, x, topk_idx, topk_weights, quant)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, args.num_experts)
        kwargs = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                      topk_idx=topk_idx, topk_weights=topk_weights, quant_mode=quant)
        result = {}

        def dispatch():
            result["out"] = buffer.dispatch(x, **kwargs)

        for _ in range(args.warmup):
            dispatch()
        before = dict(hierarchical.traffic)
        dispatch_s = timed(group, dispatch, args.iters)
        recv_x, handle = result["out"][0], result["out"][4]
        # Bytes a dispatch sends to other nodes: counted by the hierarchical transport, one row per
        # (token, node); the alltoall strategy sends one row (the same bytes) per (token, rank).
        network_rows = (hierarchical.traffic["dispatch_rows"] - before["dispatch_rows"]) // args.iters
        network_bytes = (hierarchical.traffic["dispatch_bytes"] - before["dispatch_bytes"]) // args.iters
        if strategy == "alltoall":
            row_bytes = network_bytes // network_rows if network_rows else rows["default"].network_bytes // max(
                1, rows["default"].network_rows)
            network_rows = alltoall_network_rows(topk_idx, args, rank, num_ranks)
            network_bytes = network_rows * row_bytes
        y = (recv_x[0].float() * recv_x[1].unsqueeze(1)).to(torch.bfloat16) if quant == "int8" else recv_x
        for _ in range(args.warmup):
            buffer.combine(y, handle)
        combine_s = timed(group, lambda: buffer.combine(y, handle), args.iters)
        rows[strategy] = Timing(dispatch_s, combine_s, recv_bytes(recv_x), y.numel() * y.element_size(),
                                network_bytes, network_rows)
        buffer.destroy()
        del result, recv_x, handle, y
    return rows


def check_low_latency(rank: int, group, buffer: Buffer, args, x, topk_idx, topk_weights, use_fp8: bool) -> None:
    everyone: List = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (x, topk_idx, topk_weights), group=group)
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, args.num_max_tokens,
                                                                   args.num_experts, use_fp8=use_fp8)
    ref = reference_dispatch([e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone],
                             args.num_experts, rank)
    real = ref["x"].shape[0]
    if use_fp8:
        q_ref, scale_ref = quantize_reference(ref["x"])
        ok = bool(((recv_x[0][:real].int() - q_ref.int()).abs() <= 1).all()) and \
            torch.allclose(recv_x[1][:real].double(), scale_ref, rtol=1e-6, atol=0)
        y = (recv_x[0].float() * recv_x[1].unsqueeze(1)).to(torch.bfloat16)
    else:
        ok = torch.equal(recv_x[:real], ref["x"])
        y = recv_x
    if not ok or recv_count.tolist() != ref["rows_per_expert"]:
        raise AssertionError(f"rank {rank}: low_latency_dispatch differs from the reference")
    combined, _, _ = buffer.low_latency_combine(y, topk_idx, topk_weights, handle)
    x_used = x.float() if not use_fp8 else \
        (lambda q: q[0].double() * q[1].unsqueeze(1))(quantize_reference(x)).float()
    selection = x_used.to(torch.bfloat16).unsqueeze(1).expand(-1, args.num_topk, -1)
    expected = reference_combine(selection, topk_idx, topk_weights)
    if not torch.allclose(combined.double(), expected, rtol=2e-2, atol=5e-2 if use_fp8 else 2e-2):
        raise AssertionError(f"rank {rank}: low_latency_combine differs from the reference")


def bench_low_latency(rank: int, group, args: argparse.Namespace, quant: str) -> Dict[str, Timing]:
    x, topk_idx, topk_weights = make_rank_inputs(rank, args)
    num_ranks = dist.get_world_size(group)
    use_fp8 = quant == "int8"
    size = Buffer.get_low_latency_rdma_size_hint(args.num_max_tokens, args.hidden, num_ranks, args.num_experts)
    rows: Dict[str, Timing] = {}
    for strategy in ("default", "alltoall"):
        buffer = Buffer(group, num_nvl_bytes=4096, num_rdma_bytes=size, low_latency_mode=True,
                        low_latency_strategy=strategy)
        check_low_latency(rank, group, buffer, args, x, topk_idx, topk_weights, use_fp8)
        result = {}

        def dispatch():
            result["out"] = buffer.low_latency_dispatch(x, topk_idx, args.num_max_tokens, args.num_experts,
                                                        use_fp8=use_fp8)

        for _ in range(args.warmup):
            dispatch()
        dispatch_s = timed(group, dispatch, args.iters, args.batch)
        recv_x, recv_count, handle = result["out"][:3]
        y = (recv_x[0].float() * recv_x[1].unsqueeze(1)).to(torch.bfloat16) if use_fp8 else recv_x.clone()

        def combine():
            buffer.low_latency_combine(y, topk_idx, topk_weights, handle)

        for _ in range(args.warmup):
            combine()
        combine_s = timed(group, combine, args.iters, args.batch)
        selections = int(recv_count.sum())
        per_selection = args.hidden + 4 if use_fp8 else 2 * args.hidden
        rows[strategy] = Timing(dispatch_s, combine_s, selections * per_selection, selections * 2 * args.hidden)
        buffer.destroy()
        del result, recv_x, handle, y
    return rows


def bench_rank(rank: int, num_ranks: int, group, args: argparse.Namespace) -> None:
    quant = args.quant or ("int8" if args.int8 or args.mode == "low_latency" else "bf16")
    bench = bench_low_latency if args.mode == "low_latency" else bench_normal
    rows = bench(rank, group, args, quant)
    # memcpy of the same bytes, every rank copying at the same time as in dispatch.
    nbytes = torch.tensor([rows["default"].bytes], dtype=torch.int64)
    dist.broadcast(nbytes, 0, group=group)
    nbytes = int(nbytes)
    src, dst = torch.empty(nbytes, dtype=torch.uint8).fill_(1), torch.empty(nbytes, dtype=torch.uint8).fill_(0)
    for _ in range(args.warmup):
        dst.copy_(src)
    memcpy_s = timed(group, lambda: dst.copy_(src), args.iters, args.batch)
    if rank != 0:
        return
    gbps = lambda n, s: n / s / 1e9  # noqa: E731
    tokens = f"{args.num_tokens} tokens/rank" + (f" (Nmax {args.num_max_tokens})" if args.mode == "low_latency" else "")
    per_selection = ""
    if args.mode == "low_latency":
        per_selection = f", {args.hidden + 4 if quant == 'int8' else 2 * args.hidden} B per selection"
    print(f"\ndeep_ep {args.mode.replace('_', '-')} mode: {num_ranks} ranks, {tokens}, hidden {args.hidden}, "
          f"top-{args.num_topk} of {args.num_experts} experts, dispatch {quant}{per_selection}, combine bf16 "
          f"(rank 0 receives {nbytes / 1e6:.1f} MB)")
    print(f"{'strategy':<22}{'dispatch us':>13}{'GB/s':>8}{'combine us':>13}{'GB/s':>8}{'total us':>12}")
    for name, label in (("default", "default (shm)"), ("alltoall", "alltoall (gloo)")):
        r = rows[name]
        print(f"{label:<22}{r.dispatch * 1e6:>13.0f}{gbps(r.bytes, r.dispatch):>8.2f}"
              f"{r.combine * 1e6:>13.0f}{gbps(r.combine_bytes, r.combine):>8.2f}"
              f"{(r.dispatch + r.combine) * 1e6:>12.0f}")
    print(f"{'memcpy (same bytes)':<22}{memcpy_s * 1e6:>13.0f}{gbps(nbytes, memcpy_s):>8.2f}")
    total = {k: v.dispatch + v.combine for k, v in rows.items()}
    print(f"default vs alltoall, dispatch+combine: {total['alltoall'] / total['default']:.2f}x faster")
    print(f"default dispatch GB/s vs memcpy GB/s: {memcpy_s / rows['default'].dispatch:.2f} "
          f"(dispatch takes {rows['default'].dispatch / memcpy_s:.2f}x the memcpy time)")
    if args.ranks_per_node and args.mode == "normal":
        print(f"\n{num_ranks // args.ranks_per_node if num_ranks % args.ranks_per_node == 0 else 'uneven'} simulated "
              f"nodes of {args.ranks_per_node} ranks (DEEP_EP_RANKS_PER_NODE); rank 0 per dispatch:")
        print(f"{'strategy':<22}{'rows to other nodes':>21}{'MB':>9}{'inter-node GB/s':>17}{'intra-node GB/s':>17}")
        for name, label in (("default", "hierarchical (shm)"), ("alltoall", "alltoall (gloo)")):
            r = rows[name]
            print(f"{label:<22}{r.network_rows:>21}{r.network_bytes / 1e6:>9.2f}"
                  f"{gbps(r.network_bytes, r.dispatch):>17.2f}{gbps(r.bytes, r.dispatch):>17.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2, help="local CPU ranks")
    parser.add_argument("--mode", choices=("normal", "low_latency"), default="normal")
    parser.add_argument("--num-tokens", type=int, default=None,
                        help="tokens per rank (default 1024; 128 in low-latency mode)")
    parser.add_argument("--num-max-tokens", type=int, default=None,
                        help="low-latency mode: num_max_dispatch_tokens_per_rank (default: --num-tokens)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--num-topk", type=int, default=8)
    parser.add_argument("--num-experts", type=int, default=32)
    parser.add_argument("--int8", action="store_true", help="per-token int8 dispatch")
    parser.add_argument("--quant", choices=("bf16", "int8"), default=None,
                        help="dispatch format (default: bf16 in normal mode unless --int8, int8 in low-latency)")
    parser.add_argument("--nvl-bytes", type=int, default=256 << 20, help="shared-memory bytes per rank")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ranks-per-node", type=int, default=0,
                        help="simulate nodes of this many ranks (DEEP_EP_RANKS_PER_NODE): the hierarchical "
                             "transport between them")
    parser.add_argument("--batch", type=int, default=None,
                        help="calls timed in a row per iteration (default 1; 20 in low-latency mode)")
    parser.add_argument("--default-threads", action="store_true")
    args = parser.parse_args()
    if args.num_tokens is None:
        args.num_tokens = 128 if args.mode == "low_latency" else 1024
    if args.num_max_tokens is None:
        args.num_max_tokens = args.num_tokens
    if args.batch is None:
        args.batch = 20 if args.mode == "low_latency" else 1
    env = {"DEEP_EP_RANKS_PER_NODE": str(args.ranks_per_node)} if args.ranks_per_node else {}
    spawn_ranks(bench_rank, args.num_processes, args, env=env, share_threads=not args.default_threads)


if __name__ == "__main__":
    main()
