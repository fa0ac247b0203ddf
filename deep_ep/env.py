"""The environment variables DeepEP-Ascend reads, one function each (read at call time).

Every function validates its variable and raises ValueError naming it, the expected form and
the value found. docs/compat.md lists what each one does here and on DeepEP-Ascend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# The C environment's value, which os.environ's changes reach: one native call per read, where
# os.environ.get takes several Python frames (the normal-mode calls read a few variables each).
from deep_ep_cpp import any_set as _any_set
from deep_ep_cpp import getenv as _getenv

# DEEP_USE_MODE -> (normal strategy, low-latency strategy), as DeepEP-Ascend maps it.
USE_MODES = {"default": ("default", "default"), "alltoall": ("alltoall", "alltoall"), "ops": ("default", "ops")}

# Bounds of the long-sequence rounds (DeepEP-Ascend's limits).
MAX_ROUNDS = 256
MIN_TOKENS_PER_ROUND, MAX_TOKENS_PER_ROUND = 32, 8192
MAX_TOTAL_TOKENS = 131072


def _int(name: str, default: int, low: int, high: Optional[int] = None) -> int:
    value = _getenv(name)
    if value is None or value.strip() == "":
        return default
    text = value.strip()
    if not text.lstrip("-").isdigit() or int(text) < low or (high is not None and int(text) > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(text)


def _flag(name: str) -> bool:
    value = (_getenv(name) or "0").strip()
    if value in ("", "0", "false", "False"):
        return False
    if value in ("1", "true", "True"):
        return True
    raise ValueError(f"{name} must be 0 or 1, got {value!r}")


def use_mode() -> Optional[str]:
    """DEEP_USE_MODE: None when unset, else "default", "alltoall" or "ops" (any case, as upstream
    lower-cases it). It overrides the Buffer's normal_strategy / low_latency_strategy (USE_MODES)."""
    value = _getenv("DEEP_USE_MODE")
    if value is None or value.strip() == "":
        return None
    mode = value.strip().lower()
    if mode not in USE_MODES:
        raise ValueError(f"DEEP_USE_MODE must be one of {list(USE_MODES)} (any case), got {value!r}")
    return mode


def normal_int8_quant() -> bool:
    """DEEP_NORMAL_MODE_USE_INT8_QUANT=1: normal-mode dispatch quantizes x to per-token int8 when
    quant_mode is not given (deprecated upstream in favour of quant_mode="int8")."""
    return _flag("DEEP_NORMAL_MODE_USE_INT8_QUANT")


def expert_token_nums_type() -> int:
    """MOE_EXPERT_TOKEN_NUMS_TYPE: 1 (default) = received rows per local expert; 0 = their inclusive
    prefix sum. Applies to dispatch's num_recv_tokens_per_expert_list and to low_latency_dispatch's
    recv_count (and handle[5])."""
    return _int("MOE_EXPERT_TOKEN_NUMS_TYPE", 1, 0, 1)


def shared_expert_rank_num() -> int:
    """MOE_SHARED_EXPERT_RANK_NUM: how many leading ranks hold shared experts (default 0)."""
    return _int("MOE_SHARED_EXPERT_RANK_NUM", 0, 0)


def combine_long_seq_enabled() -> bool:
    """DEEPEP_NORMAL_COMBINE_ENABLE_LONG_SEQ=1: upstream's combine also runs in the long-sequence
    rounds. Accepted; combine's result does not depend on rounds here."""
    return _flag("DEEPEP_NORMAL_COMBINE_ENABLE_LONG_SEQ")


@dataclass(frozen=True)
class LongSeqRounds:
    """DEEPEP_NORMAL_LONG_SEQ_ROUND / DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS: normal mode counts
    tokens in `rounds` rounds of `per_round_tokens` tokens; get_dispatch_layout returns
    num_tokens_per_expert int32 [rounds * E] (round j counts tokens [j * P, (j + 1) * P)), and
    dispatch takes that tensor. Unset: one round of 8192 tokens, i.e. [E]."""

    rounds: int = 1
    per_round_tokens: int = MAX_TOKENS_PER_ROUND
    configured: bool = False  # the variables are set: at most rounds * per_round_tokens tokens per call


# The unset case, shared (the dataclass is frozen): every normal-mode call asks.
ONE_ROUND = LongSeqRounds()


def long_seq_rounds() -> LongSeqRounds:
    """The long-sequence rounds; both variables must be set together (ValueError otherwise)."""
    has_round = _getenv("DEEPEP_NORMAL_LONG_SEQ_ROUND") is not None
    has_tokens = _getenv("DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS") is not None
    if has_round != has_tokens:
        raise ValueError(
            "DEEPEP_NORMAL_LONG_SEQ_ROUND and DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS must be set or unset together"
        )
    if not has_round:
        return ONE_ROUND
    rounds = _int("DEEPEP_NORMAL_LONG_SEQ_ROUND", 1, 1, MAX_ROUNDS)
    tokens = _int(
        "DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS", MAX_TOKENS_PER_ROUND, MIN_TOKENS_PER_ROUND, MAX_TOKENS_PER_ROUND
    )
    if rounds * tokens > MAX_TOTAL_TOKENS:
        raise ValueError(
            f"DEEPEP_NORMAL_LONG_SEQ_ROUND ({rounds}) * DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS "
            f"({tokens}) must not exceed {MAX_TOTAL_TOKENS}"
        )
    return LongSeqRounds(rounds, tokens, True)


# What normal mode reads: in the usual case none is set, and one native call says so.
NORMAL_MODE_VARIABLES = (
    "DEEP_NORMAL_MODE_USE_INT8_QUANT",
    "MOE_EXPERT_TOKEN_NUMS_TYPE",
    "DEEPEP_NORMAL_LONG_SEQ_ROUND",
    "DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS",
)


@dataclass(frozen=True)
class NormalSettings:
    """The environment of one normal-mode call, read once at its start (normal_int8_quant,
    expert_token_nums_type and long_seq_rounds)."""

    int8_quant: bool = False
    expert_token_nums_type: int = 1
    rounds: LongSeqRounds = ONE_ROUND


UNSET_NORMAL_SETTINGS = NormalSettings()


def normal_settings() -> NormalSettings:
    """The normal-mode variables as they are now; ValueError as each variable's function raises it."""
    if not _any_set(NORMAL_MODE_VARIABLES):
        return UNSET_NORMAL_SETTINGS
    return NormalSettings(normal_int8_quant(), expert_token_nums_type(), long_seq_rounds())
