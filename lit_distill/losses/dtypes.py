"""The precision losses compute in."""

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for half-precision (and fp32) inputs, so losses never accumulate in bf16/fp16; float64 stays float64
    (for gradcheck)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype
