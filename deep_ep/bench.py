"""The main job: a short multi-rank dispatch/combine run on local CPU ranks, beside its baselines.

    python -m deep_ep.bench                          # 2 ranks, normal mode, 16/128/1024 tokens per rank
    python -m deep_ep.bench --num-tokens 16,128,1024,4096 --default-threads
    python -m deep_ep.bench --num-processes 4 --int8 --num-tokens 2048
    python -m deep_ep.bench --mode low_latency       # 128 tokens per rank (Nmax 128), int8 dispatch

Normal mode: per size, every rank first checks each figure's calls against the pure-torch
reference, then times all figures together (measure_together: each iteration times one batch of
every figure in turn; medians over iterations of the slowest rank's time per call; a small call is
timed in batches of calls in a row, about 5 ms per iteration, the MPI baselines alike):
  - deep_ep: get_dispatch_layout + dispatch + combine in a row, and dispatch and combine alone;
  - the transport floor: MPI Alltoallv (mpi4py over MPICH, shared memory inside a host) between
    warm preallocated buffers, moving exactly the bytes dispatch receives (rows, top-k ids and
    weights) and the bytes combine returns (rows);
  - a Megatron-style MPI dispatcher (sort by expert, Alltoallv of counts and rows, permute; back
    with a weighted index_add): what one writes without deep_ep;
  - deep_ep's gloo all_to_all strategy ("alltoall");
  - with --default-threads, deep_ep's layout + dispatch + combine again with torch's default thread
    count (every core per process, as a program started with torch.multiprocessing.spawn has).
With `pip install .[bench]` (mpi4py, mpich) the ranks run under `mpiexec -n R python -m
deep_ep.bench_mpi` (deep_ep/bench_mpi.py), which runs deep_ep and the MPI baselines in the same
processes on the same seeded inputs; without it they are spawned by torch and the table says how
to add the baselines.

Low-latency mode: dispatch / combine time and GB/s (rows that hold data, at the bytes the format
moves per (token, expert) selection: int8 = H + 4 scale bytes, bf16 = 2H) beside a plain memcpy of
the same bytes, copied by every rank at the same time; every strategy's dispatch, combine and
zero-copy combine and both memcpy sizes are timed together, as the normal-mode figures are.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Hashable, List, Optional, Protocol, Tuple

import torch
import torch.distributed as dist

import deep_ep_cpp

from . import Buffer
from .reference import quantize_reference, reference_combine, reference_dispatch
from .testing import spawn_ranks, torch_threads_per_rank
from .transport import hierarchical
from .utils import num_threads

if TYPE_CHECKING:
    from .bench_mpi import MpiOutcome

# Default wall time one timed measurement aims at: enough calls to be stable, few enough for a short run.
MEASURE_SECONDS = 0.6
# Wall time one timed iteration aims at by default (calls in a row after one barrier), and its most calls.
BATCH_SECONDS = 0.005
MOST_BATCH = 32


@dataclass
class Timing:
    """One strategy's figures for the table (seconds; bytes of rank 0)."""

    dispatch: float
    combine: float
    bytes: int  # dispatch bytes received on rank 0
    combine_bytes: int
    network_bytes: int = 0  # dispatch bytes rank 0 sends to other nodes, per call
    network_rows: int = 0
    full: float = 0.0  # get_dispatch_layout + dispatch + combine in a row
    full_default_threads: float = 0.0  # the same with torch's default thread count (--default-threads)
    combine_in_place: float = 0.0  # low-latency combine from get_next_low_latency_combine_buffer
    python_calls: float = 0.0  # Python function calls per layout + dispatch + combine (python_calls())


