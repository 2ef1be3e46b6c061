"""`deit-pipe shard SRC DEST`: an ImageFolder becomes WebDataset tar shards and one manifest per split.

Per split (DESIGN invariant 1): list the image files sorted by (class, relative path) (data.image_folder);
scan every file (keep, convert or reject, with the reason) in scan units of S files; shuffle the accepted
files in an order seeded from (seed, split) and recorded, so the sample with idx j is accepted[order[j]];
write shard s, the ids [s*S, min((s+1)*S, N)), to a temporary key and commit it; once every shard is
committed, rank 0 writes the manifest.

The split's work folder, DEST/<split>/_work/ (storage.work_queue), holds the plan it is bound to (the
arguments and the source listing), the scan units' and shards' commit markers, and the recorded order. Ranks
take units round-robin and meet at the markers; workers are local processes. What is committed is never
redone, and everything is a function of the plan alone, so the output is byte-identical whatever the number
of workers or ranks, and a killed run rerun with the same arguments finishes only what is missing, in the
order it started with, whatever library it runs under now.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing import forkserver

from tqdm import tqdm

from deit_pipe.data.image_folder import SplitSource, find_splits
from deit_pipe.data.images import (
    DEFAULT_JPEG_QUALITY,
    DEFAULT_MAX_PIXELS,
    REJECT,
    Inspection,
    inspect_image,
    prepare_image,
)
from deit_pipe.data.rng import permutation
from deit_pipe.distributed.context import RankContext
from deit_pipe.errors import InputError
from deit_pipe.storage.lease import launch_lease
from deit_pipe.storage.location import check_writable, discard_partial, join, read_files, resolve, storage_errors
from deit_pipe.storage.manifest import ShardManifest, shard_name, shard_url, split_url
from deit_pipe.storage.shards import ShardInfo, ShardSample, safe_key, write_shard
from deit_pipe.storage.work_queue import CommitMarkers, bind_plan, to_json

PLAN_VERSION = 2  # 2: the sample order comes from data.rng and is recorded in the work folder


@dataclass(frozen=True)
class ShardOptions:
    """Everything the output bytes depend on (workers and ranks are deliberately not here)."""

    samples_per_shard: int = 1000
    seed: int = 0
    max_side: int = 0
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class SplitReport:
    manifest: ShardManifest
    shards_written: int  # by this rank in this run; the others were committed before or by other ranks


class SplitWork:
    """A split's work folder: its plan, scan and shard commit markers, and the recorded sample order."""

    def __init__(self, dest: str, split: str):
        self.dest, self.split = dest, split
        self.url = join(split_url(dest, split), "_work")
        self.scans = CommitMarkers(join(self.url, "scan"))
        self.shards = CommitMarkers(join(self.url, "shards"))

    @staticmethod
    def scan_marker(u: int) -> str:
        return f"{u:06d}.json"

    def shard_marker(self, s: int) -> str:
        return f"{shard_name(self.split, s)}.json"


@dataclass(frozen=True)
class Verdict:
    """A source file and what the scan made of it."""

    path: str  # relative to the split folder
    inspection: Inspection

    def to_json(self) -> dict:
        # Field by field: dataclasses.asdict copies recursively, a visible part of the scan per file.
        i = self.inspection
        return {"path": self.path, "action": i.action, "reason": i.reason, "ext": i.ext}

    @classmethod
    def of_json(cls, d: dict) -> Verdict:
        return cls(d["path"], Inspection(d["action"], d["reason"], d["ext"]))


@dataclass(frozen=True)
class SplitPlan:
    """What a split's shards hold, fixed once its files are scanned: idx -> source file."""

    source: SplitSource
    verdicts: list[Verdict]  # one per source file, in file order
    accepted: list[int]  # indices into source.files of the files kept, in file order
    order: list[int]  # idx -> position in `accepted` (the seeded shuffle, as recorded)

    def num_shards(self, options: ShardOptions) -> int:
        return math.ceil(len(self.accepted) / options.samples_per_shard)

    def file_of(self, idx: int) -> int:
        return self.accepted[self.order[idx]]


# ----------------------------------------------------------------------------- units (in workers)


# A file itself that cannot be read (missing, no permission, a folder, a symlink loop): by its errno, which a
# local filesystem gives; an object store's translated errors (expired credentials, 5xx) carry none, so they
# fail the run, which a rerun resumes, instead of rejecting files for good.
_UNREADABLE = {errno.ENOENT, errno.EACCES, errno.EISDIR, errno.ELOOP}


def _read_files(split_url_: str, relpaths: list[str], unreadable: bool = False) -> list[bytes | Exception]:
    """The files' bytes; with `unreadable`, a file that cannot be read gives its error in its place."""
    with storage_errors("read", split_url_):
        contents = read_files(split_url_, relpaths)
    for rel, data in zip(relpaths, contents, strict=True):
        if isinstance(data, Exception) and not (unreadable and getattr(data, "errno", None) in _UNREADABLE):
            with storage_errors("read", f"{split_url_}/{rel}"):
                raise data
    return contents


