"""Helpers to run a function on several local ranks (tests, benchmarks, examples): CPU ranks joined by
gloo, or one NPU per rank joined by HCCL."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .utils import usable_cores

LOOPBACK = "127.0.0.1"


def rendezvous() -> dist.TCPStore:
    """A torch.distributed store listening on 127.0.0.1, on a port the OS picked when it bound it
    (`.port`): ranks join it with `join_group`, and it must stay alive until they have. Binding it
    once leaves no window in which another socket of the host (gloo opens many) can take the port,
    as choosing a free port and having rank 0 bind it later does (EADDRINUSE at random)."""
    return dist.TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False)


def join_group(
    backend: str, rank: int, num_ranks: int, port: int, host: str = LOOPBACK, timeout: Optional[timedelta] = None
) -> None:
    """init_process_group(backend) for `rank` of `num_ranks`, through the `rendezvous` store at
    host:port (held by another process); `timeout`: of the store and the group (torch's defaults
    when None)."""
    timeouts = {} if timeout is None else {"timeout": timeout}
    store = dist.TCPStore(host, port, is_master=False, **timeouts)
    dist.init_process_group(backend, store=store, rank=rank, world_size=num_ranks, **timeouts)


DEVICES = ("cpu", "npu")


def torch_threads_per_rank(num_ranks: int) -> int:
    """torch's thread count for each of `num_ranks` ranks sharing this machine: its share of the
    usable cores (at least 1)."""
    return max(1, usable_cores() // num_ranks)


def run_rank(
    rank: int,
    num_ranks: int,
    port: int,
    env: dict,
    fn: Callable,
    args: tuple,
    device: str = "cpu",
    share_threads: bool = True,
) -> None:
    """One rank of `spawn_ranks`: sets `env`, joins the group through the `rendezvous` store on `port`
    and runs fn(rank, num_ranks, group, *args)."""
    os.environ.update(env)
    if share_threads:
        # Ranks share the machine's cores; oversubscribed threads would only slow every rank down.
        torch.set_num_threads(torch_threads_per_rank(num_ranks))
    backend = "gloo"
    if device == "npu":  # one NPU per rank, HCCL between them: the Buffer takes the NPU path
        import torch_npu  # noqa: F401

        torch.npu.set_device(rank)
        backend = "hccl"
    join_group(backend, rank, num_ranks, port)
    try:
        fn(rank, num_ranks, dist.group.WORLD, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(
    fn: Callable[..., Any],
    num_ranks: int,
    *args: Any,
    env: dict | None = None,
    device: str = "cpu",
    share_threads: bool = True,
) -> None:
    """Runs fn(rank, num_ranks, group, *args) on `num_ranks` processes on 127.0.0.1. An exception on
    any rank is raised here. `env` is set in every rank. With `share_threads` every rank sets torch's
    thread count to its share of the cores; without, ranks keep torch's default (all cores each), as
    a program started with torch.multiprocessing.spawn does.

    device "cpu": CPU ranks joined by gloo. device "npu": rank r uses NPU r (torch.npu.set_device)
    and the group is HCCL; fn finds the device with `rank_device()`.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
    store = rendezvous()
    mp.spawn(
        run_rank,
        args=(num_ranks, store.port, dict(env or {}), fn, args, device, share_threads),
        nprocs=num_ranks,
        join=True,
    )


def rank_device(group=None) -> torch.device:
    """Where a rank's tensors live: this process's NPU when the group is HCCL, else the CPU."""
    if dist.get_backend(group) == "hccl":
        return torch.device("npu", torch.npu.current_device())
    return torch.device("cpu")


def npu_skip_reason(num_ranks: int = 1) -> str | None:
    """Why NPU tests cannot run here (None when torch_npu and `num_ranks` NPUs are available)."""
    try:
        import torch_npu  # noqa: F401
    except Exception as error:  # a broken CANN install raises more than ImportError
        return f"NPU run skipped: torch_npu is not importable ({type(error).__name__}: {error})"
    if not torch.npu.is_available():
        return "NPU run skipped: torch_npu is importable but no NPU is visible"
    if torch.npu.device_count() < num_ranks:
        return f"NPU run skipped: needs {num_ranks} NPUs, {torch.npu.device_count()} visible"
    return None
