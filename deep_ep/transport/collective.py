"""Collective transport: torch.distributed all_to_all_single over the Buffer's group
(gloo on CPU, hccl on NPU). Used for strategy "alltoall", between nodes, and on NPU.

Rows travel in the order the RoutingPlan gives: a sender's selections sorted by
(destination rank, destination row), which is the (source, expert, token) order
the receiver expects from it.
"""

from __future__ import annotations

import os
import select
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..ops import RowReduction

# ---- failures ------------------------------------------------------------------------------------------
# gloo reports a missing or dead peer as a RuntimeError that names no rank ("Timed out waiting 3000ms for
# send operation", "Connection reset by peer"), and the group is unusable afterwards ("Application timeout
# caused pair closure"). Every collective below goes through `run_collective`, which turns such an error
# into one that names the ranks, and remembers the failure so that later calls say the Buffer must be
# recreated (Runtime.check_alive reads the group's status).


class LocalPeers:
    """The local peers of a group (group rank -> pid) and, where the kernel offers them (Linux 5.3+),
    a pidfd of each: a pidfd names the process itself, not its number, and reads as ready once that
    process has exited, so the answer holds even if the number is reused. Without one, /proc says."""

    def __init__(self, pids: Dict[int, int]) -> None:
        self.pids = dict(pids)
        self.pidfds: Dict[int, int] = {}
        for rank, pid in self.pids.items():
            try:
                self.pidfds[rank] = os.pidfd_open(pid)
            except (AttributeError, OSError):  # an older kernel or Python, or the process is gone
                pass
        # Closed by close(), when this object is collected, or at exit (before modules are torn down).
        self._finalizer = weakref.finalize(self, _close_all, self.pidfds)

    def exited(self, rank: int) -> bool:
        fd = self.pidfds.get(rank)
        if fd is None:
            return not process_alive(self.pids[rank])
        return bool(select.select([fd], [], [], 0)[0])

    def close(self) -> None:
        self._finalizer()


