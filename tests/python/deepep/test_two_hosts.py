"""Two real hosts on one machine: 2 hosts x 2 ranks, each host its own network namespace (joined to the
other by a veth pair), hostname (UTS namespace) and private /dev/shm (mount namespace, fresh tmpfs); gloo
runs over the veth addresses, and host discovery alone (no DEEP_EP_RANKS_PER_NODE) must find the 2 nodes.

Every result (normal, cached, int8, low-latency) must equal the single-host run's bit for bit, and both
runs check theirs against the pure-torch reference. Then the link between the hosts goes down during a
call: every rank must raise a RuntimeError naming the ranks it cannot reach within DEEP_EP_TIMEOUT_S
(plus a margin) and leave no /dev/shm segment behind, in its host's /dev/shm or the machine's.

Needs root, iproute2 (`ip netns`) and util-linux (`unshare`); skipped with the reason otherwise. The
addresses live only on the veth ends inside the two namespaces this test creates and deletes.

    python -m pytest tests/python/deepep/test_two_hosts.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import two_host_runner  # noqa: E402
from common import gather_objects, our_segments  # noqa: E402

from deep_ep.testing import rendezvous, spawn_ranks  # noqa: E402
from deep_ep.transport import collective, shm  # noqa: E402
from deep_ep.utils import timeout_seconds  # noqa: E402

TIMEOUT_S = 5
# Fault detection may take this much longer than DEEP_EP_TIMEOUT_S on a busy machine.
MARGIN_S = 8
HOST_RANKS = ([0, 1], [2, 3])
ADDRESSES = ("10.213.0.1", "10.213.0.2")
PREFIX = 24
PORT = 29500
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "two_host_runner.py")


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)


def skip_reason() -> Optional[str]:
    """Why namespaces cannot be made here (None when they can)."""
    if not sys.platform.startswith("linux"):
        return f"two-host test skipped: needs Linux namespaces, this is {sys.platform}"
    if os.geteuid() != 0:
        return "two-host test skipped: creating network namespaces needs root"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"two-host test skipped: `{tool}` not found (install {package})"
    probe = subprocess.run(
        ["unshare", "--uts", "--mount", "--propagation", "private", "true"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode:
        return f"two-host test skipped: unshare --uts --mount is not permitted ({probe.stderr.strip()})"
    return None


class TwoHosts:
    """Two network namespaces joined by a veth pair, named after this process so that concurrent runs
    do not collide. Deleted (with every process left in them) on exit, also after a failure."""

    def __init__(self, workdir: Path) -> None:
        tag = str(os.getpid())
        self.namespaces = [f"deepep{tag}{side}" for side in "ab"]
        self.links = [f"dpe{tag}{side}" for side in "ab"]  # at most 15 characters
        self.hostnames = [f"deepep-host-{side}" for side in "ab"]
        self.workdir = workdir
        self.processes: List[subprocess.Popen] = []

    def __enter__(self) -> "TwoHosts":
        try:
            for namespace in self.namespaces:
                run("ip", "netns", "add", namespace)
            run(
                "ip",
                "link",
                "add",
                self.links[0],
                "netns",
                self.namespaces[0],
                "type",
                "veth",
                "peer",
                "name",
                self.links[1],
                "netns",
                self.namespaces[1],
            )
        except subprocess.CalledProcessError as error:
            self.__exit__()
            pytest.skip(
                f"two-host test skipped: `{' '.join(error.cmd)}` is not permitted here ({error.stderr.strip()})"
            )
        try:
            for namespace, link, address in zip(self.namespaces, self.links, ADDRESSES):
                run("ip", "-n", namespace, "addr", "add", f"{address}/{PREFIX}", "dev", link)
                run("ip", "-n", namespace, "link", "set", "lo", "up")
                run("ip", "-n", namespace, "link", "set", link, "up")
        except BaseException:
            self.__exit__()
            raise
        # Name lookups inside the hosts: the two hostnames, and no name server (none is reachable there).
        (self.workdir / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{address} {name}\n" for address, name in zip(ADDRESSES, self.hostnames))
        )
        (self.workdir / "resolv.conf").write_text("")
        return self

    def launch(self, host: int, out_dir: Path) -> subprocess.Popen:
        """Starts two_host_runner.py in host `host`'s namespaces, with its own hostname and /dev/shm."""
        env = {k: v for k, v in os.environ.items() if k != two_host_runner.NODE_ENV}
        env.update(GLOO_SOCKET_IFNAME=self.links[host], DEEP_EP_TIMEOUT_S=str(TIMEOUT_S))
        # The host's ranks, then what its private /dev/shm holds once they are gone; the exit code is
        # the first failing rank's.
        ranks = " ".join(
            f"{sys.executable} {RUNNER} --master {ADDRESSES[0]} --port {PORT} --world-size 4 "
            f'--rank {rank} --host-ranks {len(HOST_RANKS[host])} --out {out_dir} & pids="$pids $!"; '
            for rank in HOST_RANKS[host]
        )
        script = (
            f"set -e; hostname {self.hostnames[host]}; mount -t tmpfs -o size=256m tmpfs /dev/shm; "
            f"mount --bind {self.workdir}/hosts /etc/hosts; "
            f"mount --bind {self.workdir}/resolv.conf /etc/resolv.conf; set +e; pids=; {ranks}"
            f"code=0; for pid in $pids; do wait $pid; rc=$?; [ $code -ne 0 ] || code=$rc; done; "
            f"ls -A /dev/shm > {out_dir}/shm_after_host{host}.txt; exit $code"
        )
        log = open(self.workdir / f"host{host}.log", "w")
        process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.namespaces[host],
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes.append(process)
        return process

    def link_down(self) -> float:
        """Takes host 0's end of the veth down; returns the time.time() when it is down."""
        run("ip", "-n", self.namespaces[0], "link", "set", self.links[0], "down")
        return time.time()

    def log(self, host: int) -> str:
        path = self.workdir / f"host{host}.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def __exit__(self, *exc_info) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for namespace in self.namespaces:
            # The runners' ranks, should one outlive its runner.
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def wait_for_loops(hosts: TwoHosts, runners: List[subprocess.Popen], fault_dir: Path, timeout_s: float) -> None:
    """Until every rank has started its call loop (fails early when a runner has exited)."""
    deadline = time.monotonic() + timeout_s
    while len(list(fault_dir.glob("looping.rank*"))) < 4:
        for host, runner in enumerate(runners):
            assert runner.poll() is None, f"host {host} exited early ({runner.returncode}):\n{hosts.log(host)}"
        assert time.monotonic() < deadline, "the ranks never started their call loop"
        time.sleep(0.02)