def make_rank_inputs(
    rank: int, num_tokens: int, hidden: int, num_experts: int, num_topk: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's seeded inputs (the MPI baselines make the same): x bf16 [T, H], topk_idx int64
    [T, K] (distinct experts), topk_weights float32 [T, K]."""
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(num_tokens, hidden, generator=generator).to(torch.bfloat16)
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    topk_idx = scores.topk(num_topk, dim=1).indices
    topk_weights = torch.softmax(scores.gather(1, topk_idx), dim=1)
    return x, topk_idx, topk_weights


def python_calls(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Python function calls per call of `fn` (cProfile's count, builtins included), after one
    warm call. Collective: every rank must run it with the same `fn`."""
    fn()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(repeats):
        fn()
    profile.disable()
    return sum(stat[1] for stat in pstats.Stats(profile).stats.values()) / repeats


def calls_for_budget(seconds_per_call: float, budget: float, most: int, fewest: int = 3) -> int:
    """Timed iterations that fill about `budget` seconds, within [fewest, most]."""
    return max(fewest, min(most, int(budget / max(seconds_per_call, 1e-6))))


def calls_per_iteration(seconds_per_call: float, batch: Optional[int]) -> int:
    """`batch`, or by default as many calls in a row as fill BATCH_SECONDS (at most MOST_BATCH): the
    ranks leave the barrier before an iteration up to a few hundred microseconds apart (gloo), which
    would otherwise count as time of a call that itself takes less than a millisecond."""
    if batch is not None:
        return batch
    return max(1, min(MOST_BATCH, math.ceil(BATCH_SECONDS / max(seconds_per_call, 1e-6))))


@dataclass
class Measured:
    """One figure to time: calls of `fn`, with torch's thread count set to `threads`."""

    fn: Callable[[], object]
    threads: int


class RankSync(Protocol):
    """How the ranks of a measurement start each iteration together and find the slowest rank."""

    def barrier(self) -> None: ...

    def max_over_ranks(self, values: torch.Tensor) -> None:
        """Replaces float64 `values` by their element-wise maximum over the ranks, in place."""


@dataclass
class TorchSync:
    """RankSync over a torch.distributed group."""

    group: dist.ProcessGroup

    def barrier(self) -> None:
        dist.barrier(self.group)

    def max_over_ranks(self, values: torch.Tensor) -> None:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)


def measure_together(
    sync: RankSync,
    figures: Dict[Hashable, Measured],
    iters: int,
    batch: Optional[int] = None,
    budget: Optional[float] = None,
    warmup: int = 0,
) -> Dict[Hashable, float]:
    """Seconds per call of every figure: the median over iterations of the slowest rank's time.

    The figures are timed interleaved: iteration i times one batch of each figure in turn, every
    batch after a barrier, so that all figures (and the ratios between them) meet the same phases of
    a shared, noisy machine. A batch is `batch` calls in a row (default: calls_per_iteration), so
    that the ranks' skew on leaving the barrier does not count as latency of a short call; a batch
    of several calls follows one untimed call, so that it runs warm as in a run of its own, not
    after the other figures' data went through the caches. After `warmup` calls, one untimed call
    of each figure estimates its time; with a `budget` (seconds) a figure gets as many iterations
    as fill it, at most `iters` and at least 3, else `iters`."""
    threads_before = torch.get_num_threads()
    names, items = list(figures), list(figures.values())
    estimates = torch.empty(len(items), dtype=torch.float64)
    for j, figure in enumerate(items):
        torch.set_num_threads(figure.threads)
        for _ in range(warmup):
            figure.fn()
        start = time.perf_counter()
        figure.fn()
        estimates[j] = time.perf_counter() - start
    sync.max_over_ranks(estimates)
    batches = [calls_per_iteration(e, batch) for e in estimates.tolist()]
    counts = [
        iters if budget is None else calls_for_budget(e * b, budget, iters) for e, b in zip(estimates.tolist(), batches)
    ]
    times = torch.zeros(len(items), max(counts), dtype=torch.float64)
    for i in range(max(counts)):
        for j, figure in enumerate(items):
            if i >= counts[j]:
                continue
            torch.set_num_threads(figure.threads)
            if batches[j] > 1:
                figure.fn()  # untimed: warm again after the other figures (a long call is timed alone, cold)
            sync.barrier()
            start = time.perf_counter()
            for _ in range(batches[j]):
                figure.fn()
            times[j, i] = (time.perf_counter() - start) / batches[j]
    torch.set_num_threads(threads_before)
    sync.max_over_ranks(times)
    return {name: statistics.median(times[j, : counts[j]].tolist()) for j, name in enumerate(names)}


def recv_bytes(recv_x) -> int:
    if isinstance(recv_x, tuple):
        return recv_x[0].numel() + recv_x[1].numel() * 4
    return recv_x.numel() * recv_x.element_size()


def check_against_reference(rank: int, group, buffer: Buffer, args, x, topk_idx, topk_weights, quant: str) -> None:
    everyone: List = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (x, topk_idx, topk_weights), group=group)
    _, _, per_expert, _, _ = buffer.get_dispatch_layout(topk_idx, args.num_experts)
    recv_x, _, _, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights, quant_mode=quant
    )
    ref = reference_dispatch(
        [e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone], args.num_experts, rank
    )
    if quant == "int8":
        q_ref, scale_ref = quantize_reference(ref["x"])
        ok = bool(((recv_x[0].int() - q_ref.int()).abs() <= 1).all()) and torch.allclose(
            recv_x[1].double(), scale_ref, rtol=1e-6, atol=0
        )
        y = (recv_x[0].float() * recv_x[1].unsqueeze(1)).to(torch.bfloat16)
    else:
        ok = torch.equal(recv_x, ref["x"])
        y = recv_x
    if not ok or counts != ref["rows_per_expert"]:
        raise AssertionError(f"rank {rank}: dispatch differs from the reference")
    combined, _, _ = buffer.combine(y, handle)
    x_used = (
        x.float() if quant == "bf16" else (lambda q: q[0].double() * q[1].unsqueeze(1))(quantize_reference(x)).float()
    )
    selection = x_used.to(torch.bfloat16).unsqueeze(1).expand(-1, args.num_topk, -1)
    expected = reference_combine(selection, topk_idx, topk_weights)
    if not torch.allclose(combined.double(), expected, rtol=2e-2, atol=5e-2 if quant == "int8" else 2e-2):
        raise AssertionError(f"rank {rank}: combine differs from the reference")


