"""DeepEP-Ascend's strategy API: the backends of normal and low-latency mode, and their registry.

A Buffer holds one normal strategy and one low-latency strategy, chosen once (by name or as an
instance) and replaceable between calls:

    from deep_ep.strategies import AlltoAllNormalCommStrategy
    buffer.normal_strategy = AlltoAllNormalCommStrategy(runtime=buffer.runtime, group=group)

Every strategy is built on a Buffer's `runtime` (the shared state: groups, shared memory, call
bookkeeping) and serves only that Buffer. The implementations live in deep_ep/strategies/.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from typing import Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.distributed as dist

from .env import USE_MODES
from .utils import EventOverlap


class NormalStrategy:
    """Names of the normal-mode strategies."""

    DEFAULT = "default"
    ALLTOALL = "alltoall"

    @classmethod
    def get_all_strategies(cls) -> list:
        return [cls.DEFAULT, cls.ALLTOALL]


class LowLatencyStrategy:
    """Names of the low-latency strategies."""

    DEFAULT = "default"
    OPS = "ops"
    ALLTOALL = "alltoall"

    @classmethod
    def get_all_strategies(cls) -> list:
        return [cls.DEFAULT, cls.OPS, cls.ALLTOALL]


# Every quant_mode name DeepEP-Ascend knows; deep_ep moves "bf16" and "int8" (utils.QUANT_MODES).
VALID_QUANT_MODES = frozenset({"bf16", "int8", "mx_fp8_e4m3", "mx_fp8_e5m2", "pertoken_fp8_e4m3", "mx_fp4_e2m1"})


class StrategyMap:
    """DEEP_USE_MODE -> (normal strategy, low-latency strategy)."""

    strategy_map = USE_MODES

    @classmethod
    def get_strategy(cls, deep_mode: str) -> Tuple[str, str]:
        key = deep_mode.lower()
        if key not in cls.strategy_map:
            raise ValueError(f"DEEP_USE_MODE must be one of {list(cls.strategy_map)}, got {deep_mode!r}")
        return cls.strategy_map[key]


class EPCommStrategy(ABC):
    """A backend of one mode over `group`. A strategy compares equal to its name."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self._group_name: Optional[str] = None
        self._runtime: Optional[weakref.ref] = None

    @property
    def runtime(self):
        """The Buffer this strategy was built on. Held weakly: the Buffer holds its strategies, and a
        cycle would keep it (and its gloo groups) alive until the garbage collector runs, at the latest
        during interpreter exit, when freeing a gloo group can abort the process."""
        runtime = self._runtime() if self._runtime is not None else None
        if runtime is None:
            raise RuntimeError(
                f"deep_ep: the Buffer this {type(self).__name__} was built on is gone; "
                "build the strategy with runtime=buffer.runtime of a live Buffer"
            )
        return runtime

    @runtime.setter
    def runtime(self, runtime) -> None:
        self._runtime = weakref.ref(runtime)

    @property
    def group_name(self) -> str:
        """The HCCL communicator name of the group ('' on CPU)."""
        if self._group_name is None:
            try:
                self._group_name = self.group._get_backend(torch.device("npu")).get_hccl_comm_name(self.rank)
            except (AttributeError, RuntimeError, ValueError):
                self._group_name = ""
        return self._group_name

    @property
    def group_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @abstractmethod
    def get_name(self) -> str:
        """The registry name of the strategy."""

    @abstractmethod
    def get_supported_modes(self) -> List[str]:
        """["normal"] or ["low_latency"]."""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.get_name() == other
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.get_name()!r})"


class NormalEPCommStrategy(EPCommStrategy):
    """A normal-mode backend: get_dispatch_layout, dispatch and combine (see deep_ep.Buffer)."""

    @abstractmethod
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Buffer.get_dispatch_layout."""

    @abstractmethod
    def dispatch(
        self,
        x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
        handle,
        num_tokens_per_rank,
        num_tokens_per_rdma_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        topk_idx,
        topk_weights,
        expert_alignment: int,
        num_worst_tokens: int,
        config,
        previous_event,
        async_finish: bool,
        allocate_on_comm_stream: bool,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor],
        quant_mode: Optional[str] = None,
    ):
        """Buffer.dispatch."""

    @abstractmethod
    def combine(
        self,
        x: torch.Tensor,
        handle,
        topk_weights: Optional[torch.Tensor],
        bias,
        config,
        previous_event,
        async_finish: bool,
        allocate_on_comm_stream: bool,
        combine_send_cost_stats: Optional[torch.Tensor],
    ):
        """Buffer.combine."""


class LowLatencyEPCommStrategy(EPCommStrategy):
    """A low-latency backend: low_latency_dispatch and low_latency_combine (see deep_ep.Buffer)."""

    @abstractmethod
    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor],
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        use_mxfp4: bool,
        async_finish: bool,
        return_recv_hook: bool,
        topk_weights: Optional[torch.Tensor],
        quant_mode: Optional[str],
    ) -> Tuple:
        """Buffer.low_latency_dispatch."""

    @abstractmethod
    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        zero_copy: bool,
        async_finish: bool,
        return_recv_hook: bool,
        out: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, EventOverlap, Callable]:
        """Buffer.low_latency_combine."""

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """Buffer.get_next_low_latency_combine_buffer; a strategy without a zero-copy buffer raises."""
        raise NotImplementedError(
            f"low-latency strategy {self.get_name()!r} has no zero-copy combine buffer; "
            "pass low_latency_combine a tensor of your own"
        )


# ==================== registry ====================
_NORMAL_STRATEGY_REGISTRY: Dict[str, Type[NormalEPCommStrategy]] = {}
_LOW_LATENCY_STRATEGY_REGISTRY: Dict[str, Type[LowLatencyEPCommStrategy]] = {}


def register_normal_strategy(name: str) -> Callable:
    """Class decorator: registers a normal-mode strategy under `name`."""

    def decorator(cls: Type[NormalEPCommStrategy]) -> Type[NormalEPCommStrategy]:
        _NORMAL_STRATEGY_REGISTRY[name] = cls
        return cls

    return decorator


def register_low_latency_strategy(name: str) -> Callable:
    """Class decorator: registers a low-latency strategy under `name`."""

    def decorator(cls: Type[LowLatencyEPCommStrategy]) -> Type[LowLatencyEPCommStrategy]:
        _LOW_LATENCY_STRATEGY_REGISTRY[name] = cls
        return cls

    return decorator


def _registered(registry: Dict[str, type], kind: str, name: str) -> type:
    from . import strategies  # noqa: F401  (the built-in strategies register themselves on import)

    if name not in registry:
        raise ValueError(f"Unknown {kind} strategy: {name!r}. Available: {list(registry)}")
    return registry[name]


def registered_normal_strategies() -> List[str]:
    """Names of every registered normal-mode strategy: the built-in ones and any registered since."""
    from . import strategies  # noqa: F401  (the built-in strategies register themselves on import)

    return list(_NORMAL_STRATEGY_REGISTRY)


def registered_low_latency_strategies() -> List[str]:
    """Names of every registered low-latency strategy: the built-in ones and any registered since."""
    from . import strategies  # noqa: F401

    return list(_LOW_LATENCY_STRATEGY_REGISTRY)


def get_normal_strategy(name: str) -> Type[NormalEPCommStrategy]:
    """The normal-mode strategy class registered under `name` (ValueError if none)."""
    return _registered(_NORMAL_STRATEGY_REGISTRY, "normal", name)


def get_low_latency_strategy(name: str) -> Type[LowLatencyEPCommStrategy]:
    """The low-latency strategy class registered under `name` (ValueError if none)."""
    return _registered(_LOW_LATENCY_STRATEGY_REGISTRY, "low latency", name)
