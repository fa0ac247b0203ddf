"""Errors and faults: argument errors, ranks that disagree, a rank that never arrives or is
killed, shared-memory allocation failures, and that no shared memory is ever left behind.

    python -m pytest tests/python/deepep/test_errors.py

Every multi-rank check runs on real processes (deep_ep.testing.spawn_ranks); peers that time
out do so after DEEP_EP_TIMEOUT_S=3 s.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from typing import Callable, List, Optional, Sequence

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Inputs, make_inputs, our_segments, reference_of  # noqa: E402

import deep_ep  # noqa: E402
import deep_ep_cpp  # noqa: E402
from deep_ep.testing import rendezvous, run_rank, spawn_ranks  # noqa: E402
from deep_ep.transport import shm as shm_transport  # noqa: E402

HIDDEN, EXPERTS, TOPK = 32, 8, 3
STRATEGIES = ("default", "alltoall")
TIMEOUT_S = 3
RECREATE = ("can no longer be used", "create a new one")


# ---- helpers ---------------------------------------------------------------------------------------------
def expect(error_type: type, words: Sequence[str], call: Callable[[], object]) -> str:
    """Runs call(), which must raise exactly `error_type` with every one of `words` in its message.

    Like pytest.raises, but keeps nothing of the exception: a traceback kept in a reference cycle
    holds the process groups of its frames until interpreter exit, and torch aborts the process
    when a gloo group is freed that late."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the type is checked below
        kind, message = type(error), str(error)
    else:
        pytest.fail(f"expected {error_type.__name__}, but nothing was raised")
    assert kind is error_type or (error_type is RuntimeError and issubclass(kind, RuntimeError)), (
        f"expected {error_type.__name__}, got {kind.__name__}: {message}"
    )
    for word in words:
        assert word in message, f"{word!r} not in the {kind.__name__} message {message!r}"
    return message


def segments_of(pids: Sequence[int]) -> List[str]:
    """Our /dev/shm entries created by these processes (other test runs on the machine are ignored)."""
    return [n for n in our_segments() if n.split("_")[2] in {str(p) for p in pids}]


def world_pids(group) -> List[int]:
    pids: List[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(pids, os.getpid(), group=group)
    return pids


def inputs_of(
    rank: int, num_ranks: int, seed: int, hidden: int = HIDDEN, experts: int = EXPERTS, tokens: Sequence[int] = (7, 5)
) -> List[Inputs]:
    """Every rank's inputs (deterministic, so each rank builds all of them without communicating)."""
    return [
        make_inputs(r, tokens[r % len(tokens)], hidden, experts, TOPK, num_ranks, torch.float32, seed=seed)
        for r in range(num_ranks)
    ]


def dispatch_of(buffer: deep_ep.Buffer, inputs: Inputs, experts: int = EXPERTS, **kwargs):
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inputs.topk_idx, experts)
    return buffer.dispatch(
        inputs.x,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=inputs.topk_idx,
        topk_weights=inputs.topk_weights,
        **kwargs,
    )


def check_dispatch(rank: int, everyone: List[Inputs], result, experts: int = EXPERTS) -> None:
    recv_x, recv_topk_idx, recv_topk_weights, counts, _, _ = result
    ref = reference_of(everyone, experts, rank)
    assert torch.equal(recv_x, ref["x"])
    assert torch.equal(recv_topk_idx, ref["topk_idx"]) and torch.equal(recv_topk_weights, ref["weights"])
    assert counts == ref["rows_per_expert"]


def check_combine(inputs: Inputs, combined: torch.Tensor) -> None:
    """Identity experts: combine gives x times the sum of the token's valid weights."""
    weight_sum = torch.where(inputs.topk_idx >= 0, inputs.topk_weights, 0).sum(1, keepdim=True)
    assert combined.shape == inputs.x.shape
    assert torch.allclose(combined, inputs.x * weight_sum, rtol=1e-5, atol=1e-6)


def check_roundtrip(buffer: deep_ep.Buffer, rank: int, num_ranks: int, seed: int, hidden: int = HIDDEN) -> None:
    """A correct dispatch + combine on `buffer` gives correct results."""
    everyone = inputs_of(rank, num_ranks, seed, hidden)
    result = dispatch_of(buffer, everyone[rank])
    check_dispatch(rank, everyone, result)
    combined, _, _ = buffer.combine(result[0], result[4])
    check_combine(everyone[rank], combined)


