"""Row fields: the tensors that travel together, one row per token, viewed as bytes."""

from __future__ import annotations

import math

import torch


def as_byte_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with a leading row dimension, viewed as uint8 [rows, row_bytes]."""
    tensor = tensor.contiguous()
    if tensor.dim() == 2:  # the common case, one view (a dtype view rescales the last dimension)
        return tensor.view(torch.uint8)
    width = math.prod(tensor.shape[1:])
    return tensor.reshape(tensor.shape[0], width).view(torch.uint8)
