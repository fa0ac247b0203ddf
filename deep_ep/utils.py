"""Small shared pieces: EventOverlap, environment settings, dtype codes, argument checks."""

from __future__ import annotations

import functools
import os
from typing import Any, Optional, Sequence

import torch

# dtype codes understood by deep_ep_cpp (float64 only for combine's partial sums).
NATIVE_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
# What token rows and expert outputs may be.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# dtype of topk_idx, as DeepEP's `deep_ep.topk_idx_t`.
topk_idx_t = torch.int64
# Most columns (top-k) a topk_idx may have.
MAX_TOPK = 16
# quant_mode values of dispatch: bf16 rows as given, or per-token dynamic int8.
QUANT_MODES = ("bf16", "int8")
# DeepEP-Ascend's other formats (A5 / C310 hardware): a ValueError naming the format, never a fallback.
UNAVAILABLE_QUANT_MODES = {
    "mx_fp8_e4m3": "MXFP8 e4m3",
    "mx_fp8_e5m2": "MXFP8 e5m2",
    "pertoken_fp8_e4m3": "per-token FP8 e4m3",
    "mx_fp4_e2m1": "MXFP4 e2m1",
}


class EventOverlap:
    """DeepEP's handle for asynchronous work. On CPU every call completes before it
    returns, so the event is always complete; on NPU it wraps a device event."""

    def __init__(self, event: Optional[Any] = None, extra_tensors: Optional[tuple] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            self.event.wait()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.current_stream_wait()


def timeout_seconds() -> float:
    """Deadline of every wait on a peer (env DEEP_EP_TIMEOUT_S, default 100 s)."""
    value = os.environ.get("DEEP_EP_TIMEOUT_S", "100")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"DEEP_EP_TIMEOUT_S must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise ValueError(f"DEEP_EP_TIMEOUT_S must be positive, got {value!r}")
    return seconds


# Where the CPU quota of this process's cgroup is read (cgroup v2, then v1).
CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_CPU_DIR = "/sys/fs/cgroup/cpu"


def _read_first_line(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return None


def cgroup_cpu_limit(cpu_max_path: str = CGROUP_V2_CPU_MAX, cpu_dir_v1: str = CGROUP_V1_CPU_DIR) -> Optional[float]:
    """Cores the cgroup's CPU quota grants (quota / period, may be fractional), None without a quota.

    cgroup v2: `cpu_max_path` holds "max 100000" (no quota) or "<quota> <period>"; else cgroup v1:
    `cpu_dir_v1`/cpu.cfs_quota_us (-1: no quota) and cpu.cfs_period_us. Missing or unreadable
    files mean no quota."""
    line = _read_first_line(cpu_max_path)
    if line is not None:
        fields = line.split()
        quota, period = (fields + ["max", "100000"])[:2]
    else:
        quota = _read_first_line(os.path.join(cpu_dir_v1, "cpu.cfs_quota_us"))
        period = _read_first_line(os.path.join(cpu_dir_v1, "cpu.cfs_period_us"))
    try:
        quota_us, period_us = int(quota), int(period)
    except (TypeError, ValueError):  # "max", absent or garbled: no quota
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return quota_us / period_us


@functools.lru_cache(maxsize=None)
def _cached_cgroup_cpu_limit() -> Optional[float]:
    # Read once per process: the calls on the hot path must not reopen /sys files.
    return cgroup_cpu_limit()


def usable_cores(cgroup_limit: Optional[float] = None) -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup CPU quota
    (`cgroup_limit` cores; default: this process's cgroup, read once)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (not Linux)
        cores = os.cpu_count() or 1
    limit = _cached_cgroup_cpu_limit() if cgroup_limit is None else cgroup_limit
    if limit is not None:
        cores = min(cores, max(1, int(limit)))
    return max(1, cores)


def num_threads(local_ranks: int = 1, cgroup_limit: Optional[float] = None) -> int:
    """Threads a native kernel of one rank may use: the usable cores shared by the `local_ranks`
    ranks of its Buffer on this host (at least 1), or env DEEP_EP_NUM_THREADS (a positive int).
    Independent of torch.get_num_threads(): callers that keep torch's default (every core per
    process) must not make the ranks' kernels oversubscribe the cores."""
    value = os.environ.get("DEEP_EP_NUM_THREADS", "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads <= 0:
            raise ValueError(f"DEEP_EP_NUM_THREADS must be a positive int (threads per rank), got {value!r}")
        return threads
    return max(1, usable_cores(cgroup_limit) // max(1, local_ranks))


def check_tensor(
    name: str,
    value: Any,
    *,
    dtypes: Sequence[torch.dtype],
    shape: Sequence[Optional[int]],
    device: Optional[torch.device] = None,
    what: Optional[str] = None,
) -> torch.Tensor:
    """Raises TypeError/ValueError naming `name`, the expectation and what was given.
    `shape` entries of None match any size; `what` says where the expected shape comes from
    (for example "[L, 2I] of w13") and is shown after it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        wanted = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {wanted}, got {value.dtype}")
    # A plain loop: this runs several times per call, and a generator costs a frame per size.
    mismatch = value.ndim != len(shape)
    if not mismatch:
        for want, got in zip(shape, value.shape):
            if want is not None and want != got:
                mismatch = True
                break
    if mismatch:
        wanted = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        if what:
            wanted += f" ({what})"
        if value.ndim != len(shape):
            raise ValueError(f"{name} must have shape {wanted}, a {len(shape)}-D tensor, got {list(value.shape)}")
        raise ValueError(f"{name} must have shape {wanted}, got {list(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on device {device}, got {value.device}")
    return value


def check_one_of(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_combine_topk_idx(topk_idx: torch.Tensor, dispatched: torch.Tensor) -> None:
    """ValueError unless low-latency combine's topk_idx (int64 [T, K]) is the dispatch's, where entries
    may have been set to -1 since (to leave them out of the sum)."""
    if topk_idx is dispatched or torch.equal(topk_idx, dispatched):
        return
    kept = topk_idx >= 0
    if not torch.equal(topk_idx[kept], dispatched[kept]):
        raise ValueError(
            "topk_idx must be the one given to low_latency_dispatch (entries may be set to -1 to leave them out)"
        )


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_num_topk(num_topk: int) -> None:
    if not 1 <= num_topk <= MAX_TOPK:
        raise ValueError(f"topk_idx must have 1 to {MAX_TOPK} columns (top-k), got {num_topk}")


def resolve_quant_mode(quant_mode: Optional[str], int8_by_default: bool) -> str:
    """quant_mode if given (one of QUANT_MODES), else "int8" or "bf16" as `int8_by_default` says."""
    if quant_mode in UNAVAILABLE_QUANT_MODES:
        raise ValueError(
            f"quant_mode={quant_mode!r} ({UNAVAILABLE_QUANT_MODES[quant_mode]}) is not available in "
            f"deep_ep (DeepEP-Ascend runs it on A5 NPUs only); use one of {list(QUANT_MODES)}"
        )
    if quant_mode is not None:
        check_one_of("quant_mode", quant_mode, QUANT_MODES)
        return quant_mode
    return "int8" if int8_by_default else "bf16"


def low_latency_quant_mode(quant_mode: Optional[str], use_fp8: bool, use_ue8m0: bool, use_mxfp4: bool) -> str:
    """low_latency_dispatch's format, mapped as DeepEP-Ascend maps its flags when quant_mode is None:
    use_mxfp4 -> MXFP4, use_fp8 with use_ue8m0 -> MXFP8, use_fp8 -> int8, else bf16. Formats deep_ep
    cannot move are a ValueError naming them."""
    if quant_mode is None:
        if use_mxfp4:
            quant_mode = "mx_fp4_e2m1"
        elif use_fp8 and use_ue8m0:
            quant_mode = "mx_fp8_e4m3"
    return resolve_quant_mode(quant_mode, bool(use_fp8))


def check_low_latency_x(x: Any, quant: str) -> str:
    """TypeError unless x is a tensor low-latency dispatch can send in format `quant` ("int8": any float
    dtype, quantized on the way; "bf16": bfloat16 or float16 as is). Returns quant."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [T, H], got {type(x).__name__}")
    if quant == "int8" and x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"x of dtype {x.dtype} cannot be quantized to int8 (use_fp8=True / quant_mode='int8'); "
            "pass bfloat16, float16 or float32"
        )
    if quant == "bf16" and x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(
            f"x must be bfloat16 or float16 without int8 quantization (use_fp8=False / "
            f"quant_mode='bf16'), got {x.dtype}"
        )
    return quant
