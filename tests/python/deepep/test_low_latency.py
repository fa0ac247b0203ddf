"""Low-latency dispatch/combine on CPU ranks, checked against the pure-torch reference.

python tests/python/deepep/test_low_latency.py --num-processes 2   # checks, then prints us and GB/s
python -m pytest tests/python/deepep/test_low_latency.py           # the test suite
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
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import calc_diff, gather_objects, make_inputs, our_segments, skip_unless_device  # noqa: E402
from low_latency_cases import Case, buffer_for, check_case, check_received, dispatch, expected_combine, expert_output  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep.npu.operators import hccl_buffsize_mb  # noqa: E402
from deep_ep.reference import quantize_reference, reference_combine, reference_shared_dispatch  # noqa: E402
from deep_ep.testing import spawn_ranks  # noqa: E402


def run_cases(rank: int, num_ranks: int, group, cases: List[Case]) -> None:
    buffer = buffer_for(group, num_ranks, cases)
    try:
        for case in cases:
            try:
                check_case(rank, num_ranks, buffer, case, group)
            except Exception as error:
                raise AssertionError(f"rank {rank}, case {case}: {error!r}") from error
    finally:
        buffer.destroy()
    dist.barrier(group)
    if rank == 0:
        assert not our_segments(), f"leaked shared memory: {our_segments()}"


def cases_for(num_ranks: int) -> List[Case]:
    base = Case(tokens=[17, 0, 24, 5][: max(1, num_ranks)] if num_ranks > 1 else [21])
    cases = [
        base,
        replace(base, quant="bf16", hook=True, seed=1),
        replace(base, hook=True, hidden=200, seed=2),
        replace(base, pattern="one_rank", topk=3, seed=3),
        replace(base, pattern="one_expert", topk=2, quant="bf16", seed=4),
        replace(base, topk=1, experts_per_rank=1, seed=5),
        replace(base, tokens=[0], seed=6),
        # A row naming an expert twice: one packed row and one combine term per selection.
        replace(base, pattern="repeat", topk=3, seed=7),
        replace(
            base, tokens=[3, 0, 4, 2], pattern="repeat", topk=6, experts_per_rank=2, quant="bf16", hook=True, seed=8
        ),
    ]
    if num_ranks >= 4:  # keep the largest world sizes quick
        cases = cases[:2] + cases[5:]
    return cases


def npu_cases(num_ranks: int) -> List[Case]:
    """The cases within the MC2 operators' limits (docs/npu.md): A3 needs 1024 <= H <= 8192."""
    return [replace(c, hidden=max(c.hidden, 1024)) for c in cases_for(num_ranks)]


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
def test_low_latency(num_ranks: int, device: str) -> None:
    skip_unless_device(device, num_ranks)
    if device == "npu":
        if num_ranks == 1:
            pytest.skip("NPU run skipped: the MC2 operators need at least 2 ranks (ep_world_size >= 2)")
        cases = npu_cases(num_ranks)
        buffsize = max(
            hccl_buffsize_mb(c.max_tokens, c.hidden, num_ranks, c.experts_per_rank * num_ranks, c.topk) for c in cases
        )
        spawn_ranks(run_cases, num_ranks, cases, env={"HCCL_BUFFSIZE": str(buffsize)}, device="npu")
        return
    spawn_ranks(run_cases, num_ranks, cases_for(num_ranks))
    assert not our_segments()


