"""The runtime of one Buffer: the state every backend (strategy) of the Buffer runs on.

A `Runtime` owns the group and our own gloo group over it (`comm`), the nodes of the group and
this rank's place in them, the native kernels' thread count, the output pool, the node's shared
memory (mapped by the first strategy that needs it) and the Buffer's lifetime. Its two modes are
objects of their own, built on it: `normal` (deep_ep/normal.py: layout, dispatch, combine) and
`low_latency` (deep_ep/low_latency.py: call numbering, hooks). Strategies are built on a runtime
(`Strategy(runtime=buffer.runtime, group=group)`) and call those two.

The backend is chosen here, once: a 'gloo' group takes the CPU path, an 'hccl' group the NPU one
(deep_ep/npu/).
"""

from __future__ import annotations

import itertools
import os
import socket
from datetime import timedelta
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from . import npu, ops
from .low_latency import LowLatencyMode
from .normal import NormalMode
from .pool import OutputPool
from .transport import collective, groups, hierarchical, shm
from .utils import num_threads, timeout_seconds

DEFAULT_NVL_BYTES = 64 << 20
_runtime_ids = itertools.count(1)


def is_npu_group(group: dist.ProcessGroup) -> bool:
    """True for an 'hccl' group (the NPU path); ValueError for a backend that is neither CPU nor NPU,
    or a group this rank is not a member of."""
    groups.check_member(group)
    backend = dist.get_backend(group)
    if backend not in ("gloo", npu.NPU_BACKEND):
        raise ValueError(f"group backend must be 'gloo' for CPU ranks or 'hccl' for Ascend NPUs, got {backend!r}")
    return backend == npu.NPU_BACKEND


