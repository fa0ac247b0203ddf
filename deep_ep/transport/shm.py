"""Shared-memory transport for the CPU ranks of one node (DeepEP's NVLink buffer).

Every local rank owns one segment, mapped by all its local peers:

    [control 4 KiB | meta 64 KiB | data area (num_nvl_bytes)]

control holds the barrier counter and the owner's pid; meta the header and
per-expert counts of the current call; the data area the rows the owner
publishes. Receivers pull rows straight from the owner's data area into their
output tensors (one copy), in rounds when the data is larger than the area.
Segments are unlinked as soon as every local peer has mapped them, so nothing
is left in /dev/shm even if a process is killed.
"""
from __future__ import annotations

import os
import uuid
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

import deep_ep_cpp

from .. import ops
from ..utils import num_threads, timeout_seconds
from .fields import row_bytes

CONTROL_BYTES = 4096
META_BYTES = 64 * 1024
DATA_OFFSET = CONTROL_BYTES + META_BYTES
ALIGN = 64
SEGMENT_PREFIX = "deep_ep_"
# Word offsets inside the control area (64-bit words, one cache line apart).
BARRIER_WORD = 0
PID_WORD = 8


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


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
            pid = int(name[len(SEGMENT_PREFIX):].split("_", 1)[0])
        except ValueError:
            continue
        if not os.path.exists(f"/proc/{pid}"):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


