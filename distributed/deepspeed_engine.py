"""DeepSpeed: the config a run asks for, the engine around the student, and its whole parameters (for
evaluation and the digest ranks compare).

On a machine without CUDA it uses DeepSpeed's CPU accelerator with gloo; with CUDA, nccl on each rank's GPU
(distributed.context). The choice is made before deepspeed is imported, since DeepSpeed picks its accelerator
at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch

from deit_pipe.choices import Precision, check
from deit_pipe.distributed.context import RankContext, rank_device, torch_env_from_slurm
from deit_pipe.errors import InputError

COLLECTIVE_TIMEOUT = timedelta(hours=2)

# DeepSpeed 0.19 still calls torch.distributed collectives that torch 2.14 deprecates, and torch warns on every
# rank: nothing a user of deit-pipe can act on.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class EngineSpec:
    zero: int = 2
    precision: str = "bf16"  # bf16 | fp32
    micro_batch: int = 64
    grad_accum: int = 1
    grad_clip: float = 0.0  # DeiT trains without clipping
    user_config: str | None = None  # a DeepSpeed JSON whose keys override ours

    def __post_init__(self):
        # Stored as the plain string: it reaches messages and JSON (an Enum member prints as Precision.bf16).
        object.__setattr__(self, "precision", check(Precision, self.precision, "--precision"))

    def config(self, load_universal: bool = False) -> dict:
        """DeepSpeed's config; `load_universal` reads a universal checkpoint (a resume on another world size)."""
        if self.zero not in (0, 1, 2, 3):
            raise InputError(f"--zero must be 0, 1, 2 or 3, not {self.zero}")
        config = {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            "zero_optimization": {"stage": self.zero},
            "bf16": {"enabled": self.precision == "bf16"},
            # Gradients reduced in fp32, not summed in bf16 across many ranks (DeepSpeed's default for bf16).
            "communication_data_type": "fp32",
            "gradient_clipping": self.grad_clip,
            "steps_per_print": 1 << 30,  # our own progress bar and metrics replace DeepSpeed's prints
            "checkpoint": {"load_universal": load_universal},
        }
        if self.user_config:
            config = _merge(config, _read_json(self.user_config))
        return config


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"--ds-config {path}: {exc}") from None


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def select_accelerator(ctx: RankContext) -> torch.device:
    """This rank's GPU with nccl when CUDA is here, else DeepSpeed's CPU accelerator with gloo."""
    device = rank_device(None, ctx)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # An op a --ds-config has DeepSpeed build on a CPU (CPU Adam) makes torch warn "No CUDA runtime is found".
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return device


@contextlib.contextmanager
def quiet_stdout():
    """DeepSpeed prints its op builds and checkpoint conversions to stdout on every rank: kept out of a run's
    output, which is its progress and results (DeepSpeed's warnings and errors go through its logger)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def init_distributed(device: torch.device) -> None:
    import deepspeed

    torch_env_from_slurm()
    if "RANK" not in os.environ:
        # A plain single process: a world of one on a free local port (DeepSpeed would try MPI otherwise).
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    if device.type == "cpu":
        # DeepSpeed's CPU backend builds a shared-memory all-reduce with g++ at its first init in an environment
        # (40 s or more, and a compiler on every node) that only its inference all-reduce calls; training's
        # collectives go to gloo either way.
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    # Rank 0 alone converts a checkpoint to the universal form or writes the final export while the others
    # wait in a collective: torch's 10-minute default would end a large run there.
    with quiet_stdout():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   timeout=COLLECTIVE_TIMEOUT)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    import deepspeed

    with quiet_stdout():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if engine.bfloat16_enabled():
        # DeepSpeed casts parameters to bf16 but leaves buffers in fp32; batch norm then meets bf16
        # weights with fp32 running statistics and refuses (a RegNet student or teacher in bf16).
        for buffer in engine.module.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(torch.bfloat16)
    return engine


def input_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def full_parameters(engine, zero: int):
    """Whole parameters on every rank while in the context: ZeRO-3 keeps only slices between forwards, and
    evaluation and the digest touch the module outside the engine's forward."""
    from deepspeed.runtime.zero import GatheredParameters

    return GatheredParameters(list(engine.module.parameters()), enabled=zero == 3)


def param_digest(engine, zero: int) -> str:
    """sha256 of the full fp32 parameters, the same on every rank when the ranks agree."""
    h = hashlib.sha256()
    with full_parameters(engine, zero):
        for p in engine.module.parameters():
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
