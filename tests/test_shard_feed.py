"""The shard feed (data/shard_feed.py): each step with the bytes of the shards its pieces read, in shared memory,
each shard read once, at most `ahead` shards before the steps are asked for, a read's error raised at the step
that needs it, and no reader thread left behind; local shards left to the workers. The shards here are local, so
the tests ask for the reading the feed does for an object store (the S3 case: tests/test_requests.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from deit_pipe.data import shard_feed
from deit_pipe.data.shard_feed import ShardFeed
from deit_pipe.data.view_plan import ViewPiece
from deit_pipe.distributed.context import RankContext
from deit_pipe.errors import InputError
from deit_pipe.stages import shard as shard_stage
from deit_pipe.storage.manifest import shard_url

SPC = 12  # 16 shards of 12 and one of 8


@pytest.fixture(scope="module")
def shards(fmnist_folder, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("feed") / "shards"
    shard_stage.run(str(fmnist_folder), str(dest), shard_stage.ShardOptions(samples_per_shard=SPC), 1, RankContext())
    return str(dest)


def plan_of(epoch: int) -> list[list[ViewPiece]]:
    """Epoch e: three steps a shard over shards 2e .. 2e + 2, the last step of each shard also in the next one."""
    steps = []
    for shard in range(2 * epoch, 2 * epoch + 3):
        steps += [[ViewPiece(shard, 0, (0, 1))], [ViewPiece(shard, 0, (2,))],
                  [ViewPiece(shard, 0, (3,)), ViewPiece(shard + 1, 1, (0,))]]
    return steps


def counting(monkeypatch) -> list[str]:
    reads: list[str] = []
    real = shard_feed.read_shard_bytes

    def read(url: str) -> bytes:
        reads.append(url)
        return real(url)

    monkeypatch.setattr(shard_feed, "read_shard_bytes", read)
    return reads


def test_every_step_comes_with_its_shards_bytes_each_shard_read_once(shards, monkeypatch):
    reads = counting(monkeypatch)
    got = list(ShardFeed(shards, "train", plan_of, read_here=True).steps([(0, range(1, 9)), (1, range(0, 2))]))
    assert [(epoch, step) for epoch, step, _ in got] == [(0, s) for s in range(1, 9)] + [(1, 0), (1, 1)]
    for epoch, step, blobs in got:
        assert list(blobs) == list(dict.fromkeys(p.shard for p in plan_of(epoch)[step]))
        for shard, blob in blobs.items():
            assert blob.is_shared() and blob.numpy().tobytes() == Path(shard_url(shards, "train", shard)).read_bytes()
    # Epoch 1 starts at shard 2, one of the last two read: kept, as a step's end of one shard and start of the next.
    assert reads == [shard_url(shards, "train", s) for s in (0, 1, 2, 3)]


def test_shards_on_a_local_disk_are_left_to_the_workers(shards, monkeypatch):
    """The page cache shares a local shard's bytes among the workers already."""
    reads = counting(monkeypatch)
    got = list(ShardFeed(shards, "train", plan_of).steps([(0, range(2, 5))]))
    assert got == [(0, 2, {}), (0, 3, {}), (0, 4, {})] and reads == []


def settled(reads: list[str]) -> list[str]:
    """`reads` once they have not grown for 0.3 s: the reader waits."""
    seen, deadline = None, time.monotonic() + 10
    while seen != reads and time.monotonic() < deadline:
        seen = list(reads)
        time.sleep(0.3)
    return reads


def test_the_reader_reads_a_shard_only_while_the_steps_not_taken_hold_at_most_ahead(shards, monkeypatch):
    reads = counting(monkeypatch)
    steps = ShardFeed(shards, "train", plan_of, ahead=1, read_here=True).steps([(e, range(9)) for e in range(4)])
    next(steps)
    # Steps 1-4 hold shards 0 and 1: step 5 (shards 1 and 2) waits until step 2, the last with shard 0, is taken.
    assert settled(reads) == [shard_url(shards, "train", s) for s in (0, 1)]
    next(steps)
    assert settled(reads) == [shard_url(shards, "train", s) for s in (0, 1)]
    next(steps)
    assert settled(reads) == [shard_url(shards, "train", s) for s in (0, 1, 2)]
    steps.close()
    assert readers_left() == 0


def readers_left(at_most: int = 0) -> int:
    """The feeds' reader threads running once at most `at_most` are (or 10 s passed: a stopped reader ends at its
    next step)."""
    deadline = time.monotonic() + 10
    while True:
        running = sum(t.name == "shard-feed" for t in threading.enumerate())
        if running <= at_most or time.monotonic() >= deadline:
            return running
        time.sleep(0.05)


def test_a_shard_that_cannot_be_read_fails_the_step_that_needs_it_and_the_reader_stops(shards, tmp_path):
    broken = tmp_path / "shards"
    (broken / "train").mkdir(parents=True)
    for s in (0, 1):
        (broken / "train" / Path(shard_url(shards, "train", s)).name).write_bytes(
            Path(shard_url(shards, "train", s)).read_bytes())
    steps = ShardFeed(str(broken), "train", plan_of, read_here=True).steps([(0, range(9))])
    assert [step for _, step, _ in (next(steps) for _ in range(5))] == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match="train-000002.tar: the manifest lists this shard, but it is not there"):
        next(steps)  # step 5 also reads shard 2
    assert readers_left() == 0


def test_a_consumer_that_stops_early_stops_the_reader(shards):
    steps = ShardFeed(shards, "train", plan_of, read_here=True).steps([(e, range(9)) for e in range(5)])
    next(steps)
    steps.close()
    assert readers_left() == 0


def test_a_train_loader_closed_or_started_again_mid_pass_leaves_no_reader(shards, monkeypatch):
    """A persistent loader's pass given up for another (a resume, --max-steps) and TrainViews.close() mid-pass
    both end the pass's reader."""
    import functools

    from deit_pipe.data import view_dataset
    from deit_pipe.data.recipe import ViewRecipe
    from deit_pipe.data.schedule import EpochPlan
    from deit_pipe.data.view_dataset import TrainViews
    from deit_pipe.data.views import ViewMaker
    from deit_pipe.storage.manifest import ShardManifest

    monkeypatch.setattr(view_dataset, "ShardFeed", functools.partial(ShardFeed, read_here=True))
    manifest = ShardManifest.load(shards, "train")
    views = TrainViews(shards, manifest, ViewMaker(ViewRecipe(img_size=32), "train"),
                       lambda epoch: EpochPlan(manifest.num_samples, epoch, 3, 1, 8), rank=0, seed=0, store_url=None,
                       store_views=None, allow_view_reuse=False, workers=1)
    try:
        next(views.walk(0, 0, 1))
        second = views.walk(1, 0, 2)  # the persistent loader's next pass: the first one's sampler is dropped
        next(second)
        assert readers_left(at_most=1) == 1  # the second pass's only
    finally:
        views.close()
    assert readers_left() == 0
