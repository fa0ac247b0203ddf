"""MPI baselines of `python -m deep_ep.bench`, timed in the same processes as deep_ep.

With mpi4py and an mpiexec at hand (`pip install .[bench]`), the normal-mode bench runs every rank
under MPICH's mpiexec (`run_with_mpi`):

    mpiexec -n R python -m deep_ep.bench_mpi --args args.json --result out.json

Each process joins a gloo group for deep_ep (the address comes from rank 0 over MPI) and, for every
size, checks deep_ep's strategies and these baselines against the independent reference
(deep_ep/reference.py), then times all of them together, iteration by iteration
(`deep_ep.bench.measure_together`), so that every ratio of the table compares figures that met the
same phases of the machine:
  - the transport floor: MPI Alltoallv between warm, preallocated byte buffers moving exactly what
    deep_ep's dispatch receives (per (token, expert) selection: the bf16 row, the top-k ids as
    local expert ids, the weights) and what combine returns (the bf16 rows);
  - a Megatron-style dispatcher written with torch and mpi4py: sort the selections by expert,
    Alltoall the counts, Alltoallv the rows, permute the chunks to expert-major order; back:
    permute, Alltoallv, weighted index_add into the tokens.
A mismatch raises, and the job aborts. Rank 0 writes every figure (JSON) to --result.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .reference import reference_combine, reference_dispatch

if TYPE_CHECKING:
    from .bench import Measured, Timing

INSTALL_HINT = "not installed - pip install .[bench] (mpi4py and MPICH's mpich wheel)"
# Seconds the normal-mode bench under mpiexec may take before it is given up.
MPI_TIMEOUT_S = 3600


@dataclass
class MpiFigures:
    """Seconds per call at one size (median of the slowest rank)."""

    floor_dispatch: float  # Alltoallv of dispatch's bytes
    floor_combine: float  # Alltoallv of combine's bytes
    dispatcher: float  # Megatron-style dispatch + combine
    dispatcher_dispatch: float
    dispatcher_combine: float


@dataclass
class MpiOutcome:
    """What the bench shows for MPI: figures by str(tokens per rank), or None and why (`note`)."""

    sizes: Optional[Dict[str, MpiFigures]]
    note: str


# ---- inside mpiexec -------------------------------------------------------------------------------
@dataclass
class MpiSync:
    """deep_ep.bench.RankSync over an MPI communicator."""

    comm: Any

    def barrier(self) -> None:
        self.comm.Barrier()

    def max_over_ranks(self, values: torch.Tensor) -> None:
        from mpi4py import MPI

        self.comm.Allreduce(MPI.IN_PLACE, values.numpy(), op=MPI.MAX)


def counts_and_displacements(counts: np.ndarray):
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    return counts, np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def alltoallv_bytes(comm, send: torch.Tensor, send_rows: np.ndarray, recv: torch.Tensor, recv_rows: np.ndarray) -> None:
    """Alltoallv of uint8-viewable row tensors (contiguous), `*_rows` rows per peer."""
    from mpi4py import MPI

    send_bytes, recv_bytes = send.view(torch.uint8).reshape(-1), recv.view(torch.uint8).reshape(-1)
    send_row, recv_row = send_bytes.numel() // max(1, send.shape[0]), recv_bytes.numel() // max(1, recv.shape[0])
    comm.Alltoallv(
        [send_bytes.numpy(), counts_and_displacements(send_rows * send_row), MPI.BYTE],
        [recv_bytes.numpy(), counts_and_displacements(recv_rows * recv_row), MPI.BYTE],
    )


def selections_by_expert(topk_idx: torch.Tensor) -> torch.Tensor:
    """Flat indices t*K+k of the valid selections, ordered by expert, then token (stable sort)."""
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order[flat[order] >= 0]


def exchange_counts(comm, per_expert: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """int64 [R, L]: rows each source rank sends to each of this rank's local experts."""
    send = per_expert.to(torch.int64).reshape(num_ranks, -1).contiguous()
    recv = torch.empty_like(send)
    comm.Alltoall(send.numpy(), recv.numpy())
    return recv


def chunk_permutation(recv_counts: torch.Tensor) -> torch.Tensor:
    """Row order that turns rows arriving by (source rank, local expert) into (local expert, source)
    order, as Megatron's sort_chunks_by_idxs."""
    num_ranks, num_local = recv_counts.shape
    starts = torch.cumsum(recv_counts.reshape(-1), 0) - recv_counts.reshape(-1)
    chunks = [
        torch.arange(int(starts[s * num_local + e]), int(starts[s * num_local + e]) + int(recv_counts[s, e]))
        for e in range(num_local)
        for s in range(num_ranks)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)


