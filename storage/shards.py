"""WebDataset tar shards: one deterministic tar per shard, committed atomically.

A sample is stored as `<key>.<ext>` (image bytes, ext = the format they really are), `<key>.cls`
(class index) and `<key>.idx` (the dense sample id), with the key the source path made safe.
Tar headers carry fixed mtime/owner so the same samples always give the same bytes: the bytes webdataset's
TarWriter writes, each header made by tarfile (TarInfo.tobuf) and laid out as TarFile lays it out. Read from an
index of the members' headers, grouped into samples by webdataset's rule: a sample's image is a view into the
shard's bytes, never copied.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from deit_pipe.errors import InputError
from deit_pipe.storage.location import map_bytes, put_atomic, read_bytes

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
    image: bytes | memoryview  # read from a shard: a view into its bytes
    ext: str


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str


def encode_shard(samples: Iterable[ShardSample]) -> bytes:
    """The tar webdataset's TarWriter(encoder=False, mtime=0, user=group="deit-pipe") writes, byte for byte: each
    sample's members in sorted extension order (cls, idx, then the image's), every header made by tarfile's
    TarInfo.tobuf in the PAX format, as TarFile.addfile makes it (addfile's copy of each TarInfo and its file
    object cost a third of the time), without importing webdataset here (it imports torch: a second of the shard
    stage's start-up, in every worker)."""
    blocks, size = [], 0
    for s in samples:
        for ext, data in sorted({s.ext: s.image, "cls": str(s.label).encode(), "idx": str(s.idx).encode()}.items()):
            member = tarfile.TarInfo(f"{s.key}.{ext}")
            # mtime an int: a float one makes tarfile add a PAX header to every member (twice the bytes).
            member.size, member.mtime, member.mode, member.uname, member.gname = len(data), 0, 0o444, *_OWNER
            header = member.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
            padding = -len(data) % tarfile.BLOCKSIZE
            blocks += [header, data, bytes(padding)]
            size += len(header) + len(data) + padding
    # TarFile.close: two zero blocks end the archive, then zeros up to a whole record.
    end = 2 * tarfile.BLOCKSIZE
    end += -(size + end) % tarfile.RECORDSIZE
    blocks.append(bytes(end))
    return b"".join(blocks)


def write_shard(url: str, name: str, samples: list[ShardSample]) -> ShardInfo:
    data = encode_shard(samples)
    put_atomic(url, data)
    return ShardInfo(name=name, num_samples=len(samples), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _record(rec: dict, url: str) -> ShardSample:
    ext = next((e for e in IMAGE_EXTS if e in rec), None)
    if ext is None or "cls" not in rec or "idx" not in rec:
        raise InputError(f"read {url}: sample {rec['__key__']} lacks an image, cls or idx member")
    try:
        idx, label = int(bytes(rec["idx"])), int(bytes(rec["cls"]))
    except ValueError:
        raise InputError(f"read {url}: sample {rec['__key__']}'s idx or cls member is not a number") from None
    return ShardSample(key=rec["__key__"], idx=idx, label=label, image=rec[ext], ext=ext)


_BLOCK = 512
_END = bytes(_BLOCK)  # a zero block ends the archive


def _plain_members(data: memoryview, url: str) -> list[tuple[str, memoryview]] | None:
    """(name, bytes) of each member, in order, for a tar of plain ustar file members (every shard this stage
    writes: its keys are ASCII and short); None for any other tar.

    A loader worker indexes every shard it has a step of, and a rank's steps of one shard go to as many workers as
    the shard has steps: tarfile's headers cost 20 us each (60 ms a 1,000-sample shard, in each such worker), these
    3 us, and webdataset's stream copies every member's bytes too (200 ms). Headers are checked as tarfile checks
    them (their checksums, all at once at the end); the bytes stay where they are."""
    heads, members, pos = [], [], 0
    while len(head := data[pos : pos + _BLOCK]) == _BLOCK and head != _END:
        try:
            # Anything but a regular file named in the name field alone (PAX or GNU records, links, a name split
            # into the prefix field, a size in base-256) is read by tarfile.
            plain = head[257:262] == b"ustar" and head[156] in (0x30, 0) and head[345] == 0
            size = int(bytes(head[124:136]).rstrip(b"\0 ") or b"0", 8) if plain else -1
        except ValueError:
            size = -1
        if size < 0:
            _check_sums(data, [*heads, pos], url)  # a damaged header is not tarfile's to read (it would stop there)
            return None
        heads.append(pos)
        members.append((bytes(head[:100]).split(b"\0", 1)[0].decode("utf-8", "surrogateescape"),
                        data[pos + _BLOCK : pos + _BLOCK + size]))
        pos += _BLOCK + -(-size // _BLOCK) * _BLOCK
    _check_sums(data, heads, url)
    _check_end(data, pos, url)
    return members


def _check_sums(data: memoryview, heads: list[int], url: str) -> None:
    """tarfile's checksum, of the headers at `heads` at once: a header's bytes summed as unsigned or as signed
    bytes (old tars), its checksum field's read as 8 spaces."""
    end = len(data) - len(data) % _BLOCK
    blocks = np.frombuffer(data, np.uint8, count=end).reshape(-1, _BLOCK)[np.asarray(heads, np.int64) // _BLOCK]
    sums = [(b.sum(1, dtype=np.int64) - b[:, 148:156].sum(1, dtype=np.int64) + 8 * 0x20).tolist()
            for b in (blocks, blocks.view(np.int8))]
    for head, unsigned, signed in zip(heads, *sums, strict=True):
        try:
            stored = int(bytes(data[head + 148 : head + 156]).rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            stored = -1
        if stored not in (unsigned, signed):
            raise InputError(f"read {url}: the tar header at byte {head} is damaged (shard it again)")


def _check_end(data: memoryview, pos: int, url: str) -> None:
    """An end-of-archive block at `pos` and nothing but zeros after it: a reader that stops at a damaged, zeroed or
    missing header would otherwise end the shard there, its later samples gone without a word (tarfile does)."""
    if len(data) - pos < _BLOCK:
        raise InputError(f"read {url}: the shard is cut short at byte {len(data)} (damaged: shard it again)")
    if np.count_nonzero(np.frombuffer(data[pos:], np.uint8)):
        raise InputError(f"read {url}: the shard's members end at byte {pos}, before its data does (damaged: shard "
                         f"it again)")


def _tar_members(data: memoryview, url: str) -> list[tuple[str, memoryview]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = [(m.name, data[m.offset_data : m.offset_data + m.size]) for m in tar.getmembers() if m.isreg()]
            _check_end(data, tar.offset, url)
            return members
    except tarfile.TarError as exc:
        raise InputError(f"read {url}: not a readable tar shard ({exc})") from None


def shard_samples(data, url: str = "<memory>") -> list[ShardSample]:
    """A shard's samples in stored order, from its bytes (any buffer); each image is a view into them, so a sample
    no view asks for costs its headers' reading only. Members are grouped into samples by webdataset's rule."""
    from webdataset.tariterators import group_by_keys  # imports torch: readers only

    data = memoryview(data).cast("B").toreadonly()  # workers share a fed shard's memory: none may write it
    members = _plain_members(data, url)
    members = _tar_members(data, url) if members is None else members
    try:
        return [_record(rec, url) for rec in group_by_keys({"fname": name, "data": body, "__url__": url}
                                                           for name, body in members)]
    except ValueError as exc:  # webdataset's grouping: a member name twice in a sample
        raise InputError(f"read {url}: {exc}") from None


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


def read_shard(url: str) -> list[ShardSample]:
    """A committed shard's samples in stored (idx) order; a shard on a local disk is mapped, not read."""
    with _listed(url):
        return shard_samples(map_bytes(url), url)
