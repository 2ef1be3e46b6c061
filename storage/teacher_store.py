"""The teacher store: a Zarr v3 group per split at any fsspec URL (DESIGN invariant 3).

    <store>/<split>/            group; attributes bind it to shards, recipe, teacher, k, views
        logits   (N, V, k) f16  top-k teacher logits, descending
        classes  (N, V, k) u16  their class indices (i32 past 65535 classes)
        tail_lse (N, V)    f32  log-sum-exp of the logits outside the top-k: their mass, exactly
        code     (N, V, r) i8   the whole logit vector's coordinates in the code basis, in steps (r > 0)
        code_mean   (C,)   f32  the code: logits ~ code_mean + (code * code_steps) @ code_basis, fitted
        code_basis  (r, C) f32  once per store on the teacher's logits; attrs["code"] says how,
        code_steps  (r,)   f32  attrs["code_error"] what it costs in KL at each temperature
        partner  (N, V)    i32  replay record: the mixing partner's idx
        lam      (N, V)    f32  replay record: the weight of the sample's own label
        digest   (N, V)    u32  digest of the view's pixels: replay drift shows without the teacher
        _commits/layout         the layout is complete (arrays and attributes written)
        _commits/layout-<V>     the layout holds V views (the barrier ranks wait on)
        _commits/<shard>-<v>    a unit is written only once its marker exists
        _lease/                 the launch writing this split (storage.lease): one at a time

Chunks are (S, 1, ...): one chunk = one image shard x one view = one write unit = one writer, so two
writers never share an object, and views appended later land in new chunks (only metadata changes).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from deit_pipe.errors import InputError
from deit_pipe.storage.location import join, resolve, storage_errors
from deit_pipe.storage.manifest import ShardManifest
from deit_pipe.storage.work_queue import CommitMarkers

# 3: the view digest named in the provenance (2's are blake2b); 2: the logit code (1 kept a flat tail)
STORE_VERSION = 3
GROWABLE_VERSIONS = (2, 3)  # a store of these versions takes more views as it is (a 2 keeps its blake2b digests)
LAYOUT_MARKER = "layout"
LIST_TRIES = 5  # listings of a store other ranks are writing, before a vanished file is an error
_UNIT_MARKER = re.compile(r"(\d+)-(\d+)")
# Fields that must match between a store and the run that reads or extends it, in the order checked.
CODE_ARRAYS = ("code_mean", "code_basis", "code_steps")
BINDING_FIELDS = ("format_version", "split", "manifest_digest", "num_samples", "samples_per_shard",
                  "recipe_hash", "teacher", "num_classes", "k", "code")


def store_binding(manifest: ShardManifest, recipe_hash: str, teacher: dict, num_classes: int, k: int,
                  code: dict) -> dict:
    """The attributes that tie a store to its shards, view recipe, teacher and logit code."""
    return {
        "format_version": STORE_VERSION,
        "split": manifest.split,
        "manifest_digest": manifest.digest,
        "num_samples": manifest.num_samples,
        "samples_per_shard": manifest.samples_per_shard,
        "recipe_hash": recipe_hash,
        "teacher": teacher,
        "num_classes": num_classes,
        "k": k,
        "code": code,
    }


@dataclass(frozen=True)
class ViewRecord:
    """Everything stored for a run of views (one unit or a slice of one): arrays of equal length n."""

    logits: np.ndarray  # [n, k] float16
    classes: np.ndarray  # [n, k]
    tail_lse: np.ndarray  # [n] float32
    code: np.ndarray  # [n, r] int8
    partner: np.ndarray  # [n] int32
    lam: np.ndarray  # [n] float32
    digest: np.ndarray  # [n] uint32


def _arrays(attrs: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-view arrays: name -> (shape after (N, V), dtype)."""
    k, num_classes, rank = attrs["k"], attrs["num_classes"], attrs["code"]["rank"]
    cls_dtype = "uint16" if num_classes <= np.iinfo(np.uint16).max else "int32"
    code = {"code": ((rank,), "int8")} if rank else {}  # zarr wants no empty axis
    return {
        "logits": ((k,), "float16"),
        "classes": ((k,), cls_dtype),
        "tail_lse": ((), "float32"),
        **code,
        "partner": ((), "int32"),
        "lam": ((), "float32"),
        "digest": ((), "uint32"),
    }


class TeacherStore:
    def __init__(self, url: str, split: str, group: zarr.Group):
        self.url = url
        self.split = split
        self.group = group
        self.commits = self._commits(url, split)
        self._opened: dict[str, zarr.Array] = {}  # each array's metadata read once per handle, not once per unit

    # -- opening -----------------------------------------------------------------------------------

    @staticmethod
    def _group_url(url: str, split: str) -> str:
        return join(url, split)

    @classmethod
    def open(cls, url: str, split: str, writable: bool = False) -> TeacherStore:
        group_url = cls._group_url(url, split)
        if not cls.exists(url, split):
            raise InputError(f"no teacher store for split '{split}' at {url} (run `deit-pipe teacher-logits`)")
        with storage_errors("open", group_url):
            return cls(url, split, zarr.open_group(group_url, mode="r+" if writable else "r"))

    @classmethod
    def exists(cls, url: str, split: str) -> bool:
        """Whether a complete layout is there (a layout cut short by a crash does not count)."""
        return cls._commits(url, split).is_committed(LAYOUT_MARKER)

    @classmethod
    def create(cls, url: str, split: str, binding: dict, num_views: int, provenance: dict,
               code: tuple[np.ndarray, np.ndarray, np.ndarray], code_error: dict) -> TeacherStore:
        """Lay out an empty store with its logit code (rank 0 of the launch holding the split's lease does this;
        the other ranks wait in `wait_layout`). The group is opened, never wiped: only the arrays of a layout cut
        short, which no unit was committed to, are written over."""
        n, spc = binding["num_samples"], binding["samples_per_shard"]
        group_url = cls._group_url(url, split)
        with storage_errors("lay out", group_url):
            group = zarr.open_group(group_url, mode="a")
            for name, (tail, dtype) in _arrays(binding).items():
                # Small integer codes compress best unshuffled; floats and wide ints with bit shuffling.
                shuffle = "noshuffle" if dtype == "int8" else "bitshuffle"
                group.create_array(
                    name, shape=(n, num_views, *tail), chunks=(spc, 1, *tail), dtype=dtype, fill_value=0,
                    compressors=[BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)], overwrite=True,
                )
            for name, values in zip(CODE_ARRAYS, code, strict=True):
                if values.size:  # zarr wants no empty axis: a code of rank 0 has only its mean
                    group.create_array(name, data=values.astype(np.float32), overwrite=True)
            group.attrs.update({**binding, "num_views": num_views, "provenance": provenance,
                                "code_error": code_error})
        store = cls(url, split, group)
        store._mark_layout()
        store.commits.commit(LAYOUT_MARKER)
        return store

    # -- binding ------------------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def num_views(self) -> int:
        return int(self.group.attrs["num_views"])

    @property
    def k(self) -> int:
        return int(self.group.attrs["k"])

    def code_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(code_mean [C], code_basis [r, C], code_steps [r]) as written at layout."""
        with storage_errors("read", f"{self.url} (the logit code)"):
            mean = self.group["code_mean"][:]
            if not self.group.attrs["code"]["rank"]:
                return mean, np.zeros((0, len(mean)), np.float32), np.zeros(0, np.float32)
            return mean, self.group["code_basis"][:], self.group["code_steps"][:]

    def check_binding(self, expected: dict, recipe: dict | None = None) -> None:
        """Refuse a store made for other shards/recipe/teacher, naming the first field that differs
        (a dotted path into nested fields; for the recipe hash, the recipe setting behind it)."""
        attrs = self.attrs
        stored_recipe = attrs.get("provenance", {}).get("recipe", {})
        for field in BINDING_FIELDS:
            if field not in expected:
                continue
            if field == "recipe_hash" and recipe and stored_recipe and attrs.get(field) != expected[field]:
                diff = next(_differences(stored_recipe, recipe, "recipe"), None)
                if diff is not None:
                    raise self._mismatch(*diff)
            diff = next(_differences(attrs.get(field), expected[field], field), None)
            if diff is not None:
                raise self._mismatch(*diff)

    def _mismatch(self, field: str, stored, here) -> InputError:
        return InputError(
            f"teacher store {self.url} does not match: {field} is {_short(stored)} in the store but {_short(here)} here"
        )

    def append_views(self, num_views: int) -> None:
        """Grow the view axis: existing chunks are untouched, new views land in new chunks."""
        if num_views <= self.num_views:
            return
        # Cut short, the rerun finds the old view count in the attributes and grows every array again.
        with storage_errors("add views to", self._group_url(self.url, self.split)):
            for name in _arrays(self.attrs):
                arr = self._array(name)
                arr.resize((arr.shape[0], num_views, *arr.shape[2:]))
            self.group.attrs["num_views"] = num_views
        self._mark_layout()

    # -- commit markers -----------------------------------------------------------------------------

    @classmethod
    def _commits(cls, url: str, split: str) -> CommitMarkers:
        return CommitMarkers(join(cls._group_url(url, split), "_commits"))

    def _mark_layout(self) -> None:
        self.commits.commit(f"layout-{self.num_views}")

    @classmethod
    def wait_layout(cls, url: str, split: str, num_views: int) -> TeacherStore:
        """The barrier for ranks other than the one that lays out or grows the store."""
        cls._commits(url, split).wait([f"layout-{num_views}"], f"the teacher store layout ({num_views} views) at {url}")
        return cls.open(url, split, writable=True)

    def is_committed(self, shard: int, v: int) -> bool:
        return self.commits.is_committed(_unit_name(shard, v))

    def committed_units(self) -> set[tuple[int, int]]:
        # Unit markers only, not the layout markers.
        return {(int(m[1]), int(m[2])) for m in map(_UNIT_MARKER.fullmatch, self.commits.committed()) if m}

    # -- units --------------------------------------------------------------------------------------

    def _array(self, name: str) -> zarr.Array:
        if name not in self._opened:
            self._opened[name] = self.group[name]
        return self._opened[name]

    def _rows(self, shard: int) -> slice:
        spc = int(self.group.attrs["samples_per_shard"])
        return slice(shard * spc, min((shard + 1) * spc, int(self.group.attrs["num_samples"])))

    def write_unit(self, shard: int, v: int, record: ViewRecord) -> None:
        """Write one whole chunk per array, then the commit marker (a unit without it is redone)."""
        rows = self._rows(shard)
        with storage_errors("write", f"{self.url} (shard {shard}, view {v})"):
            arrays = {name: self._array(name) for name in _arrays(self.attrs)}
            _at_once([array.async_array.setitem((rows, v), getattr(record, name)) for name, array in arrays.items()])
        self.commits.commit(_unit_name(shard, v))

    def read_unit(self, shard: int, v: int) -> ViewRecord:
        if not self.is_committed(shard, v):
            raise InputError(f"teacher store {self.url}: shard {shard} view {v} is not committed")
        rows = self._rows(shard)
        with storage_errors("read", f"{self.url} (shard {shard}, view {v})"):
            opened = {name: self._array(name) for name in _arrays(self.attrs)}
            arrays = dict(zip(opened, _at_once([array.async_array.getitem((rows, v)) for array in opened.values()]),
                              strict=True))
        arrays.setdefault("code", np.zeros((rows.stop - rows.start, 0), np.int8))
        return ViewRecord(**arrays)

    def nbytes_stored(self) -> int:
        """Bytes of every object of this split's store: chunks, metadata and markers, as listed now."""
        url = self._group_url(self.url, self.split)
        fs, path = resolve(url)
        with storage_errors("list", url):
            for attempt in range(LIST_TRIES):
                fs.invalidate_cache()
                try:
                    return int(fs.du(path, total=True))
                except FileNotFoundError:
                    # Other ranks still write: zarr's temporary file of a chunk was renamed between the listing and
                    # its size (local stores); list again.
                    if attempt == LIST_TRIES - 1:
                        raise


def _at_once(calls: list[Awaitable]) -> list:
    """The results of a unit's array calls (the arrays opened before: an open is itself a sync call), run at once
    on zarr's own event loop, where its stores live: on object storage a unit's 6-7 chunk GETs or PUTs then
    overlap rather than queue, and locally one round trip to the loop serves them all. Every call ends before
    the first error is raised: none is left running or unawaited."""
    async def gathered():
        return await asyncio.gather(*calls, return_exceptions=True)

    results = sync(gathered())
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _unit_name(shard: int, v: int) -> str:
    return f"{shard:06d}-{v:05d}"


def _differences(stored, here, field: str):
    """(dotted field, stored value, value here) for each leaf where two JSON-like values differ."""
    if isinstance(stored, dict) and isinstance(here, dict):
        for key in here:
            yield from _differences(stored.get(key), here[key], f"{field}.{key}")
    elif stored != here:
        yield field, stored, here


def _short(value) -> str:
    """Hashes cut to 12 characters: the message stays one readable line."""
    if isinstance(value, str) and len(value) > 16:
        return repr(value[:12] + "...")
    return repr(value)