# ---- 1. argument errors ---------------------------------------------------------------------------------
def local_errors(buffer: deep_ep.Buffer, rank: int, num_ranks: int) -> None:
    """Argument errors that need no peer: raised on the calling rank before any data moves."""
    inp = inputs_of(rank, num_ranks, seed=1)[rank]
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inp.topk_idx, EXPERTS)
    good = dict(num_tokens_per_expert=per_expert, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights)

    def dispatch(x=inp.x, **changes):
        return lambda: buffer.dispatch(x, **{**good, **changes})

    too_high, too_low = inp.topk_idx.clone(), inp.topk_idx.clone()
    too_high[1, 0], too_low[1, 0] = EXPERTS, -2
    odd_experts = EXPERTS + 1  # not a multiple of the 2 ranks

    expect(TypeError, ["x", "dtype", "int32"], dispatch(inp.x.to(torch.int32)))
    expect(TypeError, ["x", "Tensor", "ndarray"], dispatch(inp.x.numpy()))
    expect(TypeError, ["x[0]", "int8"], dispatch((inp.x, inp.x[:, 0])))
    expect(ValueError, ["x", "shape"], dispatch(inp.x[0]))
    expect(ValueError, ["x", f"{inp.x.shape[0]} rows"], dispatch(inp.x[:-1]))
    expect(TypeError, ["topk_idx", "int64", "int32"], dispatch(topk_idx=inp.topk_idx.int()))
    expect(ValueError, ["topk_idx", "shape"], dispatch(topk_idx=inp.topk_idx.flatten()))
    expect(ValueError, ["topk_idx", "columns", "17"], dispatch(topk_idx=torch.full((inp.x.shape[0], 17), -1)))
    expect(ValueError, ["topk_idx", "handle"], dispatch(topk_idx=None))
    expect(TypeError, ["topk_weights", "float32", "float64"], dispatch(topk_weights=inp.topk_weights.double()))
    expect(
        ValueError,
        ["topk_weights", "shape", str(list(inp.topk_weights[:, :-1].shape))],
        dispatch(topk_weights=inp.topk_weights[:, :-1]),
    )
    expect(ValueError, ["topk_idx", f"[-1, {EXPERTS})", str(EXPERTS)], dispatch(topk_idx=too_high))
    expect(ValueError, ["topk_idx", f"[-1, {EXPERTS})", "-2"], dispatch(topk_idx=too_low))
    expect(
        ValueError,
        ["num_experts", "multiple", str(odd_experts)],
        lambda: buffer.get_dispatch_layout(inp.topk_idx, odd_experts),
    )
    expect(
        ValueError,
        ["num_tokens_per_expert", "multiple", str(odd_experts)],
        dispatch(num_tokens_per_expert=torch.zeros(odd_experts, dtype=torch.int32)),
    )
    expect(TypeError, ["num_tokens_per_expert", "dtype"], dispatch(num_tokens_per_expert=per_expert.float()))
    expect(ValueError, ["num_tokens_per_expert", "does not match"], dispatch(num_tokens_per_expert=per_expert + 1))
    expect(ValueError, ["num_tokens_per_expert"], dispatch(num_tokens_per_expert=None))
    expect(ValueError, ["is_token_in_rank", "shape"], dispatch(is_token_in_rank=in_rank[:, :1]))
    expect(ValueError, ["quant_mode", "fp8"], dispatch(quant_mode="fp8"))
    expect(ValueError, ["expert_alignment", "0"], dispatch(expert_alignment=0))
    expect(ValueError, ["num_worst_tokens", "-1"], dispatch(num_worst_tokens=-1))
    expect(TypeError, ["handle"], lambda: buffer.dispatch(inp.x, handle=(1, 2, 3)))


