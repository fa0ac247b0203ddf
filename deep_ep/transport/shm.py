"""Shared-memory transport for the CPU ranks of one node (DeepEP's NVLink buffer).

Every local rank owns one segment, mapped by all its local peers:

    [control 4 KiB | meta 64 KiB | data area (num_nvl_bytes)]

control holds the barrier counter and the owner's pid; meta the outcome of the
owner's reservation, the header and per-expert counts of the current call; the
data area the rows the owner publishes. Receivers pull rows straight from the
owner's data area into their output tensors (one copy), in rounds when the data
is larger than the area. Segments are unlinked as soon as every local peer has
mapped them, so nothing is left in /dev/shm even if a process is killed.

Memory follows use: the whole segment is address space from the start, but only
control and meta are reserved in /dev/shm; the data area is reserved (posix_fallocate)
as a growing prefix, just before a call writes more rows than ever before. Only the
owner writes its data area, and each source's rows of a round start at its data
area's beginning, so what peers read lies inside what the owner reserved. A rank whose
reservation fails says so in its meta and writes nothing; after the barrier every rank
raises SharedMemoryExhausted (docs/memory.md).

One barrier per exchange: an owner overwrites its meta and data area only after every local peer
has released the previous read phase (a counter in the peer's control area), so no call ends with
a barrier (docs/normal_data_path.md).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NoReturn, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

import deep_ep_cpp

from .. import ops
from ..utils import num_threads, timeout_seconds
from . import collective
from .groups import CONSTRUCTION

CONTROL_BYTES = 4096
META_BYTES = 64 * 1024
STATUS_WORDS = 1  # meta word 0: data-area bytes this rank failed to reserve for the call (0: none)
DATA_OFFSET = CONTROL_BYTES + META_BYTES
ALIGN = deep_ep_cpp.REGION_ALIGN  # regions of a data area start at multiples of it (region_layout)
SEGMENT_PREFIX = "deep_ep_"
# Word offsets inside the control area (64-bit words, one cache line apart).
BARRIER_WORD = 0
PID_WORD = 8
# The owner's failure note in the control area: its length (a word), then UTF-8 text (docs/host_discovery.md).
NOTE_WORD = 16
NOTE_OFFSET = (NOTE_WORD + 1) * 8
# The read phases (rounds of dispatch / combine) this rank has finished reading its peers' areas
# for, in the last cache line of the control area; the note's text ends before it.
RELEASE_WORD = CONTROL_BYTES // 8 - 8
NOTE_END = RELEASE_WORD * 8
# How long a failed barrier waits for a local peer's note when the Buffer spans several nodes: the
# peer it waited for may be stuck a moment longer in a network exchange that is failing, too.
NOTE_GRACE_S = 1.0

NO_WORDS = np.empty(0, dtype=np.int64)  # publish_rows without meta

# Reservations of /dev/shm grow by at least this much, so that slowly growing calls
# reserve in a few steps.
COMMIT_GRANULE = 1 << 20


class SharedMemoryExhausted(RuntimeError):
    """/dev/shm could not hold the shared memory a call needs. Raised on every local rank
    before any row moves; the Buffer stays usable for calls that need less."""


def exhausted_message(what: str, needed: Dict[int, int], remedy: str) -> str:
    """The message of SharedMemoryExhausted: the ranks (global rank -> bytes they needed)."""
    ranks = ", ".join(f"rank {r} needs {n} bytes" for r, n in sorted(needed.items()))
    return (
        f"deep_ep {what}: /dev/shm is too small for this call ({ranks} of shared memory reserved); "
        f"no data moved and the Buffer stays usable for smaller calls. Enlarge /dev/shm (for example "
        f"docker run --shm-size=16g) or {remedy}."
    )


class Reservation:
    """The reserved prefix of one area of this rank's segment, grown on demand.

    Args:
        segment: this rank's deep_ep_cpp.SharedMemory (its creator).
        offset / size: the area, in bytes from the segment's start.
    """

    def __init__(self, segment, offset: int, size: int) -> None:
        self.segment = segment
        self.offset = offset
        self.size = size
        self.reserved = 0
        self.failure: Optional[str] = None  # the native reason of the last failed grow()

    def grow(self, nbytes: int) -> bool:
        """Reserves at least the first `nbytes` of the area (in COMMIT_GRANULE steps, at most the
        area). False, with the reason in `failure`, when /dev/shm is full; nothing changes then."""
        if nbytes <= self.reserved:
            return True
        target = min(self.size, -(-nbytes // COMMIT_GRANULE) * COMMIT_GRANULE)
        try:
            # Only the new part: a failed reservation must not touch the pages reserved before.
            self.segment.commit(self.offset + self.reserved, target - self.reserved)
        except RuntimeError as error:
            self.failure = str(error)
            return False
        self.reserved = target
        return True


def data_bytes_needed(rows: int, bytes_per_row: int, num_fields: int = 1) -> int:
    """Data-area bytes that hold `rows` rows of `bytes_per_row` bytes in one round."""
    return rows * bytes_per_row + ALIGN * num_fields


def window_rows(data_bytes: int, bytes_per_row: int, num_fields: int) -> int:
    """Rows of `bytes_per_row` (split over `num_fields` aligned regions) that fit the data area."""
    return max(0, (data_bytes - ALIGN * num_fields) // max(1, bytes_per_row))


def remove_stale_segments() -> None:
    """Unlinks segments whose creating process is gone (a crash between create and unlink)."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        if not name.startswith(SEGMENT_PREFIX):
            continue
        try:
            pid = int(name[len(SEGMENT_PREFIX) :].split("_", 1)[0])
        except ValueError:
            continue
        if not collective.process_alive(pid):  # a killed peer not yet reaped (a zombie) is gone, too
            unlink_segment(name)


