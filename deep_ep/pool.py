"""Reuse of large output memory.

A fresh multi-megabyte CPU tensor costs one page fault per 4 KiB page when first
written (about 1.5 us each on our machines: 14 ms for 32 MiB, nine times the copy
itself). The pool hands out outputs carved from blocks whose earlier outputs the
caller has dropped, so steady-state dispatch/combine write into warm pages.

How a block knows it is free, with public APIs only: a block is an anonymous `mmap`
object, and every output is a new tensor made by `torch.frombuffer` over it, whose
storage holds one Python reference to the mmap object until the last tensor sharing
that storage (views, slices, `.numpy()` arrays included) is gone. So the block's
Python reference count says how many storages still use it. The pool checks that
this holds at construction (a probe) and again on every hand-out (the new output
must count exactly once); if it ever does not, the pool switches itself off and
every output is a plain `torch.empty`, which is always correct.

Bounds: at most `MAX_BLOCKS` blocks and `DEEP_EP_POOL_BYTES` bytes (default
`DEFAULT_POOL_BYTES`; 0 switches the pool off) are kept; least recently used free
blocks go first, and an output that does not fit beside the busy blocks is a plain
`torch.empty`. A free block not handed out for `MAX_IDLE_HANDOUTS` hand-outs is
dropped too, so the pool holds the sizes in use now rather than every size seen.
A dropped block's pages go back to the system at once (munmap).
"""

from __future__ import annotations

import math
import mmap
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

# Smaller outputs come from the ordinary allocator, whose small-block cache is warm anyway.
MIN_POOLED_BYTES = 1 << 20
MAX_BLOCKS = 16
# A free block not handed out for this many hand-outs goes back to the system: the pool follows the
# sizes in use now, not every size it has seen.
MAX_IDLE_HANDOUTS = 64
# Two live prefill dispatch outputs of 4096 tokens x 2 ranks x top-8 of 32 experts x 2048 bf16 are
# 2 x 134 MB: the budget holds both and their combine outputs, so such calls reuse warm pages.
DEFAULT_POOL_BYTES = 512 << 20
POOL_BYTES_ENV = "DEEP_EP_POOL_BYTES"
PAGE_BYTES = mmap.PAGESIZE

# The Python reference count of an object (None where the interpreter has none, e.g. PyPy).
# Module-level so that tests can take it away or make it lie.
reference_count: Optional[Callable[[object], int]] = getattr(sys, "getrefcount", None)


