"""`deit-pipe shard SRC DEST`: an ImageFolder becomes WebDataset tar shards and one manifest per split.

Per split (DESIGN invariant 1): list the image files sorted by (class, relative path); scan every file
(keep, convert or reject, with the reason) in scan units of S files; shuffle the accepted files with a
generator seeded from (seed, split), so the sample with idx j is accepted[perm[j]]; write shard s, the
ids [s*S, min((s+1)*S, N)), to a temporary key and commit it; once every shard is committed, rank 0
writes the manifest.

Scan units and shard commit markers live under DEST/<split>/_work/ beside a plan (the arguments and
the source listing). Ranks take units round-robin and meet at file barriers; workers are local
processes. What is committed is never redone, and everything is a function of the plan alone, so the
output is byte-identical whatever the number of workers or ranks, and a killed run rerun with the same
arguments finishes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import posixpath
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from deit_pipe.data.images import (
    DEFAULT_JPEG_QUALITY,
    DEFAULT_MAX_PIXELS,
    REJECT,
    Inspection,
    inspect_image,
    is_image_name,
    prepare_image,
)
from deit_pipe.distributed.context import RankContext
from deit_pipe.errors import InputError
from deit_pipe.storage.location import check_writable, discard_partial, join, put_atomic, resolve, wait_for
from deit_pipe.storage.manifest import ShardManifest, shard_name, shard_url, split_url
from deit_pipe.storage.shards import ShardInfo, ShardSample, safe_key, write_shard

SPLITS = ("train", "val")
PLAN_VERSION = 1


@dataclass(frozen=True)
class ShardOptions:
    """Everything the output bytes depend on (workers and ranks are deliberately not here)."""

    samples_per_shard: int = 1000
    seed: int = 0
    max_side: int = 0
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class SplitSource:
    """One split folder: its URL, the class names that give labels, and its image files."""

    split: str
    url: str
    classes: list[str]
    files: list[str]  # relative to the split folder, sorted by (class, relative path)
    sizes: list[int]
    ignored: dict[str, int]  # deliberately skipped: hidden, non_image, outside_class


@dataclass
class SplitReport:
    manifest: ShardManifest
    shards_written: int  # by this rank in this run; the others were committed before or by other ranks


# ---------------------------------------------------------------------------------------------- SRC


def _subfolders(fs, path: str) -> list[str]:
    return sorted(
        posixpath.basename(e["name"].rstrip("/"))
        for e in fs.ls(path, detail=True)
        if e["type"] == "directory" and not posixpath.basename(e["name"].rstrip("/")).startswith(".")
    )


def _list_split(split: str, url: str, classes: list[str]) -> SplitSource:
    fs, root = resolve(url)
    ignored = Counter({"hidden": 0, "non_image": 0, "outside_class": 0})
    files = []
    for path, info in fs.find(root, withdirs=False, detail=True).items():
        rel = path[len(root) :].lstrip("/")
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):
            ignored["hidden"] += 1
        elif len(parts) == 1:
            ignored["outside_class"] += 1
        elif not is_image_name(parts[-1]):
            ignored["non_image"] += 1
        else:
            files.append((parts[0], rel, int(info["size"])))
    files.sort()
    if not files:
        raise InputError(f"no image files in the class folders of {url}")
    return SplitSource(split, url, classes, [f[1] for f in files], [f[2] for f in files], dict(ignored))


def find_splits(src: str) -> list[SplitSource]:
    """SRC's splits: train/ and/or val/ under it, or SRC itself as one split named after its folder."""
    fs, path = resolve(src)
    if not fs.isdir(path):
        raise InputError(f"SRC {src} does not exist or is not a folder")
    children = _subfolders(fs, path)
    if any(s in children for s in SPLITS):
        folders = {s: join(src, s) for s in SPLITS if s in children}
    else:
        folders = {posixpath.basename(path.rstrip("/")): src}
    classes = {}
    for split, url in folders.items():
        classes[split] = _subfolders(*resolve(url))
        if not classes[split]:
            raise InputError(f"no class folders in {url} (expected <class>/<image> as in ImageNet)")
    if "train" in classes and "val" in classes:
        extra = sorted(set(classes["val"]) - set(classes["train"]))
        if extra:
            raise InputError(
                f"{len(extra)} class folder(s) in val but not in train (first: {extra[0]}): labels would not match"
            )
    # val takes train's labels so that class index c means the same class in both splits.
    labels = classes.get("train")
    return [_list_split(s, url, labels or classes[s]) for s, url in folders.items()]


