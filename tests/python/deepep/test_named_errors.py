"""Errors that name things: a rank that waits for a missing peer names the operation it is in and
the ranks it waited for (never "normal mode", never a bare transport message), and a rank killed
while the Buffer is being constructed leaves no shared-memory segment behind.

    python -m pytest tests/python/deepep/test_named_errors.py

Every check runs on real processes; peers that time out do so after a short DEEP_EP_TIMEOUT_S.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Inputs, make_inputs, our_segments  # noqa: E402

import deep_ep  # noqa: E402
import deep_ep_cpp  # noqa: E402
from deep_ep.testing import join_group, rendezvous, spawn_ranks  # noqa: E402
from deep_ep.transport import collective  # noqa: E402
from deep_ep.transport import shm as shm_transport  # noqa: E402

HIDDEN, INTER, EXPERTS_PER_RANK, TOPK, MAX_TOKENS = 64, 64, 2, 2, 8
TIMEOUT_S = 1.5


def ll_bytes(num_ranks: int) -> int:
    return deep_ep.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, num_ranks, EXPERTS_PER_RANK * num_ranks)


def inputs_of(rank: int, num_ranks: int) -> Inputs:
    return make_inputs(rank, 6, HIDDEN, EXPERTS_PER_RANK * num_ranks, TOPK, num_ranks)


def segments_of(pid: int) -> List[str]:
    return [n for n in our_segments() if n.split("_")[2] == str(pid)]


# ---- a missing peer: every wait names its operation -------------------------------------------------------
@dataclass
class Skipped:
    """One operation that rank 1 skips: both ranks build the Buffer and run `prepare`; then rank 0
    runs `call` alone and must raise a RuntimeError naming `operation` and rank 1."""

    operation: str
    low_latency_strategy: Optional[str]  # None: a normal-mode Buffer (shared memory)
    prepare: Callable = lambda buffer, inputs: None
    call: Callable = lambda buffer, inputs, prepared: None


def normal_dispatch(buffer: deep_ep.Buffer, inputs: Inputs):
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inputs.topk_idx, EXPERTS_PER_RANK * buffer.group_size)
    return buffer.dispatch(
        inputs.x,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=inputs.topk_idx,
        topk_weights=inputs.topk_weights,
    )


def ll_dispatch(buffer: deep_ep.Buffer, inputs: Inputs):
    return buffer.low_latency_dispatch(
        inputs.x, inputs.topk_idx, MAX_TOKENS, EXPERTS_PER_RANK * buffer.group_size, use_fp8=False
    )


def fused(buffer: deep_ep.Buffer, inputs: Inputs, prepared) -> None:
    generator = torch.Generator().manual_seed(1)
    w13 = torch.randint(-127, 128, (EXPERTS_PER_RANK, 2 * INTER, HIDDEN), dtype=torch.int8, generator=generator)
    w1, w1_scale = deep_ep.permute_gmm1_weight(w13, torch.full((EXPERTS_PER_RANK, 2 * INTER), 1e-3))
    w2 = torch.randint(-127, 128, (EXPERTS_PER_RANK, INTER, HIDDEN), dtype=torch.int8, generator=generator)
    w2_scale = torch.full((EXPERTS_PER_RANK, HIDDEN), 1e-3)
    buffer.fused_deep_moe(
        inputs.x,
        inputs.topk_idx,
        inputs.topk_weights,
        w1,
        w1_scale,
        w2,
        w2_scale,
        MAX_TOKENS,
        EXPERTS_PER_RANK * buffer.group_size,
    )


SKIPPED = [
    Skipped("dispatch", None, call=lambda b, i, p: normal_dispatch(b, i)),
    Skipped("dispatch (cached)", None, normal_dispatch, lambda b, i, p: b.dispatch(i.x, handle=p[4])),
    Skipped("combine", None, normal_dispatch, lambda b, i, p: b.combine(p[0], p[4])),
    Skipped("low_latency_dispatch", "default", call=lambda b, i, p: ll_dispatch(b, i)),
    Skipped(
        "low_latency_combine",
        "default",
        ll_dispatch,
        lambda b, i, p: b.low_latency_combine(p[0], i.topk_idx, i.topk_weights, p[2]),
    ),
    Skipped("fused_deep_moe", "default", call=fused),
    Skipped(
        "clean_low_latency_buffer",
        "default",
        call=lambda b, i, p: b.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, EXPERTS_PER_RANK * b.group_size),
    ),
    # The low-latency exchange over all_to_all_single (gloo).
    Skipped("low_latency_dispatch", "alltoall", call=lambda b, i, p: ll_dispatch(b, i)),
    Skipped(
        "low_latency_combine",
        "alltoall",
        ll_dispatch,
        lambda b, i, p: b.low_latency_combine(p[0], i.topk_idx, i.topk_weights, p[2]),
    ),
    Skipped(
        "clean_low_latency_buffer",
        "alltoall",
        call=lambda b, i, p: b.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, EXPERTS_PER_RANK * b.group_size),
    ),
]


def make_buffer(group, skipped: Skipped) -> deep_ep.Buffer:
    if skipped.low_latency_strategy is None:
        return deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
    return deep_ep.Buffer(
        group,
        num_nvl_bytes=4096,
        num_rdma_bytes=ll_bytes(dist.get_world_size(group)),
        low_latency_mode=True,
        low_latency_strategy=skipped.low_latency_strategy,
    )


def expect_named(call: Callable, operation: str) -> float:
    """call() must raise a RuntimeError naming `operation`, rank 0 as the waiter and rank 1 as the one
    waited for, within DEEP_EP_TIMEOUT_S (plus slack for a loaded machine). Returns the seconds taken."""
    start = time.monotonic()
    try:
        call()
    except RuntimeError as error:
        message = str(error)
    else:
        pytest.fail(f"{operation}: nothing was raised")
    elapsed = time.monotonic() - start
    for word in (operation, "rank 0", "[1]", "timed out"):
        assert word in message, f"{word!r} not in {message!r}"
    assert "normal mode" not in message, message
    assert elapsed < TIMEOUT_S + 15, (elapsed, message)
    return elapsed


def missing_peer(rank: int, num_ranks: int, group) -> None:
    inputs = inputs_of(rank, num_ranks)
    for skipped in SKIPPED:
        buffer = make_buffer(group, skipped)
        prepared = skipped.prepare(buffer, inputs)
        if rank == 0:
            expect_named(lambda: skipped.call(buffer, inputs, prepared), skipped.operation)
        dist.barrier(group)  # rank 1 waits here (on the caller's group) until rank 0 has failed
        buffer.destroy()
    # A rank that never constructs its Buffer: the others' construction names it.
    if rank == 0:
        expect_named(lambda: deep_ep.Buffer(group, num_nvl_bytes=4096), "Buffer construction")
    dist.barrier(group)


def test_missing_peer_names_operation_and_ranks() -> None:
    spawn_ranks(missing_peer, 2, env={"DEEP_EP_TIMEOUT_S": str(TIMEOUT_S)})
    assert not [n for n in our_segments() if not os.path.exists(f"/proc/{n.split('_')[2]}")]


# ---- a rank killed while the Buffer is constructed --------------------------------------------------------
class KilledAfterCreating:
    """Stands in for deep_ep_cpp in the shared-memory transport: SIGKILLs this process right after it
    has created its `which`-th segment (1: normal mode's, 2: low-latency mode's), before any peer
    has mapped it."""

    def __init__(self, which: int) -> None:
        self.which, self.created = which, 0

    def __getattr__(self, name: str):
        return getattr(deep_ep_cpp, name)

    def SharedMemory(self, name: str, size: int, create: bool, committed: int):  # noqa: N802 - deep_ep_cpp's name
        segment = deep_ep_cpp.SharedMemory(name, size, create, committed)
        self.created += create
        if create and self.created == self.which:
            os.kill(os.getpid(), signal.SIGKILL)
        return segment


def constructing_rank(rank: int, num_ranks: int, port: int, which: int, first_use: bool, workdir: str) -> None:
    """Rank 1 dies while its shared memory is mapped: in Buffer construction (the "default" strategies map
    it there), or with `first_use` when a "default" normal strategy is set later on a Buffer built with
    "alltoall" (its first use). Rank 0 writes what it saw to workdir/rank0.json."""
    os.environ.update(DEEP_EP_TIMEOUT_S="30")
    torch.set_num_threads(1)
    join_group("gloo", rank, num_ranks, port)
    pids: List[Optional[int]] = [None] * num_ranks
    dist.all_gather_object(pids, os.getpid())
    buffer = None
    if first_use:
        buffer = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, normal_strategy="alltoall")
    if rank == 1:
        shm_transport.deep_ep_cpp = KilledAfterCreating(which)
    report = {}
    start = time.monotonic()
    try:
        if first_use:
            buffer.normal_strategy = "default"
        else:
            deep_ep.Buffer(
                dist.group.WORLD, num_nvl_bytes=1 << 20, num_rdma_bytes=ll_bytes(num_ranks), low_latency_mode=True
            )
        report["error"] = None
    except Exception as error:  # noqa: BLE001 - the report is checked by the test
        report.update(error=type(error).__name__, message=str(error))
    # Right after the error, before anything else on this host could sweep /dev/shm.
    report.update(elapsed=time.monotonic() - start, left_by_peer=segments_of(pids[1]), left_by_me=segments_of(pids[0]))
    with open(os.path.join(workdir, "rank0.json.tmp"), "w") as f:
        json.dump(report, f)
    os.rename(os.path.join(workdir, "rank0.json.tmp"), os.path.join(workdir, "rank0.json"))
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "which, first_use", [(1, False), (2, False), (1, True)], ids=["normal_segment", "low_latency_segment", "first_use"]
)
def test_rank_killed_in_construction_leaves_no_segment(which: int, first_use: bool, tmp_path) -> None:
    # spawn_ranks would terminate rank 0 as soon as rank 1 dies, so rank 0 is waited for on its own.
    store = rendezvous()
    context = mp.spawn(constructing_rank, args=(2, store.port, which, first_use, str(tmp_path)), nprocs=2, join=False)
    pids = [p.pid for p in context.processes]
    try:
        context.processes[0].join(120)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(30)
    assert context.processes[0].exitcode == 0, f"rank 0 exit code {context.processes[0].exitcode}"
    assert context.processes[1].exitcode == -signal.SIGKILL, context.processes[1].exitcode
    with open(tmp_path / "rank0.json") as f:
        report = json.load(f)
    assert report["error"] == "RuntimeError", report
    operation = "mapping the node's shared memory" if first_use else "in Buffer construction"
    for word in (operation, "rank 0", "[1]", "exited"):
        assert word in report["message"], report
    assert report["elapsed"] < 15, report  # the dead peer is seen at once, not after DEEP_EP_TIMEOUT_S (30 s)
    assert report["left_by_peer"] == [] and report["left_by_me"] == [], report
    assert not segments_of(pids[0]) and not segments_of(pids[1])


def test_local_peers_see_a_killed_process_exit() -> None:
    # The liveness behind "ranks [...] have exited": a pidfd (or /proc) says exited once the process is
    # gone, also while it is a zombie nobody has reaped; close() lets the descriptors go.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        peers = collective.LocalPeers({1: child.pid})
        assert not peers.exited(1)
        if hasattr(os, "pidfd_open"):
            assert set(peers.pidfds) == {1}
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not peers.exited(1):
            assert time.monotonic() < deadline, "a SIGKILLed child not seen exited within 10 s"
            time.sleep(0.01)
        assert collective.process_state(child.pid) == "Z"  # not reaped yet: still a zombie
        peers.close()
        assert peers.pidfds == {}
    finally:
        child.kill()
        child.wait()


def peer_dead_before_registration(rank: int, num_ranks: int, group) -> None:
    # A peer can pass the rendezvous that sends its pid and die (SIGKILL) before this rank registers it:
    # it must still be watched, so that the failure says it exited. Here: a zombie and a reaped child.
    zombie = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped.wait()
    while collective.process_state(zombie.pid) != "Z":
        time.sleep(0.01)
    collective.watch_group(group, 30.0, {1: zombie.pid, 2: reaped.pid})

    def closed_connection() -> None:
        raise RuntimeError("Connection closed by peer")

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ranks \[1, 2\] have exited"):
        collective.run_collective(group, "a test exchange", closed_connection)
    assert time.monotonic() - start < 5  # seen at once, not after the grace period
    zombie.wait()


def test_peer_dead_before_registration_is_named() -> None:
    spawn_ranks(peer_dead_before_registration, 1)


def test_shared_memory_wait_sees_a_killed_peer_exit() -> None:
    # The native waits of the shared-memory transports watch local peers the same way: a peer killed
    # (and left an unreaped zombie) ends the wait at once with "have exited"; a live peer that never
    # arrives ends it at the deadline. The counters live in this process: only the pids matter here.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        counters = torch.zeros(2, dtype=torch.int64)
        addresses = [counters.data_ptr(), counters.data_ptr() + 8]
        sync = deep_ep_cpp.NodeSync(addresses, 0, [0, 1], [os.getpid(), child.pid])
        if hasattr(os, "pidfd_open"):  # the kernel and Python offer pidfds: the native side uses one too
            assert sync.peers_with_pidfd == 1
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"timed out after 0\.3 s in live wait waiting for ranks \[1\]"):
            sync.wait_at_least([addresses[1]], [1], [1], 0.3, "live wait")
        assert time.monotonic() - start >= 0.3
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while collective.process_state(child.pid) != "Z":
            assert time.monotonic() < deadline, "a SIGKILLed child did not become a zombie within 10 s"
            time.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"waited in dead wait for ranks \[1\], but ranks \[1\] have exited"):
            sync.wait_at_least([addresses[1]], [1], [1], 60.0, "dead wait")
        assert time.monotonic() - start < 5  # seen at the first liveness check, not at the 60 s deadline
    finally:
        child.kill()
        child.wait()
