"""One read of each shard a rank: the loader's steps come with the bytes of the shards they need.

A DataLoader deals its steps to the workers in turn, so the consecutive steps of one shard land on different
workers: had each worker read its shards itself, a rank with W workers would fetch each of them up to W times
(W times the bytes and requests on object storage). For shards on an object store, a thread of the rank's main
process reads each shard once, up to `ahead` shards before the steps that need it are asked for, into shared
memory, and each step carries the shards its pieces read: a worker receives them by reference (torch shares the
memory with the worker processes), not by copy. Shards on a local disk are read by the workers themselves:
the page cache already shares their bytes, and shared memory would cost more (a copy, and page faults in each
process) than it saves.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator

import numpy as np
import torch

from deit_pipe.data.view_plan import ViewPiece
from deit_pipe.storage.location import is_local
from deit_pipe.storage.manifest import shard_url
from deit_pipe.storage.shards import read_shard_bytes

Step = tuple[int, int, dict[int, torch.Tensor]]  # (epoch, step, {shard: its bytes in shared memory})
KEPT = 2  # shards the reader keeps at hand: a step can hold the end of one shard and the start of the next


def shared_bytes(data: bytes) -> torch.Tensor:
    """`data` as a uint8 tensor in shared memory: pickled to a worker process, it travels as a handle."""
    tensor = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(len(data)), 0, (len(data),))
    tensor.numpy()[:] = np.frombuffer(data, np.uint8)
    return tensor


class ShardFeed:
    def __init__(self, shards_root: str, split: str, plan_of: Callable[[int], list[list[ViewPiece]]],
                 ahead: int = 2, read_here: bool | None = None):
        """`read_here`: read the shards in this process (default: when they are not on a local disk)."""
        self.shards_root, self.split, self.plan_of, self.ahead = shards_root, split, plan_of, ahead
        self.read_here = not is_local(shards_root) if read_here is None else read_here

    def steps(self, spans: list[tuple[int, range]]) -> Iterator[Step]:
        """(epoch, step, the shards it reads) for each step of `spans` ([(epoch, steps)]), in order. The shards are
        read by a thread that reads a shard only while the steps it has made and this iterator not yet given hold
        at most `ahead` shards; an error reading one is raised here, where the step that needs it is asked for.
        Without `read_here`, the steps come with no shards.

        Closing the iterator (or dropping it) stops the thread at its next step; a read under way ends first, on
        the thread alone, which nothing waits for (a daemon)."""
        if not self.read_here:
            yield from ((epoch, step, {}) for epoch, steps in spans for step in steps)
            return
        pending = _Pending(self.ahead)
        thread = threading.Thread(target=self._read, args=(spans, pending), name="shard-feed", daemon=True)
        thread.start()
        try:
            while (step := pending.take()) is not None:
                yield step
        finally:
            pending.stop()

    def _read(self, spans: list[tuple[int, range]], pending: _Pending) -> None:
        recent: OrderedDict[int, torch.Tensor] = OrderedDict()
        try:
            for epoch, steps in spans:
                plan = self.plan_of(epoch) if steps else []
                for step in steps:
                    shards = {}
                    for shard in dict.fromkeys(piece.shard for piece in plan[step]):
                        if shard not in recent:
                            if not pending.wait_for_room():
                                return
                            recent[shard] = shared_bytes(read_shard_bytes(shard_url(self.shards_root, self.split,
                                                                                       shard)))
                            if len(recent) > KEPT:
                                recent.popitem(last=False)
                        shards[shard] = recent[shard]
                    if not pending.put((epoch, step, shards)):
                        return
            pending.put(None)
        except BaseException as exc:  # raised again in the loader's thread, which turns it into one line
            pending.put(exc)


class _Pending:
    """The steps read and not yet taken, and whether the reader may read another shard: while they hold at most
    `ahead` shards."""

    def __init__(self, ahead: int):
        self.ahead = ahead
        self._steps: deque = deque()
        self._cond = threading.Condition()
        self._stopped = False

    def _shards_held(self) -> int:
        return len({shard for entry in self._steps if isinstance(entry, tuple) for shard in entry[2]})

    def wait_for_room(self) -> bool:
        """Whether another shard may be read now (waiting until it may); False once the consumer has stopped."""
        with self._cond:
            self._cond.wait_for(lambda: self._stopped or self._shards_held() <= self.ahead)
            return not self._stopped

    def put(self, entry) -> bool:
        """Hand `entry` over; False once the consumer has stopped."""
        with self._cond:
            self._steps.append(entry)
            self._cond.notify_all()
            return not self._stopped

    def take(self) -> Step | None:
        with self._cond:
            self._cond.wait_for(lambda: self._steps)
            entry = self._steps.popleft()
            self._cond.notify_all()
        if isinstance(entry, BaseException):
            raise entry
        return entry

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._steps.clear()
            self._cond.notify_all()