def combine_errors(buffer: deep_ep.Buffer, recv_x: torch.Tensor, handle: tuple, inp: Inputs) -> None:
    rows, tokens = recv_x.shape[0], inp.x.shape[0]
    expect(
        ValueError,
        ["x", "shape", str([rows, HIDDEN + 8]), str(HIDDEN)],
        lambda: buffer.combine(torch.zeros(rows, HIDDEN + 8), handle),
    )
    expect(
        ValueError,
        ["x", "shape", str([rows + 1, HIDDEN])],
        lambda: buffer.combine(torch.zeros(rows + 1, HIDDEN), handle),
    )
    expect(TypeError, ["x", "dtype"], lambda: buffer.combine(recv_x.to(torch.int32), handle))
    expect(
        ValueError,
        ["topk_weights", "shape", str([tokens, TOPK + 1])],
        lambda: buffer.combine(recv_x, handle, topk_weights=torch.rand(tokens, TOPK + 1)),
    )
    expect(
        ValueError,
        ["topk_weights", "shape"],
        lambda: buffer.combine(recv_x, handle, topk_weights=torch.rand(tokens + 1, TOPK)),
    )
    expect(
        TypeError,
        ["topk_weights", "float32"],
        lambda: buffer.combine(recv_x, handle, topk_weights=inp.topk_weights.double()),
    )
    expect(
        ValueError,
        ["bias[0]", "shape", str([tokens, HIDDEN + 1])],
        lambda: buffer.combine(recv_x, handle, bias=torch.zeros(tokens, HIDDEN + 1)),
    )
    expect(
        ValueError,
        ["bias[1]", "shape"],
        lambda: buffer.combine(recv_x, handle, bias=(torch.zeros(tokens, HIDDEN), torch.zeros(tokens, 1))),
    )
    expect(
        ValueError, ["bias", "3 items"], lambda: buffer.combine(recv_x, handle, bias=[torch.zeros(tokens, HIDDEN)] * 3)
    )
    # A handle rebuilt with one of its items replaced no longer names the dispatch's routes.
    if isinstance(handle, dict):
        rebuilt, item = {**handle, "topk_weights": handle["topk_weights"].clone()}, "'topk_weights'"
    else:
        rebuilt, item = tuple(handle[:-1]) + (handle[-1].clone(),), str(len(handle) - 1)
    expect(TypeError, ["handle", f"item {item}", "not the handle's own"], lambda: buffer.combine(recv_x, rebuilt))
    expect(TypeError, ["handle", "or a tuple / list / dict of its items"], lambda: buffer.combine(recv_x, 5))


def constructor_errors(group) -> None:
    """Rejected on every rank before the Buffer's collective setup starts."""
    expect(ValueError, ["normal_strategy", "bogus"], lambda: deep_ep.Buffer(group, normal_strategy="bogus"))
    expect(ValueError, ["normal_strategy", "ops"], lambda: deep_ep.Buffer(group, normal_strategy="ops"))
    expect(ValueError, ["low_latency_strategy", "bogus"], lambda: deep_ep.Buffer(group, low_latency_strategy="bogus"))
    expect(
        ValueError,
        ["low_latency_strategy", "ops", "torch_npu"],
        lambda: deep_ep.Buffer(group, low_latency_strategy="ops"),
    )
    expect(ValueError, ["num_nvl_bytes", "-1"], lambda: deep_ep.Buffer(group, num_nvl_bytes=-1))
    for mode, words in (("bogus", ["DEEP_USE_MODE", "bogus"]), ("ops", ["ops", "torch_npu"])):
        os.environ["DEEP_USE_MODE"] = mode
        try:
            expect(ValueError, words, lambda: deep_ep.Buffer(group))
        finally:
            del os.environ["DEEP_USE_MODE"]


def worst_tokens_too_small(buffer: deep_ep.Buffer, rank: int, num_ranks: int) -> None:
    """Every token goes to rank 0's experts: rank 0 receives many rows, rank 1 none. Then
    num_worst_tokens=1 fits rank 1 but not rank 0, and still every rank must raise."""
    everyone = inputs_of(rank, num_ranks, seed=2)
    for inputs in everyone:
        inputs.topk_idx[:] = torch.tensor([-1, 0, 1])  # experts 0 and 1 live on rank 0
    expect(
        ValueError,
        ["num_worst_tokens=1", "too small", "[0]"],
        lambda: dispatch_of(buffer, everyone[rank], num_worst_tokens=1),
    )
    result = dispatch_of(buffer, everyone[rank], num_worst_tokens=2 * 7 * num_ranks)
    assert result[0].shape[0] == 2 * 7 * num_ranks