def strategies_agree(rank: int, num_ranks: int, group) -> None:
    """Both strategies, alive at once, give the same bits; 20 calls in a row give the same bits;
    two results are alive at once and the third call reuses the first's memory."""
    case = Case(tokens=[24, 9, 0], hidden=128, experts_per_rank=3, topk=4)
    inputs = make_inputs(rank, case.tokens[rank % 3], case.hidden, 3 * num_ranks, case.topk, num_ranks, seed=9)
    other = make_inputs(rank, case.tokens[(rank + 1) % 3], case.hidden, 3 * num_ranks, case.topk, num_ranks, seed=10)
    everyone, everyone_other = gather_objects(inputs, group), gather_objects(other, group)
    buffers = [buffer_for(group, num_ranks, [case], "default"), buffer_for(group, num_ranks, [case], "alltoall")]
    results = []
    for buffer in buffers:
        for quant in ("int8", "bf16"):
            c = replace(case, quant=quant)
            runs = []
            for _ in range(20):
                recv_x, recv_count, handle, _ = dispatch(buffer, c, inputs)
                y = expert_output(recv_x, recv_count)
                combined = buffer.low_latency_combine(y, inputs.topk_idx, inputs.topk_weights, handle)[0]
                real = int(recv_count.sum())
                data = recv_x[0][:real].clone() if quant == "int8" else recv_x[:real].clone()
                scales = recv_x[1][:real].clone() if quant == "int8" else None
                runs.append((data, scales, recv_count.clone(), handle[0].clone(), handle[1].clone(), combined))
            for run in runs[1:]:
                for a, b in zip(run, runs[0]):
                    assert (a is None and b is None) or torch.equal(a, b)
            results.append(runs[0])
        # Two results alive at once (hooks pending), received in the opposite order; then a third call.
        c = replace(case, hook=True)
        first = dispatch(buffer, c, inputs)
        second = dispatch(buffer, c, other)
        with pytest.raises(RuntimeError, match="at most two"):
            dispatch(buffer, c, inputs)
        second[3]()
        first[3]()
        check_received(rank, num_ranks, c, everyone, *first[:3])
        check_received(rank, num_ranks, c, everyone_other, *second[:3])
        for recv_x, recv_count, handle, _ in (second, first):
            y = expert_output(recv_x, recv_count)
            combined, _, hook = buffer.low_latency_combine(
                y, handle.state.topk_idx, handle.state.topk_weights, handle, return_recv_hook=True
            )
            hook()
            src = inputs if recv_x is first[0] else other
            assert calc_diff(combined, expected_combine(c, src, src.topk_weights)) < 1e-5
        third = dispatch(buffer, replace(c, hook=False), inputs)
        assert third[0][0].data_ptr() == first[0][0].data_ptr()
    for a, b in zip(results[:2], results[2:]):
        for x, y in zip(a, b):
            assert (x is None and y is None) or torch.equal(x, y)
    for buffer in buffers:
        buffer.destroy()


def test_strategies_agree_and_repeat() -> None:
    spawn_ranks(strategies_agree, 3)


def combine_paths_agree(rank: int, num_ranks: int, group) -> None:
    """The shared-memory combine reads a rank's own rows from x when it reduces inside the call and
    copies them with return_recv_hook, and reads every row in place from the zero-copy buffers
    (get_next_low_latency_combine_buffer), also when only some ranks use them; all give the bits of the
    "alltoall" strategy (same float64 sum, k ascending), for bfloat16 and float16 rows, a hidden size
    that is not a multiple of the kernel's 32-column blocks, and top-k entries set to -1 before combine.
    Against the reference too."""
    hidden, experts_per_rank, topk, num_max = 100, 3, 4, 16
    num_experts = experts_per_rank * num_ranks
    buffers = {
        s: buffer_for(group, num_ranks, [Case(tokens=[num_max], max_tokens=num_max, hidden=hidden)], s)
        for s in ("default", "alltoall")
    }
    for dtype in (torch.bfloat16, torch.float16):
        inputs = make_inputs(
            rank, [num_max, 5, 0][rank % 3], hidden, num_experts, topk, num_ranks, dtype=dtype, seed=11
        )
        kept = inputs.topk_idx.clone()
        kept[::3, 1] = -1  # dropped at combine: left out of the sum
        results = {}
        for strategy, buffer in buffers.items():
            for hook in (False, True):
                recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
                    inputs.x, inputs.topk_idx, num_max, num_experts, use_fp8=False
                )
                assert recv_x.dtype == dtype
                y = (expert_output(recv_x, recv_count, dtype=torch.float32) * 1.5).to(dtype)
                combined, _, receive = buffer.low_latency_combine(
                    y, kept, inputs.topk_weights, handle, return_recv_hook=hook
                )
                receive()
                assert combined.dtype == dtype
                results[strategy, hook] = combined.clone()
                # The same rows written into the zero-copy buffer (read in place on shared memory), three
                # calls in a row so both parities' buffers serve; with the hook, two are in flight.
                pending = []
                for call in range(3):
                    zero_copy = buffer.get_next_low_latency_combine_buffer(handle)
                    assert zero_copy.shape == y.shape and zero_copy.dtype == dtype
                    zero_copy.copy_(y)
                    combined, _, receive = buffer.low_latency_combine(
                        zero_copy, kept, inputs.topk_weights, handle, return_recv_hook=hook
                    )
                    pending.append((combined, receive))
                    if len(pending) == 2 or not hook:
                        done, receive = pending.pop(0)
                        receive()
                        results[strategy, "zero-copy", hook, call] = done.clone()
                for done, receive in pending:
                    receive()
                    results[strategy, "zero-copy", hook, "last"] = done.clone()
                # Ranks that disagree on it: odd ranks copy their rows, even ranks leave them in place.
                x_of_rank = y
                if rank % 2 == 0:
                    x_of_rank = buffer.get_next_low_latency_combine_buffer(handle)
                    x_of_rank.copy_(y)
                combined, _, receive = buffer.low_latency_combine(
                    x_of_rank, kept, inputs.topk_weights, handle, return_recv_hook=hook
                )
                receive()
                results[strategy, "mixed", hook] = combined.clone()
            # `out` inside x: the rows it overwrites are read before (the reduce reads no row from x then).
            recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
                inputs.x, inputs.topk_idx, num_max, num_experts, use_fp8=False
            )
            y = (expert_output(recv_x, recv_count, dtype=torch.float32) * 1.5).to(dtype)
            out = y[: inputs.x.shape[0]]
            combined = buffer.low_latency_combine(y, kept, inputs.topk_weights, handle, out=out)[0]
            assert combined is out
            results[strategy, "out in x"] = combined.clone()
        first = results["default", False]
        for key, combined in results.items():
            assert torch.equal(combined.view(torch.int16), first.view(torch.int16)), key
        factor = 1 + (inputs.topk_idx.clamp_min(0) % experts_per_rank).double() / 8
        selection = (inputs.x.double().unsqueeze(1) * factor.unsqueeze(2)).to(dtype).double() * 1.5
        expected = reference_combine(selection.to(dtype), kept, inputs.topk_weights)
        assert calc_diff(first, expected) < 1e-5
    for buffer in buffers.values():
        buffer.destroy()


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_combine_paths_agree(num_ranks: int) -> None:
    spawn_ranks(combine_paths_agree, num_ranks)


