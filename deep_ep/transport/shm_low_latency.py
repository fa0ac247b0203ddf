"""Shared-memory transport of low-latency mode (CPU ranks of one node).

Every local rank owns one segment of `num_rdma_bytes`, mapped by all its local peers:

    [control 4 KiB | mailboxes | parity 0: slots, tokens ... returns | parity 1: the same]

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
- returns (combine): rows [Nmax * K] of the token owner: the holder of expert e writes the expert
  output of the owner's selection (t, k) into row t * K + k; the owner reduces them in k order.

Positions of the two parity halves depend only on the segment size, so a peer that disagrees on
Nmax, H or E (reported through the header) can never write into the other parity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist

import deep_ep_cpp

from ..utils import timeout_seconds
from . import shm

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


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def control_bytes(num_ranks: int) -> int:
    """Control area and mailboxes for `num_ranks` local ranks."""
    return shm.CONTROL_BYTES + 2 * 2 * num_ranks * MAILBOX_BYTES


def slot_bytes(num_max_tokens: int, hidden: int, num_experts: int) -> int:
    """One parity's dispatch area: E * Nmax slots of (token, k), Nmax token rows of up to 2H bytes
    and their scales."""
    return _align(num_experts * num_max_tokens * 8) + _align(num_max_tokens * 2 * hidden) + \
        _align(num_max_tokens * 4)


def return_bytes(num_max_tokens: int, hidden: int, num_experts: int) -> int:
    """One parity's combine rows: Nmax * K 16-bit rows (K <= min(E, 16))."""
    return _align(num_max_tokens * min(num_experts, MAX_TOPK) * 2 * hidden)


