"""Shared-memory transport of low-latency mode (CPU ranks of one node).

Every local rank owns one segment of `num_rdma_bytes` (AUTO_BYTES of address space when it is 0),
mapped by all its local peers:

    [control 4 KiB | mailboxes | parity 0: slots, tokens, scales, returns, in place ... | parity 1: the same]

- mailboxes: one per (kind, parity, source rank), kind = dispatch or combine. The source writes a
  header (and, for dispatch, its row count per local expert of the owner) and then release-stores
  the call's sequence number into the signal word; the owner waits for the signal
  (NodeSync.wait_at_least: deadline and liveness checks), reads, and release-stores the same number
  into the ack word once it no longer needs the parity's data. A source writes into a parity only
  after the owner acked the call before the previous one on it (seq - 2): two calls may be in
  flight, a third waits. Sequence numbers only grow, so nothing is reset between calls.
- tokens (dispatch): the owner's own tokens of the call, [Nmax] rows of H int8 bytes (plus a float32
  scale) or 2H bf16 bytes, each token written (and quantized) once however many experts it selects.
- slots (dispatch): fixed entries [L][R][Nmax] (local expert, source rank, slot): a source writes
  entry `slot` of block (l, source), the reference (token, k), for each of its tokens that selects
  local expert l of the owner; the owner packs the blocks expert-major into its recv_x by copying
  each referenced token row out of the source's token area. A received row is thus copied exactly
  once (the K-fold fan-out happens in that one copy), instead of once into a slot and again
  into recv_x.
- returns (combine): rows [Nmax * K] of the token owner (room for K = 17: 16 routed columns plus
  the shared expert's): the holder of expert e writes the expert
  output of the owner's selection (t, k) into row t * K + k; the owner reduces them in k order,
  in one pass that reads each row once. When the reduction runs inside the combine call (no
  return_recv_hook), a rank's outputs for its own tokens are not copied: it reads them from x.
- in place (combine): this rank's zero-copy buffer, [Nmax * R * min(17, L)] rows in the packed layout
  of its recv_x (Buffer.get_next_low_latency_combine_buffer). Written only by its owner (by the
  caller's experts), so it is reserved when first handed out; a combine whose x is this area copies
  nothing, and the token owners reduce straight from it (docs/low_latency_data_path.md).

Each send and each receive is one native call (deep_ep_cpp.ll_dispatch_send / ll_dispatch_receive /
ll_combine_send / ll_combine_receive) that also does the call's waits; docs/low_latency_data_path.md
describes the steps and their memory ordering.

Positions of the two parity halves depend only on the segment size, so a peer that disagrees on
Nmax, H or E (reported through the header) can never write into the other parity.

Memory follows use: /dev/shm backs only the control area and mailboxes at first, and then of each
half the prefix the largest (Nmax, H, E) so far needs. Peers write into each other's halves, so a
dispatch first makes sure every local rank has reserved its prefix (prepare): the owner reserves,
publishes its reserved size (COMMITTED_WORD) and that it is done with the call (READY_WORD); a
source that finds a peer's reservation too small waits for that peer's READY_WORD and writes
nothing if the peer could not reserve (SharedMemoryExhausted on every rank) or prepared for other
sizes (ValueError).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist

import deep_ep_cpp

from ..utils import timeout_seconds
from . import shm
from .groups import CONSTRUCTION
from .shm import SharedMemoryExhausted

DISPATCH, COMBINE = 0, 1
MAILBOX_BYTES = 8192
SIGNAL_WORD, ACK_WORD, HEADER_WORD = 0, 8, 16  # one cache line apart
HEADER_WORDS = 8
COUNTS_WORD = HEADER_WORD + HEADER_WORDS
MAX_LOCAL_EXPERTS = MAILBOX_BYTES // 8 - COUNTS_WORD
MAX_TOPK = 16
# Layouts (Nmax, H, E) whose addresses are remembered; a caller that keeps changing them must not
# grow the cache without end, so it starts over when full.
MAX_CACHED_LAYOUTS = 64
ALIGN = shm.ALIGN
# Segment size for num_rdma_bytes=0: address space only, /dev/shm is reserved as calls need it.
AUTO_BYTES = 64 << 30
# Control words of the reservation handshake (after shm.BARRIER_WORD and shm.PID_WORD).
COMMITTED_WORD = 16  # bytes of each half this rank has reserved
READY_WORD = 24  # the last dispatch call whose reservation step this rank has finished
FAILED_WORD = 32  # + parity: bytes this rank failed to reserve at that parity's last call (0: none)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def control_bytes(num_ranks: int) -> int:
    """Control area and mailboxes for `num_ranks` local ranks."""
    return shm.CONTROL_BYTES + 2 * 2 * num_ranks * MAILBOX_BYTES


def slot_bytes(num_max_tokens: int, hidden: int, num_experts: int) -> int:
    """One parity's dispatch area: E * Nmax slots of (token, k), Nmax token rows of up to 2H bytes
    and their scales."""
    return _align(num_experts * num_max_tokens * 8) + _align(num_max_tokens * 2 * hidden) + _align(num_max_tokens * 4)


def return_bytes(num_max_tokens: int, hidden: int, num_experts: int) -> int:
    """One parity's combine rows: Nmax * (K + 1) 16-bit rows, K <= 16 (a row may repeat an expert, so
    K is not bounded by E; the extra column is the shared expert's, see layout.SharedExperts)."""
    return _align(num_max_tokens * (MAX_TOPK + 1) * 2 * hidden)


