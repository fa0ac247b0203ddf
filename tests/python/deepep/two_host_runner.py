"""One rank of the two-host test (test_two_hosts.py).

test_two_hosts.py starts this script once per rank, inside the namespaces of the rank's host; the
rank joins the world over gloo at --master:--port:

    python two_host_runner.py --master 10.213.0.1 --port 29500 --world-size 4 --rank 0 --host-ranks 2 --out DIR

It runs `results` (every checked call, its outputs saved to DIR/results/rank<r>.pt), then `fault`
(dispatch/combine in a loop until the link to the other host fails; what it saw goes to
DIR/fault/rank<r>.json). The test runs `results` alone on one host, too, and compares the files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from datetime import timedelta
from typing import List

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import low_latency_cases  # noqa: E402
from common import make_inputs, our_segments  # noqa: E402
from normal_cases import NODE_ENV, Case, check_dispatch_and_combine, run_all_calls  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep.testing import join_group  # noqa: E402

NUM_EXPERTS = 16
HIDDEN = 128
LOW_LATENCY = low_latency_cases.Case(
    tokens=[21, 0, 24, 9], max_tokens=24, hidden=HIDDEN, experts_per_rank=4, topk=4, seed=3
)
# A fault-free loop longer than this means the test never took the link down.
FAULT_LOOP_LIMIT_S = 60.0


def normal_inputs(rank: int, num_ranks: int):
    return make_inputs(rank, [45, 0, 70, 9][rank % 4], HIDDEN, NUM_EXPERTS, 4, num_ranks, seed=11)


def check_nodes(buffer: deep_ep.Buffer, ranks_per_node: int) -> None:
    """The Buffer's nodes are blocks of `ranks_per_node` consecutive ranks."""
    expected = torch.arange(buffer.group_size) // ranks_per_node
    assert torch.equal(buffer.runtime.rank_to_node, expected), (buffer.runtime.rank_to_node, expected)


def results(rank: int, num_ranks: int, group, out_dir: str, ranks_per_node: int) -> None:
    """Normal (bf16, int8, cached) and low-latency (bf16, int8) calls, checked against the reference;
    their outputs saved for the comparison with the other run. The hosts have `ranks_per_node` ranks
    each, which host discovery must find."""
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
    check_nodes(buffer, ranks_per_node)
    saved = {}
    try:
        for quant in ("bf16", "int8"):
            # The checker learns the expected node size from the environment (the Buffer is built).
            os.environ[NODE_ENV] = str(ranks_per_node)
            check_dispatch_and_combine(
                rank,
                num_ranks,
                buffer,
                Case(tokens=[37, 0, 64, 5], experts=NUM_EXPERTS, hidden=HIDDEN, quant=quant, seed=7),
                group,
            )
            os.environ.pop(NODE_ENV)
            saved[f"normal_{quant}"] = run_all_calls(buffer, normal_inputs(rank, num_ranks), NUM_EXPERTS, quant)
    finally:
        buffer.destroy()
    buffer = low_latency_cases.buffer_for(group, num_ranks, [LOW_LATENCY])
    try:
        for quant in ("bf16", "int8"):
            case = replace(LOW_LATENCY, quant=quant)
            low_latency_cases.check_case(rank, num_ranks, buffer, case, group)
            inputs = make_inputs(
                rank,
                case.tokens[rank % len(case.tokens)],
                case.hidden,
                case.experts_per_rank * num_ranks,
                case.topk,
                num_ranks,
                seed=case.seed + 1,
            )
            recv_x, recv_count, handle, _ = low_latency_cases.dispatch(buffer, case, inputs)
            y = low_latency_cases.expert_output(recv_x, recv_count)
            combined = buffer.low_latency_combine(y, inputs.topk_idx, inputs.topk_weights, handle)[0]
            valid = int(recv_count.sum())
            rows = [r[:valid] for r in recv_x] if isinstance(recv_x, tuple) else [recv_x[:valid]]
            saved[f"low_latency_{quant}"] = rows + [recv_count, combined]
    finally:
        buffer.destroy()
    os.makedirs(os.path.join(out_dir, "results"), exist_ok=True)
    torch.save(saved, os.path.join(out_dir, "results", f"rank{rank}.pt"))