class MegatronDispatcher:
    """What a user writes without deep_ep: an all-to-all token dispatcher in torch + mpi4py."""

    def __init__(self, comm, num_experts: int) -> None:
        self.comm, self.num_experts = comm, num_experts
        self.num_ranks = comm.Get_size()

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """bf16 [N, H] rows of this rank's experts, by local expert, source rank, source token."""
        num_topk = topk_idx.shape[1]
        self.order = selections_by_expert(topk_idx)
        self.token = self.order // num_topk
        per_expert = torch.bincount(topk_idx.reshape(-1)[self.order], minlength=self.num_experts)
        self.send_rows = per_expert.reshape(self.num_ranks, -1).sum(1).numpy()
        recv_counts = exchange_counts(self.comm, per_expert, self.num_ranks)
        self.recv_rows = recv_counts.sum(1).numpy()
        permuted = x.index_select(0, self.token)
        arrived = torch.empty(int(self.recv_rows.sum()), x.shape[1], dtype=x.dtype)
        alltoallv_bytes(self.comm, permuted, self.send_rows, arrived, self.recv_rows)
        self.permutation = chunk_permutation(recv_counts)
        return arrived.index_select(0, self.permutation)

    def combine(self, y: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """[T, H] in y's dtype: sum of the weighted expert outputs of every token (float32 sums)."""
        by_source = torch.empty_like(y)
        by_source.index_copy_(0, self.permutation, y)
        back = torch.empty(self.order.numel(), y.shape[1], dtype=y.dtype)
        alltoallv_bytes(self.comm, by_source, self.recv_rows, back, self.send_rows)
        weights = topk_weights.reshape(-1)[self.order].unsqueeze(1)
        out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32)
        out.index_add_(0, self.token, back.float() * weights)
        return out.to(y.dtype)


def dispatch_rows(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, order: torch.Tensor, experts_per_rank: int
) -> torch.Tensor:
    """uint8 [S, 2H + 12K]: what dispatch delivers for each selection in `order` (expert-major):
    the row, the token's top-k as the receiver's local ids (-1 elsewhere), its weights."""
    num_topk = topk_idx.shape[1]
    token = order // num_topk
    receiver = topk_idx.reshape(-1)[order] // experts_per_rank
    ids = topk_idx[token]
    mine = (ids // experts_per_rank) == receiver.unsqueeze(1)
    local = torch.where(mine, ids - (receiver * experts_per_rank).unsqueeze(1), torch.full_like(ids, -1))
    return concat_bytes([x[token], local, topk_weights[token]])


def concat_bytes(fields: List[torch.Tensor]) -> torch.Tensor:
    """uint8 [rows, sum of field bytes]: the fields of every row side by side."""
    return torch.cat([f.contiguous().view(torch.uint8).reshape(f.shape[0], -1) for f in fields], 1)


class MpiBaselines:
    """deep_ep.bench.Baselines: the floor and the Megatron-style dispatcher on `comm`."""

    def __init__(self, comm, args: argparse.Namespace) -> None:
        self.comm, self.args = comm, args

    def prepare(self, num_tokens: int) -> Dict[str, "Measured"]:
        """Checks both baselines against the reference at one size; returns what to time, named as
        the fields of MpiFigures."""
        from .bench import Measured, make_rank_inputs

        comm, args = self.comm, self.args
        rank, num_ranks = comm.Get_rank(), comm.Get_size()
        experts_per_rank = args.num_experts // num_ranks
        x, topk_idx, topk_weights = make_rank_inputs(rank, num_tokens, args.hidden, args.num_experts, args.num_topk)
        everyone = comm.allgather((x, topk_idx, topk_weights))
        ref = reference_dispatch(
            [e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone], args.num_experts, rank
        )
        expected_out = reference_combine(x.float().unsqueeze(1).expand(-1, args.num_topk, -1), topk_idx, topk_weights)

        # The floor: warm, preallocated buffers; only Alltoallv is timed.
        order = selections_by_expert(topk_idx)
        send = dispatch_rows(x, topk_idx, topk_weights, order, experts_per_rank)
        per_expert = torch.bincount(topk_idx.reshape(-1)[order], minlength=args.num_experts)
        send_rows = per_expert.reshape(num_ranks, -1).sum(1).numpy()
        recv_rows = exchange_counts(comm, per_expert, num_ranks).sum(1).numpy()
        recv = torch.empty(int(recv_rows.sum()), send.shape[1], dtype=torch.uint8)
        returned = torch.empty(send.shape[0], 2 * args.hidden, dtype=torch.uint8)
        alltoallv_bytes(comm, send, send_rows, recv, recv_rows)
        by_source = torch.argsort(ref["src_rank"], stable=True)  # the reference is expert-major
        wanted = concat_bytes([ref["x"], ref["topk_idx"], ref["weights"]])[by_source]
        if not torch.equal(recv, wanted):
            raise AssertionError(f"MPI rank {rank}: the Alltoallv floor did not deliver dispatch's bytes")
        back = recv[:, : 2 * args.hidden].contiguous()
        alltoallv_bytes(comm, back, recv_rows, returned, send_rows)
        if not torch.equal(returned, send[:, : 2 * args.hidden]):
            raise AssertionError(f"MPI rank {rank}: the Alltoallv floor did not return combine's bytes")

        # The Megatron-style dispatcher, identity experts: its output must be deep_ep's reference.
        dispatcher = MegatronDispatcher(comm, args.num_experts)
        received = dispatcher.dispatch(x, topk_idx)
        if not torch.equal(received, ref["x"]):
            raise AssertionError(f"MPI rank {rank}: the Megatron-style dispatch differs from the reference")
        combined = dispatcher.combine(received, topk_weights, num_tokens)
        if not torch.allclose(combined.double(), expected_out, rtol=2e-2, atol=2e-2):
            raise AssertionError(f"MPI rank {rank}: the Megatron-style combine differs from the reference")

        threads = args.tuned_threads
        return {
            "floor_dispatch": Measured(lambda: alltoallv_bytes(comm, send, send_rows, recv, recv_rows), threads),
            "floor_combine": Measured(lambda: alltoallv_bytes(comm, back, recv_rows, returned, send_rows), threads),
            "dispatcher": Measured(
                lambda: dispatcher.combine(dispatcher.dispatch(x, topk_idx), topk_weights, num_tokens), threads
            ),
            # The combine alone reuses the routes of the dispatcher's last dispatch: the same on every call.
            "dispatcher_dispatch": Measured(lambda: dispatcher.dispatch(x, topk_idx), threads),
            "dispatcher_combine": Measured(lambda: dispatcher.combine(received, topk_weights, num_tokens), threads),
        }


def mpi_main(argv: Optional[List[str]] = None) -> None:
    """One rank of the normal-mode bench under mpiexec (see the module's docstring)."""
    from mpi4py import MPI

    from . import bench
    from .testing import join_group, rendezvous

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--args", required=True, help="JSON file of the bench's parsed arguments")
    parser.add_argument("--result", required=True, help="JSON file rank 0 writes the figures to")
    options = parser.parse_args(argv)
    with open(options.args) as f:
        args = argparse.Namespace(**json.load(f))
    comm = MPI.COMM_WORLD
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    try:
        store = rendezvous() if rank == 0 else None  # rank 0 holds it until every rank has joined
        join_group("gloo", rank, num_ranks, comm.bcast(store.port if rank == 0 else None, root=0))
        bench.set_rank_threads(args, num_ranks)
        timings, baselines = bench.bench_normal(rank, dist.group.WORLD, args, MpiSync(comm), MpiBaselines(comm, args))
        dist.destroy_process_group()
        if rank == 0:
            library = MPI.Get_library_version().splitlines()[0].strip()
            with open(options.result, "w") as f:
                json.dump({"library": library, "timings": timings, "baselines": baselines}, f)
    except BaseException:
        # A rank that failed must not leave the others waiting in a collective: end the whole job.
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)


# ---- in the bench ---------------------------------------------------------------------------------
def find_mpiexec() -> Optional[str]:
    """MPICH's mpiexec beside this Python (a venv or the mpich wheel's scripts), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


def mpi_unavailable(args: argparse.Namespace) -> Optional[str]:
    """None when the normal-mode bench can run under mpiexec with the MPI baselines, else why not."""
    if args.no_mpi:
        return "skipped (--no-mpi)"
    if args.quant != "bf16":
        return "the baselines move bf16 rows; run without --int8 to compare"
    if importlib.util.find_spec("mpi4py") is None or find_mpiexec() is None:
        return INSTALL_HINT
    return None


def run_with_mpi(args: argparse.Namespace) -> Tuple[Dict[str, Dict[str, "Timing"]], MpiOutcome]:
    """Runs the normal-mode bench with its ranks under mpiexec (mpi_main); returns rank 0's deep_ep
    timings and the MPI figures."""
    from .bench import bench_env, load_timings

    mpiexec = find_mpiexec()
    with tempfile.TemporaryDirectory(prefix="deep_ep_bench_mpi_") as tmp:
        arguments, result = os.path.join(tmp, "args.json"), os.path.join(tmp, "result.json")
        with open(arguments, "w") as f:
            json.dump(vars(args), f)
        command = [mpiexec, "-n", str(args.num_processes), sys.executable, "-m", "deep_ep.bench_mpi"]
        command += ["--args", arguments, "--result", result]
        # The ranks import this deep_ep (the bench's sys.path), whatever the working directory.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **bench_env(args))
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=MPI_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(
                f"the bench under mpiexec failed (exit code {done.returncode}) running "
                f"{' '.join(command)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        with open(result) as f:
            raw = json.load(f)
    mpi = MpiOutcome(
        {tokens: MpiFigures(**figures) for tokens, figures in raw["baselines"].items()},
        f"mpi4py over {' '.join(raw['library'].split())} ({mpiexec}); floor and dispatcher "
        f"checked against the reference, and timed together with deep_ep, iteration by iteration, "
        f"in the same processes",
    )
    return load_timings(raw["timings"]), mpi


if __name__ == "__main__":
    mpi_main()
