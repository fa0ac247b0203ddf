"""deep_ep: expert-parallel dispatch/combine for Mixture-of-Experts models.

DeepEP-Ascend's `Buffer` API, running on CPU ranks (shared memory inside a host,
torch.distributed between hosts) and on Ascend NPUs through torch_npu.
"""

from . import strategies as strategies  # registers the built-in strategies
from .buffer import Buffer, topk_idx_t
from .config import Config
from .ep_strategy import LowLatencyStrategy, NormalStrategy
from .fused import FuseMode, permute_gmm1_weight, unpermute_gmm1_weight
from .utils import EventOverlap

__all__ = [
    "Buffer",
    "Config",
    "EventOverlap",
    "FuseMode",
    "LowLatencyStrategy",
    "NormalStrategy",
    "permute_gmm1_weight",
    "topk_idx_t",
    "unpermute_gmm1_weight",
]
