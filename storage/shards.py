"""WebDataset tar shards: one deterministic tar per shard, committed atomically.

A sample is stored as `<key>.<ext>` (image bytes, ext = the format they really are), `<key>.cls`
(class index) and `<key>.idx` (the dense sample id), with the key the source path made safe.
Tar headers carry fixed mtime/owner so the same samples always give the same bytes: the bytes webdataset's
TarWriter writes, through tarfile as it does; read by webdataset's tar iterators.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from deit_pipe.errors import InputError
from deit_pipe.storage.location import open_url, put_atomic, read_bytes, storage_errors

IMAGE_EXTS = ("jpg", "png", "webp")
_OWNER = ("deit-pipe", "deit-pipe")  # uname, gname of every member
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
    """The tar webdataset's TarWriter(encoder=False, mtime=0, user=group="deit-pipe") writes, byte for byte: each
    sample's members in sorted extension order (cls, idx, then the image's) through tarfile, as TarWriter does,
    without importing webdataset here (it imports torch: a second of the shard stage's start-up, in every worker)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for s in samples:
            for ext, data in sorted({s.ext: s.image, "cls": str(s.label).encode(), "idx": str(s.idx).encode()}.items()):
                member = tarfile.TarInfo(f"{s.key}.{ext}")
                # mtime an int: a float one makes tarfile add a PAX header to every member (twice the bytes).
                member.size, member.mtime, member.mode, member.uname, member.gname = len(data), 0, 0o444, *_OWNER
                tar.addfile(member, io.BytesIO(data))
    return buf.getvalue()


def write_shard(url: str, name: str, samples: list[ShardSample]) -> ShardInfo:
    data = encode_shard(samples)
    put_atomic(url, data)
    return ShardInfo(name=name, num_samples=len(samples), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _record(rec: dict, url: str) -> ShardSample:
    ext = next((e for e in IMAGE_EXTS if e in rec), None)
    if ext is None or "cls" not in rec or "idx" not in rec:
        raise ValueError(f"{url}: sample {rec['__key__']} lacks an image, cls or idx member")
    return ShardSample(key=rec["__key__"], idx=int(rec["idx"]), label=int(rec["cls"]), image=rec[ext], ext=ext)


def _samples(tar_stream, url: str) -> Iterator[ShardSample]:
    from webdataset.tariterators import group_by_keys, tar_file_expander  # imports torch: readers only

    for rec in group_by_keys(tar_file_expander([{"url": url, "stream": tar_stream}])):
        yield _record(rec, url)


@contextmanager
def _listed(url: str):
    """A shard the manifest lists that is not there: the input's fault, in one line, whoever reads it."""
    try:
        yield
    except FileNotFoundError:
        raise InputError(f"read {url}: the manifest lists this shard, but it is not there") from None


def read_shard_bytes(url: str) -> bytes:
    """A committed shard's bytes, in one request."""
    with _listed(url):
        return read_bytes(url)


def decode_shard(data: bytes, url: str = "<memory>") -> Iterator[ShardSample]:
    return _samples(io.BytesIO(data), url)


def read_shard(url: str) -> Iterator[ShardSample]:
    """Stream a committed shard's samples in stored (idx) order."""
    with _listed(url), storage_errors("read", url), open_url(url, "rb") as f:
        yield from _samples(f, url)