def buffer_too_small(group, rank: int, num_ranks: int) -> None:
    """A shared-memory buffer that cannot hold one token row: a ValueError naming the minimum."""
    row = HIDDEN * 4 + TOPK * 8 + TOPK * 4  # float32 x, topk_idx, topk_weights
    needed = shm_transport.data_bytes_needed(1, row, 3)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=needed - 1)
    inp = inputs_of(rank, num_ranks, seed=3)[rank]
    expect(ValueError, ["num_nvl_bytes", str(needed - 1), f">= {needed}"], lambda: dispatch_of(buffer, inp))
    check_roundtrip(buffer, rank, num_ranks, seed=3, hidden=8)  # smaller rows fit, and the Buffer still works
    buffer.destroy()
    # Combine rows can be wider than dispatch rows (float32 outputs of a bf16 dispatch).
    hidden = 128
    needed = shm_transport.data_bytes_needed(1, hidden * 2 + TOPK * 12, 3)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=needed)
    everyone = inputs_of(rank, num_ranks, seed=4, hidden=hidden)
    inp = everyone[rank]
    recv_x, _, _, _, handle, _ = dispatch_of(buffer, Inputs(inp.x.bfloat16(), inp.topk_idx, inp.topk_weights))
    combine_needed = shm_transport.data_bytes_needed(1, hidden * 4, 1)
    expect(
        ValueError, ["num_nvl_bytes", "combine", f">= {combine_needed}"], lambda: buffer.combine(recv_x.float(), handle)
    )
    combined, _, _ = buffer.combine(recv_x, handle)
    weight_sum = torch.where(inp.topk_idx >= 0, inp.topk_weights, 0).sum(1, keepdim=True)
    assert torch.allclose(combined.float(), inp.x.bfloat16().float() * weight_sum, rtol=2e-2, atol=1e-2)
    buffer.destroy()


def argument_errors(rank: int, num_ranks: int, group) -> None:
    constructor_errors(group)
    for strategy in STRATEGIES:
        buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20, normal_strategy=strategy)
        # Every rank makes the same bad calls; then a correct call on the same Buffer works.
        local_errors(buffer, rank, num_ranks)
        check_roundtrip(buffer, rank, num_ranks, seed=5)
        everyone = inputs_of(rank, num_ranks, seed=6)
        result = dispatch_of(buffer, everyone[rank])
        combine_errors(buffer, result[0], result[4], everyone[rank])
        combined, _, _ = buffer.combine(result[0], result[4])  # the handle is still good
        check_combine(everyone[rank], combined)
        worst_tokens_too_small(buffer, rank, num_ranks)
        check_roundtrip(buffer, rank, num_ranks, seed=7)
        # Only rank 0 makes the local bad calls: had any of them moved data or waited for a peer,
        # the correct calls that follow would hang or mix up the ranks.
        if rank == 0:
            local_errors(buffer, rank, num_ranks)
            combine_errors(buffer, result[0], result[4], everyone[rank])
        check_roundtrip(buffer, rank, num_ranks, seed=8)
        buffer.destroy()
        expect(RuntimeError, ["destroyed"], lambda: dispatch_of(buffer, everyone[rank]))
    buffer_too_small(group, rank, num_ranks)
    pids = world_pids(group)
    assert not segments_of(pids), segments_of(pids)


def test_argument_errors() -> None:
    spawn_ranks(argument_errors, 2, env={"DEEP_EP_TIMEOUT_S": "20"})


def test_set_num_sms() -> None:
    saved = deep_ep.Buffer.num_sms
    try:
        for bad in (3, 0, -2, 2.0, "4"):
            expect(ValueError, ["num_sms", repr(bad)], lambda: deep_ep.Buffer.set_num_sms(bad))
            assert deep_ep.Buffer.num_sms == saved
        deep_ep.Buffer.set_num_sms(24)
        assert deep_ep.Buffer.num_sms == 24
    finally:
        deep_ep.Buffer.num_sms = saved