def dev_shm_used() -> int:
    stat = os.statvfs("/dev/shm")
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def zero_copy_buffer_outlives_destroy(rank: int, num_ranks: int, group) -> None:
    """A zero-copy combine buffer is a view of this rank's shared memory: held past Buffer.destroy() it
    stays readable (its mapping goes with the tensor), and once dropped the memory is given back."""
    dist.barrier(group)
    before = dev_shm_used()
    dist.barrier(group)
    case = Case(tokens=[16], max_tokens=16, hidden=256, experts_per_rank=2, topk=2, quant="bf16")
    buffer = buffer_for(group, num_ranks, [case])
    inputs = make_inputs(rank, 16, case.hidden, 2 * num_ranks, case.topk, num_ranks)
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
        inputs.x, inputs.topk_idx, case.max_tokens, 2 * num_ranks, use_fp8=False
    )
    zero_copy = buffer.get_next_low_latency_combine_buffer(handle)
    zero_copy.copy_(expert_output(recv_x, recv_count))
    expected = zero_copy.clone()
    buffer.low_latency_combine(zero_copy, inputs.topk_idx, inputs.topk_weights, handle)
    dist.barrier(group)
    held = dev_shm_used() - before
    buffer.destroy()
    assert torch.equal(zero_copy, expected)  # no segfault: still mapped
    del zero_copy
    dist.barrier(group)
    after = dev_shm_used() - before
    assert held > 0 and after < held, (held, after)
    assert after <= 1 << 20, after  # every rank's segments are gone (allowing for other users of /dev/shm)


def test_zero_copy_buffer_outlives_destroy() -> None:
    spawn_ranks(zero_copy_buffer_outlives_destroy, 2)
    assert not our_segments()