# ------------------------------------------------------------------------------------ work layout


def _work_url(dest: str, split: str, *parts: str) -> str:
    return join(split_url(dest, split), "_work", *parts)


def _scan_unit_url(dest: str, split: str, u: int) -> str:
    return _work_url(dest, split, "scan", f"{u:06d}.json")


def _marker_url(dest: str, split: str, s: int) -> str:
    return _work_url(dest, split, "shards", f"{shard_name(split, s)}.json")


def _to_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _plan(source: SplitSource, options: ShardOptions) -> dict:
    listing = hashlib.sha256(_to_json([source.files, source.sizes])).hexdigest()
    return {
        "version": PLAN_VERSION,
        "split": source.split,
        "classes": source.classes,
        "options": asdict(options),
        "num_files": len(source.files),
        "files_sha256": listing,
    }


def _differences(old: dict, new: dict) -> list[str]:
    diffs = [f"{k} {old['options'].get(k)} -> {v}" for k, v in new["options"].items() if old["options"].get(k) != v]
    if old["classes"] != new["classes"]:
        diffs.append("class folders")
    if (old["num_files"], old["files_sha256"]) != (new["num_files"], new["files_sha256"]):
        diffs.append(f"source files ({old['num_files']} -> {new['num_files']} files, or their names/sizes)")
    return diffs or [f"plan format {old.get('version')} -> {new['version']}"]


def _agree_on_plan(dest: str, source: SplitSource, options: ShardOptions, ctx: RankContext) -> None:
    """Bind DEST/<split> to these arguments and this SRC listing, so a rerun never mixes two runs."""
    url = _work_url(dest, source.split, "plan.json")
    plan = _plan(source, options)
    fs, path = resolve(url)
    if ctx.is_main and not fs.exists(path):
        put_atomic(url, _to_json(plan))
    wait_for([url], "rank 0's plan", poll=0.2)
    old = json.loads(fs.cat_file(path))
    if old != plan:
        raise InputError(
            f"{split_url(dest, source.split)} was written with other arguments or another SRC "
            f"({'; '.join(_differences(old, plan))}): rerun with the same arguments, or use a new DEST"
        )


def _existing(urls: list[str]) -> set[str]:
    """Which of `urls` (all in one folder) exist, with one listing instead of one request each."""
    if not urls:
        return set()
    fs, folder = resolve(posixpath.dirname(urls[0]))
    fs.invalidate_cache()
    present = {posixpath.basename(p) for p in fs.find(folder)}
    return {u for u in urls if posixpath.basename(u) in present}


def _read_json(urls: list[str]) -> list:
    if not urls:
        return []
    fs, _ = resolve(urls[0])
    paths = [resolve(u)[1] for u in urls]
    contents = fs.cat(paths)  # concurrent on object stores
    return [json.loads(contents[p]) for p in paths]


# ----------------------------------------------------------------------------- units (in workers)


def _read_files(split_url_: str, relpaths: list[str]) -> list[bytes]:
    fs, root = resolve(split_url_)
    paths = [f"{root}/{rel}" for rel in relpaths]
    contents = fs.cat(paths)  # concurrent on object stores; I/O errors fail the run (a rerun resumes)
    return [contents[p] for p in paths]


@dataclass(frozen=True)
class ScanUnit:
    split_url: str
    relpaths: list[str]
    max_pixels: int
    url: str


def scan_unit(unit: ScanUnit) -> int:
    """Inspect each file of the unit and commit the verdicts as one JSON list, in file order."""
    verdicts = [
        {"path": rel, **asdict(inspect_image(data, rel, unit.max_pixels))}
        for rel, data in zip(unit.relpaths, _read_files(unit.split_url, unit.relpaths), strict=True)
    ]
    discard_partial(unit.url)
    put_atomic(unit.url, _to_json(verdicts))
    return len(verdicts)


@dataclass(frozen=True)
class ShardEntry:
    relpath: str
    idx: int
    label: int
    inspection: Inspection


