"""How a teacher runs: its precision (bf16 autocast, or exact fp32) and its memory layout.

On a GPU, torch runs fp32 convolutions through cuDNN in TF32 by default (10-bit mantissa inputs), so an
"fp32" teacher on a GPU would not agree with the same teacher on a CPU beyond the third digit; exact fp32
turns TF32 off for the scope. A convnet teacher on a GPU runs channels_last (cuDNN's NHWC kernels); on a CPU
it keeps the layout every existing CPU-made store was computed in.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from deit_pipe.models.registry import is_vit


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


def teacher_on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The teacher on `device`: channels_last weights for a convnet on a GPU, which makes cuDNN run every
    convolution in NHWC (the input follows the weights)."""
    convnet_on_gpu = device.type == "cuda" and not is_vit(model.pretrained_cfg["architecture"])
    return model.to(device, memory_format=torch.channels_last if convnet_on_gpu else torch.preserve_format)


def device_kind(device: torch.device) -> str:
    """What a store records of the device its teacher ran on."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
