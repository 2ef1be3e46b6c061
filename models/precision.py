"""The precision a teacher runs in: bf16 autocast, or exact fp32.

On a GPU, torch runs fp32 convolutions through cuDNN in TF32 by default (10-bit mantissa inputs), so an
"fp32" teacher on a GPU would not agree with the same teacher on a CPU beyond the third digit; exact fp32
turns TF32 off for the scope.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def inference_precision(device: torch.device, precision: str):
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def device_kind(device: torch.device) -> str:
    """What a store records of the device its teacher ran on."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