def alltoall_network_rows(topk_idx: torch.Tensor, args: argparse.Namespace, rank: int, num_ranks: int) -> int:
    """Rows the alltoall strategy sends to other nodes: one per (token, rank of another node)."""
    per_node = args.ranks_per_node or num_ranks
    owner = torch.where(topk_idx >= 0, topk_idx // (args.num_experts // num_ranks), -1)
    return sum(int((owner == r).any(1).sum()) for r in range(num_ranks) if r // per_node != rank // per_node)


@dataclass
class StrategyRun:
    """One normal strategy at one size, checked against the reference and ready to time."""

    buffer: Buffer
    figures: Dict[str, Measured]  # "full" (L+D+C), "dispatch", "combine"; "full_default_threads"
    bytes: int
    combine_bytes: int
    network_bytes: int
    network_rows: int
    python_calls: float  # per layout + dispatch + combine

    def timing(self, seconds: Dict[str, float]) -> Timing:
        """The table's row from the seconds measure_together gave for `figures`."""
        return Timing(
            seconds["dispatch"],
            seconds["combine"],
            self.bytes,
            self.combine_bytes,
            self.network_bytes,
            self.network_rows,
            seconds["full"],
            full_default_threads=seconds.get("full_default_threads", 0.0),
            python_calls=self.python_calls,
        )


def prepare_normal(
    rank: int,
    group,
    args: argparse.Namespace,
    strategy: str,
    num_tokens: int,
    reference_run: Optional[StrategyRun],
) -> StrategyRun:
    """Checks one strategy at `num_tokens` tokens per rank against the reference and returns what
    to time: layout + dispatch + combine (with --default-threads also at torch's default thread
    count, for "default"), dispatch alone and combine alone (of one dispatch's handle)."""
    quant = args.quant
    x, topk_idx, topk_weights = make_rank_inputs(rank, num_tokens, args.hidden, args.num_experts, args.num_topk)
    num_ranks = dist.get_world_size(group)
    buffer = Buffer(group, num_nvl_bytes=args.nvl_bytes, normal_strategy=strategy)
    check_against_reference(rank, group, buffer, args, x, topk_idx, topk_weights, quant)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, args.num_experts)
    kwargs = dict(
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        quant_mode=quant,
    )

    def dequantized(recv_x):
        return (recv_x[0].float() * recv_x[1].unsqueeze(1)).to(torch.bfloat16) if quant == "int8" else recv_x

    def layout_dispatch_combine():
        layout = buffer.get_dispatch_layout(topk_idx, args.num_experts)
        out = buffer.dispatch(
            x,
            num_tokens_per_rank=layout[0],
            is_token_in_rank=layout[3],
            num_tokens_per_expert=layout[2],
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            quant_mode=quant,
        )
        buffer.combine(dequantized(out[0]), out[4])

    # Bytes a dispatch sends to other nodes: counted by the hierarchical transport, one row per
    # (token, node); the alltoall strategy sends one row (the same bytes) per (token, rank).
    before = dict(hierarchical.traffic)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, **kwargs)
    network_rows, network_bytes = count_network(before)
    if strategy == "alltoall":
        row_bytes = (
            network_bytes // network_rows
            if network_rows
            else (reference_run.network_bytes // max(1, reference_run.network_rows) if reference_run else 0)
        )
        network_rows = alltoall_network_rows(topk_idx, args, rank, num_ranks)
        network_bytes = network_rows * row_bytes
    y = dequantized(recv_x)
    figures = {
        "full": Measured(layout_dispatch_combine, args.tuned_threads),
        "dispatch": Measured(lambda: buffer.dispatch(x, **kwargs), args.tuned_threads),
        "combine": Measured(lambda: buffer.combine(y, handle), args.tuned_threads),
    }
    if args.default_threads and strategy == "default":
        figures["full_default_threads"] = Measured(layout_dispatch_combine, args.default_torch_threads)
    # Only deep_ep's default strategy has the column (the gloo one would take seconds at large sizes).
    calls = python_calls(layout_dispatch_combine) if strategy == "default" else 0.0
    return StrategyRun(
        buffer, figures, recv_bytes(recv_x), y.numel() * y.element_size(), network_bytes, network_rows, calls
    )


def count_network(before: Dict[str, int]) -> Tuple[int, int]:
    """(rows, bytes) the hierarchical transport sent to other nodes since `before` (one dispatch)."""
    return (
        hierarchical.traffic["dispatch_rows"] - before["dispatch_rows"],
        hierarchical.traffic["dispatch_bytes"] - before["dispatch_bytes"],
    )


class Baselines(Protocol):
    """Figures timed together with deep_ep's at every size (the MPI baselines, deep_ep/bench_mpi.py)."""

    def prepare(self, num_tokens: int) -> Dict[str, Measured]:
        """Checks the baselines at `num_tokens` tokens per rank; returns what to time, by name."""


def bench_normal(
    rank: int,
    group,
    args: argparse.Namespace,
    sync: RankSync,
    baselines: Optional[Baselines] = None,
) -> Tuple[Dict[str, Dict[str, dict]], Dict[str, Dict[str, float]]]:
    """Every size of --num-tokens: checks each strategy (and the baselines), then times all their
    figures together (measure_together). Returns ({str(tokens): {strategy: Timing as a dict}},
    {str(tokens): {baseline figure: seconds}})."""
    out: Dict[str, Dict[str, dict]] = {}
    baseline_out: Dict[str, Dict[str, float]] = {}
    for num_tokens in args.sizes:
        runs: Dict[str, StrategyRun] = {}
        for strategy in args.strategies:
            runs[strategy] = prepare_normal(rank, group, args, strategy, num_tokens, runs.get("default"))
        figures = {(name, key): figure for name, run in runs.items() for key, figure in run.figures.items()}
        if baselines is not None:
            figures.update({("baseline", key): figure for key, figure in baselines.prepare(num_tokens).items()})
        seconds = measure_together(sync, figures, args.iters, args.batch, args.measure_seconds, args.warmup)
        out[str(num_tokens)] = {
            name: asdict(run.timing({key: s for (owner, key), s in seconds.items() if owner == name}))
            for name, run in runs.items()
        }
        baseline_out[str(num_tokens)] = {key: s for (owner, key), s in seconds.items() if owner == "baseline"}
        for run in runs.values():
            run.buffer.destroy()
    return out, baseline_out


def check_low_latency(rank: int, group, buffer: Buffer, args, x, topk_idx, topk_weights, use_fp8: bool) -> None:
    everyone: List = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (x, topk_idx, topk_weights), group=group)
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
        x, topk_idx, args.num_max_tokens, args.num_experts, use_fp8=use_fp8
    )
    ref = reference_dispatch(
        [e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone], args.num_experts, rank
    )
    real = ref["x"].shape[0]
    if use_fp8:
        q_ref, scale_ref = quantize_reference(ref["x"])
        ok = bool(((recv_x[0][:real].int() - q_ref.int()).abs() <= 1).all()) and torch.allclose(
            recv_x[1][:real].double(), scale_ref, rtol=1e-6, atol=0
        )
        y = (recv_x[0].float() * recv_x[1].unsqueeze(1)).to(torch.bfloat16)
    else:
        ok = torch.equal(recv_x[:real], ref["x"])
        y = recv_x
    if not ok or recv_count.tolist() != ref["rows_per_expert"]:
        raise AssertionError(f"rank {rank}: low_latency_dispatch differs from the reference")
    combined, _, _ = buffer.low_latency_combine(y, topk_idx, topk_weights, handle)
    x_used = x.float() if not use_fp8 else (lambda q: q[0].double() * q[1].unsqueeze(1))(quantize_reference(x)).float()
    selection = x_used.to(torch.bfloat16).unsqueeze(1).expand(-1, args.num_topk, -1)
    expected = reference_combine(selection, topk_idx, topk_weights)
    if not torch.allclose(combined.double(), expected, rtol=2e-2, atol=5e-2 if use_fp8 else 2e-2):
        raise AssertionError(f"rank {rank}: low_latency_combine differs from the reference")