# ---- 2. ranks that disagree -----------------------------------------------------------------------------
def disagreement(rank: int, num_ranks: int, group) -> None:
    for strategy in STRATEGIES:
        buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20, normal_strategy=strategy)
        # Different hidden sizes.
        everyone = inputs_of(rank, num_ranks, seed=10, hidden=HIDDEN + 16 * rank)
        expect(
            ValueError,
            ["disagree", "hidden", f"rank 0: {HIDDEN}", f"rank 1: {HIDDEN + 16}"],
            lambda: dispatch_of(buffer, everyone[rank]),
        )
        check_roundtrip(buffer, rank, num_ranks, seed=11)
        # Different numbers of experts (the per-call metadata then differs in length, too).
        experts = EXPERTS * (1 + rank)
        inp = inputs_of(rank, num_ranks, seed=12)[rank]
        expect(
            ValueError,
            ["disagree", "num_experts", f"rank 0: {EXPERTS}", f"rank 1: {2 * EXPERTS}"],
            lambda: dispatch_of(buffer, inp, experts=experts),
        )
        check_roundtrip(buffer, rank, num_ranks, seed=13)
        # Different operations: rank 0 dispatches while rank 1 combines.
        everyone = inputs_of(rank, num_ranks, seed=14)
        result = dispatch_of(buffer, everyone[rank])
        call = (
            (lambda: dispatch_of(buffer, everyone[rank]))
            if rank == 0
            else (lambda: buffer.combine(result[0], result[4]))
        )
        expect(ValueError, ["disagree", "operation", "rank 0: dispatch", "rank 1: combine"], call)
        combined, _, _ = buffer.combine(result[0], result[4])
        check_combine(everyone[rank], combined)
        buffer.destroy()


@pytest.mark.parametrize("ranks_per_node", [None, "1"], ids=["one_node", "two_simulated_nodes"])
def test_ranks_disagree(ranks_per_node: Optional[str]) -> None:
    # Across nodes the hierarchical transport's forwarding counts travel with the dispatch metadata.
    env = {"DEEP_EP_TIMEOUT_S": "20"}
    if ranks_per_node:
        env["DEEP_EP_RANKS_PER_NODE"] = ranks_per_node
    spawn_ranks(disagreement, 2, env=env)


# ---- 3. a rank that never arrives -----------------------------------------------------------------------
def missing_peer(rank: int, num_ranks: int, group, strategy: str) -> None:
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20, normal_strategy=strategy)
    check_roundtrip(buffer, rank, num_ranks, seed=20)
    everyone = inputs_of(rank, num_ranks, seed=21)
    # Reference counting alone must free the failed Buffer: an error kept in a reference cycle with
    # its frames would keep it and its groups until the collector ran, maybe at exit, where freeing a
    # gloo group aborts the process.
    gc.disable()
    try:
        if rank == 0:  # rank 1 skips this dispatch
            start = time.monotonic()
            message = expect(
                RuntimeError, ["rank 0", "timed out", "[1]", "recreate"], lambda: dispatch_of(buffer, everyone[rank])
            )
            elapsed = time.monotonic() - start
            assert TIMEOUT_S - 0.5 <= elapsed <= TIMEOUT_S + 7, (elapsed, message)
            # The Buffer says it must be recreated, at once, on every later call.
            start = time.monotonic()
            expect(RuntimeError, RECREATE, lambda: dispatch_of(buffer, everyone[rank]))
            expect(RuntimeError, RECREATE, lambda: buffer.get_dispatch_layout(everyone[rank].topk_idx, EXPERTS))
            assert time.monotonic() - start < 1
        dist.barrier(group)  # rank 1 waits here (on the caller's group) until rank 0 has failed
        buffer.destroy()
        failed = weakref.ref(buffer)
        del buffer
        assert failed() is None, "a reference cycle keeps the failed Buffer alive"
    finally:
        gc.enable()
    # A new Buffer works.
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20, normal_strategy=strategy)
    check_roundtrip(buffer, rank, num_ranks, seed=22)
    buffer.destroy()
    pids = world_pids(group)
    assert not segments_of(pids), segments_of(pids)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_missing_peer_times_out(strategy: str) -> None:
    spawn_ranks(missing_peer, 2, strategy, env={"DEEP_EP_TIMEOUT_S": str(TIMEOUT_S)})