def bytes_needed(num_max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Segment bytes for Nmax tokens of hidden size H per rank, R ranks and E experts."""
    half = slot_bytes(num_max_tokens, hidden, num_experts) + return_bytes(num_max_tokens, hidden, num_experts)
    return control_bytes(num_ranks) + 2 * half


@dataclass
class Areas:
    """Addresses of one parity's areas in every local rank's segment (for one Nmax, H, E)."""

    info: List[int]  # slots: int32 [E * Nmax, 2]
    tokens: List[int]  # token rows [Nmax, row bytes]
    scales: List[int]  # float32 [Nmax]
    returns: List[int]  # combine rows [return_rows, 2H]
    return_rows: int


class LowLatencyShm:
    """The low-latency segments of one node's ranks.

    Args:
        group: the Buffer's process group (collective: names travel through it once).
        local_ranks: ranks (in `group`) of this node, ascending; here every rank of the group.
        num_bytes: size of every rank's segment (`num_rdma_bytes`).
    """

    def __init__(self, group: dist.ProcessGroup, local_ranks: Sequence[int], num_bytes: int) -> None:
        self.rank = dist.get_rank(group)
        self.local_ranks = list(local_ranks)
        self.local_index = self.local_ranks.index(self.rank)
        self.num_local = len(self.local_ranks)
        self.num_bytes = num_bytes
        self.control = control_bytes(self.num_local)
        if num_bytes < self.control + 4 * ALIGN:
            raise ValueError(f"num_rdma_bytes={num_bytes} is too small for low-latency mode: the control area "
                             f"of {self.num_local} ranks alone takes {self.control} bytes; use "
                             "Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, "
                             "num_ranks, num_experts)")
        self.half = (num_bytes - self.control) // 2 // ALIGN * ALIGN
        self.segments = shm.map_node_segments(group, self.local_ranks, num_bytes)
        self.sync = shm.node_sync(self.segments, self.local_index, self.local_ranks)
        self.base = [s.address for s in self.segments]
        own = torch.frombuffer(self.segments[self.local_index], dtype=torch.int64, count=self.control // 8)
        # inbox[kind][parity]: int64 [sources, MAILBOX_BYTES // 8], the mailboxes of this rank.
        self.inbox = own[shm.CONTROL_BYTES // 8:].view(2, 2, self.num_local, MAILBOX_BYTES // 8)
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
        self._headers = [[self.inbox[k, p, :, HEADER_WORD: HEADER_WORD + HEADER_WORDS] for p in (0, 1)] for k in (0, 1)]
        # Read once: the hot path should not parse the environment on every wait.
        self.timeout_s = timeout_seconds()

    def _mailbox(self, owner: int, kind: int, parity: int, source: int) -> int:
        return self.base[owner] + shm.CONTROL_BYTES + ((kind * 2 + parity) * self.num_local + source) * MAILBOX_BYTES

    def close(self) -> None:
        self.inbox = None
        self.sync = None
        for segment in getattr(self, "segments", []):
            segment.close()
        self.segments = []

    # ---- sizes ---------------------------------------------------------------------------------------------
    def fits(self, num_max_tokens: int, hidden: int, num_experts: int) -> bool:
        half = slot_bytes(num_max_tokens, hidden, num_experts) + return_bytes(num_max_tokens, hidden, num_experts)
        return half <= self.half and num_experts // self.num_local <= MAX_LOCAL_EXPERTS

    def areas(self, num_max_tokens: int, hidden: int, num_experts: int, parity: int) -> Areas:
        key = (num_max_tokens, hidden, num_experts, parity)
        found = self._areas.get(key)
        if found is None:
            starts = [b + self.control + parity * self.half for b in self.base]
            tokens = [s + _align(num_experts * num_max_tokens * 8) for s in starts]
            ret = return_bytes(num_max_tokens, hidden, num_experts)
            found = Areas(info=starts, tokens=tokens,
                          scales=[t + _align(num_max_tokens * 2 * hidden) for t in tokens],
                          returns=[s + self.half - ret for s in starts],
                          return_rows=ret // (2 * hidden))
            self._remember(key, found)
        return found

    # ---- signalling ----------------------------------------------------------------------------------------
    def wait_acks(self, kind: int, parity: int, seq: int, what: str) -> None:
        """Before sending call `seq`: every owner has consumed call seq - 2 on this parity."""
        if seq > 2:
            self.sync.wait_at_least(self.send_ack[kind][parity], [seq - 2] * self.num_local, self.owners,
                                    self.timeout_s, what)

    def wait_signals(self, kind: int, parity: int, seq: int, what: str) -> None:
        """Every source has published call `seq` on this parity."""
        self.sync.wait_at_least(self.recv_signal[kind][parity], [seq] * self.num_local, self.owners,
                                self.timeout_s, what)

    def headers(self, kind: int, parity: int) -> torch.Tensor:
        """int64 [sources, HEADER_WORDS] view of the headers of this rank's mailboxes."""
        return self._headers[kind][parity]

    def counts(self, parity: int, experts_per_rank: int):
        """numpy int64 [sources, L] view: rows every source sent to each local expert (dispatch)."""
        key = ("counts", parity, experts_per_rank)
        view = self._areas.get(key)
        if view is None:
            view = self._remember(key, self.inbox[DISPATCH, parity, :, COUNTS_WORD: COUNTS_WORD + experts_per_rank]
                                  .numpy())
        return view

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

    def return_view(self, num_max_tokens: int, hidden: int, num_experts: int, parity: int) -> torch.Tensor:
        """uint8 [rows, 2H] view of this rank's combine rows of one parity."""
        key = ("view", num_max_tokens, hidden, num_experts, parity)
        view = self._areas.get(key)
        if view is None:
            areas = self.areas(num_max_tokens, hidden, num_experts, parity)
            offset = areas.returns[self.local_index] - self.base[self.local_index]
            view = torch.frombuffer(self.segments[self.local_index], dtype=torch.uint8,
                                    count=areas.return_rows * 2 * hidden, offset=offset).view(-1, 2 * hidden)
            self._remember(key, view)
        return view

    def reset(self) -> None:
        """Zeroes this rank's mailboxes (clean_low_latency_buffer; peers must be quiet)."""
        self.inbox.zero_()