@dataclass
class LowLatencyRun:
    """One low-latency strategy ready to time: its Buffer, the figures (dispatch, combine and, where
    the transport has its own combine buffers, the zero-copy combine) and the check that the
    zero-copy combine still gives the copying one's bits."""

    buffer: Buffer
    figures: Dict[str, Callable[[], object]]
    selections: int  # rows that hold data on this rank
    check: Callable[[], None]


def prepare_low_latency(
    rank: int, group, args: argparse.Namespace, strategy: str, inputs: Tuple[torch.Tensor, ...], use_fp8: bool
) -> LowLatencyRun:
    """Builds `strategy`'s Buffer, checks its calls against the reference and returns its figures."""
    x, topk_idx, topk_weights = inputs
    num_ranks = dist.get_world_size(group)
    size = Buffer.get_low_latency_rdma_size_hint(args.num_max_tokens, args.hidden, num_ranks, args.num_experts)
    buffer = Buffer(
        group, num_nvl_bytes=4096, num_rdma_bytes=size, low_latency_mode=True, low_latency_strategy=strategy
    )
    check_low_latency(rank, group, buffer, args, x, topk_idx, topk_weights, use_fp8)

    def dispatch():
        return buffer.low_latency_dispatch(x, topk_idx, args.num_max_tokens, args.num_experts, use_fp8=use_fp8)

    # A combine may use the handle of an earlier dispatch (the handle keeps its own routes), so the
    # combine figures keep this one while the dispatch figure makes new ones.
    recv_x, recv_count, handle = dispatch()[:3]
    y = (recv_x[0].float() * recv_x[1].unsqueeze(1)).to(torch.bfloat16) if use_fp8 else recv_x.clone()

    def combine():
        return buffer.low_latency_combine(y, topk_idx, topk_weights, handle)[0]

    def combine_in_place():
        # The expert would write its output into the buffer; both buffers already hold y (below).
        return buffer.low_latency_combine(
            buffer.get_next_low_latency_combine_buffer(handle), topk_idx, topk_weights, handle
        )[0]

    copied = combine().clone()

    def check_zero_copy() -> None:
        for _ in range(2):  # one call per parity: each buffer gets y, and must give the same bits
            zero_copy = buffer.get_next_low_latency_combine_buffer(handle)
            zero_copy.copy_(y)
            combined = buffer.low_latency_combine(zero_copy, topk_idx, topk_weights, handle)[0]
            if not torch.equal(combined.view(torch.int16), copied.view(torch.int16)):
                raise AssertionError(f"rank {rank}: the zero-copy combine differs from the copying one")

    first = buffer.get_next_low_latency_combine_buffer(handle).data_ptr()
    check_zero_copy()
    figures = {"dispatch": dispatch, "combine": combine}
    # Timed only where the buffers are the transport's own memory (they then still hold y).
    # Every rank must agree: a rank that times alone waits in collectives its peers never join
    # (the alltoall strategy's buffers are fresh tensors, whose addresses may repeat on one rank).
    kept = torch.tensor([int(buffer.get_next_low_latency_combine_buffer(handle).data_ptr() == first)])
    dist.all_reduce(kept, op=dist.ReduceOp.MIN, group=group)
    if kept.item():
        figures["zero-copy"] = combine_in_place
    return LowLatencyRun(buffer, figures, int(recv_count.sum()), check_zero_copy if kept.item() else lambda: None)


def selection_bytes(args: argparse.Namespace) -> int:
    """Bytes low-latency dispatch moves per (token, expert) selection: int8 = H + 4 scale bytes, bf16 = 2H."""
    return args.hidden + 4 if args.quant == "int8" else 2 * args.hidden


