"""A training run's DeepSpeed checkpoints: where each stands in the schedule, resuming, the final export.

Layout: `<dir>/global_step<T>/` (DeepSpeed's files) with `position.json` beside them (epoch, steps done in it,
total steps, world size, samples per step), written before DeepSpeed moves `latest`, so `latest` always names
a checkpoint whose position is known. A resume on the same world size continues at exactly (epoch, step); on
another world size the optimizer state comes through DeepSpeed's universal checkpoint (converted once, on rank
0), and the epoch's samples consumed so far become the step of the new world's plan that consumed as many
(rounded down to a whole gradient accumulation).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from argparse import Namespace
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from deit_pipe.distributed.context import RankContext
from deit_pipe.distributed.deepspeed_engine import quiet_stdout
from deit_pipe.errors import InputError
from deit_pipe.models.export import export_safetensors

_TAG = re.compile(r"global_step(\d+)(?:_universal)?")


@dataclass(frozen=True)
class Position:
    """Where a checkpoint stands in the schedule; `step` counts the steps done in `epoch`."""

    epoch: int
    step: int
    total_steps: int
    world_size: int
    samples_per_step: int  # micro batch x ranks when it was written


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from: its tag and position, and whether it goes through DeepSpeed's
    universal form (which must be chosen before the engine is built)."""

    tag: str
    position: Position
    universal: bool


