"""WebDataset tar shards: one deterministic tar per shard, committed atomically.

A sample is stored as `<key>.<ext>` (image bytes, ext = the format they really are), `<key>.cls`
(class index) and `<key>.idx` (the dense sample id), with the key the source path made safe.
Tar headers carry fixed mtime/owner so the same samples always give the same bytes. The layout is
webdataset's (members sorted by extension, as its TarWriter writes them) but written and read with the
standard library, so shard workers do not import webdataset (and with it torch).
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from deit_pipe.storage.location import open_url, put_atomic

IMAGE_EXTS = ("jpg", "png", "webp")
_UNSAFE = re.compile(r"[^A-Za-z0-9/-]")


def safe_key(relpath: str) -> str:
    """Injective, webdataset-safe key for a source path: every char outside [A-Za-z0-9/-] becomes _xx."""
    return _UNSAFE.sub(lambda m: "".join(f"_{b:02x}" for b in m.group().encode()), relpath)


@dataclass(frozen=True)
class ShardSample:
    key: str
    idx: int
    label: int
    image: bytes
    ext: str


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str


def encode_shard(samples: Iterable[ShardSample]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for s in samples:
            members = {s.ext: s.image, "cls": str(s.label).encode(), "idx": str(s.idx).encode()}
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size = len(members[ext])
                info.mtime = 0
                info.mode = 0o444
                info.uname = info.gname = "deit-pipe"
                tar.addfile(info, io.BytesIO(members[ext]))
    return buf.getvalue()


def write_shard(url: str, name: str, samples: list[ShardSample]) -> ShardInfo:
    data = encode_shard(samples)
    put_atomic(url, data)
    return ShardInfo(name=name, num_samples=len(samples), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _record(key: str, members: dict, url: str) -> ShardSample:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None or "cls" not in members or "idx" not in members:
        raise ValueError(f"{url}: sample {key} lacks an image, cls or idx member")
    return ShardSample(key=key, idx=int(members["idx"]), label=int(members["cls"]), image=members[ext], ext=ext)


def _samples(tar_stream, url: str) -> Iterator[ShardSample]:
    key, members = None, {}
    with tarfile.open(fileobj=tar_stream, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            member_key, ext = _split_member(info.name)
            if member_key != key and members:
                yield _record(key, members, url)
                members = {}
            key = member_key
            members[ext] = tar.extractfile(info).read()
    if members:
        yield _record(key, members, url)


def decode_shard(data: bytes, url: str = "<memory>") -> Iterator[ShardSample]:
    return _samples(io.BytesIO(data), url)


def read_shard(url: str) -> Iterator[ShardSample]:
    """Stream a committed shard's samples in stored (idx) order."""
    with open_url(url, "rb") as f:
        yield from _samples(f, url)