# ---- 4. a rank that is killed ---------------------------------------------------------------------------
def wait_for_file(path: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def killed_peer(rank: int, num_ranks: int, group, strategy: str, when: str, workdir: str) -> None:
    """Rank 1 kills itself at `when`; rank 0 records what it saw in workdir/rank0.json."""
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20, normal_strategy=strategy)
    check_roundtrip(buffer, rank, num_ranks, seed=30)
    everyone = inputs_of(rank, num_ranks, seed=31)
    ready = os.path.join(workdir, "ready")
    if rank == 1:
        if when == "before_dispatch":
            wait_for_file(ready)  # rank 0 is done with the round trip: nothing of it is in flight
            os.kill(os.getpid(), signal.SIGKILL)
        dispatch_of(buffer, everyone[rank])
        wait_for_file(ready)  # rank 0 has its dispatch results
        os.kill(os.getpid(), signal.SIGKILL)
    report = {"pid": os.getpid()}
    start = time.monotonic()
    try:
        if when == "before_dispatch":
            open(ready, "w").close()
            start = time.monotonic()
            dispatch_of(buffer, everyone[rank])
        else:
            recv_x, _, _, _, handle, _ = dispatch_of(buffer, everyone[rank])
            open(ready, "w").close()
            start = time.monotonic()
            buffer.combine(recv_x, handle)
        report["error"] = None
    except Exception as error:  # noqa: BLE001 - the report is checked by the test
        report.update(error=type(error).__name__, message=str(error), elapsed=time.monotonic() - start)
    try:
        dispatch_of(buffer, everyone[rank])
        report["next_error"] = None
    except Exception as error:  # noqa: BLE001
        report.update(next_error=type(error).__name__, next_message=str(error))
    buffer.destroy()
    with open(os.path.join(workdir, "rank0.json.tmp"), "w") as f:
        json.dump(report, f)
    os.rename(os.path.join(workdir, "rank0.json.tmp"), os.path.join(workdir, "rank0.json"))


@pytest.mark.parametrize(
    "strategy,when",
    [
        ("default", "before_dispatch"),
        ("default", "before_combine"),
        ("alltoall", "before_dispatch"),
        ("alltoall", "before_combine"),
    ],
)
def test_killed_peer(strategy: str, when: str, tmp_path) -> None:
    # spawn_ranks would terminate rank 0 as soon as it sees rank 1 die, so the ranks are started
    # here and rank 0 is waited for on its own.
    store = rendezvous()
    context = mp.spawn(
        run_rank,
        args=(2, store.port, {"DEEP_EP_TIMEOUT_S": "60"}, killed_peer, (strategy, when, str(tmp_path))),
        nprocs=2,
        join=False,
    )
    pids = [p.pid for p in context.processes]
    exited = None
    try:
        context.processes[0].join(90)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        try:
            while not context.join(30):
                pass
        except Exception as error:  # noqa: BLE001 - ProcessExitedException is expected, checked below
            exited = error
    assert context.processes[0].exitcode == 0, f"rank 0 exit code {context.processes[0].exitcode}"
    assert isinstance(exited, mp.ProcessExitedException), exited
    assert exited.error_index == 1 and exited.signal_name == "SIGKILL", exited
    with open(tmp_path / "rank0.json") as f:
        report = json.load(f)
    assert report["error"] == "RuntimeError", report
    assert "rank 0" in report["message"] and "[1]" in report["message"], report
    assert "exited" in report["message"] and "recreate" in report["message"], report
    # The native barrier checks liveness every 50 ms; gloo sees the closed connection at once.
    assert report["elapsed"] < 5, report
    assert report["next_error"] == "RuntimeError", report
    assert all(word in report["next_message"] for word in RECREATE), report
    assert not segments_of(pids), segments_of(pids)


# ---- 5. shared-memory allocation and leaks --------------------------------------------------------------
def too_large_for_dev_shm() -> int:
    """More bytes than /dev/shm holds in total: tmpfs refuses such a reservation up front,
    without touching memory (a size between free and total would really allocate first)."""
    stat = os.statvfs("/dev/shm")
    if stat.f_blocks == 0:
        pytest.skip("/dev/shm has no size limit")
    return stat.f_blocks * stat.f_frsize + (1 << 30)


