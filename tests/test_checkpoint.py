"""A run's checkpoints (distributed/checkpoint.py) without DeepSpeed: where a resume continues, hand-computed,
and the order that keeps `latest` pointing at a checkpoint whose position is known. The multi-process resume
tests (tests/test_train.py, slow) show the same on real engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deit_pipe.distributed.checkpoint import Checkpoints, Position, Resume
from deit_pipe.distributed.context import RankContext
from deit_pipe.errors import InputError

# 2 ranks x micro batch 8 stopped 13 steps in: epoch 1, after 1 of its steps.
STOPPED = Position(epoch=1, step=1, total_steps=13, world_size=2, samples_per_step=16)


class FakeEngine:
    """The two DeepSpeed engine calls the checkpoints make, recorded."""

    def __init__(self, loads: bool = True):
        self.loads, self.saved, self.loaded = loads, [], []

    def save_checkpoint(self, directory, tag):
        position = Path(directory, tag, "position.json")
        self.saved.append((tag, position.exists()))  # was the position on disk before DeepSpeed's files?
        Path(directory).mkdir(parents=True, exist_ok=True)
        Path(directory, "latest").write_text(tag)

    def load_checkpoint(self, directory, tag):
        self.loaded.append(tag)
        return (str(Path(directory, tag)), {}) if self.loads else (None, None)


def stopped_run(tmp_path) -> str:
    Checkpoints(str(tmp_path), RankContext(0, 2), 16).save(FakeEngine(), 1, 1, 13)
    return str(tmp_path)


def test_save_writes_the_position_before_deepspeeds_files(tmp_path):
    engine = FakeEngine()
    Checkpoints(str(tmp_path), RankContext(0, 2), 16).save(engine, 1, 1, 13)
    assert engine.saved == [("global_step13", True)]
    assert json.loads((tmp_path / "checkpoints" / "global_step13" / "position.json").read_text()) == {
        "epoch": 1, "step": 1, "total_steps": 13, "world_size": 2, "samples_per_step": 16}
    engine = FakeEngine()
    Checkpoints(str(tmp_path / "rank1"), RankContext(1, 2), 16).save(engine, 1, 1, 13)
    assert engine.saved == [("global_step13", False)]  # rank 1 leaves the position to rank 0


@pytest.mark.parametrize("world,zero,precision,universal", [
    (2, 2, "bf16", False),  # same world: DeepSpeed's own files
    (1, 2, "fp32", True),  # another world under ZeRO: the universal form
    (1, 0, "bf16", True),  # ZeRO-0 in bf16 keeps fp32 masters per rank
    (1, 0, "fp32", False),  # ZeRO-0 in fp32: the whole state in one file
])
def test_resume_finds_the_latest_and_picks_the_universal_form_on_another_world(tmp_path, world, zero, precision,
                                                                               universal):
    out = stopped_run(tmp_path)
    assert Checkpoints(out, RankContext(0, world), 8 * world).resume(zero, precision) == Resume(
        "global_step13", STOPPED, universal)
    assert Checkpoints(str(tmp_path / "empty"), RankContext(0, world), 8).resume(zero, precision) is None


@pytest.mark.parametrize("samples_per_step,grad_accum,steps,expected", [
    (16, 1, 12, (1, 1, 13)),  # same world: exactly where it stopped
    (8, 1, 24, (1, 2, 13)),  # 1 rank: 16 samples consumed = 2 steps of 8
    (8, 4, 24, (1, 0, 13)),  # ... rounded down to a whole accumulation of 4: 0
    (4, 2, 48, (1, 4, 13)),  # 16 / 4 = 4 micro steps, a whole accumulation of 2
    (8, 1, 2, (2, 0, 13)),  # step 2 of an epoch of 2 steps: the next epoch's start
])
def test_load_continues_where_the_samples_consumed_say(tmp_path, samples_per_step, grad_accum, steps, expected):
    out = stopped_run(tmp_path)
    checkpoints = Checkpoints(out, RankContext(0, 1), samples_per_step)
    engine = FakeEngine()
    resume = Resume("global_step13", STOPPED, universal=False)
    assert checkpoints.load(engine, resume, grad_accum, lambda epoch: steps) == expected
    assert engine.loaded == ["global_step13"]
    assert checkpoints.load(engine, None, grad_accum, lambda epoch: steps) == (0, 0, 0)


def test_a_checkpoint_deepspeed_cannot_load_is_refused_by_name(tmp_path):
    checkpoints = Checkpoints(stopped_run(tmp_path), RankContext(0, 2), 16)
    with pytest.raises(InputError, match="cannot load checkpoint global_step13 in .*checkpoints"):
        checkpoints.load(FakeEngine(loads=False), Resume("global_step13", STOPPED, False), 1, lambda e: 12)
