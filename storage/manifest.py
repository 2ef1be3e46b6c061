"""The per-split manifest: written last, after every shard is committed (DESIGN invariant 1).

Layout under a shard root URL:
    <root>/<split>/manifest.json
    <root>/<split>/<split>-000000.tar ...
Shard s holds ids [s*S, min((s+1)*S, N)).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from deit_pipe.errors import InputError
from deit_pipe.storage.location import exists, join, put_atomic, read_bytes
from deit_pipe.storage.shards import ShardInfo

MANIFEST_VERSION = 1


def split_url(root: str, split: str) -> str:
    return join(root, split)


def manifest_url(root: str, split: str) -> str:
    return join(root, split, "manifest.json")


def shard_name(split: str, s: int) -> str:
    return f"{split}-{s:06d}.tar"


def shard_url(root: str, split: str, s: int) -> str:
    return join(root, split, shard_name(split, s))


@dataclass
class ShardManifest:
    split: str
    classes: list[str]
    num_samples: int
    samples_per_shard: int
    seed: int
    shards: list[ShardInfo]
    rejected: list[dict] = field(default_factory=list)  # {"path", "reason"}
    converted: list[dict] = field(default_factory=list)  # {"path", "reason"}
    ignored: dict = field(default_factory=dict)  # {"hidden": n, "non_image": n}
    options: dict = field(default_factory=dict)  # how the bytes were produced (max_side, quality, ...)
    digest: str = ""

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_range(self, s: int) -> range:
        start = s * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.num_samples))

    def shard_of(self, idx: int) -> int:
        return idx // self.samples_per_shard

    def compute_digest(self) -> str:
        """Changes whenever any sample's bytes, key or label changes: those all live in the shard bytes."""
        h = hashlib.sha256()
        h.update(json.dumps([self.split, self.classes, self.num_samples, self.samples_per_shard]).encode())
        for info in self.shards:
            h.update(info.sha256.encode())
        return h.hexdigest()

    def to_json(self) -> bytes:
        d = asdict(self)
        d["format_version"] = MANIFEST_VERSION
        return (json.dumps(d, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> ShardManifest:
        d = json.loads(data)
        d.pop("format_version", None)
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**d)

    def save(self, root: str) -> None:
        self.digest = self.compute_digest()
        put_atomic(manifest_url(root, self.split), self.to_json())

    @classmethod
    def load(cls, root: str, split: str) -> ShardManifest:
        url = manifest_url(root, split)
        if not exists(url):
            raise InputError(f"no manifest for split '{split}' at {url} (run `deit-pipe shard` first)")
        return cls.from_json(read_bytes(url))
