"""Memory follows use: /dev/shm backs what a Buffer's calls have used, not what it was created with.

- A Buffer with num_nvl_bytes=int(2e9) reserves little until used, more after a larger message;
  results stay equal to the reference.
- Low-latency mode with num_rdma_bytes=0 (what DeepEP-Ascend callers pass) sizes itself from the
  calls: low_latency_dispatch / combine and fused_deep_moe against the reference.
- Running out of /dev/shm: a clear SharedMemoryExhausted on every rank before any data moves,
  never a SIGBUS, and the same Buffer then serves a smaller call. These run in a private mount
  namespace with a small tmpfs on /dev/shm (skipped where `unshare --mount` is not permitted).

Reserved bytes are what the kernel reports for a segment's file (st_blocks of its descriptor),
not the library's own bookkeeping.

    python -m pytest tests/python/deepep/test_memory.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import gather_objects, make_inputs, our_segments, reference_of  # noqa: E402
from fused_cases import Case as FusedCase  # noqa: E402
from fused_cases import check_case as check_fused  # noqa: E402
from low_latency_cases import Case  # noqa: E402
from low_latency_cases import check_case as check_low_latency  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep.reference import reference_combine  # noqa: E402
from deep_ep.testing import spawn_ranks  # noqa: E402
from deep_ep.transport import shm as shm_transport  # noqa: E402
from deep_ep.transport import shm_low_latency  # noqa: E402

HIDDEN, EXPERTS_PER_RANK, TOPK = 1024, 2, 3
LARGE_NVL_BYTES = int(2e9)
SMALL_TOKENS, LARGE_TOKENS = 16, 2048
TMPFS_MIB = 32  # /dev/shm of the out-of-memory runs
FILLER_MIB = 8  # taken by another file there, so a reservation can fail part way


def reserved_bytes(segment) -> int:
    """Bytes of /dev/shm the kernel has allocated to a segment this rank created."""
    return os.fstat(segment.fd).st_blocks * 512


def own_segment(node) -> object:
    return node.segments[node.local_index]


def roundtrip(buffer: deep_ep.Buffer, rank: int, num_ranks: int, tokens: List[int], seed: int) -> None:
    """dispatch + combine (identity experts) of every rank's float32 tokens, checked against the reference."""
    experts = EXPERTS_PER_RANK * num_ranks
    everyone = [
        make_inputs(r, tokens[r], HIDDEN, experts, TOPK, num_ranks, torch.float32, seed=seed) for r in range(num_ranks)
    ]
    mine = everyone[rank]
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine.topk_idx, experts)
    recv_x, recv_idx, recv_weights, counts, handle, _ = buffer.dispatch(
        mine.x,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=mine.topk_idx,
        topk_weights=mine.topk_weights,
    )
    ref = reference_of(everyone, experts, rank)
    assert torch.equal(recv_x, ref["x"]) and torch.equal(recv_idx, ref["topk_idx"])
    assert torch.equal(recv_weights, ref["weights"]) and counts == ref["rows_per_expert"]
    combined = buffer.combine(recv_x, handle)[0]
    selection = mine.x.unsqueeze(1).expand(-1, TOPK, -1)
    expected = reference_combine(selection, mine.topk_idx, mine.topk_weights)
    assert torch.allclose(combined.double(), expected, rtol=1e-5, atol=1e-6)


def message_bytes(tokens: int) -> int:
    """Data-area bytes of one rank's dispatch rows (x float32, topk_idx int64, weights float32)."""
    return shm_transport.region_layout([HIDDEN * 4, TOPK * 8, TOPK * 4], tokens)[1]


# ---- normal mode: reserved bytes follow the largest message -------------------------------------------------
def normal_follows_use(rank: int, num_ranks: int, group) -> None:
    buffer = deep_ep.Buffer(group, num_nvl_bytes=LARGE_NVL_BYTES)
    segment = own_segment(buffer.runtime.shm)
    figures: Dict[str, int] = {"created": reserved_bytes(segment)}
    # Control and meta only: no data area yet.
    assert figures["created"] <= shm_transport.DATA_OFFSET, figures
    roundtrip(buffer, rank, num_ranks, [SMALL_TOKENS] * num_ranks, seed=1)
    figures["small"] = reserved_bytes(segment)
    small_need = message_bytes(SMALL_TOKENS)
    assert small_need <= figures["small"] - shm_transport.DATA_OFFSET, figures
    assert figures["small"] <= shm_transport.DATA_OFFSET + shm_transport.COMMIT_GRANULE, figures
    assert figures["small"] * 1000 < LARGE_NVL_BYTES, figures
    # The same message again reserves nothing more; a larger one grows the reservation to its size.
    roundtrip(buffer, rank, num_ranks, [SMALL_TOKENS] * num_ranks, seed=2)
    assert reserved_bytes(segment) == figures["small"]
    roundtrip(buffer, rank, num_ranks, [LARGE_TOKENS, SMALL_TOKENS], seed=3)
    figures["large"] = reserved_bytes(segment)
    assert figures["large"] * 100 < LARGE_NVL_BYTES, figures
    if rank == 0:
        # It sent LARGE_TOKENS rows; in combine it returns at most one row per (token, local expert).
        most = max(message_bytes(LARGE_TOKENS), (LARGE_TOKENS + SMALL_TOKENS) * EXPERTS_PER_RANK * HIDDEN * 4)
        assert figures["large"] >= shm_transport.DATA_OFFSET + message_bytes(LARGE_TOKENS), figures
        assert figures["large"] <= shm_transport.DATA_OFFSET + most + shm_transport.COMMIT_GRANULE, figures
        print(
            f"\nnormal mode, num_nvl_bytes={LARGE_NVL_BYTES}: reserved per rank after creation "
            f"{figures['created']} B, after {SMALL_TOKENS} tokens x {HIDDEN} float32 ({message_bytes(SMALL_TOKENS)} "
            f"B of rows) {figures['small']} B, after {LARGE_TOKENS} tokens ({message_bytes(LARGE_TOKENS)} B of rows) "
            f"{figures['large']} B"
        )
    buffer.destroy()


def test_normal_mode_reserves_what_calls_use() -> None:
    spawn_ranks(normal_follows_use, 2)
    assert not our_segments()


# ---- low-latency mode with num_rdma_bytes=0 ------------------------------------------------------------------
def low_latency_sizes_itself(rank: int, num_ranks: int, group) -> None:
    buffer = deep_ep.Buffer(group, low_latency_mode=True)  # num_rdma_bytes=0, as DeepEP-Ascend callers pass
    segment = own_segment(buffer.runtime.low_latency.ll)
    created = reserved_bytes(segment)
    assert created <= shm_low_latency.control_bytes(num_ranks), created
    small = Case(tokens=[5, 8, 0], max_tokens=8, hidden=128, experts_per_rank=2, topk=2)
    for case in (small, replace(small, quant="bf16", hook=True, seed=1)):
        check_low_latency(rank, num_ranks, buffer, case, group)
    after_small = reserved_bytes(segment)
    # Each half's reservation starts mid-page: up to a page more each.
    slack = 2 * os.sysconf("SC_PAGE_SIZE")
    assert created < after_small <= created + 2 * shm_transport.COMMIT_GRANULE + slack, (created, after_small)
    # A larger Nmax and hidden size on the same Buffer: the reservation grows with them.
    large = replace(small, tokens=[300, 17, 260], max_tokens=512, hidden=512, seed=2)
    num_experts = large.experts_per_rank * num_ranks
    needed = shm_low_latency.half_bytes(large.max_tokens, large.hidden, num_experts)
    assert needed > shm_transport.COMMIT_GRANULE
    # Rank 0 alone asks for the larger Nmax: the peers have not reserved for it, so rank 0 writes nothing
    # and says why; the peers name rank 0 (ValueError everywhere, no wait).
    inputs = make_inputs(rank, 8, large.hidden, num_experts, large.topk, num_ranks)
    with pytest.raises(
        ValueError, match=r"ranks \[1, 2\] have not prepared .* disagree" if rank == 0 else r"ranks \[0\] rejected"
    ):
        buffer.low_latency_dispatch(inputs.x, inputs.topk_idx, large.max_tokens if rank == 0 else 8, num_experts)
    check_low_latency(rank, num_ranks, buffer, large, group)
    after_large = reserved_bytes(segment)
    assert created + 2 * needed <= after_large <= created + 2 * (needed + shm_transport.COMMIT_GRANULE) + slack, (
        created,
        needed,
        after_large,
    )
    assert after_large * 1000 < shm_low_latency.AUTO_BYTES
    check_low_latency(rank, num_ranks, buffer, small, group)  # the smaller size again
    # fused_deep_moe on the same Buffer, and then on a fresh one whose first call it is.
    fused = FusedCase(tokens=[17, 0, 9], max_tokens=24)
    check_fused(rank, num_ranks, group, buffer, fused)
    buffer.destroy()
    fresh = deep_ep.Buffer(group, num_rdma_bytes=0, low_latency_mode=True)
    check_fused(rank, num_ranks, group, fresh, replace(fused, seed=3))
    fresh.destroy()
    # The all_to_all transport needs no segment: num_rdma_bytes=0 means no limit there.
    alltoall = deep_ep.Buffer(group, low_latency_mode=True, low_latency_strategy="alltoall")
    assert alltoall.runtime.low_latency.ll is None
    check_low_latency(rank, num_ranks, alltoall, large, group)
    alltoall.destroy()
    explicit_limit(rank, num_ranks, group)
    if rank == 0:
        print(
            f"\nlow-latency mode, num_rdma_bytes=0 ({shm_low_latency.AUTO_BYTES} B mapped): reserved per rank "
            f"after creation {created} B, after Nmax={small.max_tokens} H={small.hidden} {after_small} B, "
            f"after Nmax={large.max_tokens} H={large.hidden} {after_large} B"
        )