@dataclass(frozen=True)
class ShardUnit:
    split_url: str
    name: str
    url: str
    marker_url: str
    entries: list[ShardEntry]  # in idx order
    max_side: int
    jpeg_quality: int


def write_shard_unit(unit: ShardUnit) -> int:
    """Write one shard, then its commit marker (its ShardInfo): no marker, not done."""
    contents = _read_files(unit.split_url, [e.relpath for e in unit.entries])
    samples = []
    for e, data in zip(unit.entries, contents, strict=True):
        try:
            image, ext = prepare_image(data, e.inspection, unit.max_side, unit.jpeg_quality)
        except Exception as exc:  # the scan passed this file, so its bytes changed since
            raise InputError(
                f"{e.relpath} changed after it was scanned ({type(exc).__name__}); rerun in a new DEST") from exc
        samples.append(ShardSample(key=safe_key(e.relpath), idx=e.idx, label=e.label, image=image, ext=ext))
    discard_partial(unit.url)
    info = write_shard(unit.url, unit.name, samples)
    discard_partial(unit.marker_url)
    put_atomic(unit.marker_url, _to_json(asdict(info)))
    return len(samples)


def _run_units(fn: Callable, units: list, workers: int, bar: tqdm) -> None:
    """Run units in `workers` local processes (forkserver: no fork of a process with s3fs threads)."""
    if workers <= 1 or len(units) <= 1:
        for n in map(fn, units):
            bar.update(n)
        return
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload([__name__])
    with mp.Pool(min(workers, len(units))) as pool:
        for n in pool.imap_unordered(fn, units):
            bar.update(n)


def _bar(desc: str, total: int) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------------------------ split


@dataclass(frozen=True)
class SplitPlan:
    """What a split's shards hold, fixed once its files are scanned: idx -> source file."""

    source: SplitSource
    verdicts: list[dict]  # one per source file, in file order
    accepted: list[int]  # indices into source.files of the files kept, in file order
    perm: np.ndarray  # idx -> position in `accepted` (the seeded shuffle)

    @classmethod
    def of(cls, source: SplitSource, verdicts: list[dict], seed: int) -> SplitPlan:
        accepted = [i for i, v in enumerate(verdicts) if v["action"] != REJECT]
        return cls(source, verdicts, accepted, _permutation(seed, source.split, len(accepted)))


def _scan(dest: str, source: SplitSource, options: ShardOptions, ctx: RankContext, workers: int) -> list[dict]:
    size = options.samples_per_shard
    urls = [_scan_unit_url(dest, source.split, u) for u in range(math.ceil(len(source.files) / size))]
    committed = _existing(urls)
    todo = [
        ScanUnit(source.url, source.files[u * size : (u + 1) * size], options.max_pixels, urls[u])
        for u in ctx.my_units(list(range(len(urls))))
        if urls[u] not in committed
    ]
    with _bar(f"{source.split} scan", sum(len(u.relpaths) for u in todo)) as bar:
        _run_units(scan_unit, todo, workers, bar)
    wait_for(urls, f"{source.split} scan units of the other ranks", poll=0.2)
    verdicts = [v for unit in _read_json(urls) for v in unit]
    if [v["path"] for v in verdicts] != source.files:
        raise InputError(f"scan results under {_work_url(dest, source.split)} do not match SRC: use a new DEST")
    return verdicts


def _permutation(seed: int, split: str, n: int) -> np.ndarray:
    # crc32, not hash(): the split's contribution to the seed must not change between processes.
    return np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(n)


def _markers(dest: str, planned: SplitPlan, options: ShardOptions) -> list[str]:
    num_shards = math.ceil(len(planned.accepted) / options.samples_per_shard)
    return [_marker_url(dest, planned.source.split, s) for s in range(num_shards)]