@dataclass(frozen=True)
class ScanUnit:
    split_url: str
    relpaths: list[str]
    max_pixels: int
    markers: CommitMarkers
    name: str


def scan_unit(unit: ScanUnit) -> int:
    """Inspect each file of the unit and commit the verdicts as one JSON list, in file order."""
    verdicts = [
        Verdict(rel, inspect_image(data, rel, unit.max_pixels) if isinstance(data, bytes) else
                Inspection(REJECT, f"unreadable: {type(data).__name__}: {data.strerror}")).to_json()
        for rel, data in zip(unit.relpaths, _read_files(unit.split_url, unit.relpaths, unreadable=True), strict=True)
    ]
    unit.markers.commit(unit.name, to_json(verdicts))
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
    markers: CommitMarkers
    marker: str
    entries: list[ShardEntry]  # in idx order
    max_side: int
    jpeg_quality: int
    max_pixels: int


def write_shard_unit(unit: ShardUnit) -> int:
    """Write one shard, then its commit marker (its ShardInfo): no marker, not done."""
    contents = _read_files(unit.split_url, [e.relpath for e in unit.entries])
    samples = []
    for e, data in zip(unit.entries, contents, strict=True):
        try:
            image, ext = prepare_image(data, e.inspection, unit.max_side, unit.jpeg_quality)
        except Exception as exc:
            # The user's doing only if the file no longer passes the scan it passed; else deit-pipe's own bug.
            if inspect_image(data, e.relpath, unit.max_pixels) == e.inspection:
                raise
            raise InputError(
                f"{e.relpath} changed after it was scanned ({type(exc).__name__}); rerun in a new DEST") from exc
        samples.append(ShardSample(key=safe_key(e.relpath), idx=e.idx, label=e.label, image=image, ext=ext))
    discard_partial(unit.url)  # a killed write's temporary file
    info = write_shard(unit.url, unit.name, samples)
    unit.markers.commit(unit.marker, to_json(asdict(info)))
    return len(samples)


class _WorkerPool:
    """Local worker processes (forkserver: no fork of a process with s3fs threads), started when a step first has
    two units for them and kept for the rest of the run: a pool costs a process start, imports and the main
    module's re-import per worker, which every scan and write step paid again (most of a small run)."""

    def __init__(self, count: int):
        self.count, self._processes = count, None
        self._context = multiprocessing.get_context("forkserver")

    def __enter__(self) -> _WorkerPool:
        if self.count > 1:
            # The fork server imports this module while this process lists SRC: its workers start ready.
            self._context.set_forkserver_preload([__name__])
            forkserver.ensure_running()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._processes is not None:
            self._processes.terminate()
            self._processes = None

    def run(self, fn: Callable, units: list, bar: tqdm) -> None:
        """fn(unit) for every unit; each returns the images it did, which advance the bar."""
        if self.count <= 1 or len(units) <= 1:
            for n in map(fn, units):
                bar.update(n)
            return
        if self._processes is None:
            self._processes = self._context.Pool(self.count)
        try:
            for n in self._processes.imap_unordered(fn, units):
                bar.update(n)
        except BaseException:
            self.stop()  # no worker goes on with a unit while the caller cleans up after the failure
            raise


def _bar(desc: str, total: int) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------------------------ split


def _bind(work: SplitWork, source: SplitSource, options: ShardOptions, ctx: RankContext) -> None:
    """Bind the work folder to these arguments and this SRC listing, so a rerun never mixes two runs."""
    plan = {
        "version": PLAN_VERSION,
        "split": source.split,
        "classes": source.classes,
        "options": asdict(options),
        "num_files": len(source.files),
        "files_sha256": hashlib.sha256(to_json([source.files, source.sizes])).hexdigest(),
    }
    old = bind_plan(join(work.url, "plan.json"), plan, ctx.is_main)
    if old != plan:
        raise InputError(
            f"{split_url(work.dest, work.split)} was written with other arguments or another SRC "
            f"({'; '.join(_differences(old, plan))}): rerun with the same arguments, or use a new DEST"
        )


def _differences(old: dict, new: dict) -> list[str]:
    if old.get("version") != new["version"]:
        return [f"plan format {old.get('version')} -> {new['version']}"]
    diffs = [f"{k} {old['options'].get(k)} -> {v}" for k, v in new["options"].items() if old["options"].get(k) != v]
    if old["classes"] != new["classes"]:
        diffs.append("class folders")
    if (old["num_files"], old["files_sha256"]) != (new["num_files"], new["files_sha256"]):
        diffs.append(f"source files ({old['num_files']} -> {new['num_files']} files, or their names/sizes)")
    return diffs


def _scan(work: SplitWork, source: SplitSource, options: ShardOptions, ctx: RankContext,
          pool: _WorkerPool) -> list[Verdict]:
    size = options.samples_per_shard
    names = [work.scan_marker(u) for u in range(math.ceil(len(source.files) / size))]
    committed = work.scans.committed()
    todo = [
        ScanUnit(source.url, source.files[u * size : (u + 1) * size], options.max_pixels, work.scans, names[u])
        for u in ctx.my_units(list(range(len(names))))
        if names[u] not in committed
    ]
    with _bar(f"{source.split} scan", sum(len(u.relpaths) for u in todo)) as bar:
        pool.run(scan_unit, todo, bar)
    work.scans.wait(names, f"{source.split} scan units of the other ranks", poll=0.2)
    verdicts = [Verdict.of_json(v) for unit in work.scans.read(names) for v in json.loads(unit)]
    if [v.path for v in verdicts] != source.files:
        raise InputError(f"scan results under {work.url} do not match SRC: use a new DEST")
    return verdicts