def test_shm_allocation_failure_is_clear() -> None:
    size = too_large_for_dev_shm()
    name = f"/deep_ep_{os.getpid()}_alloctest_0"
    message = expect(
        RuntimeError,
        [str(size), "/dev/shm", "--shm-size", "num_nvl_bytes"],
        lambda: deep_ep_cpp.SharedMemory(name, size, True, size),
    )
    assert "free" in message, message
    assert name[1:] not in os.listdir("/dev/shm")
    assert not segments_of([os.getpid()])


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_remove_stale_segments() -> None:
    stale = f"/dev/shm/deep_ep_{dead_pid()}_0123456789ab_0"
    live = f"/dev/shm/deep_ep_{os.getpid()}_0123456789ab_0"
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
    try:
        shm_transport.remove_stale_segments()
        assert not os.path.exists(stale), "a segment of a dead process was kept"
        assert os.path.exists(live), "a segment of a live process was removed"
    finally:
        for path in (stale, live):
            if os.path.exists(path):
                os.unlink(path)


def our_mappings() -> List[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "/dev/shm/deep_ep_" in line]


def lifecycle(rank: int, num_ranks: int, group, too_large: int) -> None:
    pids = world_pids(group)
    # A Buffer larger than /dev/shm: /dev/shm backs only what calls use (docs/memory.md), so it works
    # for calls that fit, and touching all of it is a clear error instead of a SIGBUS.
    if too_large:
        oversized = deep_ep.Buffer(group, num_nvl_bytes=too_large)
        check_roundtrip(oversized, rank, num_ranks, seed=39)
        expect(
            RuntimeError,
            [f"{too_large} bytes", "--shm-size", "num_nvl_bytes"],
            lambda: oversized.get_local_buffer_tensor(torch.uint8),
        )
        check_roundtrip(oversized, rank, num_ranks, seed=38)
        oversized.destroy()
        assert not our_mappings()
    dist.barrier(group)
    assert not segments_of(pids)

    # destroy() unmaps; a Buffer dropped without destroy() is unmapped when collected.
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
    dist.barrier(group)
    assert len(our_mappings()) == num_ranks and not segments_of(pids)
    check_roundtrip(buffer, rank, num_ranks, seed=40)
    buffer.destroy()
    assert not our_mappings()
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
    check_roundtrip(buffer, rank, num_ranks, seed=41)
    del buffer
    gc.collect()
    assert not our_mappings()

    # ---- 6. Buffers alive at once on the same group keep working independently, calls interleaved.
    buffers = [
        deep_ep.Buffer(group, num_nvl_bytes=1 << 20),
        deep_ep.Buffer(group, num_nvl_bytes=1024),  # a few rows per round: many rounds
        deep_ep.Buffer(group, normal_strategy="alltoall"),
    ]
    dist.barrier(group)  # every rank has unlinked its segments
    assert len(our_mappings()) == 2 * num_ranks and not segments_of(pids)
    for step in range(2):
        inputs = [inputs_of(rank, num_ranks, seed=50 + 3 * step + i, tokens=(9 + i, 4)) for i in range(3)]
        results = [dispatch_of(b, inp[rank]) for b, inp in zip(buffers, inputs)]
        for result, everyone in zip(results, inputs):
            check_dispatch(rank, everyone, result)
        for i in (1, 0, 2):
            combined, _, _ = buffers[i].combine(results[i][0], results[i][4])
            check_combine(inputs[i][rank], combined)
        # Cached dispatch on one, a fresh dispatch on another, in between.
        again = buffers[0].dispatch(inputs[0][rank].x * 2, handle=results[0][4])[0]
        check_roundtrip(buffers[1], rank, num_ranks, seed=60 + step)
        assert torch.equal(again, results[0][0] * 2)
    for b in buffers:
        b.destroy()
    assert not our_mappings()
    dist.barrier(group)
    assert not segments_of(pids)


def test_buffer_lifecycle_and_independent_buffers() -> None:
    stat = os.statvfs("/dev/shm")
    too_large = stat.f_blocks * stat.f_frsize + (1 << 30) if stat.f_blocks else 0  # 0: /dev/shm is unlimited
    spawn_ranks(lifecycle, 2, too_large, env={"DEEP_EP_TIMEOUT_S": "20"})
