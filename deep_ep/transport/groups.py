"""The Buffer's own process groups, made by the ranks of the caller's group and nobody else.

`torch.distributed.new_group` is by default collective over the whole world: every process of the
job must call it, in the same order, members or not, and it names the group by a per-process count
of such calls. A Buffer on one of several EP groups (or on a group some ranks never build a Buffer
on) can ask neither of the ranks outside its group, and Buffers built at the same time on disjoint
groups would get the same name, so that their rendezvous mix (observed: wrong rows received).

`new_group(..., use_local_synchronization=True)` lets only the members rendezvous, but names the
group after its ranks and the number of groups the process holds at that moment. Members that hold
different numbers of groups (a rank that is also in another subgroup) then never meet, and a group
made after another one was destroyed reuses that one's name and meets its stale addresses in the
store (observed: "Connection refused"). So the Buffer's groups get names of their own:
"deep_ep/<backend>/<global ranks>/<n>", n counting the groups this process made over those ranks.
Every member makes them in the same order (Buffer construction is collective over the group), so
the members agree on n, and no name is ever used twice.

Naming a group needs torch's internal group constructor; `torch_group_helper` finds it, and where a
torch lacks it (or changed it), `new_group(..., use_local_synchronization=True)` is the fallback.
"""

from __future__ import annotations

import inspect
from collections import Counter
from datetime import timedelta
from typing import Callable, Dict, Optional, Tuple

import torch.distributed as dist

# The operation named in errors of the collective steps of Buffer.__init__.
CONSTRUCTION = "Buffer construction"
# A "default" strategy built after construction maps the node's shared memory then (its first use).
FIRST_USE = "mapping the node's shared memory for a 'default' strategy set after Buffer construction"
# Groups made so far by this process, per (backend, global ranks): the n of the next name.
_made: Counter = Counter()
# Parameters of torch's internal constructor that group_over passes.
_HELPER_PARAMETERS = ("group_size", "group_rank", "global_ranks_in_group", "backend", "store", "group_name", "timeout")


def check_member(group: dist.ProcessGroup) -> None:
    """ValueError unless this process is a member of `group` (dist.new_group hands the ranks outside
    a group a placeholder, GroupMember.NON_GROUP_MEMBER, instead of a ProcessGroup)."""
    if not isinstance(group, dist.ProcessGroup) or dist.get_rank(group) < 0:
        raise ValueError(
            f"group must be a torch.distributed ProcessGroup this rank (global rank {dist.get_rank()}) "
            f"belongs to, got {group!r}; build a Buffer only on the ranks of its group"
        )


def torch_group_helper() -> Optional[Callable]:
    """A function (ranks, backend, timeout, name) -> ProcessGroup that makes a named group over the
    global `ranks` (group rank i = ranks[i]) with torch's internal constructor, rendezvousing only
    the members; None when this torch has no such constructor with the expected parameters."""
    c10d = dist.distributed_c10d
    helper = getattr(c10d, "_new_process_group_helper", None)
    world = getattr(c10d, "_world", None)
    if helper is None or not hasattr(world, "pg_group_ranks") or not hasattr(world, "pg_map"):
        return None
    try:
        parameters = inspect.signature(helper).parameters
    except (TypeError, ValueError):
        return None
    if any(name not in parameters for name in _HELPER_PARAMETERS):
        return None

    def make(ranks: Tuple[int, ...], backend: str, timeout: timedelta, name: str) -> dist.ProcessGroup:
        default_group = dist.group.WORLD
        _, store = world.pg_map[default_group]
        me = dist.get_rank()
        group, _ = helper(
            group_size=len(ranks),
            group_rank=ranks.index(me),
            global_ranks_in_group=list(ranks),
            backend=dist.Backend(backend),
            store=store,
            group_name=name,
            timeout=timeout,
        )
        # What new_group records after the constructor: global rank -> group rank.
        mapping: Dict[int, int] = {rank: index for index, rank in enumerate(ranks)}
        world.pg_group_ranks[group] = mapping
        return group

    return make


def group_over(group: dist.ProcessGroup, backend: str, timeout: Optional[timedelta] = None) -> dist.ProcessGroup:
    """A new process group over the ranks of `group`, with the same rank numbering (group rank i is
    rank i of the new group too). Collective over the ranks of `group` only.

    Args:
        backend: "gloo" or "hccl". timeout: of every collective on the new group (None: torch's default).
    """
    ranks = tuple(dist.get_process_group_ranks(group))  # global ranks, in group-rank order
    make = torch_group_helper()
    try:
        if make is None:
            options = {"use_local_synchronization": True}
            if list(ranks) != sorted(ranks):  # new_group sorts them unless told not to
                options["sort_ranks"] = False
            if timeout is not None:
                options["timeout"] = timeout
            return dist.new_group(list(ranks), backend=backend, **options)
        key = (backend, ranks)
        name = f"deep_ep/{backend}/{'_'.join(map(str, ranks))}/{_made[key]}"
        _made[key] += 1
        return make(ranks, backend, timeout if timeout is not None else dist.default_pg_timeout, name)
    except RuntimeError as error:  # the store's or the backend's rendezvous: a peer did not come
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    me = ranks.index(dist.get_rank())
    others = [r for r in range(len(ranks)) if r != me]
    outcome = "timed out" if "timeout" in text.lower() or "timed out" in text.lower() else "failed"
    # Raised outside the handler: the backend's exception and its frames are freed now.
    raise RuntimeError(
        f"deep_ep: rank {me} (global rank {ranks[me]}) {outcome} in {CONSTRUCTION} waiting for "
        f"ranks {others} (global ranks {[ranks[r] for r in others]}) to connect its {backend} group "
        f"({text}). Every rank of the group must construct the Buffer; a peer crashed, is stuck, or "
        "started it later than the timeout (DEEP_EP_TIMEOUT_S on CPU) allows."
    )