def bench_low_latency(rank: int, group, args: argparse.Namespace) -> Tuple[Dict[str, Timing], float, float]:
    """Every strategy's dispatch and combine and a plain memcpy of the same bytes (every rank copying
    at the same time), all timed together (measure_together). Returns ({strategy: Timing}, memcpy
    seconds of the dispatch bytes, of the bytes dispatch and combine move)."""
    inputs = make_rank_inputs(rank, args.sizes[0], args.hidden, args.num_experts, args.num_topk)
    use_fp8 = args.quant == "int8"
    runs = {strategy: prepare_low_latency(rank, group, args, strategy, inputs, use_fp8) for strategy in args.strategies}
    per_selection = selection_bytes(args)
    # Rank 0's bytes size the memcpy on every rank, as the table reports rank 0's.
    nbytes = torch.tensor([runs["default"].selections * per_selection, runs["default"].selections * 2 * args.hidden])
    dist.broadcast(nbytes, 0, group=group)
    copies = {}
    for name, count in (("memcpy", int(nbytes[0])), ("memcpy both", int(nbytes.sum()))):
        src, dst = torch.full((count,), 1, dtype=torch.uint8), torch.zeros(count, dtype=torch.uint8)
        copies[name] = lambda src=src, dst=dst: dst.copy_(src)
    threads = torch.get_num_threads()
    figures: Dict[Hashable, Measured] = {
        (strategy, figure): Measured(fn, threads)
        for strategy, run in runs.items()
        for figure, fn in run.figures.items()
    }
    figures.update({name: Measured(fn, threads) for name, fn in copies.items()})
    seconds = measure_together(TorchSync(group), figures, args.iters, args.batch, warmup=args.warmup)
    rows: Dict[str, Timing] = {}
    for strategy, run in runs.items():
        run.check()  # the buffers still held y through the timing
        rows[strategy] = Timing(
            seconds[(strategy, "dispatch")],
            seconds[(strategy, "combine")],
            run.selections * per_selection,
            run.selections * 2 * args.hidden,
            combine_in_place=seconds.get((strategy, "zero-copy"), 0.0),
        )
        run.buffer.destroy()
    return rows, seconds["memcpy"], seconds["memcpy both"]


def kernels_line() -> str:
    """Which vector path deep_ep's native kernels take on this CPU (the same bits on every path, not
    the same speed), so that tables from different hosts can be told apart."""
    return f"native kernels: {deep_ep_cpp.vector_isa()} vector path"


def print_low_latency(rows: Dict[str, Timing], memcpy_s: float, memcpy_both_s: float, num_ranks: int, args) -> None:
    gbps = lambda n, s: n / s / 1e9  # noqa: E731
    nbytes = rows["default"].bytes
    per_selection = selection_bytes(args)
    print(
        f"\ndeep_ep low-latency mode: {num_ranks} ranks, {args.sizes[0]} tokens/rank (Nmax {args.num_max_tokens}), "
        f"hidden {args.hidden}, top-{args.num_topk} of {args.num_experts} experts, dispatch {args.quant}, "
        f"{per_selection} B per selection, combine bf16 (rank 0 receives {nbytes / 1e6:.1f} MB); "
        f"{kernels_line()}"
    )
    print(f"{'strategy':<22}{'dispatch us':>13}{'GB/s':>8}{'combine us':>13}{'GB/s':>8}{'total us':>12}")
    for name, label in (("default", "default (shm)"), ("alltoall", "alltoall (gloo)")):
        if name in rows:
            r = rows[name]
            print(
                f"{label:<22}{r.dispatch * 1e6:>13.0f}{gbps(r.bytes, r.dispatch):>8.2f}"
                f"{r.combine * 1e6:>13.0f}{gbps(r.combine_bytes, r.combine):>8.2f}"
                f"{(r.dispatch + r.combine) * 1e6:>12.0f}"
            )
    zero = rows["default"]
    if zero.combine_in_place:
        print(
            f"{'default, zero-copy':<22}{'':>13}{'':>8}{zero.combine_in_place * 1e6:>13.0f}"
            f"{gbps(zero.combine_bytes, zero.combine_in_place):>8.2f}"
            f"{(zero.dispatch + zero.combine_in_place) * 1e6:>12.0f}"
        )
    print(f"{'memcpy (same bytes)':<22}{memcpy_s * 1e6:>13.0f}{gbps(nbytes, memcpy_s):>8.2f}")
    total = {k: v.dispatch + v.combine for k, v in rows.items()}
    if "alltoall" in total:
        print(f"default vs alltoall, dispatch+combine: {total['alltoall'] / total['default']:.2f}x faster")
    print(
        f"default dispatch takes {rows['default'].dispatch / memcpy_s:.2f}x the memcpy time; dispatch + combine "
        f"{total['default'] * 1e6:.0f} us take {total['default'] / memcpy_both_s:.2f}x a memcpy of the bytes both "
        f"move ({memcpy_both_s * 1e6:.0f} us)"
        + (
            f"; with the zero-copy combine buffer {(zero.dispatch + zero.combine_in_place) * 1e6:.0f} us, "
            f"{(zero.dispatch + zero.combine_in_place) / memcpy_both_s:.2f}x"
            if zero.combine_in_place
            else ""
        )
    )


def set_rank_threads(args: argparse.Namespace, num_ranks: int) -> None:
    """Ranks start with torch's default thread count (with --default-threads) or their share of the
    cores; every figure is timed with the share (args.tuned_threads) unless it says otherwise."""
    args.default_torch_threads = torch.get_num_threads()
    args.tuned_threads = torch_threads_per_rank(num_ranks)
    torch.set_num_threads(args.tuned_threads)


