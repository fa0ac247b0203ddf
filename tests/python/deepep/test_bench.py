"""`python -m deep_ep.bench` at tiny sizes: deep_ep, the MPI Alltoallv floor and the Megatron-style
MPI dispatcher each checked against the reference inside the run (a mismatch fails it); the MPI
part says how to install it where mpi4py is missing."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import deep_ep_cpp
from deep_ep import bench, bench_mpi
from deep_ep.reference import reference_combine, reference_dispatch

HAVE_MPI = importlib.util.find_spec("mpi4py") is not None and bench_mpi.find_mpiexec() is not None
TINY = [
    "--num-tokens",
    "8,40",
    "--hidden",
    "128",
    "--num-topk",
    "4",
    "--num-experts",
    "8",
    "--iters",
    "3",
    "--warmup",
    "1",
    "--measure-seconds",
    "0.01",
]


def table_lines(out: str) -> dict:
    """{tokens: {column: cell}} of the normal-mode table."""
    columns, rows = [], {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| tokens/rank"):
            columns = cells
        elif line.startswith("| ") and cells[0].isdigit():
            assert len(cells) == len(columns), line
            rows[cells[0]] = dict(zip(columns, cells))
    return rows


def test_bench_normal_table(capsys):
    bench.main(TINY + ["--default-threads"])
    out = capsys.readouterr().out
    rows = table_lines(out)
    assert sorted(rows) == ["40", "8"], out
    for figures in rows.values():
        assert float(figures["L+D+C ms"]) > 0 and float(figures["default-threads ms"]) > 0
        assert figures["alltoall/ours"].endswith("x") and int(figures["Python calls"]) > 0
        if HAVE_MPI:
            dispatch_floor, combine_floor = (float(v) for v in figures["floor D+C ms"].split(" + "))
            assert dispatch_floor > 0 and combine_floor > 0 and float(figures["MPI dispatcher ms"]) > 0
        else:
            assert figures["floor D+C ms"] == "-"
    assert f"native kernels: {deep_ep_cpp.vector_isa()} vector path" in out
    if HAVE_MPI:
        assert "floor and dispatcher checked against the reference" in out
    else:
        assert "MPI: not installed - pip install .[bench]" in out


def test_bench_normal_table_without_mpi(capsys):
    """--no-mpi: the spawned ranks (no mpiexec) time deep_ep's figures, and both thread counts."""
    bench.main(TINY + ["--no-mpi", "--default-threads", "--no-alltoall"])
    out = capsys.readouterr().out
    rows = table_lines(out)
    assert sorted(rows) == ["40", "8"], out
    for figures in rows.values():
        assert figures["floor D+C ms"] == "-" and float(figures["L+D+C ms"]) > 0
        assert figures["default/tuned"].endswith("x") and float(figures["default-threads ms"]) > 0
        assert int(figures["Python calls"]) > 0
    assert "MPI: skipped (--no-mpi)" in out


def test_bench_low_latency(capfd):
    bench.main(
        [
            "--mode",
            "low_latency",
            "--num-tokens",
            "16",
            "--hidden",
            "128",
            "--num-topk",
            "4",
            "--num-experts",
            "8",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--batch",
            "2",
        ]
    )
    out = capfd.readouterr().out  # printed by rank 0's process
    assert "default (shm)" in out and "default, zero-copy" in out and "memcpy (same bytes)" in out
    assert f"native kernels: {deep_ep_cpp.vector_isa()} vector path" in out


def test_calls_per_iteration_fills_the_batch_time():
    # A small call is timed in runs of calls that last about BATCH_SECONDS; a long one alone; --batch wins.
    assert bench.calls_per_iteration(0.0005, None) == 10
    assert bench.calls_per_iteration(1e-9, None) == bench.MOST_BATCH
    assert bench.calls_per_iteration(0.05, None) == 1
    assert bench.calls_per_iteration(0.0005, 3) == 3


class LocalSync:
    """One process plays every rank: barriers return at once, the maximum is its own values."""

    def barrier(self) -> None:
        pass

    def max_over_ranks(self, values: torch.Tensor) -> None:
        pass


def test_measure_together_interleaves_warm_batches_with_their_thread_counts():
    calls = []

    def figure(name):
        return lambda: calls.append((name, torch.get_num_threads()))

    before = torch.get_num_threads()
    seconds = bench.measure_together(
        LocalSync(),
        {"a": bench.Measured(figure("a"), 1), "b": bench.Measured(figure("b"), 2)},
        iters=3,
        batch=2,
        warmup=1,
    )
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
    # Warm-up and estimate per figure, then each iteration: one untimed and two timed calls of a, of b.
    assert calls[:4] == [("a", 1), ("a", 1), ("b", 2), ("b", 2)]
    assert calls[4:] == ([("a", 1)] * 3 + [("b", 2)] * 3) * 3
    assert torch.get_num_threads() == before


def test_sizes_flag_rejects_garbage():
    with pytest.raises(SystemExit):
        bench.parse_args(["--num-tokens", "16,x"])
    assert bench.parse_args(["--num-tokens", "16,128"]).sizes == [16, 128]


@pytest.mark.skipif(not HAVE_MPI, reason="MPI baselines need mpi4py and MPICH: pip install .[bench]")
def test_megatron_dispatcher_on_one_rank_matches_reference():
    """COMM_SELF (no mpiexec): the dispatcher's rows and weighted sums are the reference's."""
    from mpi4py import MPI

    generator = torch.Generator().manual_seed(3)
    x, topk_idx, weights = bench.make_rank_inputs(0, 24, 64, 8, 3)
    topk_idx[::5, 1] = -1  # dropped selections
    dispatcher = bench_mpi.MegatronDispatcher(MPI.COMM_SELF, 8)
    received = dispatcher.dispatch(x, topk_idx)
    assert torch.equal(received, reference_dispatch([x], [topk_idx], [weights], 8, 0)["x"])
    # Distinct expert outputs: on one rank, received row i is selection order[i] (flat t*K+k).
    y = torch.randn(received.shape, generator=generator).to(torch.bfloat16)
    per_selection = torch.zeros(24 * 3, 64, dtype=torch.bfloat16)
    per_selection[dispatcher.order] = y
    expected = reference_combine(per_selection.view(24, 3, 64), topk_idx, weights)
    assert torch.allclose(dispatcher.combine(y, weights, 24).double(), expected, rtol=1e-2, atol=1e-2)
