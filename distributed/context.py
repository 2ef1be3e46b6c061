"""Rank, world size and device from torchrun / the deepspeed launcher / srun, and the unit split among ranks.

srun starts every rank itself and sets only SLURM_* variables; `torch_env_from_slurm` maps them to the ones
torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so DeepSpeed does not fall
back to MPI discovery. Each rank takes the GPU of its local rank, or the one GPU it sees when the launcher gives
every task its own (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES per task).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deit_pipe.errors import InputError
from deit_pipe.storage.lease import Launch

if TYPE_CHECKING:
    import torch

_SRUN_TASKS = "SLURM_STEP_NUM_TASKS"  # set inside an srun step only (a batch script has SLURM_PROCID too)
# Set alike for every rank of one launch (storage.lease tells a launch's own rank 0 by them, and by its start and
# its launcher process on the same host).
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID",
                     "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "WORLD_SIZE")


@dataclass(frozen=True)
class RankContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> RankContext:
        """torch.distributed's variables (torchrun, DeepSpeed's launcher), else an srun step's, else one rank."""
        env = os.environ
        if "RANK" in env:
            rank, world, local = int(env["RANK"]), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
            local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", local + 1)))  # torchrun | deepspeed
        elif _SRUN_TASKS in env:
            rank, world, local = int(env["SLURM_PROCID"]), int(env[_SRUN_TASKS]), int(env.get("SLURM_LOCALID", 0))
            local_world = int(re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE", "1"))[0])
        else:
            return cls()
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, local, max(local_world, local + 1))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launch(self) -> Launch:
        """The launch these ranks share (storage.lease: rank 0 takes the output, the others follow it). Without a
        variable that names it alone (torchrun's rendezvous id, an srun step), two launches on one host may share
        the variables."""
        return Launch(";".join(f"{name}={os.environ.get(name, '')}" for name in _LAUNCH_VARIABLES),
                      has_no_id=not (os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_STEP_ID")))

    def my_units(self, units: list) -> list:
        """Round-robin split: unit u goes to rank u % world_size (disjoint, covers all)."""
        return units[self.rank :: self.world_size]


def loader_workers(ctx: RankContext) -> int:
    """The cores of this node shared among its ranks, less one each for the rank's own process: a GPU rank is
    fed by its workers alone (views are rebuilt on the CPU, about 8 ms each at 224 px)."""
    return max(1, len(os.sched_getaffinity(0)) // ctx.local_world_size - 1)


def torch_env_from_slurm(env=os.environ) -> None:
    """Inside an srun step without torchrun: the torch.distributed variables from SLURM's (nothing when RANK is
    set; nothing in a batch script outside srun, where SLURM_PROCID is set but no step runs tasks)."""
    if "RANK" in env or _SRUN_TASKS not in env:
        return
    nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", 1)))
    if nodes > 1 and "MASTER_ADDR" not in env:
        raise InputError(f"srun on {nodes} nodes: export MASTER_ADDR (the first node's address, e.g. "
                         "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)) before srun")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    # One port per job, so two jobs sharing a node do not meet.
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 40000))
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env[_SRUN_TASKS], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))


def _gpu_node() -> bool:
    """Whether this node has an NVIDIA GPU the process was not deliberately hidden from."""
    return os.path.exists("/dev/nvidia0") and os.environ.get("CUDA_VISIBLE_DEVICES") not in ("", "-1")


def rank_device(requested: str | None, ctx: RankContext) -> torch.device:
    """The device of this rank: `requested` as given unless it is "cuda" (cpu, cuda:1, mps, ...); for "cuda" or
    None (choose), the GPU of the local rank. Refuses more local ranks than GPUs, and CPU on a GPU node whose
    CUDA does not load unless the process was hidden from its GPUs."""
    import torch  # here, not at the top: the shard stage's RankContext has no device and should not load torch

    if requested is not None and requested != "cuda":
        return torch.device(requested)
    if not torch.cuda.is_available():
        if requested == "cuda" or _gpu_node():
            raise InputError("CUDA is not available to torch here (a CPU-only torch build, or a driver that does "
                             "not load): fix it, or run on CPU with CUDA_VISIBLE_DEVICES='' (teacher-logits and "
                             "verify-store: --device cpu)")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if ctx.local_world_size <= count:
        return torch.device("cuda", ctx.local_rank)
    if count == 1 and "SLURM_GPUS_PER_TASK" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        return torch.device("cuda", 0)  # srun --gpus-per-task=1: each task sees its own GPU as cuda:0
    raise InputError(f"{ctx.local_world_size} ranks on this node but {count} GPU(s) visible to each: start at "
                     f"most {count} ranks per node, or give each task its own GPU (srun --gpus-per-task=1)")