@functools.lru_cache(maxsize=MAX_CACHED_LAYOUTS)  # every dispatch asks (prepare)
def half_bytes(num_max_tokens: int, hidden: int, num_experts: int) -> int:
    """Bytes of one parity's areas, a prefix of its half: dispatch slots, tokens and scales, then
    the combine rows."""
    return slot_bytes(num_max_tokens, hidden, num_experts) + return_bytes(num_max_tokens, hidden, num_experts)


def in_place_rows(num_max_tokens: int, num_ranks: int, num_experts: int) -> int:
    """Rows of a parity's zero-copy combine area: the most packed rows a rank can hold, Nmax * R *
    min(K, L) for any K <= MAX_TOPK + 1 (layout.SharedExperts.packed_rows)."""
    return num_max_tokens * num_ranks * min(MAX_TOPK + 1, max(1, num_experts // num_ranks))


def in_place_bytes(num_max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """One parity's zero-copy combine area: in_place_rows 16-bit rows, after the half's other areas.
    Only its owner writes it, so it is reserved when first handed out (not in prepare)."""
    return _align(in_place_rows(num_max_tokens, num_ranks, num_experts) * 2 * hidden)


def half_bytes_in_place(num_max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Bytes of one parity's areas with the zero-copy combine area after them."""
    return half_bytes(num_max_tokens, hidden, num_experts) + in_place_bytes(
        num_max_tokens, hidden, num_ranks, num_experts
    )


def bytes_needed(num_max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Segment bytes for Nmax tokens of hidden size H per rank, R ranks and E experts."""
    return control_bytes(num_ranks) + 2 * half_bytes_in_place(num_max_tokens, hidden, num_ranks, num_experts)


@dataclass
class Areas:
    """Addresses of one parity's areas in every local rank's segment (for one Nmax, H, E)."""

    info: List[int]  # slots: int32 [E * Nmax, 2]
    tokens: List[int]  # token rows [Nmax, row bytes]
    scales: List[int]  # float32 [Nmax]
    returns: List[int]  # combine rows [return_rows, 2H]
    return_rows: int
    in_place: List[int]  # zero-copy combine rows [in_place_rows, 2H] (packed layout)
    in_place_rows: int


class LowLatencyShm:
    """The low-latency segments of one node's ranks.

    Args:
        group: the Buffer's process group (collective: names travel through it once).
        local_ranks: ranks (in `group`) of this node, ascending; here every rank of the group.
        num_bytes: size of every rank's segment (`num_rdma_bytes`); 0: AUTO_BYTES.
        setup: the operation that maps the segments, named if that fails.
    """

    def __init__(
        self, group: dist.ProcessGroup, local_ranks: Sequence[int], num_bytes: int, setup: str = CONSTRUCTION
    ) -> None:
        self.rank = dist.get_rank(group)
        self.local_ranks = list(local_ranks)
        self.local_index = self.local_ranks.index(self.rank)
        self.num_local = len(self.local_ranks)
        num_bytes = num_bytes or AUTO_BYTES
        self.num_bytes = num_bytes
        self.control = control_bytes(self.num_local)
        if num_bytes < self.control + 4 * ALIGN:
            raise ValueError(
                f"num_rdma_bytes={num_bytes} is too small for low-latency mode: the control area "
                f"of {self.num_local} ranks alone takes {self.control} bytes; use "
                "Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, "
                "num_ranks, num_experts)"
            )
        self.half = (num_bytes - self.control) // 2 // ALIGN * ALIGN
        self.segments = shm.map_node_segments(group, self.local_ranks, num_bytes, self.control, setup)
        self.sync = shm.node_sync(self.segments, self.local_index, self.local_ranks)
        self.base = [s.address for s in self.segments]
        own_segment = self.segments[self.local_index]
        self.reservations = [shm.Reservation(own_segment, self.control + p * self.half, self.half) for p in (0, 1)]
        self.committed_words = [b + COMMITTED_WORD * 8 for b in self.base]
        self.ready_words = [b + READY_WORD * 8 for b in self.base]
        self.failed_words = [[b + (FAILED_WORD + p) * 8 for b in self.base] for p in (0, 1)]
        self._ready = 0  # the call READY_WORD holds
        self._failed = [0, 0]  # what FAILED_WORD + parity holds
        self._everyone_reserved = 0  # bytes per half every local rank is known to have reserved
        own = torch.frombuffer(self.segments[self.local_index], dtype=torch.int64, count=self.control // 8)
        # inbox[kind][parity]: int64 [sources, MAILBOX_BYTES // 8], the mailboxes of this rank.
        self.inbox = own[shm.CONTROL_BYTES // 8 :].view(2, 2, self.num_local, MAILBOX_BYTES // 8)
        self.owners = list(range(self.num_local))
        me = self.local_index
        mailbox = self._mailbox
        words = range(self.num_local)
        # Per (kind, parity): where this rank signals / writes headers / waits for acks as a source,
        # and where it waits for signals / writes acks as an owner.
        self.send_signal = [[[mailbox(d, k, p, me) + SIGNAL_WORD * 8 for d in words] for p in (0, 1)] for k in (0, 1)]
        self.send_header = [[[mailbox(d, k, p, me) + HEADER_WORD * 8 for d in words] for p in (0, 1)] for k in (0, 1)]
        self.send_ack = [[[mailbox(d, k, p, me) + ACK_WORD * 8 for d in words] for p in (0, 1)] for k in (0, 1)]
        self.recv_signal = [[[mailbox(me, k, p, s) + SIGNAL_WORD * 8 for s in words] for p in (0, 1)] for k in (0, 1)]
        self.recv_ack = [[[mailbox(me, k, p, s) + ACK_WORD * 8 for s in words] for p in (0, 1)] for k in (0, 1)]
        self._areas = {}
        self._headers = [
            [self.inbox[k, p, :, HEADER_WORD : HEADER_WORD + HEADER_WORDS] for p in (0, 1)] for k in (0, 1)
        ]
        self.last_seq = [[0, 0], [0, 0]]  # [kind][parity]: the last call sent through this memory
        self.handed_out = False  # whether in_place_area gave the caller a view of this rank's segment
        # Read once: the hot path should not parse the environment on every wait.
        self.timeout_s = timeout_seconds()

    def _mailbox(self, owner: int, kind: int, parity: int, source: int) -> int:
        return self.base[owner] + shm.CONTROL_BYTES + ((kind * 2 + parity) * self.num_local + source) * MAILBOX_BYTES

    def close(self) -> None:
        self.inbox = None
        self.sync = None
        self._areas = {}
        self.reservations = []
        for index, segment in enumerate(getattr(self, "segments", [])):
            # A zero-copy buffer the caller still holds views this rank's segment: the mapping then
            # goes with the last such tensor (the names are unlinked already), never under it.
            if not (index == self.local_index and getattr(self, "handed_out", False)):
                segment.close()
        self.segments = []

    # ---- sizes ---------------------------------------------------------------------------------------------
    def fits(self, num_max_tokens: int, hidden: int, num_experts: int) -> bool:
        return (
            half_bytes_in_place(num_max_tokens, hidden, self.num_local, num_experts) <= self.half
            and num_experts // self.num_local <= MAX_LOCAL_EXPERTS
        )

    # ---- reservation (see the module docstring) -----------------------------------------------------------
    def _mark_ready(self, seq: int, failed: int) -> None:
        parity = seq & 1
        if self._failed[parity] != failed:
            deep_ep_cpp.store_counter(self.failed_words[parity][self.local_index], failed)
            self._failed[parity] = failed
        deep_ep_cpp.store_counter(self.ready_words[self.local_index], seq)
        self._ready = seq

    def skip(self, seq: int) -> None:
        """Dispatch call `seq` ends before prepare (this rank rejected its arguments): peers that
        wait for this rank's reservation step stop waiting."""
        if self._ready != seq:
            self._mark_ready(seq, 0)

    def prepare(self, seq: int, num_max_tokens: int, hidden: int, num_experts: int, what: str) -> None:
        """Before dispatch call `seq` writes: this rank reserves what (Nmax, H, E) needs of both halves
        and checks that every local rank has. SharedMemoryExhausted (on every rank) when a rank's
        /dev/shm is full; ValueError when a rank prepared for smaller sizes; RuntimeError when a peer
        never finishes its step (timeout or exit)."""
        needed = half_bytes(num_max_tokens, hidden, num_experts)
        if needed <= self._everyone_reserved:  # sizes seen before: nothing to reserve or check
            self._mark_ready(seq, 0)
            return
        me = self.local_index
        own = min(r.reserved for r in self.reservations)
        failing = None
        if needed > own:
            failing = next((r for r in self.reservations if not r.grow(needed)), None)
            if failing is None:
                deep_ep_cpp.store_counter(self.committed_words[me], min(r.reserved for r in self.reservations))
        self._mark_ready(seq, needed if failing else 0)
        short = [d for d in range(self.num_local) if deep_ep_cpp.load_counter(self.committed_words[d]) < needed]
        if short:
            self.sync.wait_at_least(
                [self.ready_words[d] for d in short],
                [seq] * len(short),
                short,
                self.timeout_s,
                f"{what} (shared-memory reservation)",
            )
        exhausted, other_sizes = {}, []
        for d in short:
            if deep_ep_cpp.load_counter(self.committed_words[d]) >= needed:
                continue
            failed_bytes = deep_ep_cpp.load_counter(self.failed_words[seq & 1][d])
            if failed_bytes:
                exhausted[self.local_ranks[d]] = failed_bytes
            else:
                other_sizes.append(self.local_ranks[d])
        if exhausted:
            mine = f" (rank {self.rank}: {failing.failure})" if failing else ""
            raise SharedMemoryExhausted(
                shm.exhausted_message(what, exhausted, "use a smaller num_max_dispatch_tokens_per_rank") + mine
            )
        if other_sizes:
            raise ValueError(
                f"deep_ep {what}: ranks {other_sizes} have not prepared their buffers for "
                f"num_max_dispatch_tokens_per_rank={num_max_tokens}, hidden={hidden}, "
                f"num_experts={num_experts}: they rejected their arguments or the ranks disagree "
                "on these sizes; no data moved."
            )
        self._everyone_reserved = min(deep_ep_cpp.load_counter(a) for a in self.committed_words)

    def areas(self, num_max_tokens: int, hidden: int, num_experts: int, parity: int) -> Areas:
        key = (num_max_tokens, hidden, num_experts, parity)
        found = self._areas.get(key)
        if found is None:
            starts = [b + self.control + parity * self.half for b in self.base]
            tokens = [s + _align(num_experts * num_max_tokens * 8) for s in starts]
            ret = return_bytes(num_max_tokens, hidden, num_experts)
            found = Areas(
                info=starts,
                tokens=tokens,
                scales=[t + _align(num_max_tokens * 2 * hidden) for t in tokens],
                returns=[s + slot_bytes(num_max_tokens, hidden, num_experts) for s in starts],
                return_rows=ret // (2 * hidden),
                in_place=[s + half_bytes(num_max_tokens, hidden, num_experts) for s in starts],
                in_place_rows=in_place_rows(num_max_tokens, self.num_local, num_experts),
            )
            self._remember(key, found)
        return found

    def in_place_area(self, num_max_tokens: int, hidden: int, num_experts: int, parity: int, what: str) -> torch.Tensor:
        """uint8 [in_place_rows, 2H]: this rank's zero-copy combine area of `parity`, reserved now
        (SharedMemoryExhausted when /dev/shm is full). The caller waits for the owners first."""
        end = half_bytes_in_place(num_max_tokens, hidden, self.num_local, num_experts)
        reservation = self.reservations[parity]
        if not reservation.grow(end):
            raise SharedMemoryExhausted(
                shm.exhausted_message(what, {self.rank: end}, "use a smaller num_max_dispatch_tokens_per_rank")
                + f" ({reservation.failure})"
            )
        key = ("in_place", num_max_tokens, hidden, num_experts, parity)
        found = self._areas.get(key)
        if found is None:
            areas, me = self.areas(num_max_tokens, hidden, num_experts, parity), self.local_index
            rows = areas.in_place_rows
            area = torch.frombuffer(
                self.segments[me], dtype=torch.uint8, count=rows * 2 * hidden, offset=areas.in_place[me] - self.base[me]
            )
            found = self._remember(key, area.view(rows, 2 * hidden))
        self.handed_out = True
        return found

    def wait_consumed(self, kind: int, parity: int, what: str) -> None:
        """Returns once every owner has consumed the last call of `kind` sent on `parity`."""
        previous = self.last_seq[kind][parity]
        if previous > 0:
            self.sync.wait_at_least(
                self.send_ack[kind][parity], [previous] * self.num_local, self.owners, self.timeout_s, what
            )

    # ---- signalling ----------------------------------------------------------------------------------------
    def begin_send(self, kind: int, parity: int, seq: int) -> int:
        """Call `seq` of `kind` is about to be sent on `parity`: returns the call whose acks the sender
        must wait for first (the previous one sent on this parity through this memory, 0: none);
        the native send calls wait for them."""
        previous = self.last_seq[kind][parity]
        self.last_seq[kind][parity] = seq
        return previous

    def wait_acks(self, kind: int, parity: int, seq: int, what: str) -> None:
        """Before sending call `seq` without rows (a rejected call): every owner has consumed the
        previous call on this parity through this shared memory."""
        self.wait_consumed(kind, parity, what)
        self.begin_send(kind, parity, seq)

    def headers(self, kind: int, parity: int) -> torch.Tensor:
        """int64 [sources, HEADER_WORDS] view of the headers of this rank's mailboxes."""
        return self._headers[kind][parity]

    def _remember(self, key: tuple, value):
        """Caches `value` (an Areas or a view) under `key` and returns it."""
        if len(self._areas) >= MAX_CACHED_LAYOUTS:
            self._areas.clear()
        self._areas[key] = value
        return value

    def ack(self, kind: int, parity: int, seq: int) -> None:
        deep_ep_cpp.store_counters(self.recv_ack[kind][parity], seq)

    def publish(self, kind: int, parity: int, seq: int, header: List[int]) -> None:
        """Header and signal without rows (a call whose arguments this rank rejected)."""
        deep_ep_cpp.ll_publish(self.send_header[kind][parity], header, self.send_signal[kind][parity], seq)

    def reset(self) -> None:
        """Zeroes this rank's mailboxes and call words (clean_low_latency_buffer; peers must be quiet).
        What it has reserved stays reserved."""
        self.inbox.zero_()
        self.last_seq = [[0, 0], [0, 0]]
        for addr in (self.ready_words[self.local_index], *(words[self.local_index] for words in self.failed_words)):
            deep_ep_cpp.store_counter(addr, 0)
        self._ready = 0
        self._failed = [0, 0]