def map_node_segments(group: dist.ProcessGroup, local_ranks: Sequence[int], size: int) -> list:
    """Creates this rank's segment of `size` bytes, maps every local peer's, and unlinks the names.

    Collective over `group` (the names travel through it). Every segment starts with the control
    words (BARRIER_WORD, PID_WORD); the creator writes its pid. Once every rank has passed the
    closing barrier, every peer has mapped every segment, so the names are removed at once and no
    segment can outlive the processes. Returns deep_ep_cpp.SharedMemory objects in `local_ranks` order.
    """
    rank = dist.get_rank(group)
    remove_stale_segments()
    name = f"/{SEGMENT_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}_{rank}"
    own = deep_ep_cpp.SharedMemory(name, size, True)
    try:
        control = torch.frombuffer(own, dtype=torch.int64, count=CONTROL_BYTES // 8)
        control[PID_WORD] = os.getpid()
        names: List[Optional[str]] = [None] * dist.get_world_size(group)
        dist.all_gather_object(names, name, group=group)
        segments = [own if r == rank else deep_ep_cpp.SharedMemory(names[r], size, False) for r in local_ranks]
        # Every peer has mapped every segment once all pass this barrier.
        dist.barrier(group=group)
    finally:
        own.unlink()
    return segments


def node_sync(segments: Sequence, local_index: int, local_ranks: Sequence[int]):
    """The deep_ep_cpp.NodeSync over the BARRIER_WORD of every segment (from map_node_segments)."""
    pids = [int(torch.frombuffer(s, dtype=torch.int64, count=CONTROL_BYTES // 8)[PID_WORD]) for s in segments]
    return deep_ep_cpp.NodeSync([s.address + BARRIER_WORD * 8 for s in segments], local_index, list(local_ranks),
                                pids)


class NodeShm:
    """The shared-memory segments of one node's ranks and the barrier between them.

    Args:
        group: the Buffer's process group (used once, to swap segment names).
        local_ranks: ranks (in `group`) of this node, ascending; this rank among them.
        data_bytes: size of every rank's data area.
        what: name used in error messages.
    """

    def __init__(self, group: dist.ProcessGroup, local_ranks: Sequence[int], data_bytes: int, what: str) -> None:
        self.rank = dist.get_rank(group)
        self.local_ranks = list(local_ranks)
        self.local_index = self.local_ranks.index(self.rank)
        self.num_threads = num_threads(len(self.local_ranks))  # this rank's share of the host's cores
        self.data_bytes = data_bytes
        self.what = what
        self.segments = map_node_segments(group, self.local_ranks, DATA_OFFSET + data_bytes)
        self.bytes = [torch.frombuffer(s, dtype=torch.uint8) for s in self.segments]
        self.meta = [b[CONTROL_BYTES:DATA_OFFSET].view(torch.int64) for b in self.bytes]
        self.data = [b[DATA_OFFSET:] for b in self.bytes]
        self.sync = node_sync(self.segments, self.local_index, self.local_ranks)
        self.broken: Optional[str] = None

    @property
    def num_local(self) -> int:
        return len(self.local_ranks)

    def barrier(self) -> None:
        if self.broken:
            raise RuntimeError(self.broken)
        try:
            self.sync.barrier(timeout_seconds(), self.what)
        except BaseException as error:
            # Peers may have moved on without us: the barrier sequence cannot be trusted any more.
            self.broken = f"deep_ep: this Buffer can no longer be used after an earlier failure ({error}); " \
                          "destroy it and create a new one on every rank."
            raise

    def close(self) -> None:
        self.bytes = self.meta = self.data = []
        for segment in getattr(self, "segments", []):
            segment.close()
        self.segments = []

    # ---- meta ----------------------------------------------------------------------------------
    def publish_meta(self, meta: torch.Tensor) -> None:
        if meta.numel() * 8 > META_BYTES:
            raise ValueError(f"deep_ep: per-call metadata of {meta.numel()} int64 values exceeds the "
                             f"{META_BYTES // 8} the shared-memory control area holds; use fewer experts")
        self.meta[self.local_index][: meta.numel()].copy_(meta)

    def agreed(self, decide: Callable, meta_all: torch.Tensor):
        """Runs `decide(meta_all)`. Every rank sees the same meta, so a ValueError/TypeError
        it raises is raised on every rank; the extra barrier keeps peers from overwriting
        their meta while a slower rank still reads it, so the Buffer stays usable."""
        try:
            return decide(meta_all)
        except (ValueError, TypeError):
            self.barrier()
            raise

    def read_meta(self, length: int) -> torch.Tensor:
        """int64 [local ranks, length]: every local rank's published meta."""
        return torch.stack([m[:length] for m in self.meta])

    # ---- data area -----------------------------------------------------------------------------
    def regions(self, local_index: int, widths: Sequence[int], rows: int) -> List[torch.Tensor]:
        """uint8 [rows, width] views of consecutive aligned regions of a rank's data area."""
        out, offset = [], 0
        for width in widths:
            out.append(self.data[local_index][offset: offset + rows * width].view(rows, width))
            offset += _align(rows * width)
        return out


def dispatch_rows(node: NodeShm, meta: torch.Tensor, fields_in: List[torch.Tensor],
                  make_plan: Callable[[torch.Tensor], Tuple[List[torch.Tensor], Callable]]) -> torch.Tensor:
    """Moves token rows from their owners to the receivers, through shared memory.

    Args:
        meta: int64 [m], this rank's header and counts; meta[1] must be its token count.
        fields_in: uint8 [T, b_i] rows of this rank (the same widths on every rank).
        make_plan: called with every rank's meta int64 [R, m] once published; returns the
            output fields uint8 [N, b_i] and `routes(source, window_topk or None, begin, end)`
            giving (source token, output row) pairs of the rows to pull from that window.
    Returns: every rank's meta [R, m].
    """
    widths = [f.shape[1] for f in fields_in]
    window = window_rows(node.data_bytes, row_bytes(fields_in), len(fields_in))
    num_tokens = fields_in[0].shape[0]

    def publish(begin: int) -> None:
        end = max(begin, min(num_tokens, begin + window))
        for region, field in zip(node.regions(node.local_index, widths, window), fields_in):
            ops.copy_into(region[: end - begin], field[begin:end], node.num_threads)

    node.publish_meta(meta)
    publish(0)
    node.barrier()
    meta_all = node.read_meta(meta.numel())
    fields_out, routes = node.agreed(make_plan, meta_all)
    max_tokens = int(meta_all[:, 1].max())
    num_rounds = max(1, -(-max_tokens // window))
    for round_index in range(num_rounds):
        begin = round_index * window
        if round_index > 0:
            publish(begin)
            node.barrier()
        src_rank, src_row, dst_row = [], [], []
        for source in range(node.num_local):
            count = min(int(meta_all[source, 1]) - begin, window)
            if count <= 0:
                continue
            regions = node.regions(source, widths, window)
            token, row = routes(source, regions, begin, begin + count)
            src_rank.append(torch.full_like(token, source, dtype=torch.int32))
            src_row.append(token - begin)
            dst_row.append(row)
        if src_rank:
            ranks, rows, outs = torch.cat(src_rank), torch.cat(src_row), torch.cat(dst_row)
            for index, (width, out) in enumerate(zip(widths, fields_out)):
                srcs = [node.regions(s, widths, window)[index].data_ptr() for s in range(node.num_local)]
                deep_ep_cpp.copy_rows(out.data_ptr(), out.shape[0], width, srcs, [window] * node.num_local,
                                      width, width, ranks.numpy(), rows.numpy(), outs.numpy(), node.num_threads)
        node.barrier()
    return meta_all


def combine_rows(node: NodeShm, meta: torch.Tensor, check: Callable[[torch.Tensor], None], x: torch.Tensor,
                 rows_per_rank: Sequence[int], dest_rank: torch.Tensor, dest_row: torch.Tensor,
                 reduce: Callable[[List[torch.Tensor], torch.Tensor, torch.Tensor], None]) -> None:
    """Publishes this rank's expert outputs and reduces its tokens from every holder.

    Args:
        meta: int64 [m], this rank's header; check(meta of every rank) raises on disagreement.
        x: [N, H] expert outputs in this rank's received layout (contiguous).
        rows_per_rank: rows each local rank publishes.
        dest_rank / dest_row: int64 [T, K], holder (local index) and row of each selection, -1 if none.
        reduce: reduce(sources, src_rank, src_row) runs the weighted reduction over the uint8
            row tensors `sources`, indexed by int32 / int64 [T, K] (src_rank -1: no row).
    """
    bytes_per_row = x.shape[1] * x.element_size()
    window = window_rows(node.data_bytes, bytes_per_row, 1)
    num_rounds = max(1, -(-max(rows_per_rank) // window))
    x_bytes = x.view(torch.uint8).view(x.shape[0], bytes_per_row)
    node.publish_meta(meta)
    valid = dest_rank >= 0
    if num_rounds == 1:
        mine = rows_per_rank[node.local_index]
        ops.copy_into(node.regions(node.local_index, [bytes_per_row], window)[0][:mine], x_bytes[:mine],
                      node.num_threads)
        node.barrier()
        node.agreed(check, node.read_meta(meta.numel()))
        sources = [node.regions(s, [bytes_per_row], window)[0] for s in range(node.num_local)]
        reduce(sources, torch.where(valid, dest_rank, -1).to(torch.int32), dest_row)
        node.barrier()
        return
    # More rows than the data area holds: stage this rank's rows locally, round by round,
    # then reduce from the stage, so the sums are the same bits as in one round.
    selections = valid.nonzero(as_tuple=True)
    stage = torch.empty(len(selections[0]), bytes_per_row, dtype=torch.uint8)
    stage_row = torch.full_like(dest_row, -1)
    stage_row[selections] = torch.arange(len(selections[0]))
    holder, holder_row = dest_rank[selections], dest_row[selections]
    for round_index in range(num_rounds):
        begin = round_index * window
        mine = x_bytes[begin: min(rows_per_rank[node.local_index], begin + window)]
        ops.copy_into(node.regions(node.local_index, [bytes_per_row], window)[0][: mine.shape[0]], mine,
                      node.num_threads)
        node.barrier()
        if round_index == 0:
            node.agreed(check, node.read_meta(meta.numel()))
        in_round = (holder_row >= begin) & (holder_row < begin + window)
        srcs = [node.regions(s, [bytes_per_row], window)[0].data_ptr() for s in range(node.num_local)]
        deep_ep_cpp.copy_rows(stage.data_ptr(), stage.shape[0], bytes_per_row, srcs, [window] * node.num_local,
                              bytes_per_row, bytes_per_row, holder[in_round].to(torch.int32).numpy(),
                              (holder_row[in_round] - begin).numpy(), in_round.nonzero().flatten().numpy(),
                              node.num_threads)
        node.barrier()
    reduce([stage], torch.where(valid, 0, -1).to(torch.int32), stage_row)
