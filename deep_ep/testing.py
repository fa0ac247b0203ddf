"""Helpers to run a function on several local CPU ranks (tests, benchmarks, examples)."""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, num_ranks: int, port: int, env: dict, fn: Callable, args: tuple) -> None:
    os.environ.update(env)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    # Ranks share the machine's cores; oversubscribed threads would only slow every rank down.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_ranks))
    dist.init_process_group("gloo", rank=rank, world_size=num_ranks)
    try:
        fn(rank, num_ranks, dist.group.WORLD, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable[..., Any], num_ranks: int, *args: Any, env: dict | None = None) -> None:
    """Runs fn(rank, num_ranks, group, *args) on `num_ranks` processes joined by gloo on
    127.0.0.1. An exception on any rank is raised here. `env` is set in every rank."""
    mp.spawn(_run_rank, args=(num_ranks, free_port(), dict(env or {}), fn, args), nprocs=num_ranks, join=True)