def explicit_limit(rank: int, num_ranks: int, group) -> None:
    """A given num_rdma_bytes stays a limit (DeepEP's contract): a layout larger than it is a ValueError
    naming the size; the reservation never passes it."""
    case = Case(tokens=[8], max_tokens=8, hidden=64, experts_per_rank=2, topk=2)
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(8, 64, num_ranks, 2 * num_ranks)
    buffer = deep_ep.Buffer(group, num_rdma_bytes=size, low_latency_mode=True)
    assert reserved_bytes(own_segment(buffer.runtime.low_latency.ll)) <= size
    check_low_latency(rank, num_ranks, buffer, case, group)
    inputs = make_inputs(rank, 8, 64, 2 * num_ranks, 2, num_ranks)
    with pytest.raises(ValueError, match=rf"num_rdma_bytes={size} is too small .* it needs \d+ bytes"):
        buffer.low_latency_dispatch(inputs.x, inputs.topk_idx, 16, 2 * num_ranks)
    check_low_latency(rank, num_ranks, buffer, replace(case, seed=1), group)
    buffer.destroy()


def test_low_latency_num_rdma_bytes_zero() -> None:
    spawn_ranks(low_latency_sizes_itself, 3)
    assert not our_segments()


# ---- out of /dev/shm (run inside a private mount namespace, see main) ----------------------------------------
def shm_used() -> int:
    stat = os.statvfs("/dev/shm")
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def expect_exhausted(call, words: List[str]) -> str:
    """call() must raise SharedMemoryExhausted with every one of `words`; returns the message."""
    try:
        call()
    except shm_transport.SharedMemoryExhausted as error:
        message = str(error)
    else:
        raise AssertionError("expected SharedMemoryExhausted, nothing was raised")
    for word in words:
        assert word in message, (word, message)
    return message