def _close_all(fds: Dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


@dataclass
class GroupStatus:
    """What this module knows of one group: its timeout, the peers it can watch, and its failure
    (`failure`: the message once a collective failed; the group must then be recreated)."""

    timeout_s: Optional[float] = None
    peers: LocalPeers = field(default_factory=lambda: LocalPeers({}))  # the peers whose liveness we can see
    remote: List[int] = field(default_factory=list)  # group ranks on other hosts
    failure: Optional[str] = None
    # Told the message of a failure (weakly held: a listener does not keep its owner alive).
    listeners: List[weakref.WeakMethod] = field(default_factory=list)


_groups: "weakref.WeakKeyDictionary[dist.ProcessGroup, GroupStatus]" = weakref.WeakKeyDictionary()


def process_state(pid: int) -> str:
    """The state letter of `pid` in /proc (R, S, D, Z, ...), or "" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3]


def process_alive(pid: int) -> bool:
    """False once `pid` has exited (also while it is a zombie not yet reaped)."""
    return process_state(pid) not in ("", "Z", "X")


def group_status(group: dist.ProcessGroup) -> GroupStatus:
    """The group's status, registered on first use (a runtime keeps it to check `failure` per call)."""
    info = _groups.get(group)
    if info is None:
        info = _groups[group] = GroupStatus()
    return info


def watch_group(group: dist.ProcessGroup, timeout_s: float, pids: Dict[int, int], remote: Sequence[int] = ()) -> None:
    """Registers the group's timeout, the pids of peers on this host (group rank -> pid) and the ranks on
    other hosts, so that failures name the ranks that died or cannot be reached. Every peer in `pids` is
    watched, even one that has exited already: a peer may pass the rendezvous that sent its pid and die
    before this rank gets here (its failure is then named, not passed over as invisible)."""
    info = group_status(group)
    info.timeout_s = timeout_s
    info.peers.close()
    info.peers = LocalPeers(pids)
    info.remote = sorted(remote)


def forget_group(group: dist.ProcessGroup) -> None:
    """Drops what watch_group registered for `group` (its pidfds are closed now, not when the group
    object happens to be collected); the owner calls it when it destroys the group."""
    info = _groups.pop(group, None)
    if info is not None:
        info.peers.close()


def on_failure(group: dist.ProcessGroup, listener: Callable[[str], None]) -> None:
    """Calls the bound method `listener(message)` when a collective on `group` fails (the shared-memory
    transport posts the message where the local peers, which may be waiting for this rank, read it)."""
    group_status(group).listeners.append(weakref.WeakMethod(listener))


def _describe(group: dist.ProcessGroup, what: str, error: RuntimeError, info: GroupStatus) -> str:
    me = dist.get_rank(group)
    others = [r for r in range(dist.get_world_size(group)) if r != me]
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    timed_out = "timed out" in text.lower() or "timeout" in text.lower()
    # A killed peer's sockets close before its process is gone, and tearing down a large address space
    # can take a while on a loaded host (0.5 s and, in CI, 5 s were seen to be too short): give it up
    # to 10 s, never more than the group's timeout.
    grace = min(10.0, info.timeout_s) if info.timeout_s else 10.0
    deadline = time.monotonic() + (0 if timed_out else grace)
    while True:
        dead = sorted(r for r in info.peers.pids if info.peers.exited(r))
        if dead or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    # Peers on other hosts: their liveness cannot be seen from here, only that they did not answer in time.
    remote = [r for r in info.remote if r != me]
    alive = [r for r in sorted(info.peers.pids) if r not in dead]
    states = [f"ranks {dead} have exited"] if dead else []
    # Ranks on other hosts are named even when a local peer has exited: with the link between hosts
    # down, a local peer that timed out first exits while this rank still waits, and its closed
    # connection is then all this rank's own error shows.
    if remote:
        states.append(f"ranks {remote} on other hosts are unreachable or not answering")
        if alive:
            states.append(f"ranks {alive} on this host are alive")
    if dead:
        return f"deep_ep: rank {me} failed in {what}: {'; '.join(states)} (gloo: {text}). The Buffer must be recreated."
    who = f"ranks {others}" + (f": {'; '.join(states)}" if states else "")
    if timed_out:
        after = f" after {info.timeout_s:g} s" if info.timeout_s else ""
        cause = "A host is unreachable, or a peer" if remote else "A peer"
        return (
            f"deep_ep: rank {me} timed out{after} in {what} waiting for {who} (DEEP_EP_TIMEOUT_S; "
            f"gloo: {text}). {cause} crashed, is stuck, or called a different operation; "
            "the Buffer must be recreated."
        )
    # Which local peers still run, and in what state: what to look at when a peer closed the
    # connection without exiting.
    pids = info.peers.pids
    running = ", ".join(f"rank {r} (pid {pids[r]}) is in state {process_state(pids[r])}" for r in alive)
    return (
        f"deep_ep: rank {me} lost the connection in {what} with {who} (gloo: {text}). "
        f"{running + '. ' if running else ''}"
        "A peer crashed or its host is unreachable; the Buffer must be recreated."
    )


def run_collective(group: dist.ProcessGroup, what: str, call: Callable[[], None]) -> None:
    """Runs `call()` (torch.distributed collectives on `group`). A RuntimeError from it becomes one that
    names the ranks waited for (dead ones when their pids tell), mentioning `what` (e.g. "dispatch"); the
    group is then marked failed and every later call raises at once, saying the Buffer must be recreated."""
    info = group_status(group)
    if info.failure:
        raise RuntimeError(info.failure)
    try:
        call()
        return
    except RuntimeError as error:
        message = _describe(group, what, error, info)
    # Raised outside the handler, so that gloo's exception and its traceback (which holds the failed
    # work and its tensors) are freed now instead of living on as our exception's context.
    info.failure = (
        f"deep_ep: this Buffer can no longer be used after an earlier failure ({message}); "
        "destroy it and create a new one on every rank."
    )
    for listener in info.listeners:
        method = listener()
        if method is not None:
            method(message)
    raise RuntimeError(message)


# ---- metadata ------------------------------------------------------------------------------------------
# int64 words gathered in the first step: [m, meta[:META_PREFIX - 1]] (a header and up to ~260 experts).
META_PREFIX = 272


def all_gather_meta(group: dist.ProcessGroup, meta: np.ndarray, what: str = "the metadata exchange") -> np.ndarray:
    """int64 [R, m]: every rank's meta vector (int64 [m] numpy, as is the result).

    Ranks may pass vectors of different lengths (they disagree on the operation or on num_experts);
    gloo would abort the process on such a size mismatch, so the vectors travel as a fixed-size prefix
    first and the rest (only when longer than the prefix) once every rank has the same length. When
    the lengths differ, the result holds only every rank's first min(m) values: callers put what
    decides m (operation, num_experts) at the front and reject the disagreement from there.
    """
    num_ranks = dist.get_world_size(group)
    meta = torch.from_numpy(meta)
    length = meta.numel()
    first = min(length, META_PREFIX - 1)
    head = torch.zeros(META_PREFIX, dtype=torch.int64)
    head[0] = length
    head[1 : 1 + first] = meta[:first]
    heads = [torch.empty_like(head) for _ in range(num_ranks)]
    run_collective(group, what, lambda: dist.all_gather(heads, head, group=group))
    table = torch.stack(heads)
    lengths = table[:, 0]
    if bool((lengths != length).any()):
        return table[:, 1 : 1 + min(int(lengths.min()), META_PREFIX - 1)].contiguous().numpy()
    if length == first:
        return table[:, 1 : 1 + length].contiguous().numpy()
    rest = meta[first:].contiguous()
    parts = [torch.empty_like(rest) for _ in range(num_ranks)]
    run_collective(group, what, lambda: dist.all_gather(parts, rest, group=group))
    return torch.cat([table[:, 1:], torch.stack(parts)], dim=1).numpy()


def send_order(dest_rank: torch.Tensor, dest_row: torch.Tensor) -> torch.Tensor:
    """Flat indices into [T*K] of the valid selections, sorted by (destination rank, row)."""
    flat_rank, flat_row = dest_rank.reshape(-1), dest_row.reshape(-1)
    valid = (flat_rank >= 0).nonzero().flatten()
    span = int(flat_row.max()) + 1 if flat_row.numel() else 1
    return valid[torch.argsort(flat_rank[valid] * span + flat_row[valid])]


def exchange_rows(
    group: dist.ProcessGroup,
    send: torch.Tensor,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    what: str = "the row exchange",
) -> torch.Tensor:
    """all_to_all_single of uint8 rows [P, b] with uneven splits; returns [sum(recv_counts), b]."""
    recv = torch.empty(int(sum(recv_counts)), send.shape[1], dtype=send.dtype, device=send.device)
    run_collective(
        group,
        what,
        lambda: dist.all_to_all_single(
            recv,
            send,
            output_split_sizes=list(map(int, recv_counts)),
            input_split_sizes=list(map(int, send_counts)),
            group=group,
        ),
    )
    return recv


def dispatch_rows(
    group: dist.ProcessGroup,
    num_ranks: int,
    topk: int,
    fields_in: List[torch.Tensor],
    fields_out: List[torch.Tensor],
    dest_rank: torch.Tensor,
    dest_row: torch.Tensor,
    recv_counts: Sequence[int],
    recv_rows: torch.Tensor,
) -> torch.Tensor:
    """Sends every selected token row to its destination and places received rows.

    Args:
        fields_in / fields_out: uint8 [T, b_i] / [N, b_i] row fields.
        dest_rank / dest_row: int64 [T, K] from the RoutingPlan.
        recv_counts: rows arriving from every source rank.
        recv_rows: int64 [sum(recv_counts)], output row of each arriving row, in arrival order.
    Returns: int64 [sum(recv_counts)], the source token index of each arriving row.
    """
    order = send_order(dest_rank, dest_row)
    send_counts = torch.bincount(dest_rank.reshape(-1)[order], minlength=num_ranks).tolist()
    # The plan lives on the host; rows live on the fields' device (NPU): move the indices there.
    device = fields_in[0].device
    token = (order // topk).to(device)
    recv_rows = recv_rows.to(device)
    payload = fields_in + [
        token.view(-1, 1).view(torch.uint8) if token.numel() else torch.empty(0, 8, dtype=torch.uint8, device=device)
    ]
    send = torch.cat([f.index_select(0, token) if i < len(fields_in) else f for i, f in enumerate(payload)], dim=1)
    recv = exchange_rows(group, send, send_counts, recv_counts, "dispatch")
    offset = 0
    for out in fields_out:
        width = out.shape[1]
        out.index_copy_(0, recv_rows, recv[:, offset : offset + width])
        offset += width
    if not recv.shape[0]:  # nothing arrived: an empty view may sit at an offset int64 cannot view
        return torch.empty(0, dtype=torch.int64)
    return recv[:, offset:].contiguous().view(torch.int64).flatten().cpu()  # source token indices, host


def combine_rows(
    group: dist.ProcessGroup,
    num_ranks: int,
    x_rows: torch.Tensor,
    rows_by_source: torch.Tensor,
    recv_counts: Sequence[int],
    dest_rank: torch.Tensor,
    dest_row: torch.Tensor,
    reduction: RowReduction,
) -> None:
    """Returns expert outputs to the token owners and reduces them there.

    Args:
        x_rows: uint8 [N, b] expert outputs of this rank in its received layout.
        rows_by_source / recv_counts: as at dispatch (what came from where).
        reduction: its run(sources, src_rank, src_row) sums the rows, as in the shared-memory transport.
    """
    order = send_order(dest_rank, dest_row)
    back_counts = torch.bincount(dest_rank.reshape(-1)[order], minlength=num_ranks).tolist()
    recv = exchange_rows(
        group, x_rows.index_select(0, rows_by_source.to(x_rows.device)), recv_counts, back_counts, "combine"
    )
    position = torch.full((dest_rank.numel(),), -1, dtype=torch.int64)
    position[order] = torch.arange(order.numel())
    position = position.view_as(dest_rank)
    reduction.run([recv], torch.where(position >= 0, 0, -1).to(torch.int32), position)
