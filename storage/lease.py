"""One launch at a time on an output (DESIGN, storage rules): a lease that expires, taken before any write.

A double-submitted job must not wipe or interleave with the first: the layout of a store is created, and its
units written, by the launch holding the output's lease; a second launch refuses in one line, naming the holder.

    <output>/_lease/<generation>.json    {host, pid, launch, started, renewed_at, ended}

A lease is taken by creating the next generation's object only if it is absent (os.link on a local disk, a
conditional PUT, If-None-Match: *, on an object store), so of two launches racing for it exactly one wins. Its
holder renews it every LEASE_SECONDS / 4 from a thread, and marks it ended when the launch ends (kept: the other
ranks of a launch whose rank 0 finished first still find it, and it says who wrote the output last). A lease whose
holder died (the same host, no such process) or stopped renewing for LEASE_SECONDS (another host: a killed node) may be
taken over, by the next generation: the holder that finds a newer generation at its next renewal has lost its
output and stops the process at once, before it writes more.

Rank 0 takes the lease; the other ranks of its launch (the same launcher variables, `launch`) wait until their
rank 0 holds it, so no rank of a refused launch ever writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

from deit_pipe.errors import InputError
from deit_pipe.rng_lock import GLOBAL_RNG_LOCK
from deit_pipe.storage.location import join, put_atomic, resolve, storage_errors, wait_until

LEASE_SECONDS = float(os.environ.get("DEIT_PIPE_LEASE_SECONDS", "120"))
FOLLOW_TIMEOUT = 600.0  # seconds a rank waits for its rank 0 to hold the lease
LAUNCH_SKEW = 60.0  # seconds a launcher may start rank 0 before the other ranks


@dataclass(frozen=True)
class Launch:
    """The launch a rank belongs to: the launcher's variables every rank of it shares (its rank 0's lease records
    them), and whether none of them names this launch alone (then its ranks tell their rank 0 by their launcher
    process: the deepspeed launcher on its default port)."""

    variables: str = ""
    has_no_id: bool = False


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: the process (its start, so a reused pid is not taken for it), its launcher process, the
    launch it belongs to, and when it last said it is alive."""

    host: str
    pid: int
    process_start: int  # /proc/<pid>/stat start time in clock ticks (0 where there is no /proc)
    ppid: int
    launch: str
    started: float
    renewed_at: float
    ended: bool = False

    @classmethod
    def this_process(cls, launch: str) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()), os.getppid(), launch, now, now)

    def is_alive(self, now: float) -> bool:
        if self.ended or now - self.renewed_at > LEASE_SECONDS:
            return False
        if self.host == socket.gethostname():  # a process here can be asked directly
            return _process_start(self.pid) == self.process_start
        return True

    def is_my_rank_0(self, launch: str, since: float, by_parent: bool) -> bool:
        """Whether this lease is the one rank 0 of the caller's launch took: the same launcher variables, taken
        after the caller's launch began and, where the launcher gives no launch id (`by_parent`: the deepspeed
        launcher on its default port), on the caller's host by a child of the caller's launcher."""
        return (self.launch == launch and self.started >= since - LAUNCH_SKEW
                and not (by_parent and self.host == socket.gethostname() and self.ppid != os.getppid()))

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        return f"pid {self.pid} on {self.host}, started {started}, renewed {max(0.0, now - self.renewed_at):.0f} s ago"


def _process_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None without such a process; 0 where there is no /proc
    (then a process that exists counts as the one recorded)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else _kill_0(pid)
    except (OSError, IndexError, ValueError):
        return _kill_0(pid)


def _kill_0(pid: int) -> int | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process
        pass
    return 0