def shared_expert_ranks(rank: int, num_ranks: int, group, num_shared: int) -> None:
    """MOE_SHARED_EXPERT_RANK_NUM = S: ranks [0, S) hold the shared expert and receive every token of
    the sources s with s % S == rank; ranks [S, R) hold the routed experts, L = E / (R - S) each; combine
    adds the shared expert's output (weight 1) to the routed terms. Both strategies, against the reference."""
    experts_per_rank, topk, num_max, hidden = 2, 3, 16, 64
    num_experts = experts_per_rank * (num_ranks - num_shared)
    is_shared = rank < num_shared
    local = 1 if is_shared else experts_per_rank
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(num_max, hidden, num_ranks, num_experts)
    for strategy, quant, pattern in (
        ("default", "bf16", "random"),
        ("default", "int8", "repeat"),
        ("alltoall", "int8", "random"),
    ):
        buffer = deep_ep.Buffer(group, num_rdma_bytes=size, low_latency_mode=True, low_latency_strategy=strategy)
        inputs = make_inputs(
            rank, [11, 0, 16, 5][rank % 4], hidden, num_experts, topk, num_ranks, pattern=pattern, seed=9
        )
        everyone = gather_objects(inputs, group)
        stats = torch.zeros(local, dtype=torch.int32)
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            inputs.x,
            inputs.topk_idx,
            num_max,
            num_experts,
            cumulative_local_expert_recv_stats=stats,
            quant_mode=quant,
            topk_weights=inputs.topk_weights,
        )
        ref = reference_shared_dispatch(
            [i.x for i in everyone],
            [i.topk_idx for i in everyone],
            [i.topk_weights for i in everyone],
            num_experts,
            rank,
            num_shared,
        )
        real = ref["src_idx"].numel()
        rows = num_max * -(-num_ranks // num_shared) if is_shared else num_max * num_ranks * min(topk, local)
        assert recv_count.tolist() == ref["rows_per_expert"] and torch.equal(stats, recv_count.int())
        src_info, layout_range = handle[0], handle[1]
        assert handle[2:5] == (num_max, hidden, num_experts) and handle[5] is recv_count
        per_block = (
            torch.tensor(ref["rows_per_source"])
            if is_shared
            else torch.tensor(
                [
                    [int((everyone[s].topk_idx == (rank - num_shared) * local + e).sum()) for s in range(num_ranks)]
                    for e in range(local)
                ]
            ).reshape(-1)
        )
        assert torch.equal(layout_range, torch.cumsum(per_block, 0))
        if quant == "int8":
            q, scale = recv_x
            assert q.shape == (rows, hidden)
            error = (q[:real].double() * scale[:real].double().unsqueeze(1) - ref["x"].double()).abs()
            assert bool((error <= quantize_reference(ref["x"])[1].unsqueeze(1) * (0.5 + 1e-5) + 1e-12).all())
        else:
            assert recv_x.shape == (rows, hidden) and torch.equal(recv_x[:real], ref["x"])
        assert torch.equal(src_info[:real].long(), torch.stack([ref["src_rank"], ref["src_idx"], ref["src_k"]], 1))
        # Routed local expert l multiplies by 1 + l / 8, the shared expert by 1; combine adds it with weight 1.
        weights = torch.rand(inputs.x.shape[0], topk)
        y = expert_output(recv_x, recv_count)
        combined = buffer.low_latency_combine(y, inputs.topk_idx, weights, handle)[0].clone()
        zero_copy = buffer.get_next_low_latency_combine_buffer(handle)
        zero_copy.copy_(y)
        in_place = buffer.low_latency_combine(zero_copy, inputs.topk_idx, weights, handle)[0]
        assert torch.equal(in_place.view(torch.int16), combined.view(torch.int16)), (strategy, quant)
        case = Case(tokens=[0], quant=quant, experts_per_rank=experts_per_rank, topk=topk)
        x_used = inputs.x.double()
        if quant == "int8":
            q, s = quantize_reference(inputs.x)
            x_used = q.double() * s.unsqueeze(1)
        expected = expected_combine(case, inputs, weights) + x_used.to(torch.bfloat16).double()
        assert calc_diff(combined, expected) < 1e-5, (strategy, quant, calc_diff(combined, expected))
        tolerance = 0.1 if quant == "int8" else 2e-2
        assert torch.allclose(combined.double(), expected, rtol=tolerance, atol=tolerance)
        buffer.destroy()


@pytest.mark.parametrize("num_ranks,num_shared", [(3, 1), (4, 2), (5, 2)])
def test_shared_expert_ranks(num_ranks: int, num_shared: int) -> None:
    spawn_ranks(shared_expert_ranks, num_ranks, num_shared, env={"MOE_SHARED_EXPERT_RANK_NUM": str(num_shared)})
    assert not our_segments()


def errors(rank: int, num_ranks: int, group) -> None:
    """Clear errors before any data moves; the Buffer stays usable after them."""
    case = Case(tokens=[8], max_tokens=8, hidden=64, experts_per_rank=2, topk=2)
    for strategy in ("default", "alltoall"):
        buffer = buffer_for(group, num_ranks, [replace(case, max_tokens=16)], strategy)
        inputs = make_inputs(rank, 8, 64, 2 * num_ranks, 2, num_ranks)

        def ok():
            recv_x, recv_count, handle, _ = dispatch(buffer, case, inputs)
            combined = buffer.low_latency_combine(
                expert_output(recv_x, recv_count), inputs.topk_idx, inputs.topk_weights, handle
            )[0]
            assert calc_diff(combined, expected_combine(case, inputs, inputs.topk_weights)) < 1e-5
            return handle

        handle = ok()
        # T > Nmax on one rank: that rank says so, the others name it, nobody waits.
        big = make_inputs(rank, 12, 64, 2 * num_ranks, 2, num_ranks) if rank == 1 else inputs
        with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank" if rank == 1 else r"ranks \[1\]"):
            dispatch(buffer, case, big)
        ok()
        # Different Nmax / E across ranks: detected from the headers, not a hang.
        with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank"):
            dispatch(buffer, replace(case, max_tokens=8 + 8 * (rank == 0)), inputs)
        ok()
        with pytest.raises(ValueError, match="num_experts|rejected"):
            experts = 2 * num_ranks * (2 if rank == 0 else 1)
            buffer.low_latency_dispatch(inputs.x, inputs.topk_idx, 8, experts)
        ok()
        # Wrong H / dtype for the handle; int8 of a dtype that cannot be quantized; too small a buffer.
        recv_x, recv_count, handle, _ = dispatch(buffer, case, inputs)
        y = expert_output(recv_x, recv_count)
        with pytest.raises(ValueError, match=r"x must have shape|rejected"):
            bad = torch.cat([y, y[:, :1]], 1) if rank == 0 else y
            buffer.low_latency_combine(bad, inputs.topk_idx, inputs.topk_weights, handle)
        with pytest.raises(TypeError, match="x must have dtype torch.bfloat16"):
            buffer.low_latency_combine(y.float(), inputs.topk_idx, inputs.topk_weights, handle)
        with pytest.raises(TypeError, match="cannot be quantized"):
            buffer.low_latency_dispatch(inputs.x.to(torch.int32), inputs.topk_idx, 8, 2 * num_ranks)
        with pytest.raises(ValueError, match=r"too small .* it needs \d+ bytes"):
            buffer.low_latency_dispatch(inputs.x, inputs.topk_idx, 1024, 2 * num_ranks)
        # Repeats are fine, but one expert holds at most Nmax selections per source rank.
        crowded = torch.zeros(8, 2, dtype=torch.int64)
        with pytest.raises(ValueError, match="selects expert 0 16 times|rejected"):
            buffer.low_latency_dispatch(inputs.x, crowded, 8, 2 * num_ranks)
        ok()
        bad_idx = inputs.topk_idx.clone()
        bad_idx[0, 0] = 2 * num_ranks
        with pytest.raises(ValueError, match=r"outside \[-1|rejected"):
            buffer.low_latency_dispatch(inputs.x, bad_idx, 8, 2 * num_ranks)
        # The zero-copy buffer: only for this Buffer's own handles, once the dispatch has received.
        handle = ok()
        with pytest.raises(TypeError, match="item 0 .* is not the handle's own"):
            buffer.get_next_low_latency_combine_buffer((handle[0].clone(),) + tuple(handle[1:]))
        _, _, waiting, _, hook = buffer.low_latency_dispatch(
            inputs.x, inputs.topk_idx, case.max_tokens, 2 * num_ranks, return_recv_hook=True
        )
        with pytest.raises(RuntimeError, match="call the hook of the low_latency_dispatch"):
            buffer.get_next_low_latency_combine_buffer(waiting)
        hook()
        ok()
        buffer.destroy()
    if num_ranks > 1:
        missing_peer(rank, num_ranks, group)


def missing_peer(rank: int, num_ranks: int, group) -> None:
    """A rank that does not arrive: the others raise RuntimeError naming it within DEEP_EP_TIMEOUT_S;
    clean_low_latency_buffer() makes the Buffer usable again."""
    case = Case(tokens=[8], max_tokens=8, hidden=64, experts_per_rank=2, topk=2)
    os.environ["DEEP_EP_TIMEOUT_S"] = "2"
    buffer = buffer_for(group, num_ranks, [case])
    inputs = make_inputs(rank, 8, 64, 2 * num_ranks, 2, num_ranks)
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"ranks \[1"):
            dispatch(buffer, case, inputs)
        assert time.monotonic() - start < 2 + 5
        with pytest.raises(RuntimeError, match="clean_low_latency_buffer"):
            dispatch(buffer, case, inputs)
    dist.barrier(group)
    buffer.clean_low_latency_buffer(case.max_tokens, case.hidden, 2 * num_ranks)
    recv_x, recv_count, handle, _ = dispatch(buffer, case, inputs)
    combined = buffer.low_latency_combine(
        expert_output(recv_x, recv_count), inputs.topk_idx, inputs.topk_weights, handle
    )[0]
    assert calc_diff(combined, expected_combine(case, inputs, inputs.topk_weights)) < 1e-5
    buffer.destroy()
    del os.environ["DEEP_EP_TIMEOUT_S"]