def bench_rank(rank: int, num_ranks: int, group, args: argparse.Namespace) -> None:
    """One rank of the bench without MPI: low-latency mode prints its table; normal mode writes the
    timings to args.result_file (rank 0)."""
    set_rank_threads(args, num_ranks)
    if args.mode == "low_latency":
        rows, memcpy_s, memcpy_both_s = bench_low_latency(rank, group, args)
        if rank == 0:
            print_low_latency(rows, memcpy_s, memcpy_both_s, num_ranks, args)
        return
    timings, _ = bench_normal(rank, group, args, TorchSync(group))
    if rank == 0:
        with open(args.result_file, "w") as f:
            json.dump(timings, f)


def load_timings(raw: Dict[str, Dict[str, dict]]) -> Dict[str, Dict[str, Timing]]:
    """bench_normal's timings, as written to JSON, back as Timing rows."""
    return {tokens: {name: Timing(**row) for name, row in rows.items()} for tokens, rows in raw.items()}


def bench_env(args: argparse.Namespace) -> Dict[str, str]:
    """Environment of every rank: the simulated nodes of --ranks-per-node."""
    return {"DEEP_EP_RANKS_PER_NODE": str(args.ranks_per_node)} if args.ranks_per_node else {}


def run_ranks(args: argparse.Namespace) -> Dict[str, Dict[str, Timing]]:
    """Spawns the ranks for the normal-mode sizes (no MPI baselines); returns rank 0's
    {tokens: {strategy: Timing}}. With --default-threads the ranks keep torch's default thread
    count until bench_rank starts."""
    with tempfile.TemporaryDirectory(prefix="deep_ep_bench_") as tmp:
        args.result_file = os.path.join(tmp, "result.json")
        spawn_ranks(bench_rank, args.num_processes, args, env=bench_env(args), share_threads=not args.default_threads)
        with open(args.result_file) as f:
            return load_timings(json.load(f))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def print_normal(args: argparse.Namespace, timings: Dict[str, Dict[str, Timing]], mpi: "MpiOutcome") -> None:
    """The normal-mode table: one line per size, ratios of figures measured in this run."""

    print(
        f"\ndeep_ep normal mode: {args.num_processes} ranks, hidden {args.hidden}, top-{args.num_topk} of "
        f"{args.num_experts} experts, dispatch {args.quant}, combine bf16; ms per call, median of the slowest "
        f"rank; L+D+C = get_dispatch_layout + dispatch + combine; floor = MPI Alltoallv of the same bytes; "
        f"{kernels_line()}"
    )
    columns = [
        "tokens/rank",
        "L+D+C ms",
        "dispatch ms",
        "combine ms",
        "floor D+C ms",
        "ours/floor",
        "dispatch/floor",
        "combine/floor",
        "MPI dispatcher ms",
        "MPI disp./ours",
    ]
    if "alltoall" in args.strategies:
        columns += ["gloo alltoall ms", "alltoall/ours"]
    if args.default_threads:
        columns += ["default-threads ms", "default/tuned"]
    columns.append("Python calls")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for tokens, rows in timings.items():
        ours = rows["default"]
        cells = [tokens, ms(ours.full), ms(ours.dispatch), ms(ours.combine)]
        floor = mpi.sizes.get(tokens) if mpi.sizes else None
        if floor is not None:
            both = floor.floor_dispatch + floor.floor_combine
            cells += [
                f"{ms(floor.floor_dispatch)} + {ms(floor.floor_combine)}",
                f"{ours.full / both:.2f}x",
                f"{ours.dispatch / floor.floor_dispatch:.2f}x",
                f"{ours.combine / floor.floor_combine:.2f}x",
                ms(floor.dispatcher),
                f"{floor.dispatcher / ours.full:.2f}x",
            ]
        else:
            cells += ["-"] * 6
        if "alltoall" in args.strategies:
            other = rows["alltoall"]
            cells += [ms(other.full), f"{other.full / ours.full:.2f}x"]
        if args.default_threads:
            cells += [ms(ours.full_default_threads), f"{ours.full_default_threads / ours.full:.2f}x"]
        cells.append(f"{ours.python_calls:.0f}")
        print("| " + " | ".join(cells) + " |")
    print(f"MPI: {mpi.note}")
    print(
        "Python calls: rank 0's Python function calls per layout + dispatch + combine of deep_ep "
        "(cProfile's count, builtins included)"
    )
    if args.default_threads:
        print(
            f"default-threads: torch's default of {torch.get_num_threads()} threads in every rank; tuned: "
            f"torch.set_num_threads({torch_threads_per_rank(args.num_processes)}); the two are timed "
            f"alternately, iteration by iteration, in the same ranks; deep_ep's kernels use "
            f"{num_threads(args.num_processes)} thread(s) per rank in both"
        )
    if args.ranks_per_node:
        print(f"\nsimulated nodes of {args.ranks_per_node} ranks (DEEP_EP_RANKS_PER_NODE); rank 0 per dispatch:")
        print(f"{'tokens/rank':<12}{'strategy':<22}{'rows to other nodes':>21}{'MB':>9}{'inter-node GB/s':>17}")
        for tokens, rows in timings.items():
            for name, label in (("default", "hierarchical (shm)"), ("alltoall", "alltoall (gloo)")):
                if name in rows:
                    r = rows[name]
                    print(
                        f"{tokens:<12}{label:<22}{r.network_rows:>21}{r.network_bytes / 1e6:>9.2f}"
                        f"{r.network_bytes / r.dispatch / 1e9:>17.2f}"
                    )