def _write(dest: str, planned: SplitPlan, options: ShardOptions, ctx: RankContext, workers: int) -> int:
    """Writes this rank's uncommitted shards; returns how many."""
    source, size, n = planned.source, options.samples_per_shard, len(planned.accepted)
    markers = _markers(dest, planned, options)
    committed = _existing(markers)
    labels = {c: i for i, c in enumerate(source.classes)}
    todo = []
    for s in ctx.my_units(list(range(len(markers)))):
        if markers[s] in committed:
            continue
        entries = []
        for idx in range(s * size, min((s + 1) * size, n)):
            i = planned.accepted[planned.perm[idx]]
            v = planned.verdicts[i]
            inspection = Inspection(v["action"], v["reason"], v["ext"])
            entries.append(ShardEntry(source.files[i], idx, labels[source.files[i].split("/")[0]], inspection))
        todo.append(
            ShardUnit(
                source.url, shard_name(source.split, s), shard_url(dest, source.split, s), markers[s],
                entries, options.max_side, options.jpeg_quality,
            )
        )
    with _bar(f"{source.split} write", sum(len(u.entries) for u in todo)) as bar:
        _run_units(write_shard_unit, todo, workers, bar)
    return len(todo)


def _plan_and_write(
    dest: str, source: SplitSource, options: ShardOptions, ctx: RankContext, workers: int
) -> tuple[SplitPlan, int]:
    """The split's plan and the number of shards this rank wrote."""
    _agree_on_plan(dest, source, options, ctx)
    planned = SplitPlan.of(source, _scan(dest, source, options, ctx, workers), options.seed)
    return planned, _write(dest, planned, options, ctx, workers)


def _manifest(dest: str, planned: SplitPlan, options: ShardOptions) -> ShardManifest:
    source, verdicts = planned.source, planned.verdicts
    markers = _markers(dest, planned, options)
    wait_for(markers, f"{source.split} shards of the other ranks", poll=0.5)
    return ShardManifest(
        split=source.split,
        classes=source.classes,
        num_samples=len(planned.accepted),
        samples_per_shard=options.samples_per_shard,
        seed=options.seed,
        shards=[ShardInfo(**info) for info in _read_json(markers)],
        rejected=[{"path": v["path"], "reason": v["reason"]} for v in verdicts if v["action"] == REJECT],
        # Kept files with a reason (a PNG named .JPEG stored as .png) are listed with the conversions.
        converted=[{"path": v["path"], "reason": v["reason"]}
                   for v in verdicts if v["action"] != REJECT and v["reason"]],
        ignored=source.ignored,
        options={k: v for k, v in asdict(options).items() if k not in ("samples_per_shard", "seed")},
    )


def run(
    src: str, dest: str, options: ShardOptions, workers: int = 1, ctx: RankContext | None = None
) -> list[SplitReport]:
    """Shard every split of SRC into DEST; rank 0 writes each manifest after all its shards are committed."""
    ctx = ctx or RankContext.from_env()
    sources = find_splits(src)
    check_writable(dest)
    if "memory" in resolve(dest)[0].protocol:
        workers = 1  # a memory:// filesystem lives in one process: worker processes would write elsewhere
    # Every split's shards first, then the barriers: a rank never idles on one split while another waits.
    written = [_plan_and_write(dest, source, options, ctx, workers) for source in sources]
    reports = []
    for plan, shards_written in written:
        manifest = _manifest(dest, plan, options)
        if ctx.is_main:
            manifest.save(dest)
        reports.append(SplitReport(manifest, shards_written))
    return reports


def _by_reason(entries: list[dict]) -> str:
    counts = Counter(e["reason"].split(":")[0] for e in entries)
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))


def summary(report: SplitReport) -> Iterator[str]:
    """The closing summary of one split, a few lines of text."""
    m = report.manifest
    total_bytes = sum(s.bytes for s in m.shards)
    yield (
        f"{m.split}: {m.num_samples} samples in {m.num_shards} shards ({total_bytes / 1e6:.1f} MB; "
        f"{report.shards_written} written by this run), {len(m.classes)} classes"
    )
    yield f"  rejected {len(m.rejected)}" + (f": {_by_reason(m.rejected)}" if m.rejected else "")
    yield f"  converted {len(m.converted)}" + (f": {_by_reason(m.converted)}" if m.converted else "")
    ignored = ", ".join(f"{k} {v}" for k, v in sorted(m.ignored.items()) if v)
    yield f"  ignored {sum(m.ignored.values())}" + (f": {ignored}" if ignored else "")


def default_workers() -> int:
    return len(os.sched_getaffinity(0))