def _order(work: SplitWork, n: int, seed: int, ctx: RankContext) -> list[int]:
    """The split's sample order: drawn once, by rank 0, and read back from the work folder ever after."""
    order = bind_plan(join(work.url, "order.json"), permutation(n, "samples", seed, work.split).tolist(),
                      ctx.is_main)
    if sorted(order) != list(range(n)):
        raise InputError(f"the sample order under {work.url} is not one of {n} files: use a new DEST")
    return order


def _plan(work: SplitWork, source: SplitSource, options: ShardOptions, ctx: RankContext,
          pool: _WorkerPool) -> SplitPlan:
    _bind(work, source, options, ctx)
    verdicts = _scan(work, source, options, ctx, pool)
    accepted = [i for i, v in enumerate(verdicts) if v.inspection.action != REJECT]
    return SplitPlan(source, verdicts, accepted, _order(work, len(accepted), options.seed, ctx))


def _write(work: SplitWork, plan: SplitPlan, options: ShardOptions, ctx: RankContext, pool: _WorkerPool) -> int:
    """Writes this rank's uncommitted shards; returns how many."""
    source, size, n = plan.source, options.samples_per_shard, len(plan.accepted)
    committed = work.shards.committed()
    labels = {c: i for i, c in enumerate(source.classes)}
    todo = []
    for s in ctx.my_units(list(range(plan.num_shards(options)))):
        if work.shard_marker(s) in committed:
            continue
        entries = []
        for idx in range(s * size, min((s + 1) * size, n)):
            verdict = plan.verdicts[plan.file_of(idx)]
            entries.append(ShardEntry(verdict.path, idx, labels[verdict.path.split("/")[0]], verdict.inspection))
        todo.append(ShardUnit(source.url, shard_name(source.split, s), shard_url(work.dest, source.split, s),
                              work.shards, work.shard_marker(s), entries, options.max_side, options.jpeg_quality,
                              options.max_pixels))
    try:
        with _bar(f"{source.split} write", sum(len(u.entries) for u in todo)) as bar:
            pool.run(write_shard_unit, todo, bar)
    except BaseException:
        for unit in todo:  # writes the failure cut short (other workers' too): no temporary file stays behind
            with contextlib.suppress(OSError):  # the disk may be what failed: the original error is the news
                discard_partial(unit.url)
                discard_partial(unit.markers.marker(unit.marker))
        raise
    return len(todo)


def _manifest(work: SplitWork, plan: SplitPlan, options: ShardOptions) -> ShardManifest:
    names = [work.shard_marker(s) for s in range(plan.num_shards(options))]
    work.shards.wait(names, f"{work.split} shards of the other ranks", poll=0.5)
    kept = [v for v in plan.verdicts if v.inspection.action != REJECT]
    return ShardManifest(
        split=work.split,
        classes=plan.source.classes,
        num_samples=len(plan.accepted),
        samples_per_shard=options.samples_per_shard,
        seed=options.seed,
        shards=[ShardInfo(**json.loads(info)) for info in work.shards.read(names)],
        rejected=[{"path": v.path, "reason": v.inspection.reason}
                  for v in plan.verdicts if v.inspection.action == REJECT],
        # Kept files with a reason (a PNG named .JPEG stored as .png) are listed with the conversions.
        converted=[{"path": v.path, "reason": v.inspection.reason} for v in kept if v.inspection.reason],
        ignored=plan.source.ignored,
        options={k: v for k, v in asdict(options).items() if k not in ("samples_per_shard", "seed")},
    )


def run(
    src: str, dest: str, options: ShardOptions, workers: int = 1, ctx: RankContext | None = None
) -> list[SplitReport]:
    """Shard every split of SRC into DEST; rank 0 writes each manifest after all its shards are committed."""
    ctx = ctx or RankContext.from_env()
    if "memory" in resolve(dest)[0].protocol:
        workers = 1  # a memory:// filesystem lives in one process: worker processes would write elsewhere
    with _WorkerPool(workers) as pool:
        sources = find_splits(src)
        check_writable(dest)
        # One launch at a time writes DEST: a double-submitted job refuses here, before it plans or writes.
        with launch_lease(dest, f"the shards {dest}", ctx.is_main, ctx.launch):
            # Every split's shards first, then the barriers: a rank never idles on one split while another waits.
            written = []
            for source in sources:
                work = SplitWork(dest, source.split)
                plan = _plan(work, source, options, ctx, pool)
                written.append((work, plan, _write(work, plan, options, ctx, pool)))
            reports = []
            for work, plan, shards_written in written:
                manifest = _manifest(work, plan, options)
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
