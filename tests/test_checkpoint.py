"""A run's checkpoints (distributed/checkpoint.py) without DeepSpeed: where a resume continues, hand-computed,
and the order that keeps `latest` pointing at a checkpoint whose position is known. The multi-process resume
tests (tests/test_train.py, slow) show the same on real engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

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
    (8, 1, 2, (1, 2, 13)),  # step 2 of an epoch of 2 steps: its end (whether its row is written is train's)
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


def test_a_zero0_bf16_checkpoint_resumes_on_its_own_world_only(tmp_path):
    """ZeRO-0 bf16 keeps its fp32 masters in per-rank files DeepSpeed's universal conversion cannot read."""
    out = stopped_run(tmp_path)
    assert Checkpoints(out, RankContext(0, 2), 16).resume(0, "bf16") == Resume("global_step13", STOPPED, False)
    with pytest.raises(InputError, match=r"^global_step13 in .* was written by 2 ranks under ZeRO-0 bf16, which "
                                         r"resumes only on 2 ranks \(ZeRO 1-3 resume on any number\)$"):
        Checkpoints(out, RankContext(0, 1), 8).resume(0, "bf16")


def test_only_the_newest_k_checkpoints_stay_with_their_universal_copies(tmp_path):
    checkpoints = Checkpoints(str(tmp_path), RankContext(0, 1), 8, keep=2)
    for total in (4, 8):
        checkpoints.save(FakeEngine(), 0, total, total)
    (tmp_path / "checkpoints" / "global_step8_universal").mkdir()  # a resume on another world size made it
    (tmp_path / "checkpoints" / "global_step4_universal").mkdir()
    checkpoints.save(FakeEngine(), 1, 4, 12)
    checkpoints.save(FakeEngine(), 1, 8, 16)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["global_step12", "global_step16", "latest"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step16"


def test_keep_0_keeps_every_checkpoint_and_other_ranks_remove_nothing(tmp_path):
    for keep, rank, expected in ((0, 0, 3), (1, 1, 3), (1, 0, 1)):
        out = tmp_path / f"{keep}-{rank}"
        checkpoints = Checkpoints(str(out), RankContext(rank, 2), 8, keep=keep)
        for total in (4, 8, 12):
            (out / "checkpoints" / f"global_step{total}").mkdir(parents=True)  # every rank's DeepSpeed files
            checkpoints.save(FakeEngine(), 0, total, total)
        assert len(list((out / "checkpoints").glob("global_step*"))) == expected, (keep, rank)


class TwoRanks:
    """torch.distributed's calls in check_shared as two ranks would see them: the other rank's answer given."""

    def __init__(self, monkeypatch, other_sees: bool, rank: int = 0):
        self.other_sees, self.rank = other_sees, rank
        monkeypatch.setattr(dist, "broadcast_object_list", self.broadcast)
        monkeypatch.setattr(dist, "barrier", lambda: None)
        monkeypatch.setattr(dist, "all_gather_object", self.all_gather)

    @staticmethod
    def broadcast(objects, src):
        objects[0] = objects[0] or "from-rank-0"

    def all_gather(self, out, mine):
        out[self.rank], out[1 - self.rank] = mine, (self.other_sees, "node-a" if self.rank else "node-b")


def test_a_shared_output_passes_and_leaves_no_token(tmp_path, monkeypatch):
    TwoRanks(monkeypatch, other_sees=True)
    Checkpoints(str(tmp_path), RankContext(0, 2), 16).check_shared(wait_s=0)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_an_output_a_rank_cannot_see_is_refused_on_every_rank(tmp_path, monkeypatch):
    """A node-local --output on several nodes: rank 1's node has its own empty folder."""
    TwoRanks(monkeypatch, other_sees=False)
    with pytest.raises(InputError, match=r"^--output .* is not shared: rank 1 on node-b does not see rank 0's files"):
        Checkpoints(str(tmp_path), RankContext(0, 2), 16).check_shared(wait_s=0)
    assert list((tmp_path / "checkpoints").iterdir()) == []
    TwoRanks(monkeypatch, other_sees=True, rank=1)  # rank 1 itself, whose folder lacks rank 0's token
    with pytest.raises(InputError, match=r"is not shared: rank 1 on [^ ]+ does not see"):
        Checkpoints(str(tmp_path / "node-b"), RankContext(1, 2), 16).check_shared(wait_s=0)


def test_retention_never_removes_the_checkpoint_just_saved(tmp_path):
    """Checkpoints of higher steps (a run this folder held before) are left alone, not ranked above the new one."""
    checkpoints = Checkpoints(str(tmp_path), RankContext(0, 1), 8, keep=2)
    for old in (900, 1000):
        (tmp_path / "checkpoints" / f"global_step{old}").mkdir(parents=True)
    for total in (4, 8, 12):
        checkpoints.save(FakeEngine(), 0, total, total)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("global_step*"))
    assert names == ["global_step1000", "global_step12", "global_step8", "global_step900"]