def discovery(rank: int, num_ranks: int, group, out_dir: str, ranks_per_node: int) -> None:
    """Host discovery alone."""
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
    try:
        check_nodes(buffer, ranks_per_node)
    finally:
        buffer.destroy()


def write_json(path: str, report: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.rename(path + ".tmp", path)


def fault(rank: int, num_ranks: int, group, out_dir: str, ranks_per_node: int) -> None:
    """Dispatch + combine in a loop until a call fails (the test takes the link down meanwhile)."""
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
    inputs = normal_inputs(rank, num_ranks)
    per_expert = buffer.get_dispatch_layout(inputs.topk_idx, NUM_EXPERTS)[2]
    report: dict = {"pid": os.getpid(), "hostname": os.uname().nodename, "calls": 0, "error": None}
    fault_dir = os.path.join(out_dir, "fault")
    os.makedirs(fault_dir, exist_ok=True)
    start = time.monotonic()
    try:
        while time.monotonic() - start < FAULT_LOOP_LIMIT_S:
            recv_x, _, _, _, handle, _ = buffer.dispatch(
                inputs.x, num_tokens_per_expert=per_expert, topk_idx=inputs.topk_idx, topk_weights=inputs.topk_weights
            )
            buffer.combine(recv_x, handle)
            report["calls"] += 1
            if report["calls"] == 1:  # tell the test that this rank is in its call loop
                open(os.path.join(fault_dir, f"looping.rank{rank}"), "w").close()
    except RuntimeError as error:
        report.update(error="RuntimeError", message=str(error), failed_at=time.time())
    try:
        buffer.dispatch(
            inputs.x, num_tokens_per_expert=per_expert, topk_idx=inputs.topk_idx, topk_weights=inputs.topk_weights
        )
        report["next_error"] = None
    except RuntimeError as error:
        report["next_error"] = str(error)
    buffer.destroy()
    report["segments"] = our_segments()  # this host's private /dev/shm
    write_json(os.path.join(fault_dir, f"rank{rank}.json"), report)


def run_rank(
    rank: int,
    world_size: int,
    master: str,
    port: int,
    host_ranks: int,
    scenarios: List[str],
    out_dir: str,
    launcher_store: bool = False,
) -> None:
    os.environ.pop(NODE_ENV, None)  # the nodes must come from host discovery alone
    torch.set_num_threads(1)
    timeout = timedelta(seconds=60)
    if launcher_store:  # the launcher listens on master:port already (deep_ep.testing.rendezvous)
        join_group("gloo", rank, world_size, port, host=master, timeout=timeout)
    else:
        dist.init_process_group(
            "gloo", init_method=f"tcp://{master}:{port}", world_size=world_size, rank=rank, timeout=timeout
        )
    for scenario in scenarios:
        SCENARIOS[scenario](rank, world_size, dist.group.WORLD, out_dir, host_ranks)
    if "fault" in scenarios:
        # The default group's connections to the other host are dead: its teardown could block.
        sys.stdout.flush()
        os._exit(0)
    dist.destroy_process_group()


SCENARIOS = {"discovery": discovery, "results": results, "fault": fault}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--master", required=True, help="address of rank 0's host")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--host-ranks", type=int, required=True, help="ranks per host (discovery must agree)")
    parser.add_argument("--scenarios", default="results,fault")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--launcher-store",
        action="store_true",
        help="the launcher holds the rendezvous store at --master:--port (rank 0 does not create it)",
    )
    args = parser.parse_args()
    run_rank(
        args.rank,
        args.world_size,
        args.master,
        args.port,
        args.host_ranks,
        args.scenarios.split(","),
        args.out,
        args.launcher_store,
    )


if __name__ == "__main__":
    main()