def out_of_dev_shm(rank: int, num_ranks: int, group) -> None:
    # Two Buffers of 2 GB each on a 32 MiB /dev/shm: creating them reserves almost nothing.
    before = shm_used()
    buffer = deep_ep.Buffer(group, num_nvl_bytes=LARGE_NVL_BYTES, low_latency_mode=True)
    dist.barrier(group)
    created = shm_used() - before
    dist.barrier(group)  # every rank has measured before any reserves more
    assert created < 1 << 20, created
    roundtrip(buffer, rank, num_ranks, [SMALL_TOKENS] * num_ranks, seed=10)
    # Low-latency mode (num_rdma_bytes=0): an Nmax whose areas cannot be reserved on any rank.
    case = Case(tokens=[8, 3], max_tokens=8, hidden=256, experts_per_rank=2, topk=2)
    check_low_latency(rank, num_ranks, buffer, case, group)
    inputs = make_inputs(rank, 8, case.hidden, 2 * num_ranks, 2, num_ranks)
    huge_nmax = (TMPFS_MIB << 20) // (case.hidden * 2 * 2)
    expect_exhausted(
        lambda: buffer.low_latency_dispatch(inputs.x, inputs.topk_idx, huge_nmax, 2 * num_ranks),
        ["rank 0 needs", "rank 1 needs", "/dev/shm", "num_max_dispatch_tokens_per_rank", "no data moved"],
    )
    check_low_latency(rank, num_ranks, buffer, replace(case, seed=1), group)
    check_fused(rank, num_ranks, group, buffer, FusedCase(tokens=[5, 7], max_tokens=8))
    dist.barrier(group)

    segment = own_segment(buffer.runtime.shm)
    reserved = reserved_bytes(segment)
    dist.barrier(group)
    used_before = shm_used()

    # Rank 0 sends more rows than /dev/shm can back (but less than its total: the kernel reserves part of
    # it, fails, and gives the part back). Every rank raises, naming rank 0 and its bytes; nothing moved.
    tokens = (TMPFS_MIB - 4 << 20) // (HIDDEN * 4 + TOPK * 12)
    need = message_bytes(tokens)
    assert (TMPFS_MIB - FILLER_MIB) << 20 < need < TMPFS_MIB << 20
    message = expect_exhausted(
        lambda: roundtrip(buffer, rank, num_ranks, [tokens, SMALL_TOKENS], seed=11),
        ["rank 0 needs", f"{need} bytes", "/dev/shm", "--shm-size", "num_nvl_bytes", "no data moved"],
    )
    messages = gather_objects(message.split(" (rank 0: ")[0], group)
    assert len(set(messages)) == 1, messages  # the same error on every rank
    assert "rank 1 needs" not in message
    if rank == 0:
        assert "No space left on device" in message
    assert reserved_bytes(segment) == reserved
    dist.barrier(group)
    assert shm_used() == used_before, (shm_used(), used_before)  # the part reserved before failing went back
    dist.barrier(group)
    # The same Buffer serves a smaller call, and then a larger one that fits.
    roundtrip(buffer, rank, num_ranks, [SMALL_TOKENS + 3, SMALL_TOKENS], seed=12)
    roundtrip(buffer, rank, num_ranks, [tokens // 8, SMALL_TOKENS], seed=13)
    check_fused(rank, num_ranks, group, buffer, FusedCase(tokens=[2, 8], max_tokens=8, seed=1))

    # get_local_buffer_tensor of the whole 2 GB area: a local error, the Buffer unaffected.
    expect_exhausted(lambda: buffer.get_local_buffer_tensor(torch.uint8), [f"{LARGE_NVL_BYTES} bytes"])
    roundtrip(buffer, rank, num_ranks, [SMALL_TOKENS, 1], seed=14)
    buffer.destroy()


def run_out_of_dev_shm() -> None:
    """Inside the private mount namespace: a filler file, the ranks, then nothing of ours left."""
    with open("/dev/shm/filler", "wb") as f:
        f.write(b"\1" * (FILLER_MIB << 20))
    spawn_ranks(out_of_dev_shm, 2, env={"DEEP_EP_TIMEOUT_S": "30"})
    assert os.listdir("/dev/shm") == ["filler"], os.listdir("/dev/shm")


def namespace_command(script: str) -> List[str]:
    """Runs `script` (sh) in a private mount namespace with a TMPFS_MIB tmpfs on /dev/shm."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f"mount -t tmpfs -o size={TMPFS_MIB}m tmpfs /dev/shm && {script}",
    ]


def namespace_skip_reason() -> Optional[str]:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(namespace_command("true"), check=False, capture_output=True, text=True)
    if probe.returncode != 0:
        return f"a private /dev/shm needs `unshare --mount` and mount, not permitted here: {probe.stderr.strip()}"
    return None


def test_out_of_dev_shm() -> None:
    reason = namespace_skip_reason()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(
        namespace_command(f"exec {sys.executable} {os.path.abspath(__file__)} --out-of-dev-shm"),
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--out-of-dev-shm"]:
        run_out_of_dev_shm()
    else:
        sys.exit(f"usage: {sys.argv[0]} --out-of-dev-shm (inside a mount namespace; pytest runs it)")