def parse_sizes(text: str) -> List[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"--num-tokens must be positive ints separated by commas, got {text!r}")
    return sizes


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2, help="local CPU ranks")
    parser.add_argument("--mode", choices=("normal", "low_latency"), default="normal")
    parser.add_argument(
        "--num-tokens",
        type=parse_sizes,
        default=None,
        dest="sizes",
        help="tokens per rank, comma-separated sizes (default 16,128,1024; 128 in low-latency "
        "mode, which takes one size)",
    )
    parser.add_argument(
        "--num-max-tokens",
        type=int,
        default=None,
        help="low-latency mode: num_max_dispatch_tokens_per_rank (default: --num-tokens)",
    )
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--num-topk", type=int, default=8)
    parser.add_argument("--num-experts", type=int, default=32)
    parser.add_argument("--int8", action="store_true", help="per-token int8 dispatch")
    parser.add_argument(
        "--quant",
        choices=("bf16", "int8"),
        default=None,
        help="dispatch format (default: bf16 in normal mode unless --int8, int8 in low-latency)",
    )
    parser.add_argument("--nvl-bytes", type=int, default=256 << 20, help="shared-memory bytes per rank")
    parser.add_argument(
        "--iters",
        type=int,
        default=30,
        help="most timed iterations per figure (normal mode times as many as fit "
        "--measure-seconds, at least 3); low-latency mode: exactly this many",
    )
    parser.add_argument(
        "--measure-seconds",
        type=float,
        default=MEASURE_SECONDS,
        help="normal mode: about how long each figure is measured",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--ranks-per-node",
        type=int,
        default=0,
        help="simulate nodes of this many ranks (DEEP_EP_RANKS_PER_NODE): the hierarchical transport between them",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="calls timed in a row per iteration (default: normal mode as many as fill "
        f"{BATCH_SECONDS * 1e3:g} ms, at most {MOST_BATCH}, the MPI baselines alike; low-latency mode 20)",
    )
    parser.add_argument(
        "--default-threads",
        action="store_true",
        help="normal mode: also time layout + dispatch + combine with torch's default thread count, "
        "alternately with the tuned one (each rank's share of the cores), and show the ratio",
    )
    parser.add_argument("--no-alltoall", action="store_true", help="skip the gloo all_to_all strategy")
    parser.add_argument("--no-mpi", action="store_true", help="skip the MPI baselines")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [128] if args.mode == "low_latency" else [16, 128, 1024]
    if args.mode == "low_latency" and len(args.sizes) != 1:
        parser.error("--mode low_latency takes one --num-tokens size")
    if args.num_max_tokens is None:
        args.num_max_tokens = max(args.sizes)
    if args.batch is None and args.mode == "low_latency":
        args.batch = 20
    args.quant = args.quant or ("int8" if args.int8 or args.mode == "low_latency" else "bf16")
    args.strategies = ["default"] if args.no_alltoall else ["default", "alltoall"]
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.mode == "low_latency":
        spawn_ranks(bench_rank, args.num_processes, args)
        return
    from .bench_mpi import MpiOutcome, mpi_unavailable, run_with_mpi

    # With MPI, every rank runs in mpiexec and times deep_ep and the MPI baselines together.
    missing = mpi_unavailable(args)
    if missing is None:
        timings, mpi = run_with_mpi(args)
    else:
        timings, mpi = run_ranks(args), MpiOutcome(None, missing)
    print_normal(args, timings, mpi)


if __name__ == "__main__":
    main()