def assert_same(one: Dict, two: Dict, rank: int) -> None:
    assert one.keys() == two.keys(), (rank, one.keys(), two.keys())
    for key in one:
        assert len(one[key]) == len(two[key]), (rank, key)
        for index, (a, b) in enumerate(zip(one[key], two[key])):
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            assert same, f"rank {rank}: {key} result {index} differs between one host and two hosts"


def test_two_hosts(tmp_path: Path) -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    one_dir, two_dir = tmp_path / "one_host", tmp_path / "two_hosts"
    two_dir.mkdir()
    with TwoHosts(tmp_path) as hosts:
        runners = [hosts.launch(host, two_dir) for host in range(2)]
        # The single-host run meanwhile: the same 4 ranks, one node.
        spawn_ranks(two_host_runner.results, 4, str(one_dir), 4)
        wait_for_loops(hosts, runners, two_dir / "fault", 120)
        down_at = hosts.link_down()
        for host, runner in enumerate(runners):
            try:
                runner.wait(TIMEOUT_S + MARGIN_S + 30)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"host {host} still runs {TIMEOUT_S + MARGIN_S + 30} s after the link went down:\n{hosts.log(host)}"
                )
            assert runner.returncode == 0, f"host {host} failed:\n{hosts.log(host)}"

    for rank in range(4):
        assert_same(
            torch.load(one_dir / "results" / f"rank{rank}.pt"), torch.load(two_dir / "results" / f"rank{rank}.pt"), rank
        )

    pids = []
    for host, ranks in enumerate(HOST_RANKS):
        unreachable = HOST_RANKS[1 - host]
        for rank in ranks:
            report = json.loads((two_dir / "fault" / f"rank{rank}.json").read_text())
            pids.append(report["pid"])
            assert report["hostname"] == hosts.hostnames[host], report
            assert report["calls"] > 0 and report["error"] == "RuntimeError", report
            message = report["message"]
            assert f"rank {rank} " in message and f"ranks {unreachable} on other hosts are unreachable" in message, (
                report
            )
            detected_s = report["failed_at"] - down_at
            print(f"rank {rank}: RuntimeError {detected_s:.2f} s after the link went down")
            assert 0 <= detected_s <= TIMEOUT_S + MARGIN_S, report
            assert "recreate" in report["next_error"], report
            assert report["segments"] == [], report  # the host's private /dev/shm, after the failure
        # ... and once its ranks are gone.
        assert (two_dir / f"shm_after_host{host}.txt").read_text().split() == []
    assert not [name for name in our_segments() if int(name.split("_")[2]) in pids]  # the machine's /dev/shm


