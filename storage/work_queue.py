"""Work shared by ranks that share only storage: the plan a folder is bound to, and a commit marker per unit.

A unit of work (a scanned batch of files, a shard, a store chunk) is done once its commit marker exists; the
marker is written last and atomically, so a killed run leaves work without a marker, and the rerun redoes
exactly that. The plan a work folder is bound to (the arguments and inputs everything is a function of) is
written once, by rank 0; a rerun with another plan is refused, so two runs' outputs never mix.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from deit_pipe.storage.location import (
    discard_partial,
    exists,
    join,
    put_atomic,
    read_bytes,
    resolve,
    storage_errors,
    wait_for,
    wait_until,
)

WAIT_TIMEOUT = 24 * 3600.0  # seconds a rank waits for the others' work before it gives up


def to_json(obj) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): equal objects give equal bytes on every rank."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def bind_plan(url: str, plan, is_main: bool) -> object:
    """The plan stored at `url`: rank 0 writes `plan` there if none is; every rank waits for it. The caller
    compares it with its own (a rerun finds the first run's)."""
    if is_main and not exists(url):
        put_atomic(url, to_json(plan))
    wait_for([url], "rank 0's plan", timeout=WAIT_TIMEOUT, poll=0.2)
    return json.loads(read_bytes(url))


@dataclass(frozen=True)
class CommitMarkers:
    """A folder of commit markers, one per finished unit, named by the caller."""

    url: str

    def marker(self, name: str) -> str:
        return join(self.url, name)

    def commit(self, name: str, content: bytes = b"") -> None:
        """Mark `name` done (only its one writer calls this)."""
        discard_partial(self.marker(name))
        put_atomic(self.marker(name), content)

    def is_committed(self, name: str) -> bool:
        fs, _ = resolve(self.url)
        fs.invalidate_cache()  # another process may have committed it since the last listing
        return exists(self.marker(name))

    def committed(self) -> set[str]:
        """The names of every finished marker, from one listing (a killed write's temporary file is not one)."""
        fs, path = resolve(self.url)
        fs.invalidate_cache()
        with storage_errors("list", self.url):
            found = fs.find(path, maxdepth=1)
        return {n for n in (posixpath.basename(p) for p in found) if ".tmp-" not in n}

    def wait(self, names: Iterable[str], what: str, poll: float = 1.0) -> None:
        """The barrier between ranks: block until every named marker exists, with one listing per poll (not one
        request per marker: a split of thousands of shards waits at the cost of a few)."""
        names = set(names)
        wait_until(lambda: sorted(self.marker(n) for n in names - self.committed()), what, WAIT_TIMEOUT, poll)

    def read(self, names: list[str]) -> list[bytes]:
        """The markers' contents, fetched concurrently on object stores."""
        if not names:
            return []
        fs, _ = resolve(self.url)
        paths = [resolve(self.marker(n))[1] for n in names]
        with storage_errors("read", self.url):
            contents = fs.cat(paths)
        return [contents[p] for p in paths]