def unlink_segment(name: str) -> None:
    """Removes a segment's name (`name` as in /dev/shm, with or without the leading "/"); the
    mappings stay valid. Nothing happens if the name is gone already."""
    try:
        os.unlink(os.path.join("/dev/shm", name.lstrip("/")))
    except OSError:
        pass


def map_node_segments(
    group: dist.ProcessGroup, local_ranks: Sequence[int], size: int, committed: int, operation: str = CONSTRUCTION
) -> list:
    """Creates this rank's segment of `size` bytes (reserving its first `committed` bytes in
    /dev/shm), maps every local peer's, and unlinks the names.

    Collective over `group` (the names travel through it). Every segment starts with the control
    words (BARRIER_WORD, PID_WORD); the creator writes its pid. Once every rank has passed the
    closing barrier, every peer has mapped every segment, and each rank removes every local name,
    its own and its peers' (a peer killed right after the barrier leaves nothing). If the
    construction fails here (a peer died, timed out, or could not allocate), this rank removes its
    own name and those of creators that have exited, so a rank killed while constructing leaves no
    segment behind once a local peer notices. `operation` is what failures name (Buffer construction,
    or the later call that maps the memory first). Returns deep_ep_cpp.SharedMemory objects in
    `local_ranks` order.
    """
    rank = dist.get_rank(group)
    remove_stale_segments()
    name = f"/{SEGMENT_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}_{rank}"
    names: List[Optional[str]] = [None] * dist.get_world_size(group)
    own = deep_ep_cpp.SharedMemory(name, size, True, committed)
    try:
        control = torch.frombuffer(own, dtype=torch.int64, count=CONTROL_BYTES // 8)
        control[PID_WORD] = os.getpid()
        collective.run_collective(group, operation, lambda: dist.all_gather_object(names, name, group=group))
        segments = [own if r == rank else deep_ep_cpp.SharedMemory(names[r], size, False, 0) for r in local_ranks]
        # Every peer has mapped every segment once all pass this barrier.
        collective.run_collective(group, operation, lambda: dist.barrier(group=group))
    except BaseException:
        remove_stale_segments()  # peers that died here (their pids say so once the group noticed)
        raise
    finally:
        own.unlink()
    for r in local_ranks:
        unlink_segment(names[r])
    return segments


def node_sync(segments: Sequence, local_index: int, local_ranks: Sequence[int]):
    """The deep_ep_cpp.NodeSync over the BARRIER_WORD of every segment (from map_node_segments)."""
    pids = [int(torch.frombuffer(s, dtype=torch.int64, count=CONTROL_BYTES // 8)[PID_WORD]) for s in segments]
    return deep_ep_cpp.NodeSync([s.address + BARRIER_WORD * 8 for s in segments], local_index, list(local_ranks), pids)


class NodeShm:
    """The shared-memory segments of one node's ranks and the barrier between them.

    Args:
        group: the Buffer's process group (used once, to swap segment names).
        local_ranks: ranks (in `group`) of this node, ascending; this rank among them.
        data_bytes: size of every rank's data area (address space; /dev/shm is reserved as calls need it).
        setup: the operation that maps the segments, named if that fails.
        threads: of the native row copies (the Buffer passes its runtime's; default: this rank's share).
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        local_ranks: Sequence[int],
        data_bytes: int,
        setup: str = CONSTRUCTION,
        threads: Optional[int] = None,
    ) -> None:
        self.rank = dist.get_rank(group)
        self.local_ranks = list(local_ranks)
        self.local_index = self.local_ranks.index(self.rank)
        # The runtime's thread count; on its own, this rank's share of the host's cores.
        self.num_threads = threads if threads is not None else num_threads(len(self.local_ranks))
        self.data_bytes = data_bytes
        # The call in progress ("dispatch", "combine", ...), named when a barrier times out.
        self.operation = "the shared-memory exchange"
        # Read once, as the Buffer's gloo group fixes its own timeout at construction.
        self.timeout_s = timeout_seconds()
        self.segments = map_node_segments(group, self.local_ranks, DATA_OFFSET + data_bytes, DATA_OFFSET, setup)
        self.reservation = Reservation(self.segments[self.local_index], DATA_OFFSET, data_bytes)
        self.bytes = [torch.frombuffer(s, dtype=torch.uint8) for s in self.segments]
        self.data = [b[DATA_OFFSET:] for b in self.bytes]
        self.sync = node_sync(self.segments, self.local_index, self.local_ranks)
        # Read phases this rank has finished (and published at RELEASE_WORD); every local rank runs
        # the same sequence of phases, so a peer's count at least this one means it read all of mine.
        self.reads = 0
        self.release_addresses = [s.address + RELEASE_WORD * 8 for s in self.segments]
        self.peers = [i for i in range(len(self.local_ranks)) if i != self.local_index]
        self.peer_releases = [self.release_addresses[i] for i in self.peers]
        self.meta_addresses = [s.address + CONTROL_BYTES for s in self.segments]
        self.data_address = [s.address + DATA_OFFSET for s in self.segments]
        self.broken: Optional[str] = None
        # Across nodes a local peer may wait here while this rank's network exchange fails: tell it why.
        self.spans_nodes = self.num_local < dist.get_world_size(group)
        if self.spans_nodes:
            collective.on_failure(group, self.post_failure)

    @property
    def num_local(self) -> int:
        return len(self.local_ranks)

    def timed_barrier(self, start_ns: int, waits: Optional[torch.Tensor]) -> None:
        """barrier(), then add_arrivals(start_ns, waits)."""
        self.barrier()
        self.add_arrivals(start_ns, waits)

    def add_arrivals(self, start_ns: int, waits: Optional[torch.Tensor]) -> None:
        """With `waits` (int64 [local ranks]), adds to waits[i] the nanoseconds from `start_ns`
        (time.monotonic_ns) until local rank i was seen arriving in the last barrier."""
        if waits is not None:
            waits += (torch.tensor(self.sync.arrivals_ns, dtype=torch.int64) - start_ns).clamp_min_(0)

    def barrier(self) -> None:
        self._synchronized(lambda: self.sync.barrier(self.timeout_s, self.operation))

    def release(self) -> None:
        """Ends a read phase: this rank no longer reads its peers' meta and data areas."""
        self.reads += 1
        deep_ep_cpp.store_counter(self.release_addresses[self.local_index], self.reads)

    def wait_readers(self, start_ns: int = 0, sends: Optional[torch.Tensor] = None) -> None:
        """Returns once every local peer has released every read phase this rank has: from then on
        this rank may overwrite its meta and data area. With `sends` (int64 [local ranks]), adds to
        sends[i] the nanoseconds from `start_ns` until local rank i was seen done (this rank: now)."""
        if self.peers:
            self._synchronized(
                lambda: self.sync.wait_at_least(
                    [self.release_addresses[i] for i in self.peers],
                    [self.reads] * len(self.peers),
                    self.peers,
                    self.timeout_s,
                    self.operation,
                )
            )
        if sends is not None:
            seen = torch.tensor(self.sync.arrivals_ns, dtype=torch.int64)
            seen[self.local_index] = time.monotonic_ns()
            sends += (seen - start_ns).clamp_min_(0)

    def _synchronized(self, wait: Callable[[], Any]) -> Any:
        """Runs a wait on the peers and returns what it returns; after a failure the Buffer refuses
        every later call."""
        if self.broken:
            raise RuntimeError(self.broken)
        try:
            return wait()
        except BaseException as error:
            self._fail(error)

    def _fail(self, error: BaseException) -> NoReturn:
        """Raises the error of a failed wait on the peers, with the notes they left, and marks the
        Buffer broken: peers may have moved on without us, so the barrier sequence cannot be trusted."""
        notes = self.peer_failures() if isinstance(error, RuntimeError) else ""
        self.broken = (
            f"deep_ep: this Buffer can no longer be used after an earlier failure ({error}{notes}); "
            "destroy it and create a new one on every rank."
        )
        if notes:
            raise RuntimeError(f"{error}{notes}") from None
        try:
            raise error
        finally:
            # The raised error's traceback holds this frame: without this, frame and error would keep
            # each other (and every caller's frame, with its Buffer and groups) alive until the
            # garbage collector ran, possibly at interpreter exit, where freeing a gloo group aborts.
            del error

    def post_failure(self, message: str) -> None:
        """Leaves `message` (why this rank failed) in its control area for the local peers."""
        text = message.encode()[: NOTE_END - NOTE_OFFSET]
        if not self.bytes or not text:
            return
        control = self.bytes[self.local_index]
        control[NOTE_OFFSET : NOTE_OFFSET + len(text)].copy_(torch.frombuffer(bytearray(text), dtype=torch.uint8))
        control[:NOTE_OFFSET].view(torch.int64)[NOTE_WORD] = len(text)  # after the text: never half a note

    def peer_failures(self) -> str:
        """The notes local peers posted, each as " Rank r of this node failed first: <note>"; across
        nodes waits up to NOTE_GRACE_S for one."""
        deadline = time.monotonic() + (NOTE_GRACE_S if self.spans_nodes else 0)
        while True:
            notes = []
            for index, control in enumerate(self.bytes):
                length = int(control[:NOTE_OFFSET].view(torch.int64)[NOTE_WORD])
                if index != self.local_index and length:
                    text = bytes(control[NOTE_OFFSET : NOTE_OFFSET + length].tolist()).decode(errors="replace")
                    notes.append(f" Rank {self.local_ranks[index]} of this node failed first: {text}")
            if notes or time.monotonic() >= deadline:
                return "".join(notes)
            time.sleep(0.01)

    def close(self) -> None:
        self.bytes = self.data = []
        for segment in getattr(self, "segments", []):
            segment.close()
        self.segments = []
        self.sync = None  # its pidfds of the local peers close with it

    # ---- memory --------------------------------------------------------------------------------
    def reserve(self, nbytes: int, what: str) -> None:
        """Reserves the first `nbytes` of this rank's data area (for local use: no peer reads it);
        SharedMemoryExhausted when /dev/shm is full. Waits first until the peers have read the rows
        of the last call there, so that the caller may write the area."""
        self.wait_readers()
        if not self.reservation.grow(nbytes):
            raise SharedMemoryExhausted(
                exhausted_message(what, {self.rank: nbytes}, "lower num_nvl_bytes") + f" ({self.reservation.failure})"
            )

    # ---- meta ----------------------------------------------------------------------------------
    def exchange(
        self,
        meta: np.ndarray,
        data_bytes: int,
        copies: Sequence[Tuple[int, int, int]],
        agreed: np.ndarray = NO_WORDS,
        scatter: Optional["RowScatter"] = None,
        timed: bool = False,
    ) -> Tuple[np.ndarray, bool]:
        """Publishes this rank's call and gathers every local rank's, in one barrier.

        Reserves the first `data_bytes` of this rank's data area; once the peers have read the last
        call's, writes the status word and `meta` (int64 [m]) and makes the byte copies (dst, src,
        nbytes) and the `scatter` into the data area. After the barrier it returns every local rank's
        meta, int64 [local ranks, m], and whether they agree on the header fields `agreed` (indices
        into meta). SharedMemoryExhausted on every rank, and nothing copied, when a rank could not
        reserve. With `timed`, `published_ns` is the monotonic time at which this rank had published.
        """
        if (meta.size + STATUS_WORDS) * 8 > META_BYTES:
            raise ValueError(
                f"deep_ep: per-call metadata of {meta.size} int64 values exceeds the "
                f"{META_BYTES // 8 - STATUS_WORDS} the shared-memory control area holds; "
                "use fewer experts"
            )
        if self.broken:
            raise RuntimeError(self.broken)
        # Growing touches only pages past what peers read: it need not wait for them.
        reserved = data_bytes <= self.reservation.reserved or self.reservation.grow(data_bytes)
        try:
            self.sync.publish(
                self.peer_releases,
                self.peers,
                self.reads,
                self.meta_addresses[self.local_index],
                0 if reserved else data_bytes,
                meta,
                copies if reserved else (),
                self.num_threads,
                self.timeout_s,
                self.operation,
            )
            if scatter is not None and reserved:
                scatter.copy(self.data_address[self.local_index], self.num_threads)
            if timed:
                self.published_ns = time.monotonic_ns()
            words, outcome = self.sync.gather(
                self.meta_addresses, STATUS_WORDS + meta.size, agreed, self.timeout_s, self.operation
            )
        except BaseException as error:
            self._fail(error)
        if outcome == 1:
            self._raise_exhausted(words)
        return words[:, STATUS_WORDS:], outcome == 0

    def publish_rows(self, copies: Sequence[Tuple[int, int, int]]) -> None:
        """Once the peers have read the last read phase, makes the copies (dst, src, nbytes) into this
        rank's data area (the later rounds of an exchange)."""
        self._synchronized(
            lambda: self.sync.publish(
                self.peer_releases,
                self.peers,
                self.reads,
                self.meta_addresses[self.local_index],
                None,
                NO_WORDS,
                copies,
                self.num_threads,
                self.timeout_s,
                self.operation,
            )
        )

    def agreed(self, decide: Callable[[np.ndarray, bool], None], meta_all: np.ndarray, agree: bool) -> None:
        """Runs `decide(meta_all, agree)`. Every rank sees the same meta, so a ValueError/TypeError
        it raises is raised on every rank; it ends the read phase first, so the Buffer stays usable."""
        try:
            decide(meta_all, agree)
        except (ValueError, TypeError):
            self.release()
            raise

    def _raise_exhausted(self, words: np.ndarray) -> NoReturn:
        """SharedMemoryExhausted naming the local ranks whose status word (column 0 of `words`, every
        local rank's gathered meta) says they could not reserve; ends the read phase first."""
        failed = words[:, 0].nonzero()[0].tolist()
        needed = {self.local_ranks[i]: int(words[i, 0]) for i in failed}
        mine = f" (rank {self.rank}: {self.reservation.failure})" if self.local_index in failed else ""
        self.release()  # as in agreed()
        raise SharedMemoryExhausted(
            exhausted_message(
                self.operation,
                needed,
                "lower num_nvl_bytes (larger data then moves in rounds) or move fewer tokens per call",
            )
            + mine
        )


# (byte offsets, bytes taken) of consecutive regions of `rows` rows of each width, each starting at
# a multiple of ALIGN: the one definition, which the native pull reads windows by as well.
region_layout: Callable[[Sequence[int], int], Tuple[List[int], int]] = deep_ep_cpp.region_layout


def window_addresses(base: int, widths: Sequence[int], rows: int) -> List[int]:
    """The addresses of the regions of `region_layout(widths, rows)` in the data area at `base`."""
    return [base + offset for offset in region_layout(widths, rows)[0]]


@dataclass
class Window:
    """One source's published rows in one round of a dispatch."""

    source: int  # local index of the owner
    base: int  # address of its data area, where its fields lie as region_layout(widths, rows) places them
    rows: int  # the regions' capacity (the source's window)
    begin: int  # the source token of the round's first row
    count: int  # rows in this round


@dataclass
class RowScatter:
    """Rows of a contiguous byte-row tensor that a holder publishes at their own positions."""

    src: int  # address of uint8 [src_rows, row_bytes]
    src_rows: int
    row_bytes: int
    rows: np.ndarray  # int64 [n], ascending
    capacity: int  # rows the data area's region holds

    def copy(self, dst: int, threads: int) -> None:
        """dst row r = src row r for every r in rows (dst: a region of `capacity` rows)."""
        deep_ep_cpp.copy_rows(
            dst,
            self.capacity,
            self.row_bytes,
            [self.src],
            [self.src_rows],
            self.row_bytes,
            self.row_bytes,
            np.zeros(self.rows.shape[0], dtype=np.int32),
            self.rows,
            self.rows,
            threads,
        )


class RowReceiver(Protocol):
    """The receiving side of a shared-memory dispatch (deep_ep/strategies/normal_strategy.py)."""

    agreed_fields: np.ndarray  # the header fields every rank must agree on (indices into the meta)

    def prepare(self, meta_all: np.ndarray, agree: bool) -> None:
        """Sets up the outputs from every local rank's meta int64 [local ranks, m], of which `agree`
        says whether they agree on agreed_fields; a ValueError/TypeError it raises (on disagreement,
        say) is raised on every rank (they see the same meta)."""

    def pull(self, widths: List[int], windows: List[Window]) -> None:
        """Copies this round's rows out of the sources' windows (sources with no rows left out), whose
        fields have `widths` bytes per row."""


def dispatch_rows(
    node: NodeShm,
    meta: np.ndarray,
    fields_in: List[torch.Tensor],
    receiver: RowReceiver,
    what: str,
    waits: Optional[torch.Tensor] = None,
) -> np.ndarray:
    """Moves token rows from their owners to the receivers, through shared memory.

    Args:
        meta: int64 [m], this rank's header and counts; meta[1] must be its token count.
        fields_in: contiguous CPU uint8 [T, b_i] rows of this rank (the same widths on every rank).
        receiver: prepares the outputs once every rank's meta is published and pulls the rows.
        what: the operation ("dispatch", "dispatch (cached)"), named if a peer does not arrive.
        waits: None or int64 [local ranks]; gets the nanoseconds this rank waited for every local
            rank's rows to be published (all rounds).
    Returns: every rank's meta [R, m].

    A round moves up to `window` rows per source (as many as the data area holds); a source with
    fewer tokens lays out its regions for just those (its own window), so that the data area it
    reserves follows the largest call it has made. Each round is one barrier (rows published)
    and one release (rows read).
    """
    node.operation = what
    widths = [f.shape[1] for f in fields_in]
    window = window_rows(node.data_bytes, sum(widths), len(fields_in))
    num_tokens = fields_in[0].shape[0]
    own_offsets, own_bytes = region_layout(widths, min(num_tokens, window))
    own_base = node.data_address[node.local_index]
    # The fields are contiguous CPU byte rows (as_byte_rows): plain byte copies, no tensor views.
    own_rows = [(own_base + offset, f.data_ptr(), width) for offset, f, width in zip(own_offsets, fields_in, widths)]

    def copies(begin: int) -> List[Tuple[int, int, int]]:
        rows = max(0, min(num_tokens, begin + window) - begin)
        return [(dst, src + begin * width, rows * width) for dst, src, width in own_rows]

    meta_all, agree = node.exchange(meta, own_bytes, copies(0), receiver.agreed_fields, timed=waits is not None)
    if waits is not None:
        node.add_arrivals(node.published_ns, waits)
    node.agreed(receiver.prepare, meta_all, agree)
    tokens = meta_all[:, 1].tolist()
    windows = [min(t, window) for t in tokens]
    bases = node.data_address
    num_rounds = max(1, -(-max(tokens) // window))
    for round_index in range(num_rounds):
        begin = round_index * window
        if round_index > 0:
            node.publish_rows(copies(begin))
            node.timed_barrier(time.monotonic_ns(), waits)
        receiver.pull(
            widths,
            [
                Window(source, bases[source], windows[source], begin, min(tokens[source] - begin, window))
                for source in range(node.num_local)
                if tokens[source] > begin
            ],
        )
        node.release()
    return meta_all


def combine_rows(
    node: NodeShm,
    meta: np.ndarray,
    check: Optional[Callable[[np.ndarray], None]],
    agreed: np.ndarray,
    x_rows: torch.Tensor,
    rows_per_rank: Sequence[int],
    dest_rank: np.ndarray,
    dest_row: np.ndarray,
    reduction: ops.Reduction,
    what: str = "combine",
    sends: Optional[torch.Tensor] = None,
    peer_rows: Optional[np.ndarray] = None,
) -> None:
    """Publishes this rank's expert outputs and reduces its tokens from every holder.

    Args:
        meta: int64 [m], this rank's header; check(meta of every rank) raises when the ranks disagree
            on the fields `agreed` (None, with `agreed` empty: the caller agreed the headers already).
        x_rows: uint8 [N, H * itemsize], the expert outputs in this rank's received layout (contiguous).
        rows_per_rank: rows each local rank publishes.
        dest_rank / dest_row: int32 / int64 [T, K], holder (local index) and row of each
            selection, -1 if none.
        reduction: the weighted reduction over the rows dest_rank / dest_row name.
        what: the operation, named if a peer does not arrive.
        sends: None or int64 [local ranks]; gets the nanoseconds from publishing this rank's rows until
            every local rank was done reading them (all rounds).
        peer_rows: None, or int64 [n] the rows of x_rows that local peers read: only those are published
            (at their own positions) and this rank reads its other rows straight from x_rows.

    In one round the owner reads every expert output once, in the reduction, straight from its
    holder's data area, or from x_rows for its own (docs/normal_data_path.md).
    """
    node.operation = what
    bytes_per_row = x_rows.shape[1]
    window = window_rows(node.data_bytes, bytes_per_row, 1)
    num_rounds = max(1, -(-max(rows_per_rank) // window))
    # Each holder's regions hold just its rows when they fit (see dispatch_rows).
    windows = [min(rows, window) for rows in rows_per_rank]
    me = node.local_index
    x_address = x_rows.data_ptr()

    def copies(begin: int) -> List[Tuple[int, int, int]]:
        rows = max(0, min(rows_per_rank[me], begin + window) - begin)
        return [(node.data_address[me], x_address + begin * bytes_per_row, rows * bytes_per_row)]

    # One round with peer_rows publishes only those rows; otherwise the rows move with the meta.
    scatter = None
    if num_rounds == 1 and peer_rows is not None:
        scatter = RowScatter(x_address, x_rows.shape[0], bytes_per_row, peer_rows, windows[me])
    meta_all, agree = node.exchange(
        meta,
        region_layout([bytes_per_row], windows[me])[1],
        [] if scatter is not None else copies(0),
        agreed,
        scatter,
        timed=sends is not None,
    )
    if not agree:
        node.agreed(lambda metas, _: check(metas), meta_all, agree)
    if num_rounds == 1:
        sources = list(node.data_address)
        sources[me] = x_address
        windows[me] = x_rows.shape[0]
        reduction.run_rows(sources, windows, dest_rank, dest_row)
        node.release()
        if sends is not None:
            node.wait_readers(node.published_ns, sends)
        return
    # More rows than the data area holds: stage this rank's rows locally, round by round,
    # then reduce from the stage, so the sums are the same bits as in one round.
    selections = (dest_rank >= 0).nonzero()
    stage = torch.empty(len(selections[0]), bytes_per_row, dtype=torch.uint8)
    stage_row = np.full(dest_row.shape, -1, dtype=np.int64)
    stage_row[selections] = np.arange(len(selections[0]))
    holder, holder_row = dest_rank[selections], dest_row[selections]
    srcs = list(node.data_address)  # one field: its region starts its owner's data area
    for round_index in range(num_rounds):
        begin = round_index * window
        if round_index > 0:
            node.publish_rows(copies(begin))
            node.barrier()
        in_round = (holder_row >= begin) & (holder_row < begin + window)
        deep_ep_cpp.copy_rows(
            stage.data_ptr(),
            stage.shape[0],
            bytes_per_row,
            srcs,
            windows,
            bytes_per_row,
            bytes_per_row,
            holder[in_round],
            holder_row[in_round] - begin,
            in_round.nonzero()[0],
            node.num_threads,
        )
        node.release()
    if sends is not None:
        node.wait_readers(node.published_ns, sends)
    stage_rank = np.where(dest_rank >= 0, 0, -1).astype(np.int32)
    reduction.run_rows([stage.data_ptr()], [stage.shape[0]], stage_rank, stage_row)