def size_class(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of a step between 1/16 and 1/8 of it (and of the page
    size), so that outputs of nearby sizes (a batch a few tokens longer) share blocks."""
    step = max(1 << max(nbytes.bit_length() - 4, 0), PAGE_BYTES)
    return -(-nbytes // step) * step


def pool_bytes_from_env() -> int:
    """The pool's byte budget: env DEEP_EP_POOL_BYTES (a non-negative int), else DEFAULT_POOL_BYTES."""
    value = os.environ.get(POOL_BYTES_ENV)
    if value is None or not value.strip():
        return DEFAULT_POOL_BYTES
    if not value.strip().isdigit():
        raise ValueError(f"{POOL_BYTES_ENV} must be a non-negative integer number of bytes, got {value!r}")
    return int(value)


@dataclass(eq=False)  # identity, never tensor or value comparison
class Block:
    """One pooled allocation: an anonymous mapping and when it was last handed out."""

    memory: mmap.mmap
    nbytes: int
    last_use: int = 0


class OutputPool:
    """Uninitialised CPU outputs that reuse the warm pages of dropped earlier outputs.

    Args:
        max_bytes: most bytes the pool keeps (None: env DEEP_EP_POOL_BYTES, default 512 MiB;
            0 switches pooling off).
    """

    def __init__(self, max_bytes: Optional[int] = None) -> None:
        self.max_bytes = pool_bytes_from_env() if max_bytes is None else max_bytes
        if not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {self.max_bytes!r}")
        self.blocks: List[Block] = []
        self.clock = 0
        self.lock = threading.Lock()  # two threads must never both take one free block
        self.idle_refs = 0
        self.enabled = self.max_bytes >= MIN_POOLED_BYTES and self._calibrate()

    # ---- reference counting ------------------------------------------------------------------------
    def _users(self, block: Block) -> int:
        """Storages that still use `block` (0: free)."""
        return reference_count(block.memory) - self.idle_refs

    def _calibrate(self) -> bool:
        """True when reference counts track the storages over a block as the pool needs: one per
        storage, kept by a view that outlives its base tensor, gone with the last view."""
        if reference_count is None:
            return False
        try:
            probe = Block(mmap.mmap(-1, PAGE_BYTES), PAGE_BYTES)
            self.idle_refs = reference_count(probe.memory)
            base = torch.frombuffer(probe.memory, dtype=torch.uint8)
            view = base[8:16].view(torch.int32)
            with_both = self._users(probe)
            del base
            with_view = self._users(probe)
            del view
            return (with_both, with_view, self._users(probe)) == (1, 1, 0)
        except Exception:  # an interpreter or torch that behaves otherwise: plain allocations
            return False

    def _disable(self) -> None:
        self.enabled = False
        self.blocks = []

    # ---- hand-out ----------------------------------------------------------------------------------
    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of `shape` and `dtype` that aliases no live tensor."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.enabled and MIN_POOLED_BYTES <= nbytes <= self.max_bytes:
            with self.lock:
                out = self._take(nbytes, shape, dtype)
            if out is not None:
                return out
        return torch.empty(*shape, dtype=dtype)

    def _take(self, nbytes: int, shape: Sequence[int], dtype: torch.dtype) -> Optional[torch.Tensor]:
        """A pooled output, or None when the budget is held by busy blocks (or the pool switched off)."""
        self.clock += 1
        free = [b for b in self.blocks if self._users(b) == 0]
        idle = [b for b in free if self.clock - b.last_use > MAX_IDLE_HANDOUTS]
        if idle:
            self._drop(idle)
            free = [b for b in free if b not in idle]  # Block compares by identity
        fitting = [b for b in free if nbytes <= b.nbytes <= 2 * nbytes]
        if fitting:
            block = min(fitting, key=lambda b: b.nbytes)
        else:
            block = self._new_block(nbytes, free)
            if block is None:
                return None
        out = torch.frombuffer(block.memory, dtype=torch.uint8, count=nbytes)
        if self._users(block) != 1:  # the counts stopped tracking storages: never risk an alias
            self._disable()
            return None
        block.last_use = self.clock
        return out.view(dtype).view(*shape)

    def _new_block(self, nbytes: int, free: List[Block]) -> Optional[Block]:
        """A new block for an output of `nbytes`, after dropping least recently used free blocks
        until it fits the budget; None (nothing dropped) when the busy blocks leave no room."""
        size = min(size_class(nbytes), self.max_bytes)
        busy_bytes = sum(b.nbytes for b in self.blocks) - sum(b.nbytes for b in free)
        if busy_bytes + size > self.max_bytes or len(self.blocks) - len(free) >= MAX_BLOCKS:
            return None
        kept = sum(b.nbytes for b in self.blocks)
        for victim in sorted(free, key=lambda b: b.last_use):
            if kept + size <= self.max_bytes and len(self.blocks) < MAX_BLOCKS:
                break
            self._drop([victim])
            kept -= victim.nbytes
        try:
            block = Block(mmap.mmap(-1, size), size)
        except OSError:  # no address space left for a mapping: the ordinary allocator decides
            return None
        self.blocks.append(block)
        return block

    def _drop(self, blocks: List[Block]) -> None:
        """Forgets free `blocks`: their mappings are unmapped as their last reference goes."""
        self.blocks = [b for b in self.blocks if b not in blocks]

    @property
    def pooled_bytes(self) -> int:
        """Bytes of all blocks the pool keeps (busy or free)."""
        return sum(b.nbytes for b in self.blocks)

    def clear(self) -> None:
        """Forgets every block; outputs still in use keep their memory until they are dropped."""
        with self.lock:
            self.blocks = []
