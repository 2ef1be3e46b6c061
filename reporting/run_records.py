"""What a training run leaves in its folder besides checkpoints, each written so a killed run keeps what it had:

- `run.json`: the run's config, written at its start (atomic; a resumed run writes its own);
- `steps.jsonl`: rank 0's loss and learning rate at every step (its own micro batch), written every 50 steps and
  at each checkpoint (the losses stay on the device until then: one sync, not one per step);
- `metrics.jsonl`: one row per finished epoch (mean train loss over every rank, eval top-1/top-5);
- `ranks/rank<r>.json`: each rank's final state (steps, parameter digest), to check that ranks agree;
- `results.json` (atomic, last: it tells a caller that the run finished) and `training.png`.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from deit_pipe.distributed.context import RankContext
from deit_pipe.reporting.plots import plot_training, read_jsonl
from deit_pipe.storage.location import put_atomic

FLUSH_EVERY = 50  # steps between reads of the losses from the device


class RunRecords:
    def __init__(self, output: str, ctx: RankContext, config: dict):
        """Opens the records; rank 0 writes the run's config (`run.json`) first, so a run that dies early still
        says what it was."""
        self.output, self.ctx, self.config = output, ctx, config
        os.makedirs(output, exist_ok=True)
        self.metrics_path = os.path.join(output, "metrics.jsonl")
        steps_path = os.path.join(output, "steps.jsonl")
        if ctx.is_main:
            put_atomic(os.path.join(output, "run.json"), json.dumps(config, indent=1).encode())
            for path in (self.metrics_path, steps_path):
                _cut_torn_line(path)
        self._steps = open(steps_path, "a", buffering=1) if ctx.is_main else None
        self._pending: list[tuple] = []

    def step(self, epoch: int, step: int, total_steps: int, loss: torch.Tensor | float, lr: float) -> float | None:
        """Records a step; the losses are read from the device every FLUSH_EVERY steps, in one sync (a read per
        step would stall a GPU). Returns the newest loss read, when this step read them."""
        if self._steps is None:
            return None
        self._pending.append((epoch, step, total_steps, loss, lr))
        return self.flush() if len(self._pending) >= FLUSH_EVERY else None

    def flush(self) -> float | None:
        """Writes the pending steps' lines; returns the newest loss (None when nothing was pending)."""
        if not self._pending:
            return None
        losses = torch.stack([torch.as_tensor(p[3], dtype=torch.float32) for p in self._pending]).tolist()
        for (epoch, step, total_steps, _, lr), loss in zip(self._pending, losses, strict=True):
            self._steps.write(json.dumps({"epoch": epoch, "step": step, "total_steps": total_steps, "loss": loss,
                                          "lr": lr}) + "\n")
        self._pending.clear()
        return losses[-1]

    def epoch(self, row: dict) -> None:
        self.flush()
        if self.ctx.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def has_epoch(self, epoch: int, device: torch.device) -> bool:
        """Whether `epoch`'s row is written: rank 0 reads it and every rank takes its answer (ranks deciding apart
        would walk different collectives)."""
        written = self.ctx.is_main and os.path.exists(self.metrics_path) and any(
            r["epoch"] == epoch for r in read_jsonl(self.metrics_path))
        flag = torch.tensor([int(written)], device=device)
        if dist.is_initialized():
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def close(self) -> None:
        if self._steps is not None:
            self.flush()
            self._steps.close()

    def rank_state(self, state: dict) -> None:
        """This rank's file; rank 0 removes the files of ranks a run resumed on fewer ranks no longer has."""
        ranks_dir = os.path.join(self.output, "ranks")
        os.makedirs(ranks_dir, exist_ok=True)
        with open(os.path.join(ranks_dir, f"rank{self.ctx.rank}.json"), "w") as f:
            json.dump(state, f)
        if self.ctx.is_main:
            for name in os.listdir(ranks_dir):
                if int(name[len("rank"):-len(".json")]) >= self.ctx.world_size:
                    os.remove(os.path.join(ranks_dir, name))

    def finish(self, result: dict, title: str) -> dict:
        """The plot, then results.json with the last epoch's row as `final` and the run's config (rank 0)."""
        if self.ctx.is_main:
            rows = read_jsonl(self.metrics_path)
            result = {**result, "final": rows[-1] if rows else {}, "config": self.config}
            plot_training(self.metrics_path, os.path.join(self.output, "training.png"), title=title)
            put_atomic(os.path.join(self.output, "results.json"), json.dumps(result, indent=1).encode())
        return result


def _cut_torn_line(path: str) -> None:
    """Drop a last line a killed run left half-written: appended to, it would join the next row into one bad line."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass
