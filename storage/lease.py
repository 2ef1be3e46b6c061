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
import uuid
from dataclasses import asdict, dataclass

from deit_pipe.errors import InputError
from deit_pipe.storage.location import is_local, join, put_atomic, resolve, storage_errors, wait_until

LEASE_SECONDS = float(os.environ.get("DEIT_PIPE_LEASE_SECONDS", "120"))
FOLLOW_TIMEOUT = 600.0  # seconds a rank waits for its rank 0 to hold the lease


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: the process, the launch it belongs to, and when it last said it is alive."""

    host: str
    pid: int
    launch: str
    started: float
    renewed_at: float
    ended: bool = False

    @classmethod
    def this_process(cls, launch: str) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), launch, now, now)

    def is_alive(self, now: float) -> bool:
        if self.ended:
            return False
        if self.host == socket.gethostname():  # a process here can be asked directly
            return _process_exists(self.pid)
        return now - self.renewed_at <= LEASE_SECONDS

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        return f"pid {self.pid} on {self.host}, started {started}, renewed {max(0.0, now - self.renewed_at):.0f} s ago"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class LaunchLease:
    """The lease on one output, held by this process until `release` (or the process's end)."""

    def __init__(self, url: str, generation: int, holder: Holder):
        self.url = url
        self.generation = generation
        self.holder = holder
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name=f"lease {url}", daemon=True)

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
            if _create_if_absent(_key(url, generation + 1), _encode(me)):
                lease = cls(url, generation + 1, me)
                lease._drop_older()
                lease._renewer.start()
                return lease
            # Another launch took this generation first: look again (it is alive, so this refuses).

    @staticmethod
    def follow(output: str, what: str, launch: str) -> None:
        """A rank other than 0: wait until rank 0 of this launch holds the lease."""
        url = join(output, "_lease")

        def not_held() -> list[str]:
            _, current = _newest(url)
            return [] if current is not None and current.launch == launch else [url]

        wait_until(not_held, f"rank 0 to take the lease on {what} (another launch may hold it)", FOLLOW_TIMEOUT,
                   poll=0.5)

    # -- holding --------------------------------------------------------------------------------------

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            with contextlib.suppress(Exception):  # a failed renewal is retried; expiry allows three misses
                generation, current = _newest(self.url)
                if generation > self.generation:
                    self._lost(current)
                self.holder = Holder(**{**asdict(self.holder), "renewed_at": time.time()})
                put_atomic(_key(self.url, self.generation), _encode(self.holder))

    def _lost(self, winner: Holder | None) -> None:
        """Another launch took the output over (this one stopped renewing for too long): stop writing now."""
        by = winner.describe(time.time()) if winner else "another launch"
        print(f"deit-pipe: error: lost the lease on {self.url} to {by} after not renewing it for "
              f"{LEASE_SECONDS:.0f} s: this launch stops; committed work is kept", file=sys.stderr, flush=True)
        os._exit(3)  # from this thread, so no more writes of this launch can follow

    def _drop_older(self) -> None:
        fs, path = resolve(self.url)
        for generation in _generations(self.url):
            if generation < self.generation:
                with contextlib.suppress(FileNotFoundError), storage_errors("remove", self.url):
                    fs.rm_file(posixpath.join(path, f"{generation:08d}.json"))

    def release(self) -> None:
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join()
        self.holder = Holder(**{**asdict(self.holder), "renewed_at": time.time(), "ended": True})
        put_atomic(_key(self.url, self.generation), _encode(self.holder))

    def __enter__(self) -> LaunchLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def launch_lease(output: str, what: str, is_main: bool, launch: str):
    """Rank 0 holds `output`'s lease for the block; the other ranks enter once their rank 0 holds it."""
    if is_main:
        with LaunchLease.take(output, what, launch):
            yield
    else:
        LaunchLease.follow(output, what, launch)
        yield


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
    fs, path = resolve(_key(url, generations[-1]))
    try:
        with storage_errors("read", url):
            return generations[-1], Holder(**json.loads(fs.cat_file(path)))
    except FileNotFoundError:  # dropped by a newer generation's holder between the listing and the read
        return _newest(url)


def _create_if_absent(url: str, data: bytes) -> bool:
    """Write `url` only if no object is there: True if this call created it."""
    fs, path = resolve(url)
    if is_local(url):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with storage_errors("create", url):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)  # atomic, and fails if the name exists
                except FileExistsError:
                    return False
            return True
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    with storage_errors("create", url):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            # A retried PUT whose first try went through also lands here: then the object is ours.
            try:
                return fs.cat_file(path) == data
            except FileNotFoundError:
                return False
    return True