def host_identity() -> str:
    """Ranks with the same identity are one node: they share /dev/shm and see each other's pids.

    hostname / boot id / (device, inode) of /dev/shm. The boot id tells hosts of one name apart;
    /dev/shm's device and inode tell apart containers (or mount namespaces) of one host and one
    name that each mount their own /dev/shm and so cannot map each other's segments
    (docs/host_discovery.md)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    try:
        shm_stat = os.stat("/dev/shm")
        shm_id = f"{shm_stat.st_dev}:{shm_stat.st_ino}"
    except OSError:
        shm_id = ""
    return f"{socket.gethostname()}/{boot}/{shm_id}"


class Runtime:
    """The shared state of one Buffer (collective: every rank of `group` builds it).

    Args:
        group: the Buffer's ProcessGroup (gloo on CPU, hccl on NPU).
        num_nvl_bytes: bytes of this rank's shared-memory data area (0: DEFAULT_NVL_BYTES).
        num_rdma_bytes: bytes of the low-latency buffer (0: sized by the calls).
        low_latency_mode: whether low-latency calls are enabled.
    """

    def __init__(
        self, group: dist.ProcessGroup, num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool
    ) -> None:
        self.group = group
        self.on_npu = is_npu_group(group)
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        if self.on_npu:
            npu.init_backend()  # torch_npu importable; warns when the wheel was built for another SoC
        self.device = npu.current_device() if self.on_npu else torch.device("cpu")
        # The device path (NPU; or CPU with DEEP_EP_FORCE_TORCH_OPS=1, which runs the NPU path's code on
        # CPU): normal mode over the collective transport with torch ops and plain torch allocations.
        self.device_path = self.on_npu or ops.torch_ops_forced()
        self.runtime_id = next(_runtime_ids)  # handles remember it: a handle of another Buffer is refused
        self.low_latency_mode = low_latency_mode
        self.num_nvl_bytes = num_nvl_bytes or DEFAULT_NVL_BYTES
        self.num_rdma_bytes = num_rdma_bytes
        # Our own group: its timeout is DEEP_EP_TIMEOUT_S, and our traffic never mixes with the caller's.
        # Only the ranks of `group` take part in making it (other ranks may be anywhere).
        self.comm: Optional[dist.ProcessGroup] = groups.group_over(group, "gloo", timedelta(seconds=timeout_seconds()))
        # Token rows of the collective transport: on NPU over HCCL (the caller's group); metadata stays on
        # the host and goes over `comm` (gloo) everywhere.
        self.data_comm: Optional[dist.ProcessGroup] = group if self.on_npu else self.comm
        # Read on every call (check_alive): a failed collective leaves its message there.
        self.comm_status = collective.group_status(self.comm)
        self.data_status = collective.group_status(self.data_comm)
        self.rank_to_node = self._discover_nodes()
        self.topology = hierarchical.Topology(self.rank, self.rank_to_node)  # derives the nodes' ranks once
        self.node = self.topology.node
        self.num_nodes = self.topology.num_nodes
        self.local_ranks: List[int] = self.topology.local_ranks
        # Threads of the native kernels: this rank's share of the cores (DEEP_EP_NUM_THREADS overrides).
        self.num_threads = num_threads(len(self.local_ranks))
        self.shm: Optional[shm.NodeShm] = None  # mapped by the first "default" normal strategy (node_shm)
        self.setup_operation = groups.CONSTRUCTION  # what a failure while mapping shared memory names
        self.pool = OutputPool()
        self.destroyed = False
        self.normal = NormalMode(self)
        self.low_latency = LowLatencyMode(self)

    def started(self) -> None:
        """Construction is over: shared memory mapped from now on is mapped at its first use."""
        self.setup_operation = groups.FIRST_USE

    # ---- topology --------------------------------------------------------------------------------
    def _discover_nodes(self) -> torch.Tensor:
        # Every rank's host identity and pid: the nodes, and the peers whose liveness this process can
        # check, so that a failure in the collective transport names the ranks that died.
        peers: List[Optional[Tuple[str, int]]] = [None] * self.group_size
        collective.run_collective(
            self.comm,
            groups.CONSTRUCTION,
            lambda: dist.all_gather_object(peers, (host_identity(), os.getpid()), group=self.comm),
        )
        hosts = [host for host, _ in peers]
        here = hosts[self.rank]
        collective.watch_group(
            self.comm,
            timeout_seconds(),
            {r: pid for r, (host, pid) in enumerate(peers) if host == here and r != self.rank},
            [r for r, host in enumerate(hosts) if host != here],
        )
        per_node = os.environ.get("DEEP_EP_RANKS_PER_NODE")
        if per_node:
            if not per_node.isdigit() or int(per_node) < 1:
                raise ValueError(f"DEEP_EP_RANKS_PER_NODE must be a positive integer, got {per_node!r}")
            return torch.arange(self.group_size) // int(per_node)
        order = {h: i for i, h in enumerate(dict.fromkeys(hosts))}
        return torch.tensor([order[h] for h in hosts])

    def node_shm(self) -> shm.NodeShm:
        """The node's normal-mode shared memory, mapped on first use (collective: every rank builds the
        "default" normal strategy at the same point)."""
        if self.shm is None:
            self.shm = shm.NodeShm(
                self.comm, self.local_ranks, self.num_nvl_bytes, self.setup_operation, self.num_threads
            )
        return self.shm

    # ---- checks shared by the modes ----------------------------------------------------------------
    def check_alive(self) -> None:
        """RuntimeError if the Buffer was destroyed or an earlier wait on a peer failed."""
        if self.destroyed:
            raise RuntimeError("deep_ep: this Buffer was destroyed; create a new one")
        # After a peer timed out or died, the barriers / the group cannot be trusted: say so before
        # touching any shared state.
        broken = (
            (self.shm.broken if self.shm is not None else None)
            or self.comm_status.failure
            or self.data_status.failure  # NPU: the rows' HCCL group
        )
        if broken:
            raise RuntimeError(broken)

    def check_devices(self, **tensors) -> None:
        """ValueError naming the first tensor (or list item) not on the Buffer's device; None is skipped."""
        for name, tensor in tensors.items():
            if isinstance(tensor, torch.Tensor):  # the common case first: one check per tensor
                if tensor.device != self.device:
                    raise ValueError(f"{name} must be on the Buffer's device {self.device}, got {tensor.device}")
                continue
            for index, t in enumerate(tensor if isinstance(tensor, (tuple, list)) else []):
                if isinstance(t, torch.Tensor) and t.device != self.device:
                    raise ValueError(f"{name}[{index}] must be on the Buffer's device {self.device}, got {t.device}")

    def empty(self, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised output: from the pool on CPU, a plain allocation on the Buffer's device otherwise."""
        if self.device_path:
            return torch.empty(*shape, dtype=dtype, device=self.device)
        return self.pool.empty(shape, dtype)

    # ---- kernel profiling, as on DeepEP-Ascend's runtime object -----------------------------------
    def begin_profile(
        self, num_profile_skip_launches: int, num_profile_active_launches: int, profile_trace_dir: Optional[str] = ""
    ) -> None:
        """Accepted as DeepEP-Ascend's runtime accepts it (its tests call buffer.runtime.begin_profile):
        this runtime launches no device kernel to trace, so nothing is recorded."""

    def end_profile(self) -> None:
        """Accepted for DeepEP-Ascend compatibility (see begin_profile)."""

    # ---- lifetime --------------------------------------------------------------------------------
    def destroy(self) -> None:
        """Releases the shared memory, the low-latency resources and our own group."""
        self.close()
        self.pool.clear()
        # Our own group goes now, too: a gloo group that lives on until interpreter exit (a Buffer
        # kept alive by an exception's traceback, say) can abort the process when it is freed then.
        comm, self.comm = self.comm, None
        if self.data_comm is comm:
            self.data_comm = None
        if comm is not None:
            collective.forget_group(comm)
        if comm is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(comm)
            except (ValueError, RuntimeError):
                pass  # already gone (destroyed with the default group)
        self.destroyed = True

    def close(self) -> None:
        """Unmaps (and, as the last local user, unlinks) the shared memory; safe to call twice."""
        if getattr(self, "shm", None) is not None:
            self.shm.close()
            self.shm = None
        if getattr(self, "low_latency", None) is not None:
            self.low_latency.close()

    def __del__(self) -> None:
        self.close()