class LaunchLease:
    """The lease on one output: held by rank 0 of a launch until `release`, watched by its other ranks."""

    def __init__(self, url: str, generation: int, holder: Holder, held: bool, since: float = 0.0,
                 by_parent: bool = False):
        self.url = url
        self.generation = generation
        self.holder = holder
        self.held = held  # rank 0 renews it; the other ranks only watch that it is still their launch's
        self.since, self.by_parent = since, by_parent  # (the other ranks) how they know their rank 0's lease
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name=f"lease {url}", daemon=True)
        self._watcher.start()

    # -- taking ---------------------------------------------------------------------------------------

    @classmethod
    def take(cls, output: str, what: str, launch: str = "") -> LaunchLease:
        """Hold `output`'s lease, or refuse in one line if another live launch holds it."""
        url = join(output, "_lease")
        me = Holder.this_process(launch)
        while True:
            generation, current = _newest(url)
            if current is not None and current.is_alive(time.time()):
                raise InputError(f"another launch is writing {what} ({current.describe(time.time())}): wait for it "
                                 f"to end; if it was killed on another host, its lease expires "
                                 f"{LEASE_SECONDS:.0f} s after its last renewal")
            if put_atomic(_key(url, generation + 1), _encode(me), exclusive=True):
                lease = cls(url, generation + 1, me, held=True)
                lease._drop_older()
                return lease
            # Another launch took this generation first: look again (it is alive, so this refuses).

    @classmethod
    def follow(cls, output: str, what: str, launch: str, by_parent: bool = False) -> LaunchLease:
        """A rank other than 0: wait until rank 0 of this launch holds the lease, then watch it."""
        url, since = join(output, "_lease"), _launch_began()
        found: list[tuple[int, Holder]] = []

        def not_held() -> list[str]:
            generation, current = _newest(url)
            if current is not None and current.is_my_rank_0(launch, since, by_parent):
                found.append((generation, current))
                return []
            return [url]

        wait_until(not_held, f"rank 0 to take the lease on {what} (another launch may hold it)", FOLLOW_TIMEOUT,
                   poll=0.5)
        return cls(url, *found[-1], held=False, since=since, by_parent=by_parent)

    # -- holding --------------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Every LEASE_SECONDS / 4: stop the process if the lease went to another launch (a newer generation, or
        another holder in this one: a store that ignored the conditional PUT); rank 0 renews it."""
        while not self._stop.wait(LEASE_SECONDS / 4):
            # The lock: botocore draws its retry jitter from python's global `random`, which the views of this
            # process must have to themselves.
            with GLOBAL_RNG_LOCK, contextlib.suppress(Exception):  # a failed look or renewal is retried (3 misses)
                generation, current = _newest(self.url)
                ours = current is None or (generation == self.generation and _same_process(current, self.holder))
                if not ours and not self.held and current.is_my_rank_0(self.holder.launch, self.since, self.by_parent):
                    # The lease this rank found was an earlier launch's; its own rank 0 holds the newer one.
                    self.generation, self.holder = generation, current
                elif not ours and generation >= self.generation:
                    self._lost(current)
                if self.held:
                    self.holder = Holder(**{**asdict(self.holder), "renewed_at": time.time()})
                    put_atomic(_key(self.url, self.generation), _encode(self.holder))

    def _lost(self, winner: Holder | None) -> None:
        """Another launch took the output over (this one stopped renewing for too long): stop writing now."""
        by = winner.describe(time.time()) if winner else "another launch"
        print(f"deit-pipe: error: lost the lease on {self.url} to {by} after not renewing it for "
              f"{LEASE_SECONDS:.0f} s: this launch stops; committed work is kept", file=sys.stderr, flush=True)
        os._exit(3)  # from this thread, so no more writes of this process can follow

    def _drop_older(self) -> None:
        fs, path = resolve(self.url)
        for generation in _generations(self.url):
            if generation < self.generation:
                with contextlib.suppress(FileNotFoundError), storage_errors("remove", self.url):
                    fs.rm_file(posixpath.join(path, f"{generation:08d}.json"))

    def release(self) -> None:
        """Stop watching; rank 0 marks the lease ended."""
        self._stop.set()
        self._watcher.join()
        if self.held:
            self.holder = Holder(**{**asdict(self.holder), "renewed_at": time.time(), "ended": True})
            put_atomic(_key(self.url, self.generation), _encode(self.holder))

    def __enter__(self) -> LaunchLease:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.release()
        else:  # the error on its way out is the one to report, not a failed release behind it
            with contextlib.suppress(Exception):
                self.release()


def launch_lease(output: str, what: str, is_main: bool, launch: Launch) -> LaunchLease:
    """Rank 0 takes `output`'s lease; the other ranks return once their rank 0 holds it. Use it with `with`."""
    if is_main:
        return LaunchLease.take(output, what, launch.variables)
    return LaunchLease.follow(output, what, launch.variables, by_parent=launch.has_no_id)


def _launch_began() -> float:
    """When this process's launcher started it (the process's own start time; now without /proc)."""
    try:
        ticks = _process_start(os.getpid()) or 0
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK") if ticks else time.time()
    except (OSError, ValueError):
        return time.time()


def _same_process(a: Holder, b: Holder) -> bool:
    return (a.host, a.pid, a.process_start, a.started) == (b.host, b.pid, b.process_start, b.started)


def _key(url: str, generation: int) -> str:
    return join(url, f"{generation:08d}.json")


def _encode(holder: Holder) -> bytes:
    return json.dumps(asdict(holder), sort_keys=True).encode()


def _generations(url: str) -> list[int]:
    fs, path = resolve(url)
    fs.invalidate_cache()
    with storage_errors("list", url):
        try:
            names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def _newest(url: str) -> tuple[int, Holder | None]:
    """(the newest generation, its holder); (0, None) when no lease was ever taken."""
    generations = _generations(url)
    if not generations:
        return 0, None
    key = _key(url, generations[-1])
    fs, path = resolve(key)
    try:
        with storage_errors("read", url):
            record = fs.cat_file(path)
    except FileNotFoundError:  # dropped by a newer generation's holder between the listing and the read
        return _newest(url)
    try:
        return generations[-1], Holder(**json.loads(record))
    except (ValueError, TypeError):
        raise InputError(f"{key} is not a lease deit-pipe wrote: remove it if no launch is writing there") from None