def test_errors() -> None:
    spawn_ranks(errors, 2)
    assert not our_segments()


# ---- script mode: correctness, then latency and bandwidth ---------------------------------------------------
def bench_rank(rank: int, num_ranks: int, group, args) -> None:
    run_cases(rank, num_ranks, group, cases_for(num_ranks)[:3])
    num_experts = args.num_experts
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(args.num_max_tokens, args.hidden, num_ranks, num_experts)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=4096, num_rdma_bytes=size, low_latency_mode=True)
    inputs = make_inputs(rank, args.num_tokens, args.hidden, num_experts, args.num_topk, num_ranks)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        dist.barrier(group)
        start = time.perf_counter()
        for _ in range(args.iters):
            fn()
        seconds = torch.tensor([(time.perf_counter() - start) / args.iters], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=group)
        return float(seconds)

    for quant in ("int8", "bf16"):
        use_fp8 = quant == "int8"
        state = {}

        def run_dispatch():
            state["out"] = buffer.low_latency_dispatch(
                inputs.x, inputs.topk_idx, args.num_max_tokens, num_experts, use_fp8=use_fp8
            )

        dispatch_s = timed(run_dispatch)
        recv_x, recv_count, handle = state["out"][:3]
        y = expert_output(recv_x, recv_count)
        combine_s = timed(lambda: buffer.low_latency_combine(y, inputs.topk_idx, inputs.topk_weights, handle))

        def both():
            run_dispatch()
            buffer.low_latency_combine(y, inputs.topk_idx, inputs.topk_weights, state["out"][2])

        total_s = timed(both)
        # Bytes the format really moves per (token, expert) selection received here.
        per_row = args.hidden + 4 if use_fp8 else 2 * args.hidden
        selections = torch.tensor([int(recv_count.sum())], dtype=torch.float64)
        dist.all_reduce(selections, group=group)
        dispatch_bytes = float(selections) / num_ranks * per_row
        combine_bytes = float(selections) / num_ranks * 2 * args.hidden
        if rank == 0:
            print(
                f"[{num_ranks} ranks, {args.num_tokens} tokens, H={args.hidden}, K={args.num_topk}, "
                f"E={num_experts}] dispatch {quant} ({per_row} B/selection): {dispatch_s * 1e6:.0f} us "
                f"{dispatch_bytes / dispatch_s / 1e9:.2f} GB/s | combine bf16 ({2 * args.hidden} B/selection): "
                f"{combine_s * 1e6:.0f} us {combine_bytes / combine_s / 1e9:.2f} GB/s | dispatch+combine "
                f"{total_s * 1e6:.0f} us {(dispatch_bytes + combine_bytes) / total_s / 1e9:.2f} GB/s",
                flush=True,
            )
    buffer.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--num-tokens", type=int, default=128)
    parser.add_argument("--num-max-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--num-topk", type=int, default=8)
    parser.add_argument("--num-experts", type=int, default=32)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    spawn_ranks(bench_rank, args.num_processes, args)


if __name__ == "__main__":
    main()