# ---- a failing network exchange is told to the local peers waiting in shared memory ------------------
def failure_note(rank: int, num_ranks: int, group) -> None:
    """Ranks 0 and 1 share a node, rank 2 is "another host". Rank 0's network exchange fails (a gloo
    timeout, stood in for by the error gloo raises) while rank 1 waits for it in a shared-memory
    barrier: rank 1's error must carry rank 0's, which names rank 2 as unreachable."""
    pids = gather_objects(os.getpid(), group)
    local_ranks = [0, 1] if rank < 2 else [2]
    collective.watch_group(
        group,
        timeout_seconds(),
        {r: pids[r] for r in local_ranks if r != rank},
        [r for r in range(num_ranks) if r not in local_ranks],
    )
    node = shm.NodeShm(group, local_ranks, 4096)
    node.operation = "the note test"  # what a timed-out barrier names (each call sets its own)
    try:
        if rank == 0:

            def lost() -> None:
                raise RuntimeError("Timed out waiting 1000ms for recv operation to complete")

            with pytest.raises(RuntimeError, match=r"ranks \[2\] on other hosts are unreachable"):
                collective.run_collective(group, "dispatch", lost)
        elif rank == 1:
            with pytest.raises(RuntimeError) as error:
                node.barrier()
            message = str(error.value)
            assert "rank 1 timed out" in message and "[0]" in message, message
            assert "Rank 0 of this node failed first: deep_ep: rank 0 timed out" in message, message
            assert "in dispatch" in message and "ranks [2] on other hosts are unreachable" in message, message
            with pytest.raises(RuntimeError, match="Rank 0 of this node failed first"):
                node.barrier()  # and the node stays marked broken with the reason
    finally:
        dist.barrier(group)
        node.close()


def test_failure_note_reaches_local_peers() -> None:
    spawn_ranks(failure_note, 3, env={"DEEP_EP_TIMEOUT_S": "1"})


# ---- one hostname, two /dev/shm --------------------------------------------------------------------------
def test_same_hostname_separate_dev_shm(tmp_path: Path) -> None:
    """Two ranks of one hostname and one network, rank 1 with a /dev/shm of its own (as two containers
    that mount their own): they cannot share memory, so discovery must make them two nodes."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != two_host_runner.NODE_ENV}
    store = rendezvous()  # held here until both ranks are done: no rank has to bind a port it was told
    ranks = []
    for rank in range(2):
        command = [
            sys.executable,
            RUNNER,
            "--master",
            "127.0.0.1",
            "--port",
            str(store.port),
            "--launcher-store",
            "--world-size",
            "2",
            "--rank",
            str(rank),
            "--host-ranks",
            "1",
            "--scenarios",
            "discovery",
            "--out",
            str(tmp_path),
        ]
        if rank == 1:
            command = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mount -t tmpfs -o size=16m tmpfs /dev/shm && exec "$@"',
                "sh",
            ] + command
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for rank, process in enumerate(ranks):
            output = process.communicate(timeout=120)[0]
            assert process.returncode == 0, f"rank {rank}:\n{output[-4000:]}"
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