class Checkpoints:
    """The checkpoints of one run folder, as one rank sees them."""

    def __init__(self, output: str, ctx: RankContext, samples_per_step: int, keep: int = 2):
        self.dir = os.path.join(output, "checkpoints")
        self.ctx = ctx
        self.samples_per_step = samples_per_step
        self.keep = keep  # the newest checkpoints kept on disk (torchtitan's keep_latest_k); 0: all

    def check_shared(self, wait_s: float = 30.0) -> None:
        """Every rank must see the one checkpoint folder (on several nodes: a shared filesystem), or the ranks
        would take different resume branches and hang in their first collective. Rank 0 leaves a token there;
        a rank that cannot see it (after `wait_s` for a network filesystem's caches) fails every rank alike."""
        token = [uuid.uuid4().hex if self.ctx.is_main else None]
        dist.broadcast_object_list(token, src=0)
        path = os.path.join(self.dir, f".shared-{token[0]}")
        if self.ctx.is_main:
            os.makedirs(self.dir, exist_ok=True)
            open(path, "w").close()
        dist.barrier()
        deadline = time.monotonic() + wait_s
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.5)
        views = [None] * self.ctx.world_size
        dist.all_gather_object(views, (os.path.exists(path), socket.gethostname()))
        if self.ctx.is_main:
            os.remove(path)
        blind = [(rank, host) for rank, (seen, host) in enumerate(views) if not seen]
        if blind:
            rank, host = blind[0]
            raise InputError(f"--output {os.path.dirname(self.dir)} is not shared: rank {rank} on {host} does not see "
                             f"rank 0's files there ({len(blind)} rank(s) blind); use a filesystem every node mounts")

    def latest(self) -> tuple[str, Position] | None:
        """(tag, position) of the checkpoint DeepSpeed's `latest` names, or None without one."""
        latest = os.path.join(self.dir, "latest")
        if not os.path.exists(latest):
            return None
        with open(latest) as f:
            tag = f.read().strip()
        with open(os.path.join(self.dir, tag, "position.json")) as f:
            return tag, Position(**json.load(f))

    def resume(self, zero: int, precision: str) -> Resume | None:
        """What a `--resume` continues from, or None when there is no checkpoint yet. ZeRO-0 in fp32 keeps the
        whole optimizer state in one file and needs no universal form on another world size."""
        found = self.latest()
        if found is None:
            return None
        tag, position = found
        if position.world_size == self.ctx.world_size:
            return Resume(tag, position, universal=False)
        if zero == 0 and precision == "bf16":
            # Its optimizer keeps fp32 masters per rank in files DeepSpeed's universal conversion cannot read.
            raise InputError(f"{tag} in {self.dir} was written by {position.world_size} ranks under ZeRO-0 bf16, "
                             f"which resumes only on {position.world_size} ranks (ZeRO 1-3 resume on any number)")
        return Resume(tag, position, universal=zero > 0)

    def save(self, engine, epoch: int, step: int, total_steps: int) -> None:
        tag = f"global_step{total_steps}"
        if self.ctx.is_main:
            # Before DeepSpeed's files: `latest` moves last, so it never names a checkpoint without a position.
            os.makedirs(os.path.join(self.dir, tag), exist_ok=True)
            position = Position(epoch, step, total_steps, self.ctx.world_size, self.samples_per_step)
            with open(os.path.join(self.dir, tag, "position.json"), "w") as f:
                json.dump(asdict(position), f)
        engine.save_checkpoint(self.dir, tag=tag)
        if self.ctx.is_main and self.keep:
            self._remove_older(total_steps, self.keep)

    def _remove_older(self, saved: int, keep: int) -> None:
        """Keep the checkpoint just saved (which `latest` names) and the keep - 1 before it, with their universal
        copies; remove the older ones."""
        found = {int(m[1]) for m in map(_TAG.fullmatch, os.listdir(self.dir)) if m}
        for step in sorted((s for s in found if s <= saved), reverse=True)[keep:]:
            for tag in (f"global_step{step}", f"global_step{step}_universal"):
                shutil.rmtree(os.path.join(self.dir, tag), ignore_errors=True)

    def load(self, engine, resume: Resume | None, grad_accum: int,
             steps_in: Callable[[int], int]) -> tuple[int, int, int]:
        """(epoch, step within it, total steps) to continue from; (0, 0, 0) without a checkpoint. A checkpoint at
        an epoch's end gives (epoch, its steps): the caller knows whether that epoch's row was written."""
        if resume is None:
            return 0, 0, 0
        tag = self._universal_copy(resume.tag) if resume.universal else resume.tag
        path, _ = engine.load_checkpoint(self.dir, tag=tag)
        if path is None:
            raise InputError(f"cannot load checkpoint {tag} in {self.dir}")
        pos = resume.position
        epoch, step = pos.epoch, pos.step
        if pos.samples_per_step != self.samples_per_step:
            step = pos.step * pos.samples_per_step // self.samples_per_step // grad_accum * grad_accum
        return epoch, min(step, steps_in(epoch)), pos.total_steps

    def _universal_copy(self, tag: str) -> str:
        """Convert checkpoint `tag` to DeepSpeed's universal form (rank 0, once); returns the new tag."""
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        universal_tag = f"{tag}_universal"
        if self.ctx.is_main:
            out = os.path.join(self.dir, universal_tag)
            shutil.rmtree(out, ignore_errors=True)  # a conversion killed half way
            with quiet_stdout():
                ds_to_universal(Namespace(input_folder=os.path.join(self.dir, tag), output_folder=out,
                                          num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                          strict=True, inject_missing_state=True))
        dist.barrier()
        return universal_tag

    def fp32_state(self, engine, zero: int) -> dict[str, torch.Tensor] | None:
        """The whole fp32 state dict on rank 0 (None elsewhere): the module's own under ZeRO-0, else gathered
        from the ZeRO partitions of the last checkpoint."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if zero > 0:
            dist.barrier()  # every rank's partition of the last checkpoint is on disk
        if not self.ctx.is_main:
            return None
        if zero == 0:
            return {k: v.float() for k, v in engine.module.state_dict().items()}
        with quiet_stdout():
            return get_fp32_state_dict_from_zero_checkpoint(self.dir)

    def export(self, engine, zero: int, build: Callable[[], torch.nn.Module], path: str) -> None:
        """The final model as safetensors (fp32), written by rank 0 into a fresh `build()`."""
        state = self.fp32_state(engine, zero)
        if state is not None:
            model = build()
            model.load_state_dict(state)
            export_safetensors(model, path)
